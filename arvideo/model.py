"""Model folders in diffusers layout: validation, loading, prompt encoding.

A folder holds `model_index.json` and one subfolder per component (`transformer/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`), plus an optional `arvideo.json` with this
engine's defaults for the model (fps, resolution, chunking, steps, guidance, KV window).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, ModelFolderError, PromptError

REQUIRED = ("transformer", "vae")
EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "models" / "shapes-df"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin")) or any(folder.glob("*.index.json"))


def check_model_folder(path: str | Path) -> dict[str, Any]:
    """Raises ModelFolderError naming everything missing; returns model_index.json."""
    root = Path(path)
    if not root.is_dir():
        raise ModelFolderError(
            f"model folder {root} does not exist; pass --model DIR with a diffusers-layout folder "
            f"(model_index.json, transformer/, vae/, ...) or omit --model for the embedded model"
        )
    problems = []
    index_path = root / "model_index.json"
    index: dict[str, Any] = {}
    if not index_path.is_file():
        problems.append("model_index.json is missing")
    else:
        index = json.loads(index_path.read_text())
    for name in REQUIRED:
        sub = root / name
        if not (sub / "config.json").is_file():
            problems.append(f"{name}/config.json is missing")
        elif not _has_weights(sub):
            problems.append(f"{name}/ has no weights (*.safetensors)")
    if "text_encoder" in index and index.get("text_encoder", [None])[0] is not None:
        if not (root / "text_encoder" / "config.json").is_file():
            problems.append("text_encoder/config.json is missing (or pass prompt embeddings)")
        if not (root / "tokenizer").is_dir():
            problems.append("tokenizer/ is missing")
    if problems:
        raise ModelFolderError(f"model folder {root} is incomplete: " + "; ".join(problems))
    return index


@dataclass
class PromptEncoder:
    """Encodes prompts the way diffusers' SkyReels/Wan pipelines do (T5 states, trimmed, zero-padded)."""

    tokenizer: Any
    text_encoder: Any
    max_sequence_length: int
    grammar: str | None = None

    def check(self, prompts: list[str]) -> None:
        """Raises PromptError naming the first bad word, for a model with a prompt grammar."""
        if self.grammar == "shapes-v1":
            from .world.captions import parse_caption

            for p in prompts:
                if p.strip():
                    parse_caption(p)

    @torch.no_grad()
    def __call__(self, prompts: list[str], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        self.check(prompts)
        from diffusers.pipelines.skyreels_v2.pipeline_skyreels_v2_diffusion_forcing import prompt_clean

        prompts = [prompt_clean(p) for p in prompts]
        tok = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids, mask = tok.input_ids.to(self.text_encoder.device), tok.attention_mask.to(self.text_encoder.device)
        seq_lens = mask.gt(0).sum(dim=1).long()
        states = self.text_encoder(ids, mask).last_hidden_state.to(dtype=dtype, device=device)
        states = [u[:v] for u, v in zip(states, seq_lens)]
        return torch.stack(
            [torch.cat([u, u.new_zeros(self.max_sequence_length - u.size(0), u.size(1))]) for u in states]
        )


@dataclass
class ModelBundle:
    """Everything loaded from a model folder."""

    path: Path
    transformer: torch.nn.Module
    vae: torch.nn.Module
    prompt_encoder: PromptEncoder | None
    scheduler_config: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def spatial_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.vae.temperal_downsample)


def check_device(device: str) -> None:
    """A clear error for a device this torch cannot use (instead of torch's assertion deep in `.to`)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}: use 'cpu', 'cuda' or 'cuda:N'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} needs a CUDA build of torch and a GPU; this torch "
                              f"({torch.__version__}) sees none. Use device=cpu, or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) visible")


def load_model(path: str | Path | None = None, device: str = "cpu", dtype: str = "float32") -> ModelBundle:
    """Loads a diffusers-layout model folder (default: the embedded shapes model)."""
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel

    root = Path(path) if path is not None else EMBEDDED_MODEL
    if path is None and not root.is_dir():
        raise ModelFolderError(f"the embedded model is missing at {root}; reinstall arvideo or pass --model DIR")
    index = check_model_folder(root)
    if dtype not in DTYPES:
        raise ModelFolderError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    check_device(device)
    transformer_cls = SkyReelsV2Transformer3DModel
    if index.get("transformer", [None, None])[1] == "WanTransformer3DModel":
        raise ModelFolderError(
            "WanTransformer3DModel folders are not supported yet (their timestep input is per batch, "
            "not per frame); use a SkyReels-V2 DF checkpoint"
        )
    transformer = transformer_cls.from_pretrained(root / "transformer", torch_dtype=torch_dtype).to(device).eval()
    vae = AutoencoderKLWan.from_pretrained(root / "vae", torch_dtype=torch.float32).to(device).eval()
    defaults: dict[str, Any] = {}
    if (root / "arvideo.json").is_file():
        defaults = json.loads((root / "arvideo.json").read_text())
    scheduler_config: dict[str, Any] = {}
    sched_path = root / "scheduler" / "scheduler_config.json"
    if sched_path.is_file():
        scheduler_config = json.loads(sched_path.read_text())
    encoder = None
    if (root / "text_encoder" / "config.json").is_file():
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one-line components; no bar per load

        cls_name = (index.get("text_encoder") or [None, "T5EncoderModel"])[1] or "T5EncoderModel"
        encoder_cls = getattr(transformers, cls_name, None)
        if encoder_cls is None:
            raise ModelFolderError(f"text encoder class {cls_name} (model_index.json) is not in transformers")
        tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer")
        text_encoder = encoder_cls.from_pretrained(root / "text_encoder").to(device).eval()
        encoder = PromptEncoder(
            tokenizer, text_encoder, int(defaults.get("max_sequence_length", 512)), defaults.get("prompt_grammar")
        )
    return ModelBundle(root, transformer, vae, encoder, scheduler_config, defaults)


def describe_model(path: str | Path | None = None) -> str:
    """Human-readable summary of a model folder (for `arvideo info`)."""
    root = Path(path) if path is not None else EMBEDDED_MODEL
    index = check_model_folder(root)
    lines = [f"model folder: {root}", f"pipeline: {index.get('_class_name', '?')}"]
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        sub = root / name
        if not sub.is_dir():
            continue
        size = sum(f.stat().st_size for f in sub.rglob("*") if f.is_file())
        cfg_path = sub / ("scheduler_config.json" if name == "scheduler" else "config.json")
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        keys = {
            "transformer": ["num_layers", "num_attention_heads", "attention_head_dim", "ffn_dim", "in_channels", "patch_size", "num_frame_per_block"],
            "vae": ["base_dim", "z_dim", "dim_mult", "temperal_downsample"],
            "text_encoder": ["d_model", "num_layers", "vocab_size"],
            "scheduler": ["_class_name", "flow_shift", "prediction_type"],
        }.get(name, [])
        summary = ", ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)
        lines.append(f"  {name}/: {size / 1e6:.1f} MB {summary}")
    if (root / "arvideo.json").is_file():
        lines.append(f"arvideo defaults: {json.loads((root / 'arvideo.json').read_text())}")
    return "\n".join(lines)


def require_prompt_encoder(bundle: ModelBundle) -> PromptEncoder:
    if bundle.prompt_encoder is None:
        raise PromptError(f"model folder {bundle.path} has no text encoder; pass prompt embeddings instead")
    return bundle.prompt_encoder
