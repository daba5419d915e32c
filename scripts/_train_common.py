"""Shared pieces of the shapes-df training scripts: configs, world clips, text encoding, checkpoints.

Everything here builds diffusers / transformers classes only, so the exported folder loads with
`SkyReelsV2DiffusionForcingPipeline.from_pretrained` and nothing from this file is needed at
inference time.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from arvideo.world import VOCABULARY, sample_world  # noqa: E402

# --- model configs (the exported folder records them; these are the defaults the scripts build) ---

VAE_CONFIG = dict(
    base_dim=16,
    z_dim=16,  # v1 (session 2); v0 used 8
    dim_mult=[1, 2, 4],  # 64x64 -> 16x16 (4x spatial)
    num_res_blocks=1,
    attn_scales=[],
    temperal_downsample=[False, True],  # 1 + 2n frames -> 1 + n latent frames
    dropout=0.0,
    scale_factor_temporal=2,
    scale_factor_spatial=4,
)

TEXT_CONFIG = dict(
    d_model=64,
    d_kv=32,
    d_ff=256,
    num_layers=2,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=32,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    use_cache=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)

MAX_SEQUENCE_LENGTH = 24  # longest caption is 18 words + </s>

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2),  # 16x16 latent -> 64 tokens per latent frame
    num_attention_heads=2,
    attention_head_dim=64,
    in_channels=VAE_CONFIG["z_dim"],
    out_channels=VAE_CONFIG["z_dim"],
    text_dim=TEXT_CONFIG["d_model"],
    freq_dim=256,
    ffn_dim=512,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
    inject_sample_info=False,
    num_frame_per_block=2,
)

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2 (T5 convention)


def setup_torch(threads: int = 2, seed: int = 0) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- world clips ---


def world_clip(seed: int, num_frames: int, rng: np.random.Generator, max_start: int = 4000) -> tuple[np.ndarray, str]:
    """A clip of `num_frames` frames from world `seed` at a random start frame, and its caption."""
    world = sample_world(int(seed))
    start = int(rng.integers(0, max_start))
    return world.clip(start, num_frames), world.spec.caption


def to_video_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> float [B, 3, F, H, W] in [-1, 1] (the diffusers video convention)."""
    x = torch.from_numpy(np.ascontiguousarray(clips)).float().div_(127.5).sub_(1.0)
    return x.permute(0, 4, 1, 2, 3).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos in [-1, 1] (measured on the 0..255 scale)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) * 127.5).pow(2).mean().item()
    return 10.0 * math.log10(255.0**2 / max(mse, 1e-10))


# --- tokenizer and text encoder ---


def build_tokenizer():
    """Word-level fast tokenizer over the caption vocabulary; appends </s>; pads with <pad> (id 0)."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    words = [w for w in VOCABULARY if w not in SPECIAL_TOKENS]
    if "," not in words:
        words.append(",")
    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + sorted(words))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MAX_SEQUENCE_LENGTH,
        padding_side="right",
    )
    return fast


def build_text_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, **TEXT_CONFIG))


def _prompt_clean(text: str) -> str:
    # The pipeline's prompt_clean minus ftfy/html unescaping (no-ops on grammar captions).
    return re.sub(r"\s+", " ", text).strip()


def tokenize(tokenizer, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    """(input_ids, mask) exactly as SkyReelsV2DiffusionForcingPipeline._get_t5_prompt_embeds builds them."""
    out = tokenizer(
        [_prompt_clean(p) for p in prompts],
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    return out.input_ids, out.attention_mask


def encode_tokens(text_encoder, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The pipeline's embedding: encoder states trimmed to the true length, zero-padded to max length."""
    max_len = input_ids.shape[1]
    seq_lens = mask.gt(0).sum(dim=1).long()
    states = text_encoder(input_ids, mask).last_hidden_state
    states = [u[:v] for u, v in zip(states, seq_lens)]
    return torch.stack([torch.cat([u, u.new_zeros(max_len - u.size(0), u.size(1))]) for u in states], dim=0)


def encode_prompts(tokenizer, text_encoder, prompts: list[str], max_sequence_length: int = MAX_SEQUENCE_LENGTH):
    device = next(text_encoder.parameters()).device
    ids, mask = tokenize(tokenizer, prompts, max_sequence_length)
    return encode_tokens(text_encoder, ids.to(device), mask.to(device))


# --- checkpoints, logs, EMA ---


class EMA:
    """Exponential moving average of a module's parameters (with the usual warm-up of the decay)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        shadow, current = [], []
        for k, v in module.state_dict().items():
            if v.dtype == self.shadow[k].dtype and v.dtype.is_floating_point and v.device == self.shadow[k].device:
                shadow.append(self.shadow[k])
                current.append(v.detach())
            elif v.dtype.is_floating_point:
                self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)
            else:
                self.shadow[k].copy_(v)
        if shadow:  # one fused update for the float32 tensors (per-tensor launches dominate small models on a GPU)
            torch._foreach_lerp_(shadow, current, 1 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.num_updates = state["num_updates"]
        self.shadow = state["shadow"]


def atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class CsvLog:
    """Appends rows (dicts) to a CSV file; the header is written once."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fields: list[str] | None = None
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path) as f:
                self._fields = next(csv.reader(f), None)

    def write(self, row: dict) -> None:
        new = self._fields is None
        if new:
            self._fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def append_jsonl(path: Path, row: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


class Clock:
    """Wall-clock budget: `done()` once `minutes` have passed since construction (None = never)."""

    def __init__(self, minutes: float | None):
        self.t0 = time.time()
        self.minutes = minutes

    def elapsed(self) -> float:
        return time.time() - self.t0

    def done(self) -> bool:
        return self.minutes is not None and self.elapsed() >= 60.0 * self.minutes


# --- model assembly (shared by training-time evaluation and export) ---


def build_transformer(num_frame_per_block: int | None = None, config: dict | None = None, channels: int | None = None):
    """The transformer from `config` (a checkpoint's `transformer_config`) or the defaults here;
    `channels` (the VAE's z_dim) sets in/out channels of a new model."""
    from diffusers import SkyReelsV2Transformer3DModel

    cfg = dict(config or TRANSFORMER_CONFIG)
    if num_frame_per_block is not None:
        cfg["num_frame_per_block"] = num_frame_per_block
    if channels is not None:
        cfg["in_channels"] = cfg["out_channels"] = channels
    return SkyReelsV2Transformer3DModel(**cfg)


def build_scheduler(flow_shift: float):
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=flow_shift, num_train_timesteps=1000
    )


def build_vae_from_checkpoint(path: Path, device: str = "cpu"):
    """The trained AutoencoderKLWan with `latents_mean` / `latents_std` from its checkpoint's statistics.

    `path` is a train_vae.py checkpoint, or an exported model folder (its `vae/`), e.g. models/shapes-df."""
    from diffusers import AutoencoderKLWan

    path = Path(path)
    if path.is_dir():
        sub = path / "vae" if (path / "vae" / "config.json").exists() else path
        vae = AutoencoderKLWan.from_pretrained(sub).to(device)
        return vae.eval().requires_grad_(False), dict(config=dict(vae.config), folder=str(sub))
    ck = torch.load(path, map_location=device, weights_only=False)
    if "latents_mean" not in ck:
        raise SystemExit(f"{path} has no latent statistics: let train_vae.py finish (it computes them at the end)")
    vae = AutoencoderKLWan(**ck["config"], latents_mean=ck["latents_mean"], latents_std=ck["latents_std"])
    vae.load_state_dict(ck["vae"])
    return vae.eval().requires_grad_(False), ck


def assemble_pipeline(vae, text_encoder, tokenizer, transformer, flow_shift: float):
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    return SkyReelsV2DiffusionForcingPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=build_scheduler(flow_shift),
    )


def checkpoint_from_folder(folder: Path) -> dict:
    """An exported model folder as a train_transformer.py checkpoint for `--init`: its transformer and text
    encoder weights as the EMA shadow, the transformer config, and the training behind them (arvideo.json)."""
    from diffusers import SkyReelsV2Transformer3DModel
    from transformers import T5EncoderModel

    folder = Path(folder)
    transformer = SkyReelsV2Transformer3DModel.from_pretrained(folder / "transformer")
    text_encoder = T5EncoderModel.from_pretrained(folder / "text_encoder")
    state = torch.nn.ModuleDict(dict(transformer=transformer, text_encoder=text_encoder)).state_dict()
    keys = set(TRANSFORMER_CONFIG) | {"num_frame_per_block"}
    config = {k: (tuple(v) if k == "patch_size" else v) for k, v in transformer.config.items() if k in keys}
    info = json.loads((folder / "arvideo.json").read_text()) if (folder / "arvideo.json").exists() else {}
    return dict(ema=dict(shadow={k: v.float() for k, v in state.items()}), transformer_config=config,
                step=int(info.get("trained_steps", 0)), wall_s=60.0 * float(info.get("trained_minutes", 0.0)))
