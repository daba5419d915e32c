"""Why a model's adherence is what it is: where in time, for which objects, and how objects fail.

Reads videos saved by `arvideo eval --save-dir DIR` (seedN.npy with its seedN.json caption) and
splits the world metric `present(o, f)` (world-spec.md: 0.4 A <= mass <= 2.5 A) by time (the
first chunk, which no context affects, against later frames), by the object's size, colour and
shape and by the background, and counts each miss by kind: colour absent (mass < 0.1 A), too
small (0.1 A <= mass < 0.4 A), too large (mass > 2.5 A). `--world` scores the world's own frames
of the same seeds beside them, and `--vae DIR` the VAE's reconstruction of those frames (what the
model could score with a perfect transformer), category by category.

    arvideo eval --generate 24 --seed-offset 20000 --frames 160 --save-dir runs/diag --json runs/diag.json
    python scripts/diagnose_adherence.py runs/diag/*.npy --world --vae models/shapes-df/vae
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # eval_vae's reconstruction, also when loaded by path

from arvideo.world import sample_world  # noqa: E402
from arvideo.world.captions import parse_caption  # noqa: E402
from arvideo.world.metrics import PRESENT_BOUNDS, is_present, object_masses  # noqa: E402

ABSENT = 0.1  # mass below 0.1 A: the colour is not drawn at all


def time_bins(num_frames: int, first: int) -> list[tuple[str, slice]]:
    bins = [(f"first chunk (0-{first - 1})", slice(0, first)), (f"{first}-39", slice(first, 40)),
            ("40-79", slice(40, 80)), ("80-159", slice(80, 160)), ("160+", slice(160, None))]
    return [(name, s) for name, s in bins if len(range(num_frames)[s])]


def analyse(videos: list[tuple[np.ndarray, str]], first: int) -> dict:
    """Per-category present rates and miss kinds over (frames, caption) pairs, and per object of each video
    its present rate and median mass / expected area."""
    by = defaultdict(lambda: np.zeros(4))  # present, absent, too small, too large (frame-object counts)
    per_video, per_object = [], []
    for frames, caption in videos:
        spec = parse_caption(caption)
        mass, areas = object_masses(frames, spec)
        present = is_present(mass, areas)
        ratio = mass / areas
        kinds = np.stack([present, ratio < ABSENT, (ratio >= ABSENT) & (ratio < PRESENT_BOUNDS[0]),
                          ratio > PRESENT_BOUNDS[1]], axis=-1)  # a partition of the frame-object pairs
        per_video.append(float(present.mean()))
        per_object += [{"caption": caption, "object": f"{o.size} {o.colour} {o.shape}",
                        "present": float(present[:, k].mean()), "median_mass_ratio": float(np.median(ratio[:, k]))}
                       for k, o in enumerate(spec.objects)]
        for name, s in time_bins(len(frames), first):
            by[("time", name)] += kinds[s].reshape(-1, 4).sum(axis=0)
        for k, o in enumerate(spec.objects):
            for cat, value in (("size", o.size), ("colour", o.colour), ("shape", o.shape),
                               ("background", spec.background), ("objects in caption", str(len(spec.objects)))):
                by[(cat, value)] += kinds[:, k].sum(axis=0)
        by[("all", "all")] += kinds.reshape(-1, 4).sum(axis=0)
    return {"by": {k: v.tolist() for k, v in by.items()}, "per_video": per_video, "per_object": per_object}


def world_videos(seeds: list[int], num_frames: int) -> list[np.ndarray]:
    return [sample_world(seed).clip(0, num_frames) for seed in seeds]


def reconstruct(vae_path: Path, videos: list[np.ndarray]) -> list[np.ndarray]:
    """The VAE's round trip of each video (its first 1 + 4k frames), as `eval_vae.py` measures it."""
    from eval_vae import load
    from eval_vae import reconstruct as round_trip

    vae = load(vae_path)
    return [round_trip(vae, v[: 1 + 4 * ((len(v) - 1) // 4)])[0] for v in videos]


def table(results: dict[str, dict]) -> str:
    names = list(results)
    keys = list(next(iter(results.values()))["by"])
    order = {"all": 0, "time": 1, "size": 2, "colour": 3, "shape": 4, "background": 5, "objects in caption": 6}
    keys.sort(key=lambda k: (order[k[0]], k[1] if k[0] != "size" else ["small", "medium", "large"].index(k[1])))
    head = "| category | " + " | ".join(f"{n} present" for n in names) + " | " + " | ".join(
        f"{names[0]} {k}" for k in ("absent", "too small", "too large")) + " |"
    lines = [head, "| --- |" + " ---: |" * (len(names) + 3)]
    for key in keys:
        cells = []
        for n in names:
            c = results[n]["by"].get(key)
            cells.append(f"{c[0] / sum(c):.3f}" if c else "-")
        c = results[names[0]]["by"][key]
        total = sum(c)  # present + absent + too small + too large partition the frame-object pairs
        lines.append(f"| {key[0]}: {key[1]} | " + " | ".join(cells) + " | "
                     + " | ".join(f"{c[i] / total:.3f}" for i in (1, 2, 3)) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="seedN.npy files from `arvideo eval --save-dir`")
    p.add_argument("--first", type=int, default=4, help="frames of the first chunk (block size x temporal factor)")
    p.add_argument("--world", action="store_true", help="also score the world's own frames of the same seeds")
    p.add_argument("--vae", type=Path, help="also score this VAE's reconstructions of the world's frames")
    p.add_argument("--objects", action="store_true",
                   help="also list, video by video, the model's objects present in under half of the frames")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    videos, seeds = [], []
    for f in sorted(args.files):
        meta = json.loads(f.with_suffix(".json").read_text())
        videos.append((np.load(f), meta["caption"]))
        seeds.append(int(meta["seed"]))
    results = {"model": analyse(videos, args.first)}
    if args.world or args.vae:
        world = world_videos(seeds, len(videos[0][0]))
        if args.world:
            results["world"] = analyse(list(zip(world, [c for _, c in videos])), args.first)
        if args.vae:
            rec = reconstruct(args.vae, world)
            results["VAE reconstruction"] = analyse(list(zip(rec, [c for _, c in videos])), args.first)
    print(f"{len(videos)} videos ({', '.join(map(str, seeds))}), {len(videos[0][0])} frames; present(o, f) rate per "
          f"category, and for the model the share of frame-object pairs missed by kind (absent: mass < {ABSENT} A; "
          "too small: below 0.4 A; too large: above 2.5 A)\n")
    print(table(results))
    if args.objects:
        print("\nObjects present in under half of the frames (present rate, median mass / expected area):\n")
        for seed, caption in zip(seeds, [c for _, c in videos]):
            missed = [o for o in results["model"]["per_object"] if o["caption"] == caption and o["present"] < 0.5]
            if missed:
                print(f"- {seed} \"{caption}\": " + "; ".join(
                    f"{o['object']} {o['present']:.2f}, {o['median_mass_ratio']:.2f}" for o in missed))
    if args.json:
        args.json.write_text(json.dumps({k: {**v, "by": {" / ".join(kk): vv for kk, vv in v["by"].items()}}
                                         for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
