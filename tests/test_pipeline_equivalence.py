"""Whole generations equal diffusers' SkyReelsV2DiffusionForcingPipeline on a tiny random model."""
import pytest
import torch
from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler

from arvideo.config import build_config
from arvideo.engine import Engine
from arvideo.model import ModelBundle
from tests.tiny import tiny_transformer, tiny_vae

# float32 CPU; the two paths differ in attention summation order (masked SDPA vs SDPA on slices)
# and UniPC running per block vs per frame; errors stay ~1e-6 over 4-6 steps, so 1e-4 relative
RTOL = 1e-4
SHIFT = 5.0


class NonAliasingUniPC(UniPCMultistepScheduler):
    """diffusers' UniPC, given a copy of `sample`.

    The pipeline passes `latents[:, :, idx]` (a view) to `step`, UniPC keeps it as
    `last_sample`, and the pipeline then overwrites that memory with the step's result, so
    the corrector of the next step reads the new sample instead of the previous one
    (test_diffusers_pipeline_unipc_aliasing_changes_results). arvideo never aliases; the
    reference it is compared with must not either.
    """

    def step(self, model_output, timestep, sample, *args, **kwargs):
        return super().step(model_output, timestep, sample.clone(), *args, **kwargs)


def _setup(text_dim=16):
    transformer = tiny_transformer(text_dim=text_dim)
    vae = tiny_vae()
    sched_cfg = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT)
    bundle = ModelBundle("<memory>", transformer, vae, None, sched_cfg, {"height": 32, "width": 32, "fps": 16})
    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
        scheduler=NonAliasingUniPC(**sched_cfg),
    )
    pipe.set_progress_bar_config(disable=True)
    cond = torch.randn(1, 6, text_dim)
    uncond = torch.randn(1, 6, text_dim)
    return bundle, pipe, cond, uncond


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("ar_step", [0, 1, 3])
def test_kv_streaming_generation_equals_diffusers_pipeline(ar_step):
    bundle, pipe, cond, uncond = _setup()
    engine = Engine(bundle)
    steps, block, latent_frames = 4, 2, 6
    frames = 1 + 2 * (latent_frames - 1)
    cfg = build_config(frames=frames, seed=3, guidance_scale=3.0, overrides=[
        f"sampler.steps={steps}", "sampler.name=unipc", f"schedule.causal_block_size={block}",
        f"schedule.ar_step={ar_step}", "kv.policy=full",
    ])
    noise = engine.chunk_noise(cfg)
    # diffusers 0.42.1 cannot take `latents=` for this pipeline (prepare_latents then returns a
    # bare tensor and __call__ fails to unpack it), so substitute our noise at that point instead
    original = pipe.prepare_latents

    def prepare_latents(*args, **kwargs):
        out = original(*args, **kwargs)
        assert out[0].shape == noise.shape
        return (noise.clone(), *out[1:])

    pipe.prepare_latents = prepare_latents
    ours = torch.cat([c.latents for c in engine.stream(cfg, prompt_embeds=cond, negative_prompt_embeds=uncond, decode=False)], dim=2)
    ref = pipe(
        prompt=None, prompt_embeds=cond, negative_prompt_embeds=uncond, height=32, width=32, num_frames=frames,
        num_inference_steps=steps, guidance_scale=3.0, output_type="latent",
        causal_block_size=block, ar_step=ar_step, base_num_frames=frames, fps=16,
    ).frames
    assert ours.shape == ref.shape
    assert _rel(ours, ref) < RTOL
    # the engine called the backbone once per row of the step matrix (commits ride along)
    rows = steps + (latent_frames // block - 1) * min(ar_step, steps)
    assert engine.model_calls == rows


@pytest.mark.parametrize("block,ar_step,frames,base", [(1, 0, 17, 9), (2, 1, 13, 7)])
def test_window_mode_long_video_equals_diffusers_pipeline(block, ar_step, frames, base):
    """Bidirectional (block 1) and block-causal windows with overlap history and addnoise.

    (1, 0, 17, 9): 9 latent frames in windows of 5 with 3 of overlap; (2, 1, 13, 7): 7 latent
    frames in windows of 4, overlap 3 truncated to 2 by diffusers' block alignment.
    """
    bundle, pipe, cond, uncond = _setup()
    bundle.transformer.register_to_config(num_frame_per_block=block)
    engine = Engine(bundle)
    steps = 3
    cfg = build_config(frames=frames, seed=7, guidance_scale=2.5, overrides=[
        f"sampler.steps={steps}", "schedule.name=window", f"schedule.causal_block_size={block}",
        f"schedule.ar_step={ar_step}", f"schedule.base_num_frames={base}", "schedule.overlap_history=5",
        "schedule.addnoise_condition=20",
    ])
    torch.manual_seed(11)
    ours = torch.cat([c.latents for c in engine.stream(cfg, prompt_embeds=cond, negative_prompt_embeds=uncond, decode=False)], dim=2)
    torch.manual_seed(11)
    ref = pipe(
        prompt=None, prompt_embeds=cond, negative_prompt_embeds=uncond, height=32, width=32, num_frames=frames,
        num_inference_steps=steps, guidance_scale=2.5, generator=torch.Generator().manual_seed(7),
        output_type="latent", base_num_frames=base, overlap_history=5, addnoise_condition=20, fps=16,
        causal_block_size=block if block > 1 else None, ar_step=ar_step,
    ).frames
    assert ours.shape == ref.shape
    assert _rel(ours, ref) < RTOL


def test_diffusers_pipeline_unipc_aliasing_changes_results():
    """Documents why the reference above clones: in-place writes into UniPC's `last_sample`."""
    cfg = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT)
    clean, aliased = UniPCMultistepScheduler(**cfg), UniPCMultistepScheduler(**cfg)
    clean.set_timesteps(4)
    aliased.set_timesteps(4)
    latents = torch.randn(1, 4, 2, 8, 8)
    x = latents[:, :, 0].clone()
    for k in range(4):
        v = torch.randn_like(x)
        x = clean.step(v, clean.timesteps[k], x, return_dict=False)[0]
        latents[:, :, 0] = aliased.step(v, aliased.timesteps[k], latents[:, :, 0], return_dict=False)[0]
    assert (x - latents[:, :, 0]).abs().max() > 1e-2
