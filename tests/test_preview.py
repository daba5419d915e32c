"""Live previews: the latent->RGB projection, the preview files, and the page served over HTTP."""
import json
import urllib.error
import urllib.request

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from arvideo.cli import main
from arvideo.config import build_config
from arvideo.engine import Engine, FrameChunk, StepEvent
from arvideo.model import load_model
from arvideo.preview import LatentProjection, PreviewServer, PreviewWriter, collect_status
from tests.tiny import save_tiny_model_folder

CAPTION = "a large blue square on a gray background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


def test_projection_recovers_a_linear_latent_to_rgb_map():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=gen) * 0.04  # small enough that no pixel clips
    bias = torch.tensor([0.5, 0.4, 0.6])
    latents = torch.randn(1, 4, 3, 8, 8, generator=gen)
    rgb = torch.einsum("cfhw,cd->fhwd", latents[0], weight) + bias  # [3, 8, 8, 3] in 0..1
    assert 0 < rgb.min() and rgb.max() < 1
    # frames at 4x resolution; the first latent frame decodes to 1 frame, the others to 2 (temporal factor 2)
    pixels = rgb.repeat_interleave(4, 1).repeat_interleave(4, 2)
    frames = torch.cat([pixels[:1], pixels[1:].repeat_interleave(2, 0)])
    proj = LatentProjection(4)
    proj.observe(latents, (frames * 255).round().numpy().astype(np.uint8), first_frame_included=True, temporal=2)
    # uint8 rounding is the only error: within half a level, plus the ridge term
    assert torch.allclose(proj.weight[:4].float(), weight, atol=2e-3)
    assert torch.allclose(proj.weight[4].float(), bias, atol=2e-3)
    image = proj(latents)
    assert image.shape == (8, 3 * 8, 3) and image.dtype == np.uint8


def test_projection_fitted_on_finished_chunks_matches_their_colours_better_than_the_prior(folder):
    engine = Engine(load_model(folder))
    chunks = list(engine.stream(build_config(prompt=CAPTION, frames=17, overrides=["schedule.ar_step=1"])))
    proj = LatentProjection.from_vae(engine.model.vae)

    def error(p: LatentProjection) -> float:
        """Mean abs error (levels) against each chunk's frames, one per latent frame, pooled to latent size."""
        total = []
        for c in chunks[1:]:  # chunks after the first: every latent frame decodes to 2 frames
            predicted = p(c.latents).reshape(8, -1, 8, 3).transpose(1, 0, 2, 3)  # [f, h, w, 3]
            pairs = c.frames[: 2 * len(predicted)].reshape(-1, 2, 8, 4, 8, 4, 3).mean((1, 3, 5))
            total.append(np.abs(predicted[: len(pairs)].astype(float) - pairs).mean())
        return float(np.mean(total))

    prior = error(proj)
    for c in chunks:
        proj.observe(c.latents, c.frames, first_frame_included=c.start == 0, temporal=2)
    # the tiny VAE has random weights, so no linear map is good; least squares still must beat the prior
    assert error(proj) < 0.9 * prior, (error(proj), prior)  # measured: 10.2 vs 12.4 levels


def test_writer_keeps_in_flight_chunks_latest_frame_and_status(tmp_path):
    proj = LatentProjection(4)
    writer = PreviewWriter(tmp_path, name="clip", total_frames=9, steps=3, projection=proj, temporal_factor=2,
                           interval=0.0)
    x0 = torch.zeros(1, 4, 2, 8, 8)
    writer.on_step(StepEvent(0, [(0, 0, x0), (1, 0, x0)], 1))
    status = json.loads((tmp_path / "status.json").read_text())
    assert [c["index"] for c in status["chunks"]] == [0, 1] and status["chunks"][0]["step"] == 1
    assert iio.imread(tmp_path / "chunk_00000.png").shape == (8, 16, 3)  # 2 latent frames side by side
    frames = np.full((3, 32, 32, 3), 200, np.uint8)
    writer.on_chunk(FrameChunk(0, 0, frames, torch.zeros(1, 4, 2, 8, 8)))
    status = json.loads((tmp_path / "status.json").read_text())
    assert [c["index"] for c in status["chunks"]] == [1] and not (tmp_path / "chunk_00000.png").exists()
    assert status["frames_done"] == 3 and status["latest"] == "latest.png"
    assert np.array_equal(iio.imread(tmp_path / "latest.png"), frames[-1])
    writer.finish(True)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["state"] == "done" and status["chunks"] == [] and not list(tmp_path.glob("chunk_*.png"))


def test_generate_with_preview_dir_ends_with_a_done_status(folder, tmp_path):
    preview, out = tmp_path / "preview", tmp_path / "v.npy"
    assert main(["generate", CAPTION, "--model", str(folder), "--frames", "17", "--out", str(out),
                 "--preview", str(preview), "--quiet", "schedule.ar_step=1"]) == 0
    (status,) = collect_status(preview)
    assert (status["state"], status["frames_done"], status["frames_total"]) == ("done", 17, 17)
    assert np.array_equal(iio.imread(preview / "latest.png"), np.load(out)[-1])


def test_server_serves_the_page_status_and_images_over_http(tmp_path):
    job = tmp_path / "clip"
    writer = PreviewWriter(job, name="clip", total_frames=9, steps=3, projection=LatentProjection(4),
                           temporal_factor=2, interval=0.0)
    writer.on_step(StepEvent(0, [(2, 1, torch.zeros(1, 4, 2, 8, 8))], 1))
    with PreviewServer(tmp_path, port=0) as server:
        assert server.url.startswith("http://127.0.0.1:")

        def get(path: str) -> tuple[int, bytes, str]:
            try:
                with urllib.request.urlopen(server.url.rstrip("/") + path, timeout=10) as r:
                    return r.status, r.read(), r.headers["Content-Type"]
            except urllib.error.HTTPError as exc:
                return exc.code, b"", ""

        code, page, kind = get("/")
        assert code == 200 and kind.startswith("text/html") and b"arvideo" in page and b"/api/status" in page
        code, body, _ = get("/api/status")
        (status,) = json.loads(body)["jobs"]
        assert status["path"] == "clip/" and status["chunks"][0]["image"] == "chunk_00002.png"
        code, png, kind = get("/files/clip/chunk_00002.png?v=3")
        assert code == 200 and kind == "image/png" and png == (job / "chunk_00002.png").read_bytes()
        assert get("/files/../../etc/passwd")[0] == 404
        assert get("/files/clip/missing.png")[0] == 404
