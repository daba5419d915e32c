"""Does torch.compile speed up the embedded model's denoising on CPU?

Two engines on the same weights in one process, one as shipped and one with every transformer
block's feed-forward network and cross-attention wrapped in `torch.compile` (inductor's C++
backend: fused elementwise work around the linear layers); the block-causal self-attention and
the KV store stay eager, as they call into the store between operations. Both denoise the same
prompt and seed without decoding (the decoder is the same for both), in alternating repeats after
a warm-up that includes the compilation, and the clean latents are compared.

    python scripts/bench_compile.py                          # 96 frames, --cache fast, 3 repeats
    python scripts/bench_compile.py --frames 48 cache.preset=none

Writes its table between the `bench:compile` markers of docs/benchmarks.md (--doc '' to skip).
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
from arvideo.reporting import measured_line, write_marked_section  # noqa: E402


def compile_blocks(engine: Engine) -> int:
    """Wrap each block's FFN and cross-attention in torch.compile; returns the modules wrapped."""
    import torch._dynamo

    # one graph per block and module, and a few shapes each (1 or 2 chunks computing, context growing)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    n = 0
    for block in engine.backbone.model.blocks:
        block.ffn = torch.compile(block.ffn, dynamic=True)
        block.attn2 = torch.compile(block.attn2, dynamic=True)
        n += 2
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--frames", type=int, default=96)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (default: cache.preset=fast)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = args.overrides or ["cache.preset=fast"]
    cfg = build_config(prompt="a medium cyan square and a small red circle on a gray background",
                       frames=args.frames, seed=1, overrides=overrides)
    eager, compiled = Engine.from_folder(args.model), Engine.from_folder(args.model)
    wrapped = compile_blocks(compiled)

    def run(engine: Engine) -> tuple[float, list[torch.Tensor]]:
        t = time.perf_counter()
        latents = [c.latents for c in engine.stream(cfg, decode=False)]
        return time.perf_counter() - t, latents

    t_eager_first, ref = run(eager)
    t_compile_first, out = run(compiled)  # includes compiling
    diff = max((a - b).abs().max().item() for a, b in zip(ref, out))
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.repeat):
        times["eager"].append(run(eager)[0])
        times["compiled"].append(run(compiled)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    paired = [e / c for e, c in zip(times["eager"], times["compiled"])]
    lines = [
        measured_line() + f"; "
        f"`python scripts/bench_compile.py --frames {args.frames} --repeat {args.repeat}"
        + (" " + " ".join(args.overrides) if args.overrides else "") + "`",
        "",
        f"Denoising of {args.frames} frames (`{' '.join(overrides)}`, no decode), shipped model; "
        f"{wrapped} modules compiled (each block's FFN and cross-attention); median of {args.repeat} "
        "alternating repeats after one warm-up run each.",
        "",
        "| engine | median s | each repeat (s) | first run s (compiled: includes compiling) |",
        "| --- | ---: | --- | ---: |",
        f"| eager (shipped) | {med['eager']:.2f} | {', '.join(f'{t:.2f}' for t in times['eager'])} | "
        f"{t_eager_first:.1f} |",
        f"| torch.compile | {med['compiled']:.2f} | {', '.join(f'{t:.2f}' for t in times['compiled'])} | "
        f"{t_compile_first:.1f} |",
        "",
        f"Paired speedup (eager / compiled): median {statistics.median(paired):.2f}x "
        f"(each repeat: {', '.join(f'{p:.2f}x' for p in paired)}); max abs difference of the clean "
        f"latents {diff:.1e}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.doc:
        write_marked_section(Path(args.doc), "<!-- bench:compile -->", "<!-- /bench:compile -->", text)


if __name__ == "__main__":
    main()
