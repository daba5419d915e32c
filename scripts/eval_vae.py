"""Reconstruction ceiling of a trained VAE: what the model could score if the transformer were perfect.

Encodes held-out shapes-world clips (seeds below 1000; training uses seeds from 1000 up), decodes
the posterior means with the pipeline's own `vae.decode`, and reports PSNR and the world metrics of
the reconstructions, for several clip lengths (long decodes show drift in a causal decoder).

    python scripts/eval_vae.py checkpoints/vae/last.pt
    python scripts/eval_vae.py models/shapes-df/vae --frames 9 33 65
    python scripts/eval_vae.py models/shapes-df/vae --frames 9 --clips 30 --solid   # colour fidelity
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from _train_common import build_vae_from_checkpoint, psnr, setup_torch, to_video_tensor

from arvideo.world import sample_world
from arvideo.world.metrics import CLASSIFY_DISTANCE, format_table, mean_scores, score_video


def load(path: Path):
    if path.is_dir():
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan.from_pretrained(path).eval().requires_grad_(False)
    return build_vae_from_checkpoint(path)[0]


@torch.no_grad()
def reconstruct(vae, clip: np.ndarray) -> tuple[np.ndarray, float]:
    x = to_video_tensor(clip[None])
    y = vae.decode(vae.encode(x).latent_dist.mode()).sample
    return ((y[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy(), psnr(y, x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vae", type=Path, help="a train_vae.py checkpoint or an exported vae/ folder")
    p.add_argument("--frames", type=int, nargs="+", default=[9, 33], help="clip lengths (1 + 4k)")
    p.add_argument("--clips", type=int, default=6)
    p.add_argument("--start", type=int, default=100, help="first world frame of each clip")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--solid", action="store_true",
                   help="also print, per object colour and background, the fraction of solid object pixels (exactly "
                   "the palette colour in the clip) whose reconstruction lies within the metrics' colour radius")
    args = p.parse_args()
    setup_torch(args.threads)
    vae = load(args.vae)
    rows, within = [], {}
    for frames in args.frames:
        scores, values = [], []
        for seed in range(args.clips):
            world = sample_world(seed)
            clip = world.clip(args.start, frames)
            out, value = reconstruct(vae, clip)
            scores.append(score_video(out, world.spec))
            values.append(value)
            for o in world.spec.objects if args.solid else ():
                rgb = np.array(o.rgb)
                err = np.linalg.norm(out[(clip == rgb).all(-1)].astype(np.float64) - rgb, axis=-1)
                hits = within.setdefault((o.colour, world.spec.background), [0, 0])
                hits[0] += int((err <= CLASSIFY_DISTANCE).sum())
                hits[1] += err.size
        row = mean_scores(scores)
        print(f"{frames} frames: PSNR {np.mean(values):.2f} dB", flush=True)
        rows.append((f"{frames} frames, PSNR {np.mean(values):.2f} dB", row))
    print(format_table(rows))
    if within:
        print("\nSolid object pixels within the colour radius (all clip lengths):\n\n| colour | background | fraction | pixels |"
              "\n| --- | --- | ---: | ---: |")
        for (colour, bg), (hit, total) in sorted(within.items()):
            print(f"| {colour} | {bg} | {hit / max(total, 1):.2f} | {total} |")


if __name__ == "__main__":
    main()
