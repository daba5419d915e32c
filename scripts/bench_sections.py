"""Prompt sections on the embedded model: does a video follow a prompt change, and how fast?

For each pair of held-out captions (A, B) it makes, with the same seed and settings:
- `move`: A, then B from frame --switch on, the store's sink moved to B's first chunk (default);
- `keep`: the same with `kv.section_sink=keep` (the video's first chunk stays the sink);
- `A only`: A for the whole video (the control: what the second part looks like without a switch);
- `B alone`: a fresh video of B as long as the second part (what the model draws for B from scratch).
The second part (from the frame the switch actually lands on) is scored with the shapes-world
metrics against B, and its adherence also against A (how much of the old scene stays). The
first part of every sectioned video is compared with `A only`'s (largest pixel difference).

    python scripts/bench_sections.py                      # 8 caption pairs, 160 frames, switch at 80
    python scripts/bench_sections.py --pairs 2 --frames 48 --switch 24 --set sampler.steps=4   # smoke
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arvideo.config import PromptSection, build_config  # noqa: E402
from arvideo.engine import Engine  # noqa: E402
from arvideo.evaluate import heldout_captions  # noqa: E402
from arvideo.reporting import measured_line, write_marked_section  # noqa: E402
from arvideo.sections import first_video_frame  # noqa: E402
from arvideo.world.metrics import paired_difference, score_video  # noqa: E402

DOC = ROOT / "docs" / "sections.md"
METRICS = ("adherence", "spurious", "persistence", "smoothness", "background")
VARIANTS = ("move", "keep", "A only", "B alone")


def run_pair(engine: Engine, base, seed: int, a: str, b: str, switch: int) -> dict:
    sectioned = replace(base, prompt=a, seed=seed, sections=[PromptSection(switch, b)])
    r = engine.resolve(sectioned)
    plan = engine.section_plan(r)
    start = plan.switch_frames()[1]
    # the chunk before the switch: in flight beside B's first chunk (windows of 2), the only earlier one
    # whose context can differ from `A only`'s (`scored` eviction steered by its own queries alone)
    frames_at = [first_video_frame(s, engine.model.temporal_factor) for s in plan.chunk_starts]
    before = frames_at[frames_at.index(start) - 1]
    out = {"seed": seed, "a": a, "b": b, "switch": start, "chunk_before": before}
    videos = {}
    for variant in ("move", "keep"):
        cfg = replace(sectioned, kv=replace(sectioned.kv, section_sink=variant))
        videos[variant] = engine.generate(cfg)
    videos["A only"] = engine.generate(replace(base, prompt=a, seed=seed))
    videos["B alone"] = engine.generate(replace(base, prompt=b, seed=seed, frames=base.frames - start))
    for variant, video in videos.items():
        part = video if variant == "B alone" else video[start:]
        scores = score_video(part, b)
        scores["adherence_to_a"] = score_video(part, a)["adherence"]
        out[variant] = scores
    def diff(lo, hi):
        return max(int(np.abs(videos[v][lo:hi].astype(int) - videos["A only"][lo:hi]).max()) for v in ("move", "keep"))

    out["diff_before"], out["diff_chunk_before"] = diff(0, before), diff(before, start)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--pairs", type=int, default=8, help="caption pairs (A from seeds --seed.., B from the next ones)")
    ap.add_argument("--seed", type=int, default=10_000, help="first held-out world seed")
    ap.add_argument("--frames", type=int, default=160)
    ap.add_argument("--switch", type=int, default=80, help="frame the second prompt is asked to start at")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--set", nargs="*", default=[], help="config overrides key=value for every video")
    ap.add_argument("--json", default=None, help="raw rows here")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/sections.md alone")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    engine = Engine.from_folder(args.model)
    base = build_config(frames=args.frames, overrides=list(args.set))
    captions = heldout_captions(2 * args.pairs, args.seed)
    rows = []
    t0 = time.time()
    for i in range(args.pairs):
        (seed, a), (_, b) = captions[i], captions[args.pairs + i]
        rows.append(run_pair(engine, base, seed, a, b, args.switch))
        print(f"pair {i + 1}/{args.pairs} ({time.time() - t0:.0f} s): " + ", ".join(
            f"{v} {rows[-1][v]['adherence']:.3f}" for v in VARIANTS), flush=True)
    mean = {v: {m: float(np.mean([r[v][m] for r in rows])) for m in (*METRICS, "adherence_to_a")} for v in VARIANTS}
    settings = " ".join(args.set) or "default settings"
    lines = [
        f"Command: `{' '.join(['python scripts/bench_sections.py', *sys.argv[1:]])}`",
        "",
        measured_line() + f"; model "
        f"{args.model or 'models/shapes-df'}, {settings}; {args.pairs} caption pairs (A: world seeds {args.seed}.."
        f"{args.seed + args.pairs - 1}, B: {args.seed + args.pairs}..{args.seed + 2 * args.pairs - 1}), "
        f"{args.frames} frames, B asked from frame {args.switch} (lands on frame {rows[0]['switch']}); "
        f"{time.time() - t0:.0f} s in all.",
        "",
        "Second part of each video (from the switch; `B alone`: a fresh video of B as long), scored against B, "
        "and its adherence to A:",
        "",
        "| variant | " + " | ".join(METRICS) + " | adherence to A |",
        "| --- |" + " ---: |" * (len(METRICS) + 1),
    ]
    for v in VARIANTS:
        lines.append(f"| {v} | " + " | ".join(f"{mean[v][m]:.3f}" for m in METRICS) + f" | {mean[v]['adherence_to_a']:.3f} |")
    if args.pairs > 1:
        lines += ["", "Paired over caption pairs (first minus second: mean +- standard error):", "",
                  "| first - second | adherence | adherence to A | spurious | persistence | smoothness |",
                  "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for first, second in (("move", "keep"), ("move", "A only"), ("move", "B alone"), ("keep", "B alone")):
            cells = []
            for m in ("adherence", "adherence_to_a", "spurious", "persistence", "smoothness"):
                d = paired_difference([r[first] for r in rows], [r[second] for r in rows], m)
                cells.append(f"{d['mean']:+.3f} +- {d['se']:.3f}")
            lines.append(f"| {first} - {second} | " + " | ".join(cells) + " |")
    lines += ["", "First part of the sectioned videos against `A only`'s, largest difference in 255 levels: frames "
              f"before the chunk preceding the switch {max(r['diff_before'] for r in rows)} (0 = identical); that chunk "
              f"(frames {rows[0]['chunk_before']}-{rows[0]['switch'] - 1}) {max(r['diff_chunk_before'] for r in rows)} "
              "(its context was chosen without the new chunk's queries, `A only`'s with them).", "",
              "Per pair (adherence of the second part to B: move / keep / A only / B alone):", ""]
    for r in rows:
        lines.append(f"- seed {r['seed']}: '{r['a']}' -> '{r['b']}': "
                     + " / ".join(f"{r[v]['adherence']:.3f}" for v in VARIANTS))
    text = "\n".join(lines)
    print(text)
    if not args.no_doc:
        write_marked_section(DOC, "<!-- bench:sections -->", "<!-- /bench:sections -->", text, header="# Prompt sections\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
