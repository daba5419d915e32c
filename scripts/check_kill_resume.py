"""Kill a real render with SIGKILL, check the partial mp4 plays, resume it, compare with an uninterrupted run.

The issue-7 acceptance check on the embedded model (the tests do the same on a tiny random
model): `arvideo render` of one long job is killed once its mp4 holds `--kill-after` frames;
the partial mp4 is decoded (it must play, every written frame but possibly the newest);
`arvideo render --resume` completes it; the resumed `.npy` must equal an uninterrupted run's
frames bit for bit (CPU, deterministic). Prints a markdown summary; `--doc` also writes it into
docs/rendering.md between `<!-- check:kill-resume -->` markers.

    python scripts/check_kill_resume.py --frames 320 --kill-after 100
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- check:kill-resume -->", "<!-- /check:kill-resume -->"


def mp4_frames(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as box:
        return np.stack([f.to_ndarray(format="rgb24") for f in box.decode(video=0)])


def render(jobs: Path, out_dir: Path, model: str | None, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "arvideo.cli", "render", str(jobs), "--out-dir", str(out_dir), "--quiet", *extra]
    if model:
        cmd += ["--model", model]
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, cwd=ROOT)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--frames", type=int, default=320)
    p.add_argument("--kill-after", type=int, default=100, help="kill once the partial npy holds this many frames")
    p.add_argument("--prompt", default="a large red circle and a medium yellow square on a gray background")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--doc", action="store_true", help="write the summary into docs/rendering.md")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        job = f"- {{prompt: '{args.prompt}', frames: {args.frames}, seed: {args.seed}, out: [v.mp4, v.npy]}}\n"
        (tmp / "jobs.yaml").write_text(job)
        ref_dir = tmp / "ref"
        ref_dir.mkdir()
        t0 = time.monotonic()
        proc = render(tmp / "jobs.yaml", ref_dir, args.model)
        if proc.wait() != 0:
            raise SystemExit(f"uninterrupted render failed: {proc.stderr.read().decode()[-2000:]}")
        straight_s = time.monotonic() - t0
        expected = np.load(ref_dir / "v.npy")

        run_dir = tmp / "run"
        run_dir.mkdir()
        t0 = time.monotonic()
        proc = render(tmp / "jobs.yaml", run_dir, args.model)
        partial, state = run_dir / "v.partial.npy", run_dir / "v.mp4.arvideo-state"
        held = 0
        while proc.poll() is None:
            if state.exists() and partial.exists():
                try:
                    held = np.load(partial, mmap_mode="r").shape[0]
                except ValueError:
                    held = 0
                if held >= args.kill_after:
                    break
            time.sleep(0.01)
        if proc.poll() is not None:
            raise SystemExit("the render finished before the kill: lower --kill-after")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed_s = time.monotonic() - t0
        killed = mp4_frames(run_dir / "v.mp4")

        t0 = time.monotonic()
        proc = render(tmp / "jobs.yaml", run_dir, args.model, "--resume")
        if proc.wait() != 0:
            raise SystemExit(f"resume failed: {proc.stderr.read().decode()[-2000:]}")
        resume_s = time.monotonic() - t0
        resumed = np.load(run_dir / "v.npy")
        resumed_mp4 = mp4_frames(run_dir / "v.mp4")
        same = resumed.shape == expected.shape and np.array_equal(resumed, expected)

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([
        f"Measured {now}, `python scripts/check_kill_resume.py --frames {args.frames} --kill-after {args.kill_after}`"
        f" (model {args.model or 'models/shapes-df'}, CPU, float32; caption \"{args.prompt}\", seed {args.seed}):",
        "",
        "| step | result |",
        "| --- | --- |",
        f"| uninterrupted render | {len(expected)} frames in {straight_s:.1f} s |",
        f"| killed with SIGKILL | after {killed_s:.1f} s, partial npy held {held} frames; the partial mp4 decodes to "
        f"{len(killed)} frames |",
        f"| `--resume` | completed in {resume_s:.1f} s; mp4 {len(resumed_mp4)} frames |",
        f"| resumed `.npy` == uninterrupted | {'yes, bit-identical' if same else 'NO'} |",
    ])
    print(text)
    if args.doc:
        from arvideo.reporting import write_marked_section

        write_marked_section(ROOT / "docs" / "rendering.md", BEGIN, END, text)
    return 0 if same and len(killed) >= held - 1 > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
