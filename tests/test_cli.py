"""`arvideo generate` and `arvideo info` end to end on the tiny model folder."""
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from arvideo.cli import main, parse_args
from tests.tiny import save_tiny_model_folder

CAPTION = "a large blue square on a gray background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


def mp4_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_generate_npy_and_mp4_hold_the_requested_frames(folder, tmp_path):
    npy, mp4 = tmp_path / "v.npy", tmp_path / "v.mp4"
    assert main(["generate", CAPTION, "--model", str(folder), "--frames", "9", "--out", str(npy), "--quiet"]) == 0
    video = np.load(npy)
    assert video.shape == (9, 32, 32, 3) and video.dtype == np.uint8
    assert main(["generate", CAPTION, "--model", str(folder), "--frames", "9", "--out", str(mp4), "--quiet"]) == 0
    decoded = mp4_frames(mp4)
    assert decoded.shape == (9, 32, 32, 3)
    # same request, same seed: the mp4 is the npy through H.264 (CRF 18 on random-model frames: a few levels)
    assert np.abs(decoded.astype(int) - video).mean() < 20
    assert not (tmp_path / "v.npy.arvideo-state").exists() and not (tmp_path / "v.mp4.arvideo-state").exists()


def test_unparseable_prompt_exits_2_naming_the_word_and_writes_nothing(folder, tmp_path, capsys):
    out = tmp_path / "bad.mp4"
    code = main(["generate", "a large blu square on a gray background", "--model", str(folder), "--frames", "9",
                 "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "'blu'" in err
    assert "frames:" not in err  # checked before the progress bar starts
    assert not out.exists()


def test_overrides_may_follow_options(folder, tmp_path):
    args = parse_args(["generate", CAPTION, "--frames", "9", "schedule.ar_step=1", "--out", "x.npy", "kv.commit=clean"])
    assert args.overrides == ["schedule.ar_step=1", "kv.commit=clean"] and args.out == ["x.npy"]
    assert args.frames == 9 and args.prompt == CAPTION


def test_png_preview_keeps_the_newest_frame(folder, tmp_path):
    import imageio.v3 as iio

    npy, png = tmp_path / "v.npy", tmp_path / "latest.png"
    assert main(["generate", CAPTION, "--model", str(folder), "--frames", "9", "--out", str(npy), "--preview", str(png),
                 "--quiet"]) == 0
    assert np.array_equal(iio.imread(png), np.load(npy)[-1])


def test_info_prints_every_component(folder, capsys):
    assert main(["info", str(folder)]) == 0
    text = capsys.readouterr().out
    for component in ("transformer/", "vae/", "text_encoder/", "tokenizer/", "scheduler/"):
        assert component in text
    assert "num_layers=2" in text and "z_dim=4" in text


def test_console_script_generates_in_a_real_process(folder, tmp_path):
    script = Path(sys.executable).with_name("arvideo")
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter (pip install -e .)")
    out = tmp_path / "sub.npy"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(script), "generate", CAPTION, "--model", str(folder), "--frames", "9", "--out", str(out),
                           "--quiet"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert np.load(out).shape == (9, 32, 32, 3)


def test_python_dash_m_generate_writes_stats_with_the_whole_process_peak(folder, tmp_path):
    import json

    out, stats = tmp_path / "m.npy", tmp_path / "stats.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "arvideo", "generate", CAPTION, "--model", str(folder), "--frames", "9",
                           "--out", str(out), "--stats", str(stats), "--quiet"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(stats.read_text())
    assert got["frames"] == 9 and got["model_calls"] > 0 and got["seconds"] > 0
    # a process that imported torch and ran a model: well over 50 MiB, under this machine's memory
    assert 50 * 2**20 < got["peak_memory_bytes"] < 24 * 2**30
    assert np.load(out).shape == (9, 32, 32, 3)


def test_peak_bytes_reads_the_high_water_mark_without_resetting_it():
    """`generate --stats` reports peak_bytes(): it must keep a peak that is long gone, not the current RSS."""
    from arvideo.memory import peak_bytes, process_resident_bytes

    before = process_resident_bytes()
    if before == 0:
        pytest.skip("no /proc here")
    block = np.ones(200 * 2**20, dtype=np.uint8)  # touched: 200 MiB resident
    del block
    assert peak_bytes("cpu") >= before + 190 * 2**20
    assert peak_bytes("cpu") >= before + 190 * 2**20  # reading it twice does not reset it


def test_generate_with_sections_reports_where_each_prompt_starts(folder, tmp_path):
    npy, stats = tmp_path / "s.npy", tmp_path / "s.json"
    two = "a small red circle on a navy background"
    assert main(["generate", CAPTION, "--model", str(folder), "--frames", "25", "--section", "12", two,
                 "--out", str(npy), "--stats", str(stats), "--quiet", "--no-state"]) == 0
    import json

    # tiny model: chunks of 4 frames after the first 3, so frame 12 snaps to the boundary at 15
    assert json.loads(stats.read_text())["sections"] == [{"frame": 0, "prompt": CAPTION}, {"frame": 15, "prompt": two}]
    assert np.load(npy).shape[0] == 25


def test_a_section_may_start_in_seconds(folder, tmp_path):
    npy, stats = tmp_path / "s.npy", tmp_path / "s.json"
    two = "a small red circle on a navy background"
    # the tiny model's folder says 16 fps: 0.75 s = frame 12, which snaps to the boundary at 15
    assert main(["generate", CAPTION, "--model", str(folder), "--frames", "25", "--section", "0.75s", two,
                 "--out", str(npy), "--stats", str(stats), "--quiet", "--no-state"]) == 0
    import json

    assert json.loads(stats.read_text())["sections"][1] == {"frame": 15, "prompt": two}


@pytest.mark.parametrize("section, message", [(["x", "a small red circle on a navy background"], "frame number"),
                                              (["12", "a small purple circle on a navy background"], "'purple'"),
                                              (["30", "a small red circle on a navy background"], "before the video ends")])
def test_a_bad_section_exits_2_and_writes_nothing(folder, tmp_path, capsys, section, message):
    out = tmp_path / "bad.mp4"
    code = main(["generate", CAPTION, "--model", str(folder), "--frames", "25", "--section", *section,
                 "--out", str(out), "--quiet"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
