"""Full-compute step timing at SkyReels-V2 1.3B size (random weights): arvideo's KV path vs diffusers.

Measures, in one process on one device:
  - diffusers' forward over a whole window, bidirectional and with its dense block-causal mask
    (the anchors in ../shared/methods.md section 7: 1.51 s and 2.62 s on an H100);
  - arvideo's packed block-causal call over the same window (one SDPA per block, no mask);
  - arvideo's single block step: one block attending to the cached K/V of the blocks before it;
  - a bf16 matmul (8192^3) for the device's achievable rate, and the model FLOP utilisation.
Writes a markdown table to docs/gpu.md (appends a dated section) and prints it.

    python scripts/bench_gpu_step.py                    # H100/H200: 540P, 97 frames, block 5, bf16
    python scripts/bench_gpu_step.py --tiny --device cpu  # smoke test of the script itself
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from arvideo.backbones import CallPlan, WanFamilyBackbone
from arvideo.kvstore import KVStore

SKYREELS_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6,
)
TINY = dict(SKYREELS_1_3B, num_attention_heads=2, attention_head_dim=24, ffn_dim=64, num_layers=2, text_dim=32)


def timed(fn, device, repeats: int) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def linear_flops(cfg: dict, tokens: int, text_tokens: int) -> float:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    per_layer = 2 * tokens * (4 * d * d + 2 * d * cfg["ffn_dim"]) + 2 * tokens * d * d * 2  # self qkvo + ffn + cross q,o
    per_layer += 2 * text_tokens * d * d * 2  # cross k, v
    return per_layer * cfg["num_layers"]


def attention_flops(cfg: dict, pairs: float, text_pairs: float) -> float:
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return 4 * d * (pairs + text_pairs) * cfg["num_layers"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--height", type=int, default=544)
    ap.add_argument("--width", type=int, default=960)
    ap.add_argument("--frames", type=int, default=97, help="video frames in the window (VAE: 4x temporal)")
    ap.add_argument("--block", type=int, default=5, help="latent frames per block")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="tiny random model (smoke test)")
    ap.add_argument("--out", default="docs/gpu.md")
    ap.add_argument("--peers-json", default="docs/benchmarks/peers.json",
                    help="write the result as this file's \"gpu\" entry (issue 6's schema; '' to skip)")
    args = ap.parse_args(argv)
    from diffusers import SkyReelsV2Transformer3DModel

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    cfg = TINY if args.tiny else SKYREELS_1_3B
    if args.tiny:
        args.height, args.width, args.frames = 64, 64, 41
    torch.manual_seed(0)
    model = SkyReelsV2Transformer3DModel(**cfg).to(device=device, dtype=dtype).eval()
    lat_f = (args.frames - 1) // 4 + 1
    lat_h, lat_w = args.height // 8, args.width // 8
    blocks = lat_f // args.block
    lat_f = blocks * args.block
    tpf = (lat_h // 2) * (lat_w // 2)
    tokens = lat_f * tpf
    x = torch.randn(1, cfg["in_channels"], lat_f, lat_h, lat_w, device=device, dtype=dtype)
    t = torch.full((1, lat_f), 500, device=device, dtype=torch.long)
    text = torch.randn(1, 512, cfg["text_dim"], device=device, dtype=dtype)
    rows = []

    with torch.no_grad():
        model.register_to_config(num_frame_per_block=1)
        s = timed(lambda: model(x, t, text, enable_diffusion_forcing=True, return_dict=False), device, args.repeats)
        rows.append(("diffusers window, bidirectional", tokens, s, linear_flops(cfg, tokens, 512)
                     + attention_flops(cfg, tokens * tokens, tokens * 512)))
        model.register_to_config(num_frame_per_block=args.block)
        s = timed(lambda: model(x, t, text, enable_diffusion_forcing=True, return_dict=False), device, args.repeats)
        causal_pairs = sum((i + 1) * args.block * tpf * args.block * tpf for i in range(blocks))
        rows.append(("diffusers window, block-causal dense mask", tokens, s, linear_flops(cfg, tokens, 512)
                     + attention_flops(cfg, causal_pairs, tokens * 512)))

        bb = WanFamilyBackbone(model, "auto")
        txt = bb.prepare_text(text)
        lay = bb.kv_layout(lat_h, lat_w)
        plan = CallPlan([args.block] * blocks, torch.arange(lat_f))

        def packed():
            store = KVStore(lay.num_layers, 1, lay.heads, lay.head_dim, dtype=dtype, device=device)
            return bb(x, t, txt, plan, store)

        s = timed(packed, device, args.repeats)
        rows.append(("arvideo window, block-causal packed (no mask)", tokens, s, linear_flops(cfg, tokens, 512)
                     + attention_flops(cfg, causal_pairs, tokens * 512)))

        store = KVStore(lay.num_layers, 1, lay.heads, lay.head_dim, dtype=dtype, device=device)
        ctx_frames = lat_f - args.block
        bb(x[:, :, :ctx_frames], t[:, :ctx_frames], txt, CallPlan([ctx_frames], torch.arange(ctx_frames), commit=1), store)
        store.commit([(0, ctx_frames * tpf)])
        xb, tb = x[:, :, ctx_frames:], t[:, ctx_frames:]
        bplan = CallPlan([args.block], torch.arange(ctx_frames, lat_f))
        s = timed(lambda: bb(xb, tb, txt, bplan, store), device, args.repeats)
        btok = args.block * tpf
        rows.append((f"arvideo one block step ({args.block} latent frames, {ctx_frames} cached)", btok, s,
                     linear_flops(cfg, btok, 512) + attention_flops(cfg, btok * lat_f * tpf, btok * 512)))

        n = 2048 if args.tiny else 8192
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        s = timed(lambda: a @ b, device, args.repeats)
        peak = 2 * n**3 / s

    stamp = datetime.date.today().isoformat()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"\n## {name}, {stamp}, torch {torch.__version__}, {args.dtype}, "
             f"{args.height}x{args.width}, {args.frames} frames, block {args.block}"
             + (" (TINY smoke model)" if args.tiny else " (SkyReels-V2 1.3B size, random weights)"),
             f"\nmeasured matmul peak ({n}^3): {peak / 1e12:.0f} TFLOP/s\n",
             "| case | tokens | seconds | TFLOP/s | share of matmul peak |", "| --- | --- | --- | --- | --- |"]
    result = {"device": name, "date": stamp, "matmul_tflops": peak / 1e12, "rows": []}
    for label, tok, sec, flops in rows:
        lines.append(f"| {label} | {tok} | {sec:.3f} | {flops / sec / 1e12:.0f} | {flops / sec / peak:.0%} |")
        result["rows"].append({"case": label, "tokens": tok, "seconds": sec, "tflops": flops / sec / 1e12,
                               "mfu": flops / sec / peak})
    text_out = "\n".join(lines) + "\n"
    print(text_out)
    print(json.dumps(result))
    out = Path(args.out)
    if not out.exists():
        out.write_text("# GPU step timings\n\nWritten by `scripts/bench_gpu_step.py`; anchors in "
                       "../shared/methods.md section 7 (H100: 1.51 s bidirectional, 2.62 s dense causal mask).\n")
    with out.open("a") as f:
        f.write(text_out)
    if args.peers_json and not args.tiny:
        write_peers_gpu(Path(args.peers_json), result, args)
    return 0


def write_peers_gpu(path: Path, result: dict, args) -> None:
    """The "gpu" entry of peers.json: arvideo's full-compute step is the KV-cached block step (what a
    streaming run repeats); its share of the measured matmul rate is `full_step_mfu`."""
    data = json.loads(path.read_text()) if path.exists() else {}
    step = next(r for r in result["rows"] if r["case"].startswith("arvideo one block step"))
    data["gpu"] = dict(result, full_step_mfu=step["mfu"], model="SkyReels-V2 1.3B size, random weights (speed only)",
                       dtype=args.dtype, height=args.height, width=args.width, frames=args.frames, block=args.block,
                       command="python scripts/bench_gpu_step.py", torch=torch.__version__,
                       diffusers=__import__("diffusers").__version__)
    data.pop("gpu_note", None)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")  # bench_peers.py writes indent 1 too


if __name__ == "__main__":
    raise SystemExit(main())
