"""End to end at SkyReels-V2 1.3B size, random weights (speed and memory only): diffusers vs arvideo.

Issue 6's GPU end-to-end comparison: the same random-weight model (the 1.3B transformer of
`bench_gpu_step.py`, a Wan 2.1-size `AutoencoderKLWan`, UniPC with flow shift 8), the same random
prompt embeddings (no text encoder: its cost is the same for both and not what is compared), 257
frames at 544x960, 30 steps, guidance 6, bf16 transformer and float32 VAE (as diffusers' examples
load them). One row per process, since each takes minutes:

  - `diffusers`: `SkyReelsV2DiffusionForcingPipeline`, long video through its own windows
    (`base_num_frames` 97, `overlap_history` 17, `addnoise_condition` 20, synchronous), the
    transformer's own attention (`num_frame_per_block` 1: bidirectional inside a window, its faster
    mode), `output_type="np"`: decoded once at the end;
  - `arvideo-full`: `Engine.stream`, KV-cached diffusion forcing in blocks of 5 latent frames
    (synchronous, windows of 5 blocks as resolved from `base_num_frames` 97), `scored` KV store of
    20 latent frames (a 25-latent-frame attention span, the 97-frame window's), full compute;
  - `arvideo-meancache`: the same with a fixed MeanCache schedule, `meancache:budget=10` without a
    calibration file (an even spread of 10 of the 30 steps per chunk: a known computed fraction of
    1/3), skipped steps from the average-velocity estimate.

Per row: wall time from the first denoising step to the last frame in hand (decode included; model
building excluded), time to first frame (diffusers: when the pipeline returns), peak allocated GPU
memory (`torch.cuda.max_memory_allocated`), transformer calls. Rows are merged into
`docs/benchmarks/gpu_e2e.json` (one entry per row, with device, date and versions) and the table in
docs/gpu.md (between `<!-- bench:gpu-e2e -->` markers) is rewritten from that file, so rows measured
by separate commands (or sessions: each row says when) appear together.

    python scripts/bench_gpu_e2e.py --row diffusers           # H100: several minutes per row
    python scripts/bench_gpu_e2e.py --row arvideo-full
    python scripts/bench_gpu_e2e.py --row arvideo-meancache
    python scripts/bench_gpu_e2e.py --tiny --device cpu --row all --json /tmp/e2e.json --doc /tmp/gpu.md  # smoke test
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_gpu_step import SKYREELS_1_3B, TINY  # noqa: E402

from arvideo.reporting import write_marked_section  # noqa: E402

ROWS = ("diffusers", "arvideo-full", "arvideo-meancache")
SETTINGS = dict(height=544, width=960, frames=257, steps=30, guidance=6.0, shift=8.0, block=5, base_num_frames=97,
                overlap_history=17, addnoise_condition=20.0, kv_budget_frames=20, text_tokens=512, meancache_budget=10)
# The smoke test's sizes: a 4x-temporal, 8x-spatial VAE as the real one, a few windows and chunks.
TINY_SETTINGS = dict(SETTINGS, height=64, width=64, frames=45, steps=4, base_num_frames=21, overlap_history=9,
                     kv_budget_frames=10, text_tokens=16, meancache_budget=2)
TINY_VAE = dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    """Random-weight transformer, VAE and scheduler of the benchmark's size (seeded: every row gets the same)."""
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel, UniPCMultistepScheduler

    torch.manual_seed(0)
    with torch.device(device):  # initialise on the device: 1.4 B parameters are slow to fill on a CPU
        transformer = SkyReelsV2Transformer3DModel(**(TINY if tiny else SKYREELS_1_3B)).to(dtype).eval()
        vae = AutoencoderKLWan(**(TINY_VAE if tiny else {})).float().eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        flow_shift=SETTINGS["shift"], num_train_timesteps=1000)
    return transformer, vae, scheduler


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_calls(transformer) -> list[int]:
    calls = [0]
    transformer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def run_diffusers(transformer, vae, scheduler, embeds, s: dict, device) -> dict:
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    pipe = SkyReelsV2DiffusionForcingPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                                              scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    calls = count_calls(transformer)
    sync(device)
    t0 = time.perf_counter()
    video = pipe(prompt=None, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1], height=s["height"], width=s["width"],
                 num_frames=s["frames"], num_inference_steps=s["steps"], guidance_scale=s["guidance"],
                 base_num_frames=s["base_num_frames"], overlap_history=s["overlap_history"],
                 addnoise_condition=s["addnoise_condition"], ar_step=0, output_type="np",
                 generator=torch.Generator(device).manual_seed(0)).frames[0]
    sync(device)
    total = time.perf_counter() - t0
    return {"seconds": total, "ttff_s": total, "frames": int(np.asarray(video).shape[0]), "model_calls": calls[0]}


def run_arvideo(transformer, vae, scheduler, embeds, s: dict, device, dtype_name: str, cache: str) -> dict:
    from arvideo.config import build_config
    from arvideo.engine import Engine
    from arvideo.model import ModelBundle

    defaults = {"height": s["height"], "width": s["width"], "fps": 24, "causal_block_size": s["block"], "ar_step": 0,
                "steps": s["steps"], "guidance_scale": s["guidance"], "flow_shift": s["shift"],
                "context_noise": s["addnoise_condition"], "base_num_frames": s["base_num_frames"],
                "kv_policy": "scored", "kv_window_latent_frames": s["kv_budget_frames"], "sampler": "unipc"}
    # no calibration file on purpose: `meancache:budget=N` then takes an even spread of N steps (its warning is noise here)
    logging.getLogger("arvideo.caching.calibration").setLevel(logging.ERROR)
    bundle = ModelBundle(Path("random-weights"), transformer, vae, None, dict(scheduler.config), defaults)
    engine = Engine(bundle)
    cfg = build_config(None, [f"cache.preset={cache}"], frames=s["frames"], device=str(device), dtype=dtype_name)
    resolved = engine.resolve(cfg).cfg
    sync(device)
    t0 = time.perf_counter()
    ttff, frames = None, 0
    for chunk in engine.stream(cfg, prompt_embeds=embeds[0], negative_prompt_embeds=embeds[1]):
        frames += len(chunk.frames)
        if ttff is None:
            ttff = time.perf_counter() - t0
    sync(device)
    return {"seconds": time.perf_counter() - t0, "ttff_s": ttff, "frames": frames, "model_calls": engine.model_calls,
            "schedule": {"window_blocks": resolved.schedule.window_blocks, "kv_policy": resolved.kv.policy,
                         "kv_budget_frames": resolved.kv.budget_frames, "sampler": resolved.sampler.name}}


def measure(row: str, args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    s = TINY_SETTINGS if args.tiny else SETTINGS
    transformer, vae, scheduler = build(args.tiny, device, dtype)
    text_dim = transformer.config.text_dim
    g = torch.Generator(device).manual_seed(1)
    embeds = [torch.randn(1, s["text_tokens"], text_dim, generator=g, device=device, dtype=dtype) for _ in range(2)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        if row == "diffusers":
            out = run_diffusers(transformer, vae, scheduler, embeds, s, device)
        else:
            cache = "none" if row == "arvideo-full" else f"meancache:budget={s['meancache_budget']}"
            out = run_arvideo(transformer, vae, scheduler, embeds, s, device, args.dtype, cache)
            out["cache"] = cache
    out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import diffusers

    out.update(row=row, device=name, date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
               torch=torch.__version__, diffusers=diffusers.__version__, dtype=args.dtype, tiny=args.tiny,
               settings=s, command="python scripts/bench_gpu_e2e.py " + " ".join(args.argv))
    return out


def table(rows: dict) -> str:
    lines = ["Random weights at SkyReels-V2 1.3B size: speed and memory only, no quality. Seconds = first "
             "denoising step to last frame in hand (decode included, model building excluded).", "",
             "| row | device | date | frames | seconds | vs diffusers | time to first frame s | peak GiB | model calls | cache |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    base = rows.get("diffusers", {}).get("seconds")
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        speed = f"{base / r['seconds']:.2f}x" if base else "-"
        peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
        lines.append(f"| {name}{' (TINY)' if r.get('tiny') else ''} | {r['device']} | {r['date']} | {r['frames']} | "
                     f"{r['seconds']:.1f} | {speed} | {r['ttff_s']:.1f} | {peak} | {r['model_calls']} | "
                     f"{r.get('cache', '-')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", required=True, choices=[*ROWS, "all"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="tiny random model and video (smoke test, any device)")
    ap.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "gpu_e2e.json"))
    ap.add_argument("--doc", default=str(ROOT / "docs" / "gpu.md"))
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    path = Path(args.json)
    rows = json.loads(path.read_text()) if path.is_file() else {}
    for row in ROWS if args.row == "all" else [args.row]:
        rows[row] = measure(row, args)
        print(json.dumps(rows[row]), flush=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=1) + "\n")  # after every row: a later failure keeps it
    text = table(rows)
    print(text)
    write_marked_section(Path(args.doc), "<!-- bench:gpu-e2e -->", "<!-- /bench:gpu-e2e -->", text,
                         header="# GPU timings\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
