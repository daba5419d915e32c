"""VAE decode speed on CPU: arvideo's streaming decoder with and without its CPU fast path.

Decodes the same random latents (a video of `--latent-frames` latent frames, streamed in chunks of
`--chunk` latent frames as the engine does) with
  - `torch`: `StreamingDecoder(fast_cpu=False, pixels_per_call=1)`, the decoder as diffusers runs it
    (torch's generic 3-D convolution with `F.pad` padding, `F.normalize` RMS norm, one latent frame
    per decoder call), chunk by chunk;
  - `fast, 1 per call`: the CPU fast path alone (oneDNN channels-last convolutions that pad the
    borders themselves, the one-reduction RMS norm), still one latent frame per decoder call;
  - `fast`: `StreamingDecoder()`, the default: the fast path and a whole chunk per decoder call
    (up to `pixels_per_call`);
  - `diffusers`: `AutoencoderKLWan.decode` of the whole latent video at once (what the diffusers
    pipeline does at the end of a video);
alternating the order every repeat, and reports the median time, ms per output frame, the speedup
over `torch`, and the largest pixel difference from `torch` (in [-1, 1] units).

    python scripts/bench_decoder.py                      # shipped model, 41 latent frames (81 frames), 5 repeats
    python scripts/bench_decoder.py --threads 2 --repeat 9

Writes its table between `<!-- bench:decoder -->` markers in docs/benchmarks.md.
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

from arvideo.reporting import measured_line, write_marked_section  # noqa: E402
from arvideo.vae import StreamingDecoder, denormalise_latents, use_fast_cpu_path  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "shapes-df"))
    ap.add_argument("--latent-frames", type=int, default=41)
    ap.add_argument("--chunk", type=int, default=2, help="latent frames per streamed chunk")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"), help="'' to skip writing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(args.model, subfolder="vae").eval()
    h = w = 16
    latents = torch.randn(1, vae.config.z_dim, args.latent_frames, h, w, generator=torch.Generator().manual_seed(0))

    def streamed(fast: bool, batched: bool = True) -> torch.Tensor:
        dec = StreamingDecoder(vae, fast_cpu=fast, **({} if batched else {"pixels_per_call": 1}))
        parts = [dec.decode_tensor(latents[:, :, :1])]
        for i in range(1, args.latent_frames, args.chunk):
            parts.append(dec.decode_tensor(latents[:, :, i : i + args.chunk]))
        return torch.cat(parts, dim=2)

    @torch.no_grad()
    def whole() -> torch.Tensor:
        use_fast_cpu_path(vae.decoder, False)  # diffusers' own path (the flag is shared with the streamed rows)
        z = denormalise_latents(vae, latents)
        return vae.decode(z, return_dict=False)[0].clamp(-1, 1)

    variants = {"torch": lambda: streamed(False, batched=False), "fast, 1 per call": lambda: streamed(True, batched=False),
                "fast": lambda: streamed(True), "diffusers": whole}
    times: dict[str, list[float]] = {k: [] for k in variants}
    outputs: dict[str, torch.Tensor] = {}
    streamed(True)  # warm-up (oneDNN primitive creation, allocator)
    names = list(variants)
    for r in range(args.repeat):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            outputs[name] = variants[name]()
            times[name].append(time.perf_counter() - t0)
    frames = outputs["torch"].shape[2]
    base = statistics.median(times["torch"])
    lines = [
        measured_line() + f"; "
        f"`python scripts/bench_decoder.py {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        f"VAE of `{Path(args.model).name}`, {args.latent_frames} random latent frames ({frames} frames of "
        f"{outputs['torch'].shape[-2]}x{outputs['torch'].shape[-1]}), streamed in chunks of {args.chunk}; "
        f"median of {args.repeat} alternating repeats.",
        "",
        "| decoder | median s | ms / frame | speedup vs torch | max abs diff vs torch |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name in names:
        med = statistics.median(times[name])
        diff = (outputs[name] - outputs["torch"]).abs().max().item()
        lines.append(f"| {name} | {med:.3f} | {1e3 * med / frames:.1f} | {base / med:.2f}x | {diff:.1e} |")
    text = "\n".join(lines)
    print(text)
    if args.doc:
        write_marked_section(Path(args.doc), "<!-- bench:decoder -->", "<!-- /bench:decoder -->", text)


if __name__ == "__main__":
    main()
