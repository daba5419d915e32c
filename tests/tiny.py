"""Tiny random diffusers models for CPU tests (float32)."""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel


def tiny_transformer(in_channels: int = 4, text_dim: int = 16, layers: int = 2, seed: int = 0,
                     inject_sample_info: bool = False) -> SkyReelsV2Transformer3DModel:
    torch.manual_seed(seed)
    model = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=in_channels, text_dim=text_dim, freq_dim=32, ffn_dim=48, num_layers=layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
        inject_sample_info=inject_sample_info,
    )
    # random weights everywhere (zero-initialised tables would hide modulation bugs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def tiny_vae(z_dim: int = 4, seed: int = 0) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True], dropout=0.0,
        latents_mean=[0.1 * i for i in range(z_dim)], latents_std=[1.0 + 0.1 * i for i in range(z_dim)],
    ).eval()


def tiny_tokenizer(words):
    """Word-level tokenizer over `words`, saved/loaded as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for w in list(words) + [","]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def save_tiny_model_folder(path, *, grammar: str | None = "shapes-v1", defaults: dict | None = None):
    """A complete diffusers-layout folder with random tiny weights (the engine's test model)."""
    from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler
    from transformers import T5Config, T5EncoderModel

    from arvideo.world import VOCABULARY

    tokenizer = tiny_tokenizer(VOCABULARY)
    torch.manual_seed(1)
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )).eval()
    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, transformer=tiny_transformer(text_dim=16),
        vae=tiny_vae(),
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    import json
    from pathlib import Path

    arv = {"fps": 16, "height": 32, "width": 32, "causal_block_size": 2, "ar_step": 0, "steps": 3,
           "guidance_scale": 3.0, "max_sequence_length": 16, "prompt_grammar": grammar}
    arv.update(defaults or {})
    (Path(path) / "arvideo.json").write_text(json.dumps(arv))
    return path
