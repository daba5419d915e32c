"""Denoising speed on CPU: the backbone with and without its CPU fast path.

Denoises the same video (default settings of the model, full compute, `--frames` frames, no VAE
decode: the engine's chunk stream of clean latents) with the backbone's `fast_cpu` flag off (the
transformer's modules exactly as diffusers runs them) and on (the FFN's tanh GELU computed as the
identical x * sigmoid(2z): `arvideo/backbones/wan_family.py: feed_forward`), alternating the order
every repeat, and reports the median time, ms per model call, the speedup, and the largest
difference of the final latents.

    python scripts/bench_backbone.py                  # shipped model, 48 frames, 5 repeats, 1 thread

Writes its table between `<!-- bench:backbone -->` markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from arvideo.config import build_config  # noqa: E402
from arvideo.engine import Engine  # noqa: E402
from arvideo.reporting import device_line, write_marked_section  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded models/shapes-df)")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip writing")
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    engine = Engine.from_folder(args.model)
    cfg = build_config(prompt="a medium cyan square and a large red circle on a gray background", frames=args.frames,
                       seed=0, overrides=["cache.preset=none", *args.overrides])
    r = engine.resolve(cfg)
    text = engine.encode_text(r, None, None)

    def denoise(fast: bool) -> tuple[torch.Tensor, int]:
        engine.backbone.fast_cpu = fast
        calls = engine.model_calls
        with torch.no_grad():
            latents = [z for tick in engine._stream_chunks(r, text, None, None) for _, z in tick]
        return torch.cat(latents, dim=2), engine.model_calls - calls

    times: dict[str, list[float]] = {"diffusers modules": [], "fast": []}
    outputs: dict[str, torch.Tensor] = {}
    denoise(True)  # warm-up
    names = list(times)
    calls = 0
    for rep in range(args.repeat):
        for name in names if rep % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            outputs[name], calls = denoise(name == "fast")
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times[names[0]])
    lines = [
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {device_line()}; "
        f"`python scripts/bench_backbone.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"Model `{Path(engine.model.path).name}`, {args.frames} frames, full compute, default settings "
        f"({r.steps} steps, guidance {r.guidance}), {calls} model calls per run, no decode; median of "
        f"{args.repeat} alternating repeats.",
        "",
        "| backbone | median s | ms / model call | speedup | max abs latent diff |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        med = statistics.median(times[name])
        diff = (outputs[name] - outputs[names[0]]).abs().max().item()
        lines.append(f"| {name} | {med:.3f} | {1e3 * med / calls:.1f} | {base / med:.2f}x | {diff:.1e} |")
    text_out = "\n".join(lines)
    print(text_out)
    if args.doc:
        write_marked_section(Path(args.doc), "<!-- bench:backbone -->", "<!-- /bench:backbone -->", text_out)


if __name__ == "__main__":
    main()
