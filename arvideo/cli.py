"""Command line: arvideo generate | info | eval."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from .errors import ArvideoError

log = logging.getLogger("arvideo")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a video (streams frames to --out as chunks finish)")
    p.add_argument("prompt", help="text prompt (the embedded model takes shapes-world captions)")
    p.add_argument("--model", default=None, help="model folder in diffusers layout (default: embedded shapes model)")
    p.add_argument("--frames", type=int, default=None, help="number of video frames (default 48)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per chunk")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--schedule", choices=["diffusion-forcing", "pipelined", "window"], default=None)
    p.add_argument("--cache", default=None, help="cache preset: none (full compute)")
    p.add_argument("--out", action="append", default=None,
                   help="output path: .mp4, .gif, .npy, or a directory for PNG frames (repeatable; default video.mp4)")
    p.add_argument("--preview", default=None, help="PNG file rewritten with the latest finished frame")
    p.add_argument("--config", action="append", default=None, help="YAML config file (repeatable, merged in order)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. kv.policy=window")


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a model folder")
    p.add_argument("model", nargs="?", default=None, help="model folder (default: embedded model)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score videos with the shapes-world metrics")
    p.add_argument("files", nargs="*", help=".npy/.mp4 files to score (caption from --caption or a sidecar .json)")
    p.add_argument("--caption", default=None, help="caption of the given files")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="generate N videos from held-out seeds instead")
    p.add_argument("--seed-offset", type=int, default=10_000, help="first world seed for --generate captions")
    p.add_argument("--frames", type=int, default=160)
    p.add_argument("--model", default=None)
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.add_argument("--save-dir", default=None, help="keep generated videos (.npy) here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arvideo", description="Streaming autoregressive long-video generation")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_info(sub)
    _add_eval(sub)
    return parser


def _config_from_args(args, prompt: str | None = None):
    from .config import build_config

    overrides = list(args.overrides or [])
    for flag, key in (("steps", "sampler.steps"), ("schedule", "schedule.name"), ("cache", "cache.preset")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    values = dict(
        prompt=prompt, frames=getattr(args, "frames", None), seed=getattr(args, "seed", None),
        guidance_scale=getattr(args, "guidance", None), device=getattr(args, "device", None),
        dtype=getattr(args, "dtype", None),
    )
    return build_config(args.config, overrides, **values)


def cmd_generate(args) -> int:
    from .engine import Engine
    from .sinks import MultiSink, PreviewSink, open_sink

    cfg = _config_from_args(args, args.prompt)
    engine = Engine.from_folder(args.model, cfg.device, cfg.dtype, cfg.attention)
    resolved = engine.resolve(cfg)  # validate everything before any file is touched
    engine.make_schedule(resolved)
    outs = args.out or ["video.mp4"]
    sinks = [open_sink(p, resolved.fps) for p in outs]
    if args.preview:
        sinks.append(PreviewSink(args.preview))
    sink = MultiSink(sinks)
    start = time.perf_counter()
    written = 0
    try:
        for chunk in engine.stream(cfg, progress=not args.quiet):
            sink.write(chunk.frames)
            written += len(chunk.frames)
    except ArvideoError as exc:
        sink.close()
        print(f"error: {exc}\n{written} frames already written stay playable in: {', '.join(outs)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        sink.close()
        print(f"interrupted: {written} frames written to {', '.join(outs)}", file=sys.stderr)
        return 130
    sink.close()
    seconds = time.perf_counter() - start
    if not args.quiet:
        print(f"wrote {written} frames ({written / resolved.fps:.1f} s at {resolved.fps} fps) to "
              f"{', '.join(outs)} in {seconds:.1f} s, {engine.model_calls} model calls", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from .model import describe_model

    print(describe_model(args.model))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import run_eval

    return run_eval(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"generate": cmd_generate, "info": cmd_info, "eval": cmd_eval}
    try:
        return handlers[args.command](args)
    except ArvideoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
