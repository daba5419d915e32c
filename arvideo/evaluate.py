"""`arvideo eval`: world metrics for generated videos or existing files."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np

from .errors import ConfigError


def read_video(path: str | Path) -> np.ndarray:
    """uint8 [F, H, W, 3] from .npy or any video PyAV can decode."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p} does not exist")
    if p.suffix == ".npy":
        return np.load(p)
    import av

    with av.open(str(p)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def heldout_captions(count: int, seed_offset: int) -> list[tuple[int, str]]:
    """(seed, caption) pairs drawn from world seeds never used in development (>= seed_offset)."""
    from .world import sample_world

    return [(seed, sample_world(seed).spec.caption) for seed in range(seed_offset, seed_offset + count)]


EVALUATION_SEEDS = range(10_000, 20_000)  # held-out captions; calibration uses < 10000, development >= 20000


def describe_seeds(first: int, count: int) -> str:
    """Names a run's captions by their world seeds: the held-out evaluation set or development captions."""
    seeds = f"world seeds {first}..{first + count - 1}"
    if first in EVALUATION_SEEDS and first + count - 1 in EVALUATION_SEEDS:
        return "held-out " + seeds
    return seeds + (" (development captions, not the evaluation set)" if first >= EVALUATION_SEEDS.stop else "")


def generate_and_score(engine, base_cfg, captions: list[tuple[int, str]], save_dir: str | None = None,
                       progress: bool = False) -> list[dict]:
    """Generates one video per (seed, caption) with `engine` and scores it."""
    from dataclasses import replace

    from .world.metrics import score_video

    rows = []
    for seed, caption in captions:
        cfg = replace(base_cfg, prompt=caption, seed=seed)
        t0 = time.perf_counter()
        video = engine.generate(cfg, progress=progress)
        seconds = time.perf_counter() - t0
        scores = score_video(video, caption)
        rows.append({"seed": seed, "caption": caption, "frames": len(video), "seconds": seconds,
                     "model_calls": engine.model_calls, **scores})
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            np.save(Path(save_dir) / f"seed{seed}.npy", video)
            (Path(save_dir) / f"seed{seed}.json").write_text(json.dumps({"caption": caption, "seed": seed}))
    return rows


_SETTING = re.compile(r"^[A-Za-z_][\w.]*=")


def run_eval(args) -> int:
    from .cli import _config_from_args
    from .world.metrics import format_table, mean_scores, score_video

    # argparse hands every positional to `files`: `key=value` items that are not files are settings.
    files = [f for f in args.files or [] if Path(f).exists() or not _SETTING.match(f)]
    args.overrides = list(args.overrides or []) + [f for f in args.files or [] if f not in files]
    # Check every input before generating anything, so a typo never costs a finished run.
    captions = []
    for f in files:
        if not Path(f).is_file():
            raise ConfigError(f"{f}: no such file (give .npy/.mp4 videos, or key=value settings)")
        caption = args.caption
        sidecar = Path(f).with_suffix(".json")
        if caption is None and sidecar.is_file():
            caption = json.loads(sidecar.read_text()).get("caption")
        if caption is None:
            raise ConfigError(f"no caption for {f}: pass --caption or put {{\"caption\": ...}} in {sidecar}")
        captions.append(caption)
    rows: list[dict] = []
    if args.generate:
        from .engine import Engine

        cfg = _config_from_args(args)
        engine = Engine.from_folder(args.model, cfg.device, cfg.dtype, cfg.attention)
        rows = generate_and_score(engine, cfg, heldout_captions(args.generate, args.seed_offset),
                                  args.save_dir, progress=not args.quiet)
    elif args.overrides:
        raise ConfigError(f"settings {' '.join(args.overrides)} only apply with --generate N")
    for f, caption in zip(files, captions):
        video = read_video(f)
        rows.append({"file": str(f), "caption": caption, "frames": len(video), **score_video(video, caption)})
    if not rows:
        raise ConfigError("nothing to evaluate: give files or --generate N")
    metrics = ["adherence", "spurious", "persistence", "smoothness", "background", "flicker"]
    table = [(r.get("file") or f"seed {r['seed']}", {k: r[k] for k in metrics}) for r in rows]
    mean = mean_scores([{k: r[k] for k in metrics} for r in rows])
    table.append(("mean", mean))
    print(format_table(table))
    result = {"rows": rows, "mean": mean}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps({"mean": mean}))
    return 0
