"""Export trained checkpoints as a diffusers model folder (the embedded default model, models/shapes-df).

Writes `SkyReelsV2DiffusionForcingPipeline.save_pretrained(out, safe_serialization=True,
max_shard_size="15MB")` (vae/, text_encoder/, tokenizer/, transformer/, scheduler/,
model_index.json) from the VAE checkpoint of train_vae.py and the EMA weights of the
transformer + text encoder checkpoint of train_transformer.py, plus `arvideo.json`, the
engine's defaults for this model (keys documented in docs/training.md).

Example:
    python scripts/export_model.py --vae checkpoints/vae_dec/last.pt --df checkpoints/df/last.pt --out models/shapes-df
    python scripts/export_model.py ... --verify   # reload in this process and generate one short video
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from _train_common import (
    MAX_SEQUENCE_LENGTH,
    assemble_pipeline,
    build_text_encoder,
    build_tokenizer,
    build_transformer,
    build_vae_from_checkpoint,
    count_params,
)


def arvideo_defaults(args, df_ck: dict) -> dict:
    train = df_ck.get("args", {})
    cbs = df_ck["transformer_config"]["num_frame_per_block"]
    clip_latents = int(train.get("clip_latents", 8))
    return {
        "fps": 16,
        "height": 64,
        "width": 64,
        "causal_block_size": cbs,
        "ar_step": args.ar_step,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "flow_shift": args.flow_shift,
        "context_noise": float(train.get("context_noise", 20.0)),
        "kv_window_latent_frames": args.kv_window if args.kv_window is not None else clip_latents,
        "train_clip_latent_frames": clip_latents,
        "negative_prompt": "",
        "prompt_grammar": "shapes-v1",
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "vae_temporal_factor": 2,
        "vae_spatial_factor": 4,
        # A run started with --init continues an earlier one: count both.
        "trained_steps": int(df_ck.get("step", 0)) + int(df_ck.get("init", {}).get("step", 0)),
        "trained_minutes": round((float(df_ck.get("wall_s", 0.0)) + float(df_ck.get("init", {}).get("wall_s", 0.0))) / 60, 1),
        "window_blocks": args.window_blocks,
        "kv_policy": args.kv_policy,
        "kv_positions": args.kv_positions,
        "kv_pool_width": args.kv_pool_width,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", type=Path, default=Path("checkpoints/vae/last.pt"))
    p.add_argument("--df", type=Path, default=Path("checkpoints/df/last.pt"))
    p.add_argument("--out", type=Path, default=Path("models/shapes-df"))
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--steps", type=int, default=20, help="arvideo.json: default denoising steps")
    p.add_argument("--guidance-scale", type=float, default=4.0, help="arvideo.json: default CFG scale")
    p.add_argument("--flow-shift", type=float, default=3.0, help="scheduler flow_shift (also in arvideo.json)")
    p.add_argument("--ar-step", type=int, default=0, help="arvideo.json: default ar_step")
    p.add_argument("--kv-window", type=int, default=6,
                   help="arvideo.json: KV budget in latent frames of committed context (default 6: with window_blocks 2 "
                        "the attention span is 10 latent frames, a little over the training clip)")
    p.add_argument("--window-blocks", type=int, default=2, help="arvideo.json: chunks denoised together (sync schedule)")
    p.add_argument("--kv-policy", default="scored", help="arvideo.json: default KV eviction policy")
    p.add_argument("--kv-positions", default="reindexed", choices=["absolute", "reindexed"],
                   help="arvideo.json: default rotary positions of cached frames (chosen by the 2,000-frame "
                   "measurement in docs/kvstore.md)")
    p.add_argument("--kv-pool-width", type=int, default=15,
                   help="arvideo.json: scored eviction's max-pool width of importance along token order (15 chosen "
                   "on development captions, session 17, docs/kvstore.md; the engine's default without it is 7)")
    p.add_argument("--verify", action="store_true", help="reload the folder and generate a 15-frame video")
    p.add_argument("--eval", action="store_true",
                   help="reload the folder and score the training-time evaluation videos (train_transformer.py protocol)")
    args = p.parse_args()
    torch.set_num_threads(2)

    vae, _ = build_vae_from_checkpoint(args.vae)
    df = torch.load(args.df, map_location="cpu", weights_only=False)
    tokenizer = build_tokenizer()
    cbs = df["transformer_config"]["num_frame_per_block"]
    model = torch.nn.ModuleDict(dict(transformer=build_transformer(cbs, config=df["transformer_config"]), text_encoder=build_text_encoder(len(tokenizer))))
    if args.no_ema:
        model.load_state_dict(df["model"])
    else:
        state = model.state_dict()
        model.load_state_dict({k: v.to(state[k].dtype) for k, v in df["ema"]["shadow"].items()})
    model.eval()
    pipe = assemble_pipeline(vae, model["text_encoder"], tokenizer, model["transformer"], args.flow_shift)

    # Replace only what this script writes: other tools keep files here (e.g. cache calibration tables).
    for name in ("vae", "text_encoder", "tokenizer", "transformer", "scheduler"):
        if (args.out / name).is_dir():
            shutil.rmtree(args.out / name)
    pipe.save_pretrained(args.out, safe_serialization=True, max_shard_size="15MB")
    defaults = arvideo_defaults(args, df)
    (args.out / "arvideo.json").write_text(json.dumps(defaults, indent=2) + "\n")
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB): transformer {count_params(model['transformer']):,} params, "
          f"text encoder {count_params(model['text_encoder']):,}, vae {count_params(vae):,}; "
          f"step {df.get('step')}, {'raw' if args.no_ema else 'EMA'} weights")
    print(json.dumps(defaults, indent=2))

    if args.verify:
        from _train_common import encode_prompts
        from diffusers import SkyReelsV2DiffusionForcingPipeline

        pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(args.out)
        caption = "a large red circle on a black background"
        pos = encode_prompts(pipe.tokenizer, pipe.text_encoder, [caption])
        neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, [""])
        out = pipe(prompt=None, prompt_embeds=pos, negative_prompt_embeds=neg, height=64, width=64, num_frames=15,
                   num_inference_steps=4, guidance_scale=defaults["guidance_scale"], causal_block_size=cbs,
                   output_type="np").frames[0]
        print(f"verify: generated {out.shape} in [{out.min():.2f}, {out.max():.2f}]")
    if args.eval:
        print("eval", evaluate_folder(args.out), flush=True)


def evaluate_folder(folder: Path, eval_steps: int = 16, eval_frames: int = 31) -> dict:
    """Load `folder` with from_pretrained and run train_transformer.py's evaluation protocol on it."""
    import argparse as _argparse

    from diffusers import SkyReelsV2DiffusionForcingPipeline
    from train_transformer import evaluate_model

    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(folder)
    d = json.loads((folder / "arvideo.json").read_text())
    args = _argparse.Namespace(causal_block_size=d["causal_block_size"], clip_latents=d["train_clip_latent_frames"],
                               eval_flow_shift=d["flow_shift"], eval_frames=eval_frames, eval_steps=eval_steps,
                               eval_guidance=d["guidance_scale"], context_noise=d["context_noise"])
    model = torch.nn.ModuleDict(dict(transformer=pipe.transformer, text_encoder=pipe.text_encoder))
    return evaluate_model(model, pipe.vae, pipe.tokenizer, args)


if __name__ == "__main__":
    main()
