"""Train the shapes-df SkyReelsV2Transformer3DModel and its T5 text encoder with diffusion forcing.

Data: a pool of shapes-world clips encoded once with the frozen trained VAE (posterior mean,
normalised with the VAE config's latents_mean / latents_std, exactly as the pipeline does),
kept with their captions; each step takes random crops of `--clip-latents` latent frames
(half of them start at latent frame 0, the single-frame "image" latent every video begins with).

Objective (the conventions of diffusers' UniPC `flow_prediction`):
    x_sigma = (1 - sigma) * x0 + sigma * noise,  target v = noise - x0,  timestep = 1000 * sigma,
with sigma drawn per block of `causal_block_size` latent frames independently (diffusion
forcing), the transformer in diffusers' block-causal mode (`_set_ar_attention`), and the
timestep passed as [B, F] (`enable_diffusion_forcing=True`). For `--context-prob` of the
samples a random prefix of blocks is "context": nearly clean, at a level drawn around
`--context-noise` (the engine feeds finished chunks back as x*(1-0.001a) + eps*0.001a with
timestep a), and left out of the loss. Occasionally (`--self-forcing-prob`) the context is
the model's own one-step estimate of x0 instead of the ground truth, so it learns to continue
from imperfect history. The text encoder is trained jointly, through exactly the pipeline's
`_get_t5_prompt_embeds` encoding; `--caption-dropout` of captions become "" (the negative
prompt used for classifier-free guidance).

Every `--eval-every-min` minutes the EMA weights are put in a SkyReelsV2DiffusionForcingPipeline
and a few short videos are generated (long-video mode: windows of the training clip length,
`addnoise_condition` = context noise) and scored with arvideo.world.metrics.score_video.

Example (the run behind models/shapes-df):
    python scripts/train_transformer.py --vae checkpoints/vae/last.pt --minutes 55 --pool-clips 320 --pool-frames 17 --out checkpoints/df
    python scripts/train_transformer.py --vae checkpoints/vae/last.pt --minutes 10 --out checkpoints/df --resume
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from pathlib import Path

import numpy as np
import torch
from _train_common import (
    EMA,
    MAX_SEQUENCE_LENGTH,
    TRANSFORMER_CONFIG,
    Clock,
    CsvLog,
    append_jsonl,
    assemble_pipeline,
    atomic_save,
    build_text_encoder,
    build_tokenizer,
    build_transformer,
    build_vae_from_checkpoint,
    checkpoint_from_folder,
    count_params,
    encode_tokens,
    setup_torch,
    to_video_tensor,
    tokenize,
)

from arvideo.world import sample_world, score_video

EVAL_SEEDS = (3, 11, 5)  # held-out worlds (training pool seeds are >= 1000)


# --- latent pool ---


def render_clips(job: tuple) -> tuple[np.ndarray, list[str], torch.Tensor]:
    """World clips for (world seeds, start frames, frames, temporal factor, spatial factor): uint8 clips,
    captions and object masks. Runs in the pool's worker processes (numpy and CPU torch only)."""
    seeds, starts, frames, tf, sf = job
    torch.set_num_threads(1)
    clips, captions, masks = [], [], []
    for seed, start in zip(seeds, starts):
        world = sample_world(int(seed))
        clip = world.clip(int(start), frames)
        clips.append(clip)
        captions.append(world.spec.caption)
        masks.append(object_mask(clip, world.spec.background_rgb, tf, sf))
    return np.stack(clips), captions, torch.stack(masks)


def pool_jobs(seed, batch: int, frames: int, tf: int, sf: int, num_clips: int | None = None):
    """Render jobs of `batch` clips, (world seeds, start frames, frames, tf, sf), drawn from `seed`
    (an int or a numpy seed sequence); endless when num_clips is None."""
    rng = np.random.default_rng(seed)
    made = 0
    while num_clips is None or made < num_clips:
        n = batch if num_clips is None else min(batch, num_clips - made)
        seeds, starts = [], []
        for _ in range(n):  # the draw order of the single-process version: seed, then start, per clip
            seeds.append(int(rng.integers(1000, 10**8)))
            starts.append(int(rng.integers(0, 4000)))
        yield (seeds, starts, frames, tf, sf)
        made += n


def fork_workers(workers: int):
    import multiprocessing as mp

    return mp.get_context("fork").Pool(workers)


class Renderer:
    """Renders jobs in order: inline, or in `workers` processes with at most two jobs per worker
    waiting (so an endless job stream holds bounded memory). Start it before anything touches CUDA:
    the workers are forked."""

    def __init__(self, jobs, workers: int = 0, procs=None):
        self.jobs, self.workers, self.pending = iter(jobs), workers, []
        self.procs = procs  # a process pool forked earlier (before CUDA), or one made here
        if workers > 0:
            self.procs = self.procs or fork_workers(workers)
            self._top_up()

    def _top_up(self) -> None:
        while len(self.pending) < 2 * self.workers:
            job = next(self.jobs, None)
            if job is None:
                return
            self.pending.append(self.procs.apply_async(render_clips, (job,)))

    def next(self, block: bool = True):
        """The next rendered batch (clips, captions, masks); None when the jobs are exhausted, or
        (block=False, workers only) when it is not rendered yet."""
        if self.procs is None:
            job = next(self.jobs, None)
            return None if job is None else render_clips(job)
        if not self.pending or (not block and not self.pending[0].ready()):
            return None
        out = self.pending.pop(0).get()
        self._top_up()
        return out

    def close(self) -> None:
        if self.procs is not None:
            self.procs.terminate()
            self.procs.join()
            self.procs = None


class LatentEncoder:
    """The frozen VAE on `device`: uint8 clips -> normalised fp16 posterior-mean latents."""

    def __init__(self, vae, device):
        self.device = torch.device(device)
        self.vae = vae.to(self.device)
        z_dim = vae.config.z_dim
        self.mean = torch.tensor(vae.config.latents_mean, device=self.device).view(1, z_dim, 1, 1, 1)
        self.inv_std = 1.0 / torch.tensor(vae.config.latents_std, device=self.device).view(1, z_dim, 1, 1, 1)

    @torch.no_grad()
    def __call__(self, clips: np.ndarray) -> torch.Tensor:
        z = self.vae.encode(to_video_tensor(clips).to(self.device)).latent_dist.mode()
        return ((z - self.mean) * self.inv_std).half()


@torch.no_grad()
def build_pool(vae, num_clips: int, frames: int, seed: int, batch: int = 4, workers: int = 0,
               device: torch.device | str = "cpu") -> dict:
    """Encode `num_clips` random world clips: normalised latents [N, C, 1 + (frames-1)/2, 16, 16] and captions.

    `workers` > 0 renders the clips in that many processes (started before the VAE moves to `device`);
    the VAE encodes on `device`, and the pool stays there. The clips depend on `seed` alone."""
    tf, sf = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    renderer = Renderer(pool_jobs(seed, batch, frames, tf, sf, num_clips), workers)
    encode = LatentEncoder(vae, device)
    latents, masks, captions = [], [], []
    t0 = time.time()
    k = 0
    while (rendered := renderer.next()) is not None:
        clips, caps, m = rendered
        latents.append(encode(clips))
        masks.append(m.to(encode.device))
        captions.extend(caps)
        if k % 25 == 0:
            print(f"pool: {len(captions)}/{num_clips} clips encoded, {time.time() - t0:.0f}s", flush=True)
        k += 1
    renderer.close()
    print(f"pool: {len(captions)} clips in {time.time() - t0:.0f}s", flush=True)
    return dict(latents=torch.cat(latents), masks=torch.cat(masks), captions=captions, frames=frames)


class PoolRefresher:
    """Keeps the pool fresh during training (`--pool-refresh K`): worker processes render new world
    clips all along, and every K steps one rendered batch, if one is ready (training never waits for
    it), is encoded and overwrites the oldest clips of the pool, with their masks and captions. So
    a run can start from a small pool and still see new clips throughout, instead of spending
    minutes of a GPU lease building a large one."""

    def __init__(self, renderer: Renderer, encode: LatentEncoder, tokenizer, pool: dict):
        self.renderer, self.encode, self.tokenizer = renderer, encode, tokenizer
        self.pool = pool  # latents, masks, ids, mask: tensors written in place
        self.cursor = 0  # the oldest slot
        self.replaced = 0

    def poll(self, block: bool = False) -> int:
        """Encodes one rendered batch into the oldest slots if one is ready; the clips written."""
        rendered = self.renderer.next(block=block)
        if rendered is None:
            return 0
        clips, caps, m = rendered
        z = self.encode(clips)
        ids, mask = tokenize(self.tokenizer, caps, MAX_SEQUENCE_LENGTH)
        n_pool, n = self.pool["latents"].shape[0], len(caps)
        slots = (self.cursor + torch.arange(n)) % n_pool
        self.pool["latents"][slots] = z.to(self.pool["latents"].device)
        if self.pool.get("masks") is not None:
            self.pool["masks"][slots] = m.to(self.pool["masks"].device)
        self.pool["ids"][slots] = ids
        self.pool["mask"][slots] = mask
        self.cursor = int((self.cursor + n) % n_pool)
        self.replaced += n
        return n


def object_mask(clip: np.ndarray, background_rgb, tf: int, sf: int) -> torch.Tensor:
    """[1, latent frames, h, w] uint8: 1 where a latent cell (and its 8 neighbours) covers any object pixel.

    Latent frame 0 is video frame 0; latent frame j > 0 covers frames tf*j-1, tf*j (temporal factor tf = 2);
    sf is the VAE's spatial factor."""
    obj = torch.from_numpy(np.abs(clip.astype(np.int16) - np.array(background_rgb, np.int16)).sum(-1) > 0)
    obj = obj.float()[None]  # [1, F, H, W]
    first, rest = obj[:, :1], obj[:, 1:]
    rest = rest.reshape(1, -1, tf, *rest.shape[-2:]).amax(2)
    m = torch.cat([first, rest], 1)  # [1, latent F, H, W]
    m = torch.nn.functional.max_pool2d(m, sf)  # any object pixel in the cell
    m = torch.nn.functional.max_pool2d(m, 3, stride=1, padding=1)  # and its neighbours (edges)
    return m.to(torch.uint8)


# --- noise levels and context ---


def shift_sigma(s: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * s / (1 + (shift - 1) * s)


def sample_sigmas(batch: int, blocks: int, args, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block sigma [B, nb] and a context mask [B, nb] (True = context block, not in the loss)."""
    s = torch.sigmoid(torch.randn(batch, blocks, generator=gen) * args.logit_std)
    sigma = shift_sigma(s, args.train_shift)
    # Some samples denoise all their blocks at one level, as a multi-block chunk or ar_step=0 does.
    same = torch.rand(batch, generator=gen) < args.same_level_prob
    sigma[same] = sigma[same, :1].expand(-1, blocks)
    ctx = torch.zeros(batch, blocks, dtype=torch.bool)
    use_ctx = torch.rand(batch, generator=gen) < args.context_prob
    for b in torch.nonzero(use_ctx).flatten().tolist():
        k = int(torch.randint(1, blocks, (1,), generator=gen))
        ctx[b, :k] = True
    # Context level drawn uniformly in [0, 2 * context_noise] around the inference value.
    a = torch.rand(batch, blocks, generator=gen) * 2 * args.context_noise / 1000.0
    sigma = torch.where(ctx, a, sigma)
    return sigma, ctx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", type=Path, default=Path("checkpoints/vae/last.pt"), help="trained VAE checkpoint (train_vae.py)")
    p.add_argument("--out", type=Path, default=Path("checkpoints/df"), help="checkpoint folder")
    p.add_argument("--steps", type=int, default=10**7, help="stop after this many optimiser steps")
    p.add_argument("--minutes", type=float, default=None, help="stop after this wall time (checkpoint saved)")
    p.add_argument("--until", type=float, default=None,
                   help="unix time to stop at; overrides --minutes with the time left once the pool is built")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt (and reuse OUT/pool.pt)")
    p.add_argument("--init", type=Path, default=None,
                   help="start from this checkpoint's EMA weights (and its transformer config), or from an exported "
                        "model folder's weights (e.g. models/shapes-df), with a fresh optimiser, step count and pool: "
                        "a new run that continues a previous model")
    p.add_argument("--heads", type=int, default=None, help="new model: attention heads (x 64 channels each)")
    p.add_argument("--layers", type=int, default=None, help="new model: transformer blocks")
    p.add_argument("--ffn-dim", type=int, default=None, help="new model: feed-forward width")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--clip-latents", type=int, default=8, help="latent frames per training clip = kv window")
    p.add_argument("--causal-block-size", type=int, default=TRANSFORMER_CONFIG["num_frame_per_block"])
    p.add_argument("--pool-clips", type=int, default=400, help="world clips encoded once into the latent pool")
    p.add_argument("--pool-frames", type=int, default=33, help="video frames per pool clip (1 + 4k)")
    p.add_argument("--pool", type=Path, default=None,
                   help="latent pool file (default OUT/pool.pt); built and saved if missing, else loaded, so runs "
                        "side by side can share one")
    p.add_argument("--pool-workers", type=int, default=0, help="processes rendering the pool's world clips")
    p.add_argument("--pool-refresh", type=int, default=0, metavar="K",
                   help="every K steps, replace the pool's oldest clips with one batch of new world clips rendered "
                        "in the background by the --pool-workers processes (if one is ready; training never waits); "
                        "0 = a fixed pool")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--logit-std", type=float, default=1.0, help="sigma = shift(sigmoid(N(0, logit_std)))")
    p.add_argument("--train-shift", type=float, default=2.0, help="time shift applied to training sigmas")
    p.add_argument("--same-level-prob", type=float, default=0.15)
    p.add_argument("--context-prob", type=float, default=0.5)
    p.add_argument("--context-noise", type=float, default=20.0, help="inference context timestep (0..1000)")
    p.add_argument("--self-forcing-prob", type=float, default=0.1, help="per-step chance of model-made context")
    p.add_argument("--self-forcing-after", type=float, default=0.3, help="fraction of the budget before it starts")
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--object-weight", type=float, default=4.0,
                   help="loss weight of latent cells near objects (background cells weigh 1)")
    p.add_argument("--save-every-min", type=float, default=4.0)
    p.add_argument("--eval-every-min", type=float, default=15.0, help="0 disables")
    p.add_argument("--eval-steps", type=int, default=16)
    p.add_argument("--eval-guidance", type=float, default=4.0)
    p.add_argument("--eval-flow-shift", type=float, default=3.0)
    p.add_argument("--eval-frames", type=int, default=31)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--log", type=Path, default=Path("runs/df_train.csv"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the transformer (useful on GPU)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    setup_torch(args.threads, args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    vae, _ = build_vae_from_checkpoint(args.vae)
    cbs, T = args.causal_block_size, args.clip_latents
    if T % cbs:
        raise SystemExit(f"--clip-latents {T} must be a multiple of --causal-block-size {cbs}")

    if args.pool_refresh and args.pool_workers < 1:
        raise SystemExit("--pool-refresh renders new clips in the background: give --pool-workers N (N >= 1)")
    # forked now, before anything touches CUDA; they render the refresh clips once training runs
    refresh_procs = fork_workers(args.pool_workers) if args.pool_refresh else None
    pool_path = args.pool or args.out / "pool.pt"
    if pool_path.exists() and (args.resume or args.pool is not None):
        pool = torch.load(pool_path, map_location=device, weights_only=False)
    else:
        pool = build_pool(vae, args.pool_clips, args.pool_frames, seed=args.seed + 1, batch=max(4, args.batch // 4),
                          workers=args.pool_workers, device=device)
        atomic_save(pool, pool_path)
    latents = pool["latents"].to(device)  # [N, C, P, 16, 16] fp16, normalised
    masks = pool.get("masks")  # [N, 1, P, 16, 16] uint8 object cells (older pools have none)
    masks = masks.to(device) if masks is not None else None
    N, C, P = latents.shape[:3]
    print(f"pool: {N} clips x {P} latent frames; std {latents.float().std():.3f}", flush=True)
    if P < T:
        raise SystemExit(f"pool clips have {P} latent frames, fewer than --clip-latents {T}")
    if args.pool_refresh and pool.get("frames", args.pool_frames) != args.pool_frames:
        raise SystemExit(f"--pool-refresh renders --pool-frames {args.pool_frames} frames a clip, the pool has "
                         f"{pool['frames']}: give --pool-frames {pool['frames']}")

    tokenizer = build_tokenizer()
    ids, mask = tokenize(tokenizer, pool["captions"], MAX_SEQUENCE_LENGTH)
    empty_ids, empty_mask = tokenize(tokenizer, [""], MAX_SEQUENCE_LENGTH)

    init = None
    new_size = {k: v for k, v in (("num_attention_heads", args.heads), ("num_layers", args.layers),
                                  ("ffn_dim", args.ffn_dim)) if v is not None}
    if args.init is not None:
        if args.resume:
            raise SystemExit("--init starts a new run from a checkpoint; --resume continues OUT/last.pt: give one")
        if new_size:
            raise SystemExit("--heads/--layers/--ffn-dim size a new model; --init continues one of a fixed size")
        init = checkpoint_from_folder(args.init) if args.init.is_dir() else torch.load(args.init, map_location="cpu", weights_only=False)
    t_config = init["transformer_config"] if init is not None else (dict(TRANSFORMER_CONFIG, **new_size) if new_size else None)
    model = torch.nn.ModuleDict(
        dict(transformer=build_transformer(cbs, config=t_config, channels=C), text_encoder=build_text_encoder(len(tokenizer)))
    ).to(device)
    prior = {}  # the training behind the --init weights (export_model.py adds it to the totals)
    if init is not None:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in init["ema"]["shadow"].items()})
        print(f"initialised from the EMA weights of {args.init} (step {init['step']})", flush=True)
        before = init.get("init", {})
        prior = dict(path=str(args.init), step=init["step"] + before.get("step", 0),
                     wall_s=init["wall_s"] + before.get("wall_s", 0.0))
    model["transformer"]._set_ar_attention(cbs)
    print(f"transformer parameters: {count_params(model['transformer']):,}; "
          f"text encoder: {count_params(model['text_encoder']):,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = EMA(model, args.ema)
    step, wall_before = 0, 0.0
    last = args.out / "last.pt"
    if args.resume and last.exists():
        ck = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        ema.load_state_dict(ck["ema"])
        step, wall_before = ck["step"], ck["wall_s"]
        prior = ck.get("init", {})
        print(f"resumed at step {step} ({wall_before / 60:.1f} min trained)", flush=True)

    refresher = None
    if args.pool_refresh:
        # a stream of its own per (seed, step), so a resumed run renders clips it has not seen
        jobs = pool_jobs(np.random.SeedSequence([args.seed + 1, 1, step]), max(4, args.batch // 4), args.pool_frames,
                         vae.config.scale_factor_temporal, vae.config.scale_factor_spatial)
        refresher = PoolRefresher(Renderer(jobs, args.pool_workers, procs=refresh_procs), LatentEncoder(vae, device),
                                  tokenizer, dict(latents=latents, masks=masks, ids=ids, mask=mask))
    gen = torch.Generator().manual_seed(args.seed * 1000 + step)
    # Noise is drawn where it is used (a CPU draw copied to the GPU would cost more than the step).
    dgen = gen if device.type == "cpu" else torch.Generator(device).manual_seed(args.seed * 1000 + step)
    log = CsvLog(args.log)
    eval_log = args.log.with_name(args.log.stem + "_eval.jsonl")
    if args.until is not None:
        args.minutes = max(0.5, (args.until - time.time()) / 60)
        print(f"training for {args.minutes:.1f} minutes (--until)", flush=True)
    clock = Clock(args.minutes)
    last_save = last_eval = time.time()
    nb = T // cbs

    def save() -> None:
        atomic_save(
            dict(model=model.state_dict(), opt=opt.state_dict(), ema=ema.state_dict(), step=step,
                 wall_s=wall_before + clock.elapsed(), args=vars(args) | dict(vae=str(args.vae), out=str(args.out), log=str(args.log)),
                 transformer_config=dict(t_config or TRANSFORMER_CONFIG, num_frame_per_block=cbs, in_channels=C, out_channels=C),
                 init=prior),
            last,
        )

    def evaluate() -> None:
        t0 = time.time()
        ema_model = copy.deepcopy(model).cpu()
        ema_model.load_state_dict({k: v.to(ema_model.state_dict()[k].dtype) for k, v in ema.shadow.items()})
        ema_model.eval()
        row = evaluate_model(ema_model, vae, tokenizer, args)
        row.update(step=step, wall_s=round(wall_before + clock.elapsed(), 1), eval_s=round(time.time() - t0, 1))
        append_jsonl(eval_log, row)
        print("eval", row, flush=True)

    model.train()
    running = []
    while step < args.steps and not clock.done():
        frac = clock.elapsed() / (60 * args.minutes) if args.minutes else 0.0
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        for g in opt.param_groups:
            g["lr"] = lr

        # Batch: random clips, random crops (half from frame 0), captions with dropout.
        b_idx = torch.randint(0, N, (args.batch,), generator=gen)
        from_zero = torch.rand(args.batch, generator=gen) < 0.5
        starts = torch.where(from_zero, 0, torch.randint(0, P - T + 1, (args.batch,), generator=gen))
        rows, frames_idx = b_idx.to(device)[:, None], (starts[:, None] + torch.arange(T)).to(device)
        x0 = latents[rows, :, frames_idx].permute(0, 2, 1, 3, 4).float()  # [B, C, T, h, w]
        if masks is not None and args.object_weight != 1.0:
            obj = masks[rows, :, frames_idx].permute(0, 2, 1, 3, 4).float()
            pix_w = 1.0 + (args.object_weight - 1.0) * obj  # [B, 1, T, h, w]
        else:
            pix_w = torch.ones_like(x0[:, :1])
        drop = torch.rand(args.batch, generator=gen) < args.caption_dropout
        b_ids = torch.where(drop[:, None], empty_ids, ids[b_idx]).to(device)
        b_mask = torch.where(drop[:, None], empty_mask, mask[b_idx]).to(device)

        sigma_blk, ctx_blk = sample_sigmas(args.batch, nb, args, gen)
        sigma = sigma_blk.repeat_interleave(cbs, dim=1).to(device)  # [B, T]
        ctx = ctx_blk.repeat_interleave(cbs, dim=1).to(device)
        noise = torch.randn(x0.shape, generator=dgen, device=device)
        s5 = sigma[:, None, :, None, None]
        xt = (1 - s5) * x0 + s5 * noise
        timestep = sigma * 1000.0

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            text = encode_tokens(model["text_encoder"], b_ids, b_mask)
            if ctx.any() and frac > args.self_forcing_after and torch.rand(1, generator=gen).item() < args.self_forcing_prob:
                # Self-forcing-lite: context = the model's own one-step x0 estimate from a mid noise level.
                with torch.no_grad():
                    s_sf = 0.2 + 0.5 * torch.rand(args.batch, 1, generator=gen).to(device)
                    sig_sf = torch.where(ctx, s_sf.expand(-1, T), sigma)
                    x_sf = (1 - sig_sf[:, None, :, None, None]) * x0 + sig_sf[:, None, :, None, None] * noise
                    v = model["transformer"](x_sf, sig_sf * 1000.0, text.detach(), enable_diffusion_forcing=True, return_dict=False)[0]
                    x0_hat = (x_sf - sig_sf[:, None, :, None, None] * v.float()).clamp(-6, 6)
                    c5 = ctx[:, None, :, None, None]
                    xt = torch.where(c5, (1 - s5) * x0_hat + s5 * noise, xt)
            pred = model["transformer"](xt, timestep, text, enable_diffusion_forcing=True, return_dict=False)[0]
        target = noise - x0
        # Objects cover a few % of the latent cells: weight them up (--object-weight) so the loss is
        # not all background; normalised by the weight mass, so the scale stays comparable.
        w = (~ctx).float()[:, None, :, None, None] * pix_w
        loss = ((pred.float() - target).pow(2) * w).sum() / (w.sum() * C).clamp_min(1)

        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model)
        step += 1
        if refresher is not None and step % args.pool_refresh == 0:
            refresher.poll()
        running.append(loss.detach())  # read at log time: a .item() per step would wait for the GPU

        if step % args.log_every == 0:
            row = dict(step=step, wall_s=round(wall_before + clock.elapsed(), 1), lr=f"{lr:.2e}",
                       loss=round(torch.stack(running).mean().item(), 5), grad_norm=round(gn.item(), 3))
            if refresher is not None:
                row["refreshed"] = refresher.replaced
            running = []
            log.write(row)
            print(row, flush=True)
        if time.time() - last_save > 60 * args.save_every_min:
            save()
            last_save = time.time()
        if args.eval_every_min > 0 and time.time() - last_eval > 60 * args.eval_every_min:
            save()
            evaluate()
            model.train()
            last_eval = last_save = time.time()

    if refresher is not None:
        refresher.renderer.close()
    save()
    print(f"saved {last} at step {step}, {(wall_before + clock.elapsed()) / 60:.1f} min trained", flush=True)
    if args.eval_every_min > 0:
        evaluate()


@torch.no_grad()
def evaluate_model(model: torch.nn.ModuleDict, vae, tokenizer, args, seeds=EVAL_SEEDS) -> dict:
    """Generate one short video per held-out caption with the diffusers pipeline; mean world metrics."""
    transformer = model["transformer"]
    pipe = assemble_pipeline(vae, model["text_encoder"], tokenizer, transformer, args.eval_flow_shift)
    pipe.set_progress_bar_config(disable=True)
    cbs, T = args.causal_block_size, args.clip_latents
    base_frames = 2 * (T - 1) + 1  # T latent frames
    overlap = 2 * (T // 2 - 1) + 1  # half a window of history
    rows = []
    for seed in seeds:
        caption = sample_world(seed).spec.caption
        pos = encode_tokens(model["text_encoder"], *tokenize(tokenizer, [caption]))
        neg = encode_tokens(model["text_encoder"], *tokenize(tokenizer, [""]))
        out = pipe(
            prompt=None,
            prompt_embeds=pos,
            negative_prompt_embeds=neg,
            height=64,
            width=64,
            num_frames=args.eval_frames,
            num_inference_steps=args.eval_steps,
            guidance_scale=args.eval_guidance,
            causal_block_size=cbs,
            ar_step=0,
            base_num_frames=base_frames,
            overlap_history=overlap,
            addnoise_condition=args.context_noise,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).frames[0]
        frames = (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
        rows.append(score_video(frames, caption))
    keys = rows[0].keys()
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys} | dict(videos=len(rows), frames=args.eval_frames)


if __name__ == "__main__":
    main()
