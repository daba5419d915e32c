"""Probe: composed classifier-free guidance for multi-object captions of the embedded model.

The embedded model drops objects of multi-object captions (docs/training.md, "Where v5's
adherence is lost"). Composed guidance (Liu et al. 2022, "Compositional Visual Generation with
Composable Diffusion Models") conditions on each object separately and adds the guidance
directions: every model call runs one pass per object caption ("a medium blue square on a navy
background", i.e. the caption cut down to one object), optionally the full caption, and the
unconditional pass, and the engine takes

    and:   v = v_u + sum_i W (v_i - v_u)
    full:  v = v_u + G (v_full - v_u) + sum_i W (v_i - v_u)

Single-object captions keep plain guidance (G). `--mode full --object-weight 0` is exactly the
default generation (checked in tests/test_probe_composed_guidance.py). Everything after the
options is handed to `arvideo eval`, e.g.

    python scripts/probe_composed_guidance.py --mode and --object-weight 4 -- \
        --generate 36 --seed-offset 20000 --frames 32 --json runs/compose/and4_a.json

This is a measurement script, not an engine feature: it swaps the engine's text encoding and its
guidance combination for its own run (the result, docs/training.md: adherence falls, so the
engine does not offer it).
"""
from __future__ import annotations

import argparse
import sys

import torch

from arvideo.engine import DTYPES, Engine
from arvideo.model import require_prompt_encoder
from arvideo.world.captions import SceneSpec, parse_caption


def passes(prompt: str, mode: str, guidance: float, object_weight: float) -> tuple[list[str], list[float]]:
    """The conditional prompts of one call and the weight of each one's guidance direction."""
    spec = parse_caption(prompt)
    if len(spec.objects) == 1:
        return [prompt], [guidance]
    objects = [SceneSpec((o,), spec.background).caption for o in spec.objects]
    if mode == "and":
        return objects, [object_weight] * len(objects)
    return [prompt, *objects], [guidance] + [object_weight] * len(objects)


def install(mode: str, object_weight: float) -> None:
    """Replaces Engine.encode_text and Engine._guide for this process."""
    weights: dict[str, torch.Tensor] = {}

    def encode_text(self, r, prompt_embeds=None, negative_prompt_embeds=None, sections=None):
        if prompt_embeds is not None or (sections is not None and len(sections.prompts) > 1):
            raise SystemExit("the probe takes one caption per video (no prompt sections or embeddings)")
        prompts, w = passes(r.cfg.prompt, mode, r.guidance, object_weight)
        weights["w"] = torch.tensor(w)
        dtype, device = DTYPES[r.cfg.dtype], self.backbone.device
        embeds = require_prompt_encoder(self.model)(prompts + [r.cfg.negative_prompt], device, dtype)
        return [self.backbone.prepare_text(embeds.to(device=device, dtype=dtype))]

    def guide(v: torch.Tensor, r) -> torch.Tensor:
        uncond, w = v[-1:], weights["w"].to(v)
        return uncond + (w.view(-1, 1, 1, 1, 1) * (v[:-1] - uncond)).sum(0, keepdim=True)

    Engine.encode_text = encode_text
    Engine._guide = staticmethod(guide)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("and", "full"), default="and")
    p.add_argument("--object-weight", type=float, default=4.0, help="W, each object caption's guidance weight")
    args = p.parse_args(ours)
    install(args.mode, args.object_weight)
    from arvideo.cli import main as cli_main

    return cli_main(["eval", *rest])


if __name__ == "__main__":
    sys.exit(main())
