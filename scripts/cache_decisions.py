"""Which steps each chunk computed under a cache preset: the per-chunk decisions, printed.

    python scripts/cache_decisions.py fast                               # chunks 0, 3, 8 of a 48-frame video
    python scripts/cache_decisions.py flowcache:tau=0.3,warmup=2 --chunks 0 5 --frames 96
    python scripts/cache_decisions.py combination:tau=0.03,indicator=slope,estimator=fitted sampler.name=euler

Runs one video (world caption of --seed, or --caption) with the preset and prints, for each
requested chunk, the steps whose model call ran (the engine's forced first step included), and
how many steps each chunk computed. The sampler is the preset's (`sampler: euler` in the preset
files), else the model's, unless `sampler.name=...` is given.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arvideo.caching import make_policy_factory, preset_sampler
from arvideo.config import build_config
from arvideo.engine import Engine
from arvideo.evaluate import heldout_captions


class Recorder:
    """Wraps a policy factory: every policy it makes reports the steps its chunk computed."""

    def __init__(self, inner) -> None:
        self.inner, self.may_skip, self.guidance = inner, inner.may_skip, inner.guidance
        self.computed: dict[int, list[int]] = {}

    def __call__(self, ctx):
        policy, steps = self.inner(ctx), self.computed.setdefault(ctx.chunk, [])

        class Recorded:
            def __getattr__(self, name):
                return getattr(policy, name)

            def should_compute(self, step, latents):
                return policy.should_compute(step, latents)

            def observe(self, step, latents, velocity):  # every step whose model call ran
                steps.append(step)
                policy.observe(step, latents, velocity)

            def reuse(self, step, latents):
                return policy.reuse(step, latents)

        return Recorded()

    def __deepcopy__(self, memo):
        return self


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--model", default=None)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--seed", type=int, default=20000, help="world seed of the caption and of the noise")
    p.add_argument("--caption", default=None)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 3, 8])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    engine = Engine.from_folder(args.model)
    overrides = list(args.overrides)
    sampler = preset_sampler(args.preset)
    if sampler and not any(o.startswith("sampler.name=") for o in overrides):
        overrides.append(f"sampler.name={sampler}")  # a factory object carries no preset file's sampler
    caption = args.caption or heldout_captions(1, args.seed)[0][1]
    cfg = build_config(prompt=caption, frames=args.frames, seed=args.seed, overrides=overrides)
    steps = engine.resolve(cfg).steps
    recorder = Recorder(make_policy_factory(args.preset, steps, engine.model.path))
    engine.generate(replace(cfg, cache=replace(cfg.cache, preset=recorder)))
    print(f"{args.preset}: {caption!r}, {args.frames} frames, {steps} steps, sampler {engine.resolve(cfg).cfg.sampler.name}")
    for chunk in args.chunks:
        if chunk not in recorder.computed:
            print(f"chunk {chunk}: not in this video ({len(recorder.computed)} chunks)")
            continue
        done = recorder.computed[chunk]
        print(f"chunk {chunk}: computed {len(done)} of {steps} steps: {', '.join(map(str, done))}")
    counts = [len(v) for v in recorder.computed.values()]
    print(f"all {len(counts)} chunks: {min(counts)} to {max(counts)} computed steps, mean {sum(counts) / len(counts):.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
