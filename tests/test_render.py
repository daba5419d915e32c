"""`arvideo render`: validation, failure isolation, crash-safe resume, memory planning, Ray."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from arvideo.cli import main
from arvideo.config import build_config
from arvideo.engine import Engine
from arvideo.errors import ConfigError
from arvideo.memory import MemoryEstimate, PeakMeter, format_size, parse_size, plan_batch
from arvideo.model import load_model
from arvideo.render import load_jobs, render_local, run_job
from tests.tiny import save_tiny_model_folder

REPO = Path(__file__).resolve().parents[1]
BLUE = "a large blue square on a gray background"
RED = "a small red circle on a black background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


def write_jobs(path: Path, jobs: list[dict]) -> Path:
    path.write_text(yaml.safe_dump(jobs))
    return path


def mp4_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)


def reference(folder, **request) -> np.ndarray:
    overrides = request.pop("overrides", [])
    return Engine(load_model(folder)).generate(build_config(overrides=overrides, **request))


# -- validation -----------------------------------------------------------------------------------
def test_unknown_job_key_is_an_error_listing_valid_keys(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"prompt": BLUE, "out": "a.mp4"}, {"promt": BLUE, "out": "b.mp4"}])
    with pytest.raises(ConfigError, match=r"job 2: unknown key 'promt'; valid keys: name, out, model, .*prompt"):
        load_jobs(jobs)


def test_job_settings_nested_dotted_and_aliases_reach_the_config(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.yaml", [
        {"prompt": BLUE, "frames": 9, "seed": 4, "out": ["x.mp4", "x.npy"], "steps": 5, "guidance": 1.0,
         "schedule": "pipelined", "kv": {"policy": "window", "budget_frames": 4}, "sampler.shift": 2.0},
    ])
    (job,) = load_jobs(jobs, out_dir=tmp_path / "o", overrides=["seed=9", "height=64"])
    assert (job.cfg.frames, job.cfg.seed, job.cfg.height) == (9, 4, 64)  # the job's seed wins over the CLI's
    assert (job.cfg.sampler.steps, job.cfg.sampler.shift, job.cfg.guidance_scale) == (5, 2.0, 1.0)
    assert (job.cfg.schedule.name, job.cfg.kv.policy, job.cfg.kv.budget_frames) == ("pipelined", "window", 4)
    assert job.outputs == [tmp_path / "o" / "x.mp4", tmp_path / "o" / "x.npy"] and job.name == "x"
    assert not job.kv_default


def test_every_job_is_validated_before_any_runs(folder, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.yaml", [
        {"prompt": BLUE, "frames": 5, "out": "ok.npy"},
        {"prompt": BLUE, "frames": 5, "out": "bad.npy", "height": 33},
    ])
    assert main(["render", str(jobs), "--model", str(folder), "--out-dir", str(tmp_path), "--quiet"]) == 2
    assert "job 2 (bad): height and width must be multiples of 8" in capsys.readouterr().err
    assert not (tmp_path / "ok.npy").exists()
    jobs = write_jobs(tmp_path / "dup.yaml", [{"prompt": BLUE, "out": "a.npy"}, {"prompt": RED, "out": "a.npy"}])
    with pytest.raises(ConfigError, match="also written by"):
        load_jobs(jobs)


def test_a_job_may_change_its_prompt_in_sections(folder, tmp_path, capsys):
    sections = [{"frame": 12, "prompt": RED}]
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"prompt": BLUE, "frames": 25, "seed": 1, "out": "s.npy",
                                                "sections": sections}])
    assert main(["render", str(jobs), "--model", str(folder), "--out-dir", str(tmp_path), "--quiet"]) == 0
    assert np.array_equal(np.load(tmp_path / "s.npy"),
                          reference(folder, prompt=BLUE, frames=25, seed=1, sections=sections))
    bad = write_jobs(tmp_path / "bad.yaml", [{"prompt": BLUE, "frames": 25, "out": "ok.npy"},
                                             {"prompt": BLUE, "frames": 25, "out": "b.npy",
                                              "sections": [{"frame": 40, "prompt": RED}]}])
    assert main(["render", str(bad), "--model", str(folder), "--out-dir", str(tmp_path), "--quiet"]) == 2
    assert "job 2 (b): sections[0] (frame 40)" in capsys.readouterr().err
    assert not (tmp_path / "ok.npy").exists()


# -- failure isolation ----------------------------------------------------------------------------------
def test_batch_with_a_bad_prompt_and_a_missing_model_finishes_the_rest_and_exits_1(folder, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.yaml", [
        {"prompt": BLUE, "frames": 9, "seed": 1, "out": ["blue.mp4", "blue.npy"]},
        {"prompt": "a large blu square on a gray background", "frames": 9, "seed": 2, "out": ["typo.mp4", "typo.npy"]},
        {"prompt": RED, "frames": 9, "seed": 3, "out": "red.npy"},
        {"prompt": RED, "frames": 9, "seed": 3, "out": "nomodel.mp4", "model": str(tmp_path / "missing")},
    ])
    code = main(["render", str(jobs), "--model", str(folder), "--out-dir", str(tmp_path), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    assert np.array_equal(np.load(tmp_path / "blue.npy"), reference(folder, prompt=BLUE, frames=9, seed=1))
    assert len(mp4_frames(tmp_path / "blue.mp4")) == 9
    assert np.array_equal(np.load(tmp_path / "red.npy"), reference(folder, prompt=RED, frames=9, seed=3))
    written = sorted(p.name for p in tmp_path.iterdir() if p.suffix in (".mp4", ".npy"))
    assert written == ["blue.mp4", "blue.npy", "red.npy"]
    assert "4 jobs: 2 done, 2 failed" in out
    assert "failed: typo: PromptError" in out and "'blu'" in out
    assert "failed: nomodel: ModelFolderError" in out and "does not exist" in out


def test_job_failing_mid_run_leaves_only_its_partial_mp4(folder, tmp_path, monkeypatch):
    from arvideo.backbones.wan_family import WanFamilyBackbone

    jobs = load_jobs(write_jobs(tmp_path / "jobs.yaml", [
        {"prompt": BLUE, "frames": 41, "out": ["nan.mp4", "nan.npy", "nan.gif", "nanframes/"],
         "schedule.ar_step": 1}]), out_dir=tmp_path)
    original, calls = WanFamilyBackbone.__call__, [0]

    def poisoned(self, *args, **kwargs):
        calls[0] += 1
        v = original(self, *args, **kwargs)
        return v * float("nan") if calls[0] == 12 else v

    monkeypatch.setattr(WanFamilyBackbone, "__call__", poisoned)
    result = run_job(jobs[0], Engine(load_model(folder)))
    assert not result.ok and result.error_type == "NonFiniteError" and 0 < result.frames < 41
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jobs.yaml", "nan.partial.mp4"]
    assert len(mp4_frames(tmp_path / "nan.partial.mp4")) == result.frames  # playable, every frame written
    assert result.left == [str(tmp_path / "nan.partial.mp4")]


# -- resume -------------------------------------------------------------------------------------------
def test_render_killed_with_sigkill_resumes_to_the_uninterrupted_frames(folder, tmp_path):
    frames, request = 49, {"prompt": BLUE, "frames": 49, "seed": 7}
    jobs = write_jobs(tmp_path / "jobs.yaml", [{**request, "out": ["v.mp4", "v.npy"], "schedule.ar_step": 1}])
    kill_after = random.Random(7).randint(9, 21)  # frames in the partial npy when the kill lands (of 49)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "arvideo.cli", "render", str(jobs), "--model", str(folder),
                             "--out-dir", str(tmp_path), "--quiet"], env=env, stderr=subprocess.PIPE)
    partial, state = tmp_path / "v.partial.npy", tmp_path / "v.mp4.arvideo-state"
    held, deadline = 0, time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and partial.exists():
            try:
                held = np.load(partial, mmap_mode="r").shape[0]
            except ValueError:
                held = 0
            if held >= kill_after:
                break
        time.sleep(0.005)
    assert proc.poll() is None, f"render ended before the kill: {proc.stderr.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = mp4_frames(tmp_path / "v.mp4")
    assert len(killed) >= held - 1 > 0  # the killed mp4 plays: every frame written but the newest
    from arvideo.state import RunState

    emitted = RunState.load(state).emitted_frames  # where the resumed run continues
    assert not (tmp_path / "v.npy").exists()  # not complete, so not under its final name

    assert main(["render", str(jobs), "--model", str(folder), "--out-dir", str(tmp_path), "--quiet"]) == 2
    assert main(["render", str(jobs), "--model", str(folder), "--out-dir", str(tmp_path), "--quiet", "--resume"]) == 0
    expected = reference(folder, overrides=["schedule.ar_step=1"], **request)
    assert np.array_equal(np.load(tmp_path / "v.npy"), expected)  # bit-identical on CPU
    resumed = mp4_frames(tmp_path / "v.mp4")
    assert resumed.shape == (frames, 32, 32, 3)
    # frames before the cut were re-muxed, not re-encoded: identical to the killed file's
    # (the newest frame may be missing from the killed mp4: the state's last chunk supplies it)
    cut = min(emitted, len(killed))
    assert cut > 0 and np.array_equal(resumed[:cut], killed[:cut])
    # the rest went through one more H.264 encode start (a keyframe); error as for an uninterrupted file
    from arvideo.sinks import Mp4Sink

    with Mp4Sink(tmp_path / "straight.mp4", 16) as sink:
        sink.write(expected)
    straight = np.abs(mp4_frames(tmp_path / "straight.mp4").astype(int) - expected).mean()
    assert np.abs(resumed.astype(int) - expected).mean() < straight + 1.0
    assert not state.exists() and not (tmp_path / "v.partial.npy").exists()


def test_generate_interrupted_resumes_and_refuses_a_different_request(folder, tmp_path, monkeypatch, capsys):
    from arvideo.sinks import NpySink

    npy, mp4 = tmp_path / "g.npy", tmp_path / "g.mp4"
    args = ["generate", BLUE, "--model", str(folder), "--frames", "33", "--seed", "2", "--out", str(mp4),
            "--out", str(npy), "--quiet", "schedule.ar_step=1"]
    original = NpySink._write

    def interrupt_at_frame_17(self, frames):
        if self.frames_written >= 17:
            raise KeyboardInterrupt
        original(self, frames)

    monkeypatch.setattr(NpySink, "_write", interrupt_at_frame_17)
    assert main(args) == 130
    monkeypatch.setattr(NpySink, "_write", original)
    state = tmp_path / "g.mp4.arvideo-state"
    assert state.exists() and "continue with --resume" in capsys.readouterr().err
    assert main(args) == 2  # a state exists: not silently overwritten
    other = [a if a != "2" else "3" for a in args]
    assert main(other + ["--resume"]) == 2 and "different request" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    expected = reference(folder, prompt=BLUE, frames=33, seed=2, overrides=["schedule.ar_step=1"])
    assert np.array_equal(np.load(npy), expected)
    assert len(mp4_frames(mp4)) == 33 and not state.exists()


# -- memory ---------------------------------------------------------------------------------------------
def test_sizes_parse_in_binary_units():
    assert parse_size("8G") == parse_size("8GB") == parse_size("8GiB") == 8 * 2**30
    assert parse_size("1.5m") == int(1.5 * 2**20) and parse_size("4096") == 4096
    assert format_size(3 * 2**30) == "3 GiB"
    with pytest.raises(ConfigError, match="write it like 8G"):
        parse_size("lots")


def _est(dynamic_mb: int, weights_mb: int = 100) -> MemoryEstimate:
    return MemoryEstimate(weights_mb << 20, dynamic_mb << 20, 0, 0, 0, 0)


def test_planner_runs_as_many_jobs_as_fit_and_caps_a_default_kv_store():
    weights = {"m": 100 << 20}
    ests = [_est(300), _est(200), _est(200)]
    # process 100 + weights 100 + the largest jobs: 300 + 200 = 700 fits 850, + 200 = 900 does not
    assert plan_batch(ests, weights, 850 << 20, 100 << 20, None).parallel == 2
    assert plan_batch(ests, weights, 600 << 20, 100 << 20, None).parallel == 1
    assert plan_batch(ests, weights, 10 << 30, 100 << 20, 2).parallel == 2  # --parallel caps it
    # job 0 alone does not fit; its KV (1 MiB per latent frame here) is capped to the largest window that fits
    recap = lambda i, frames: _est(200 + frames)  # noqa: E731
    plan = plan_batch(ests, weights, 450 << 20, 100 << 20, None, recap=recap, cappable=[True, False, False],
                      min_frames=[2, 2, 2], max_frames=[500, 500, 500])
    assert plan.jobs[0].kv_budget_frames == 50 and plan.peak <= 450 << 20
    with pytest.raises(ConfigError, match=r"too small: job 1 alone needs about 500 MiB.*one job at a time in --max-memory 500 MiB"):
        plan_batch(ests, weights, 450 << 20, 100 << 20, None)


def test_max_memory_too_small_is_refused_at_once(folder, tmp_path, capsys):
    jobs = write_jobs(tmp_path / "jobs.yaml", [{"prompt": BLUE, "frames": 9, "out": "a.npy"}])
    assert main(["render", str(jobs), "--model", str(folder), "--out-dir", str(tmp_path), "--max-memory", "64M"]) == 2
    err = capsys.readouterr().err
    assert "--max-memory 64 MiB is too small" in err and "would fit one job at a time in --max-memory" in err
    assert not (tmp_path / "a.npy").exists()


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS")
def test_max_memory_bound_holds_and_the_estimate_covers_the_measured_peak(folder, tmp_path, capsys):
    from arvideo.memory import process_resident_bytes
    from arvideo.render import plan_jobs

    jobs_file = write_jobs(tmp_path / "jobs.yaml", [
        {"prompt": BLUE, "frames": 9, "seed": s, "height": 64, "width": 64, "out": f"m{s}.mp4"} for s in range(3)])
    plan, _ = plan_jobs(load_jobs(jobs_file, model=str(folder)), None, 1, baseline=process_resident_bytes())
    bound = plan.baseline + plan.weights + 2 * max(j.estimate.dynamic for j in plan.jobs) + (16 << 20)
    meter = PeakMeter()
    meter.reset()
    code = main(["render", str(jobs_file), "--model", str(folder), "--out-dir", str(tmp_path), "--quiet",
                 "--max-memory", str(bound)])
    peak = meter.peak()
    out, err = capsys.readouterr()
    assert code == 0, out + err
    assert "memory plan: 2 job(s) at a time" in err  # two fit, three do not
    assert peak <= bound, f"peak {format_size(peak)} over the bound {format_size(bound)}"
    assert "peak memory" in out and all((tmp_path / f"m{s}.mp4").exists() for s in range(3))


# -- Ray ------------------------------------------------------------------------------------------------
@pytest.mark.slow  # ~35 s on 2 shared cores: Ray start-up plus two workers importing torch
def test_twenty_jobs_on_local_ray_match_the_in_process_renderer(folder, tmp_path):
    ray = pytest.importorskip("ray")
    from arvideo.render import render_ray

    specs = [{"prompt": BLUE if s % 2 else RED, "frames": 5, "seed": s, "out": f"j{s:02d}.npy"} for s in range(20)]
    jobs_file = write_jobs(tmp_path / "jobs.yaml", specs)
    local = load_jobs(jobs_file, out_dir=tmp_path / "local", model=str(folder))
    remote = load_jobs(jobs_file, out_dir=tmp_path / "ray", model=str(folder))
    assert all(r.ok for r in render_local(local, progress=False))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}})
    try:
        results = render_ray(remote, progress=False)
    finally:
        ray.shutdown()
    assert [r.ok for r in results] == [True] * 20
    for s in range(20):
        assert np.array_equal(np.load(tmp_path / "ray" / f"j{s:02d}.npy"), np.load(tmp_path / "local" / f"j{s:02d}.npy"))
