"""The training scripts end to end at toy length: VAE, transformer (new, --init, --resume), export.

This is what someone retraining the embedded model runs (docs/training.md), shrunk to a few
optimiser steps: it checks that the scripts work together and that the exported folder loads
with diffusers and with the engine, not that the weights are any good (~45 s on one core).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run(script: str, *args) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], capture_output=True,
                          text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_vae_transformer_init_resume_export_then_load(tmp_path):
    vae = tmp_path / "vae"
    run("train_vae.py", "--out", vae, "--steps", 2, "--batch", 1, "--frames", 5, "--crop", 32, "--threads", 1,
        "--eval-clips", 1, "--stat-clips", 2, "--log", tmp_path / "vae.csv")
    ck = vae / "last.pt"
    out = run("eval_vae.py", ck, "--frames", 5, "--clips", 2, "--solid", "--threads", 1)
    solid_rows = [line for line in out.splitlines() if line.startswith("| ") and line.count("|") == 5
                  and "colour" not in line and "---" not in line]
    assert "Solid object pixels within the colour radius" in out and solid_rows  # one row per colour / background
    common = ["--vae", ck, "--batch", 2, "--pool-clips", 2, "--pool-frames", 17, "--eval-every-min", 0, "--threads", 1]
    out = run("train_transformer.py", "--out", tmp_path / "df", "--steps", 2, "--log", tmp_path / "df.csv", *common)
    assert "saved" in out and "at step 2" in out
    out = run("train_transformer.py", "--init", tmp_path / "df" / "last.pt", "--out", tmp_path / "df2", "--steps", 2,
              "--log", tmp_path / "df2.csv", *common)
    assert "initialised from the EMA weights" in out
    out = run("train_transformer.py", "--resume", "--out", tmp_path / "df2", "--steps", 3, "--log", tmp_path / "df2.csv",
              *common)
    assert "resumed at step 2" in out and "at step 3" in out
    model = tmp_path / "model"
    run("export_model.py", "--vae", ck, "--df", tmp_path / "df2" / "last.pt", "--out", model)

    defaults = json.loads((model / "arvideo.json").read_text())
    assert defaults["trained_steps"] == 2 + 3  # the --init run's steps count too
    assert defaults["kv_pool_width"] == 15 and defaults["kv_policy"] == "scored"
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(model)
    assert pipe.transformer.config.in_channels == pipe.vae.config.z_dim

    from arvideo.config import build_config
    from arvideo.engine import Engine

    engine = Engine.from_folder(model)
    frames = engine.generate(build_config(prompt="a small red circle on a black background", frames=7,
                                          overrides=["sampler.steps=2"]))
    assert frames.shape == (7, 64, 64, 3) and frames.dtype == np.uint8

    # An exported folder is a starting point too (how v5 continued the shipped weights): its weights
    # come back exactly as the EMA they were exported from, and the training behind them is counted.
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from _train_common import checkpoint_from_folder

    folder_ck = checkpoint_from_folder(model)
    ema = torch.load(tmp_path / "df2" / "last.pt", map_location="cpu", weights_only=False)["ema"]["shadow"]
    assert folder_ck["ema"]["shadow"].keys() == ema.keys()
    assert all(torch.equal(folder_ck["ema"]["shadow"][k], ema[k].float()) for k in ema)
    assert folder_ck["step"] == 5
    out = run("train_transformer.py", "--vae", model, "--init", model, "--out", tmp_path / "df3", "--steps", 1,
              "--batch", 2, "--pool-clips", 2, "--pool-frames", 17, "--pool-workers", 1, "--pool-refresh", 1,
              "--eval-every-min", 0,
              "--threads", 1, "--log", tmp_path / "df3.csv")
    assert f"initialised from the EMA weights of {model}" in out
    run("export_model.py", "--vae", model, "--df", tmp_path / "df3" / "last.pt", "--out", tmp_path / "model3")
    assert json.loads((tmp_path / "model3" / "arvideo.json").read_text())["trained_steps"] == 5 + 1


def test_pool_rendered_by_worker_processes_equals_the_single_process_pool():
    import torch
    from diffusers import AutoencoderKLWan

    module = _load_script("train_transformer")
    sys.path.insert(0, str(ROOT / "scripts"))
    from _train_common import VAE_CONFIG

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**VAE_CONFIG, latents_mean=[0.0] * 16, latents_std=[1.0] * 16).eval()
    one = module.build_pool(vae, num_clips=5, frames=9, seed=3, batch=2)
    many = module.build_pool(vae, num_clips=5, frames=9, seed=3, batch=2, workers=2)
    assert one["captions"] == many["captions"] and len(one["captions"]) == 5
    assert torch.equal(one["latents"], many["latents"]) and torch.equal(one["masks"], many["masks"])
    rebatched = module.build_pool(vae, num_clips=5, frames=9, seed=3, batch=3, workers=2)
    assert rebatched["captions"] == one["captions"] and torch.equal(rebatched["masks"], one["masks"])
    torch.testing.assert_close(rebatched["latents"], one["latents"], rtol=0, atol=1e-3)  # fp16; VAE batch size only
    other = module.build_pool(vae, num_clips=5, frames=9, seed=4, batch=2)
    assert not torch.equal(one["latents"], other["latents"])  # the seed, not the batching, picks the clips


def test_pool_refresh_overwrites_the_oldest_clips_with_new_ones_and_their_captions():
    import torch
    from diffusers import AutoencoderKLWan

    module = _load_script("train_transformer")
    from _train_common import MAX_SEQUENCE_LENGTH, VAE_CONFIG, build_tokenizer, tokenize

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**VAE_CONFIG, latents_mean=[0.0] * 16, latents_std=[1.0] * 16).eval()
    pool = module.build_pool(vae, num_clips=3, frames=9, seed=3, batch=2)
    tokenizer = build_tokenizer()
    ids, mask = tokenize(tokenizer, pool["captions"], MAX_SEQUENCE_LENGTH)
    tensors = dict(latents=pool["latents"].clone(), masks=pool["masks"].clone(), ids=ids.clone(), mask=mask.clone())
    tf, sf = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    jobs = list(module.pool_jobs(np.random.SeedSequence([9, 1, 0]), 2, 9, tf, sf, num_clips=4))
    expected = [module.render_clips(job) for job in jobs]
    encode = module.LatentEncoder(vae, "cpu")
    refresher = module.PoolRefresher(module.Renderer(iter(jobs), workers=1), encode, tokenizer, tensors)
    assert refresher.poll(block=True) == 2  # slots 0 and 1, the oldest
    assert refresher.poll(block=True) == 2  # slot 2, then around to slot 0
    assert refresher.poll(block=True) == 0 and refresher.replaced == 4  # the jobs are exhausted
    refresher.renderer.close()
    caps = expected[0][1] + expected[1][1]  # the clips of slots 0, 1, 2, 0 in order
    for slot, clip in ((1, 1), (2, 2), (0, 3)):
        batch, k = divmod(clip, 2)
        torch.testing.assert_close(tensors["latents"][slot], encode(expected[batch][0])[k], rtol=0, atol=1e-3)
        assert torch.equal(tensors["masks"][slot], expected[batch][2][k])
        want_ids, want_mask = tokenize(tokenizer, [caps[clip]], MAX_SEQUENCE_LENGTH)
        assert torch.equal(tensors["ids"][slot], want_ids[0]) and torch.equal(tensors["mask"][slot], want_mask[0])
    assert not torch.equal(tensors["latents"], pool["latents"])
    again = [module.render_clips(job)[1] for job in module.pool_jobs(np.random.SeedSequence([9, 1, 0]), 2, 9, tf, sf,
                                                                     num_clips=4)]
    assert again[0] + again[1] == caps  # the stream is fixed by its seed; another step gives other clips
    other = next(module.pool_jobs(np.random.SeedSequence([9, 1, 5]), 2, 9, tf, sf))
    assert other[0] != jobs[0][0]


def _load_script(name: str):
    import importlib.util

    sys.path.insert(0, str(ROOT / "scripts"))  # the scripts import their sibling _train_common
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # worker processes find functions by module name when pickling them
    spec.loader.exec_module(module)
    return module


def test_vae_palette_hinge_counts_only_solid_pixels_beyond_the_margin():
    import torch

    tv = _load_script("train_vae")
    x, w, solid = tv.sample_batch(np.random.default_rng(0), 2, 5, 1000, 2000, crop=64)
    assert x.shape[2:] == solid.shape[2:] and solid.shape[1] == 1
    # solid = exactly the background or a captioned object's colour: the anti-aliased edges are not
    frac = solid.mean().item()
    assert 0.5 < frac < 1.0
    torch.manual_seed(0)
    vae = tv.build_vae()
    vae.eval()

    def hinge(offset_rgb: float, margin: float) -> float:
        # a decoder that returns the input shifted by offset_rgb (0-255 units) in one channel
        vae_forward = tv.decode_unclamped
        tv.decode_unclamped = lambda _vae, _z: x + torch.tensor([offset_rgb / 127.5, 0, 0]).view(1, 3, 1, 1, 1)
        try:
            _, parts = tv.vae_loss(vae, x, w, 0.0, solid=solid, palette_weight=1.0, palette_margin=margin)
        finally:
            tv.decode_unclamped = vae_forward
        return parts["palette"]

    assert hinge(10.0, 12.0) == 0.0  # within the margin: nothing to push
    assert abs(hinge(30.0, 12.0) - 18.0 / 127.5) < 1e-4  # 18 units beyond it, on every solid pixel
    _, parts = tv.vae_loss(vae, x, w, 0.0)
    assert "palette" not in parts  # off by default (the runs before it are reproducible)
