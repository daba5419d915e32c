"""Train the tiny AutoencoderKLWan of the shapes-df model on shapes-world clips.

4x spatial and 2x temporal compression: 64x64 frames -> 16x16 latents, 1 + 2n frames ->
1 + n latent frames. Loss: object-weighted L1 + MSE + L1 of spatial gradients + a small
per-element KL. At the end (step or wall-time budget reached) the script measures
reconstruction PSNR on held-out worlds (seeds below 1000; training uses seeds from 1000 up)
and the per-channel mean / std of the posterior means, which become the VAE config's
`latents_mean` / `latents_std`.

Examples (models/shapes-df: the runs are listed in docs/training.md):
    python scripts/train_vae.py --minutes 18 --frames 5 --batch 6 --lr 1.2e-3 --out checkpoints/vae
    python scripts/train_vae.py --minutes 5 --out checkpoints/vae --resume            # continue
    python scripts/train_vae.py --init checkpoints/vae/last.pt --decoder-only --frames 17 --batch 2 \
        --lr 4e-4 --minutes 28 --out checkpoints/vae_dec                              # decoder on longer clips
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
from _train_common import VAE_CONFIG, Clock, CsvLog, append_jsonl, atomic_save, count_params, psnr, setup_torch, to_video_tensor
from diffusers import AutoencoderKLWan

from arvideo.world import sample_world

HELD_OUT_SEEDS = range(0, 1000)
TRAIN_SEED_BASE = 1000


def build_vae(latents_mean=None, latents_std=None, config: dict | None = None) -> AutoencoderKLWan:
    config = config or VAE_CONFIG
    z = config["z_dim"]
    return AutoencoderKLWan(
        **config,
        latents_mean=list(latents_mean) if latents_mean is not None else [0.0] * z,
        latents_std=list(latents_std) if latents_std is not None else [1.0] * z,
    )


def sample_batch(rng: np.random.Generator, batch: int, frames: int, seed_lo: int, seed_hi: int, crop: int = 64):
    """Clips [B, 3, F, crop, crop] in [-1, 1], per-pixel loss weights [B, 1, F, crop, crop] and the
    mask of solid pixels (exactly a palette colour: object interiors and background, not the
    anti-aliased edges) [B, 1, F, crop, crop].

    The VAE is convolutional, so random spatial crops teach it the same local maps at a fraction
    of the cost of whole 64x64 frames (crop 32: 4x cheaper steps)."""
    clips, weights, solids = [], [], []
    for _ in range(batch):
        world = sample_world(int(rng.integers(seed_lo, seed_hi)))
        clip = world.clip(int(rng.integers(0, 4000)), frames)  # [F, H, W, 3]
        if crop < clip.shape[1]:
            y0, x0 = (int(v) for v in rng.integers(0, clip.shape[1] - crop + 1, size=2) // 4 * 4)
            clip = clip[:, y0 : y0 + crop, x0 : x0 + crop]
        bg = np.array(world.spec.background_rgb, dtype=np.int16)
        # Objects cover a few % of the frame: weight non-background pixels up so they are not ignored.
        off_bg = np.abs(clip.astype(np.int16) - bg).sum(-1) > 0
        is_obj = off_bg.astype(np.float32)
        solid = ~off_bg
        for o in world.spec.objects:
            solid |= (clip == np.array(o.rgb, dtype=np.uint8)).all(-1)
        clips.append(clip)
        weights.append(1.0 + 4.0 * is_obj)
        solids.append(solid.astype(np.float32))
    x = to_video_tensor(np.stack(clips))
    w = torch.from_numpy(np.stack(weights))[:, None]
    return x, w, torch.from_numpy(np.stack(solids))[:, None]


def decode_unclamped(vae: AutoencoderKLWan, z: torch.Tensor) -> torch.Tensor:
    """`vae.decode` without its final clamp to [-1, 1]: the clamp zeroes the gradient of any pixel
    pushed past the wrong bound, which left whole regions stuck in the first run."""
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    out = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        out.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(out, 2)


def vae_loss(vae: AutoencoderKLWan, x: torch.Tensor, w: torch.Tensor, kl_weight: float, sample: bool = False,
             decoder_only: bool = False, solid: torch.Tensor | None = None, palette_weight: float = 0.0,
             palette_margin: float = 12.0):
    with torch.set_grad_enabled(not decoder_only):
        post = vae.encode(x).latent_dist
    # Decoding the posterior mean (not a sample) learns far faster in a short CPU budget; the
    # transformer is trained on posterior means anyway. The KL term then only bounds the means.
    z = post.sample() if sample else post.mode()
    y = decode_unclamped(vae, z)
    err = y - x
    l1 = (err.abs() * w).mean()
    l2 = (err.pow(2) * w).mean()
    gx = (y[..., :, 1:] - y[..., :, :-1]) - (x[..., :, 1:] - x[..., :, :-1])
    gy = (y[..., 1:, :] - y[..., :-1, :]) - (x[..., 1:, :] - x[..., :-1, :])
    grad = gx.abs().mean() + gy.abs().mean()
    kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
    loss = l1 + l2 + 0.5 * grad + kl_weight * kl
    parts = dict(l1=l1.item(), l2=l2.item(), grad=grad.item(), kl=kl.item())
    if palette_weight > 0 and solid is not None:
        # The world metrics classify a pixel by its nearest palette colour within RGB distance 40:
        # a solid pixel decoded more than `palette_margin` (0-255 units) off its colour is pushed
        # back, in proportion to how far (object pixels weighted as in the L1 / MSE terms).
        dist = (err * 127.5).pow(2).sum(1, keepdim=True).add(1e-6).sqrt()
        hinge = ((dist - palette_margin).clamp(min=0) / 127.5 * w * solid).sum() / (w * solid).sum().clamp(min=1)
        loss = loss + palette_weight * hinge
        parts["palette"] = hinge.item()
    return loss, parts


@torch.no_grad()
def evaluate_psnr(vae: AutoencoderKLWan, num_clips: int = 16, frames: int = 17) -> float:
    """Mean reconstruction PSNR (posterior mean, no sampling) over held-out worlds."""
    rng = np.random.default_rng(12345)
    vals = []
    for i in range(num_clips):
        world = sample_world(int(HELD_OUT_SEEDS[i * 7 % len(HELD_OUT_SEEDS)]))
        x = to_video_tensor(world.clip(int(rng.integers(0, 4000)), frames)[None])
        y = vae.decode(vae.encode(x).latent_dist.mode()).sample
        vals.append(psnr(y, x))
    return float(np.mean(vals))


@torch.no_grad()
def latent_stats(vae: AutoencoderKLWan, num_clips: int = 96, frames: int = 17) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of posterior means over training-range clips."""
    rng = np.random.default_rng(777)
    zs = []
    for _ in range(num_clips):
        world = sample_world(int(rng.integers(TRAIN_SEED_BASE, 10**8)))
        x = to_video_tensor(world.clip(int(rng.integers(0, 4000)), frames)[None])
        zs.append(vae.encode(x).latent_dist.mode())
    z = torch.cat(zs).transpose(0, 1).flatten(1)  # [C, N]
    return z.mean(1).tolist(), z.std(1).clamp_min(1e-4).tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("checkpoints/vae"), help="checkpoint folder")
    p.add_argument("--steps", type=int, default=100000, help="stop after this many optimiser steps")
    p.add_argument("--minutes", type=float, default=None, help="stop after this wall time (then evaluate and save)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--init", type=Path, default=None, help="start from this checkpoint's weights (fresh optimiser)")
    p.add_argument("--decoder-only", action="store_true",
                   help="freeze encoder + quant_conv (the latent space, and the --init latent statistics, stay as they are)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--frames", type=int, default=9, help="frames per training clip (1 + 4k)")
    p.add_argument("--crop", type=int, default=64, help="random square crop of the 64x64 frames (multiple of 4)")
    p.add_argument("--z-dim", type=int, default=VAE_CONFIG["z_dim"], help="latent channels (new runs only)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--palette-weight", type=float, default=0.0,
                   help="weight of the palette hinge: solid pixels decoded farther than --palette-margin from "
                   "their colour (what the world metrics' 40-unit colour radius punishes); 0 = off (as for every shipped VAE)")
    p.add_argument("--palette-margin", type=float, default=12.0, help="palette hinge margin, RGB units 0-255")
    p.add_argument("--sample-posterior", action="store_true", help="decode posterior samples instead of means")
    p.add_argument("--save-every-min", type=float, default=3.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--log", type=Path, default=Path("runs/vae_train.csv"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (useful on GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-clips", type=int, default=16, help="held-out clips for the final PSNR")
    p.add_argument("--stat-clips", type=int, default=96, help="clips for the latent mean / std statistics")
    args = p.parse_args()

    setup_torch(args.threads, args.seed)
    device = torch.device(args.device)
    config = dict(VAE_CONFIG, z_dim=args.z_dim)
    init_ck = None
    if args.init is not None or (args.resume and (args.out / "last.pt").exists()):
        src = args.init if args.init is not None else args.out / "last.pt"
        config = torch.load(src, map_location="cpu", weights_only=False).get("config", config)
    vae = build_vae(config=config).to(device)
    if args.init is not None:
        init_ck = torch.load(args.init, map_location=device, weights_only=False)
        vae.load_state_dict(init_ck["vae"])
    if args.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    opt = torch.optim.AdamW([q for q in vae.parameters() if q.requires_grad], lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, wall_before = 0, 0.0
    last = args.out / "last.pt"
    if args.resume and last.exists():
        ck = torch.load(last, map_location=device, weights_only=False)
        vae.load_state_dict(ck["vae"])
        opt.load_state_dict(ck["opt"])
        step, wall_before = ck["step"], ck.get("wall_s", 0.0)
        print(f"resumed at step {step}", flush=True)
    print(f"VAE parameters: {count_params(vae):,}", flush=True)

    rng = np.random.default_rng(args.seed + step)
    log = CsvLog(args.log)
    clock = Clock(args.minutes)
    last_save = time.time()
    run_steps = 0

    def save(extra: dict | None = None) -> None:
        atomic_save(
            dict(vae=vae.state_dict(), opt=opt.state_dict(), step=step, wall_s=wall_before + clock.elapsed(),
                 config=config, **(extra or {})),
            last,
        )

    vae.train()
    while step < args.steps and not clock.done():
        # Linear warm-up, then cosine decay to 10% over the wall-time (or step) budget.
        frac = clock.elapsed() / (60 * args.minutes) if args.minutes else run_steps / max(1, args.steps)
        lr = args.lr * min(1.0, (run_steps + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        for g in opt.param_groups:
            g["lr"] = lr
        x, w, solid = sample_batch(rng, args.batch, args.frames, TRAIN_SEED_BASE, 10**8, args.crop)
        x, w, solid = x.to(device), w.to(device), solid.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss, parts = vae_loss(vae, x, w, args.kl_weight, args.sample_posterior, args.decoder_only, solid,
                                   args.palette_weight, args.palette_margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        run_steps += 1
        if step % args.log_every == 0:
            row = dict(step=step, wall_s=round(wall_before + clock.elapsed(), 1), lr=f"{lr:.2e}", loss=round(loss.item(), 5),
                       grad_norm=round(gn.item(), 3), **{k: round(v, 5) for k, v in parts.items()})
            log.write(row)
            print(row, flush=True)
        if time.time() - last_save > 60 * args.save_every_min:
            save()
            last_save = time.time()

    vae.eval()
    value = evaluate_psnr(vae, args.eval_clips)
    if args.decoder_only and init_ck is not None and "latents_mean" in init_ck:
        mean, std = init_ck["latents_mean"], init_ck["latents_std"]  # encoder frozen: same latent space
    else:
        mean, std = latent_stats(vae, args.stat_clips)
    wall = wall_before + clock.elapsed()
    save(dict(psnr=value, latents_mean=mean, latents_std=std))
    summary = dict(step=step, wall_s=round(wall, 1), psnr_db=round(value, 2), latents_mean=mean, latents_std=std,
                   params=count_params(vae))
    append_jsonl(args.log.with_suffix(".summary.jsonl"), summary)
    print(summary, flush=True)


if __name__ == "__main__":
    main()
