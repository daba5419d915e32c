"""Paired comparison of two `arvideo eval --json` runs over the same captions and seeds.

Prints, per world metric, each run's mean and the mean difference (first minus second) with its
standard error over videos, and how many videos score higher / lower under the first run. This is
how docs/kvstore.md and docs/training.md compare settings (per-caption spread in the shapes world
is larger than most differences between settings, so the standard error is part of every reading).

    arvideo eval --generate 12 --frames 160 --json a.json kv.positions=absolute
    arvideo eval --generate 12 --frames 160 --json b.json kv.positions=reindexed
    python scripts/compare_evals.py a.json b.json
    python scripts/compare_evals.py a1.json,a2.json b1.json,b2.json   # runs made in parts
    python scripts/compare_evals.py peers.json:arvideo-fast peers.json:diffusers   # bench_peers rows
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from arvideo.world.metrics import METRICS, paired_difference


def _videos(part: str) -> list[dict]:
    """The scored videos of `arvideo eval --json F`, or of one row of `scripts/bench_peers.py`'s
    json as `F:ROW` (its per-caption runs)."""
    path, _, row = part.rpartition(":") if ":" in part and not Path(part).exists() else (part, "", "")
    data = json.load(open(path))
    if not row:
        return data["rows"]
    runs = [r for r in data.get("cpu", {}).get("runs", []) if r["row"] == row]
    if not runs:
        sys.exit(f"{path} has no bench_peers runs of row {row!r}")
    return runs


def load_rows(path: str) -> dict[int, dict]:
    """Rows by seed of one run; `a.json,b.json` joins runs made in parts (e.g. two processes over
    consecutive seed ranges); a seed in two parts is an error."""
    out: dict[int, dict] = {}
    for part in path.split(","):
        for r in _videos(part):
            if int(r["seed"]) in out:
                sys.exit(f"seed {r['seed']} appears twice in {path}: join parts over different seeds")
            out[int(r["seed"])] = r
    return out


def compare(first: str, second: str) -> str:
    a, b = load_rows(first), load_rows(second)
    if set(a) != set(b):
        sys.exit(f"{first} and {second} score different seeds ({sorted(a)} / {sorted(b)}): run both "
                 "with the same --generate N and --seed-offset")
    seeds = sorted(a)
    lines = [f"{first} - {second}, {len(seeds)} videos (seeds {seeds[0]}..{seeds[-1]})", "",
             "| metric | first | second | first - second | videos higher / lower |", "| --- | ---: | ---: | ---: | --- |"]
    for m in METRICS:
        x, y = [a[s] for s in seeds], [b[s] for s in seeds]
        d = paired_difference(x, y, m)
        lines.append(f"| {m} | {sum(r[m] for r in x) / len(x):.3f} | {sum(r[m] for r in y) / len(y):.3f} | "
                     f"{d['mean']:+.3f} +- {d['se']:.3f} | {d['higher']} / {d['lower']} |")
    return "\n".join(lines)


def by_objects(first: str, second: str, metric: str = "adherence") -> str:
    """Each run's mean `metric` and seconds per video, by the number of objects in the caption."""
    from arvideo.world.captions import parse_caption

    a, b = load_rows(first), load_rows(second)
    groups: dict[int, list[int]] = {}
    for s in sorted(set(a) & set(b)):
        groups.setdefault(len(parse_caption(a[s]["caption"]).objects), []).append(s)
    lines = [f"| objects in caption | videos | first {metric} | second {metric} | first s / video | second s / video |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    def mean(rows: dict, seeds: list[int], key: str) -> float:
        return sum(float(rows[s][key]) for s in seeds) / len(seeds)

    for k, seeds in sorted(groups.items()):
        lines.append(f"| {k} | {len(seeds)} | {mean(a, seeds, metric):.3f} | {mean(b, seeds, metric):.3f} | "
                     f"{mean(a, seeds, 'seconds'):.1f} | {mean(b, seeds, 'seconds'):.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--by-objects", action="store_true",
                   help="also each run's mean adherence and seconds per video by the caption's number of objects")
    args = p.parse_args()
    print(compare(args.first, args.second))
    if args.by_objects:
        print("\n" + by_objects(args.first, args.second))


if __name__ == "__main__":
    main()
