"""Decode ahead on or off: whole-process time of `arvideo generate`, alternating A/B runs.

Each repeat runs `arvideo generate PROMPT --frames N --cache PRESET` once with
`decode_ahead=false` (the VAE decode inside the generation loop) and once with
`decode_ahead=true` (the default: decoded on a background thread while generation goes on),
in alternating order, each as its own process, timed from launch to exit. Reports the median
and each repeat's paired ratio, and checks the two videos are identical (same frames).

    python scripts/bench_decode_ahead.py                      # 320 frames, --cache fast, 3 repeats
    python scripts/bench_decode_ahead.py --cache none --repeat 5

Writes its table between `<!-- bench:decode-ahead -->` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arvideo.reporting import measured_line, write_marked_section  # noqa: E402

PROMPT = "a small red circle, a large blue square and a medium white triangle on a gray background"


def run(args, ahead: bool, out: Path) -> float:
    cmd = [sys.executable, "-m", "arvideo", "generate", args.prompt, "--frames", str(args.frames), "--cache", args.cache,
           "--seed", str(args.seed), "--quiet", "--out", str(out), f"decode_ahead={str(ahead).lower()}"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=320)
    ap.add_argument("--cache", default="fast")
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {False: Path(tmp) / "inline.npy", True: Path(tmp) / "ahead.npy"}
        for rep in range(args.repeat):
            order = (False, True) if rep % 2 == 0 else (True, False)
            for ahead in order:
                times[ahead].append(run(args, ahead, outs[ahead]))
                print(f"repeat {rep}: decode_ahead={ahead} {times[ahead][-1]:.2f} s", flush=True)
        same = np.array_equal(np.load(outs[False]), np.load(outs[True]))
    ratios = [a / b for a, b in zip(times[False], times[True])]
    lines = [
        measured_line() + f"; "
        f"`python scripts/bench_decode_ahead.py --frames {args.frames} --cache {args.cache} --repeat {args.repeat}`",
        "",
        f"`arvideo generate --frames {args.frames} --cache {args.cache}` (shipped model), whole process, "
        f"{args.repeat} alternating repeats; videos identical: {'yes' if same else 'NO'}.",
        "",
        "| decode | median s | each repeat (s) |",
        "| --- | ---: | --- |",
        f"| inline (`decode_ahead=false`) | {statistics.median(times[False]):.1f} | "
        + ", ".join(f"{t:.1f}" for t in times[False]) + " |",
        f"| ahead (default) | {statistics.median(times[True]):.1f} | " + ", ".join(f"{t:.1f}" for t in times[True]) + " |",
        "",
        f"Paired speedup (inline / ahead): median {statistics.median(ratios):.2f}x "
        f"(each repeat: {', '.join(f'{r:.2f}x' for r in ratios)}).",
    ]
    text = "\n".join(lines)
    print(text)
    write_marked_section(Path(args.doc), "<!-- bench:decode-ahead -->", "<!-- /bench:decode-ahead -->", text)
    if not same:
        raise SystemExit("decode ahead changed the frames")


if __name__ == "__main__":
    main()
