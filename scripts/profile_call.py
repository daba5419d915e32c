"""Where the time of a generation goes on CPU: torch profiler over one `engine.stream` of the
embedded model (model calls and streaming decode), top operators by self CPU time.

    python scripts/profile_call.py                        # 48 frames, full compute, one thread
    python scripts/profile_call.py --frames 96 cache.preset=fast
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arvideo.config import build_config  # noqa: E402
from arvideo.engine import Engine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (default: cache.preset=none)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_folder(args.model)
    cfg = build_config(prompt="a medium cyan square on a gray background", frames=args.frames, seed=1,
                       overrides=["cache.preset=none", *args.overrides])
    list(engine.stream(cfg))  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        list(engine.stream(cfg))
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    print(f"{args.frames} frames, overrides {args.overrides or ['cache.preset=none']}, {args.threads} thread(s); "
          f"self CPU total {total / 1e6:.2f} s\n")
    print("| operator | self CPU % | calls | mean us |\n| --- | ---: | ---: | ---: |")
    for e in ops[: args.rows]:
        print(f"| {e.key} | {100 * e.self_cpu_time_total / total:.1f} | {e.count} | {e.self_cpu_time_total / e.count:.0f} |")


if __name__ == "__main__":
    main()
