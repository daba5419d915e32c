"""Streaming VAE decode for the Wan family: latent chunks in, uint8 frames out.

diffusers' `AutoencoderKLWan.decode` already runs its decoder one latent frame at a time,
carrying causal-conv caches (`feat_cache`) from frame to frame, but it clears them at the
end of every call. `StreamingDecoder` drives the same decoder module with a cache it owns
and keeps between calls, so a video decoded chunk by chunk (any chunk sizes, in order)
gives the frames of one whole-video decode, while memory stays that of one decoder call
(one latent frame at 540p; a whole small chunk, up to `pixels_per_call` output pixels, at
64 x 64) plus the caches (two frames per causal conv): nothing of earlier chunks is kept.

Latents here are NORMALISED as the transformer produces them; the un-normalisation and
the uint8 mapping match diffusers' SkyReels-V2 pipeline and `VideoProcessor` (`pil`
convention: `round(((x / 2 + 0.5).clamp(0, 1)) * 255)`; diffusers' `export_to_video`
truncates instead, which is up to one level darker).

Spatial tiling (`vae.enable_tiling()`) is not used here: each latent frame is decoded whole.

CPU fast path: on CPU, float32, without autograd, two of the decoder's operations are much
slower in torch's default form than they need to be. Its 3-D convolutions go to torch's generic
`slow_conv3d` (an im2col buffer of 6-14 MiB per call at 64 x 64, then a GEMM); and its RMS norm
(`WanRMS_norm`: `F.normalize` over the channel dimension, a strided reduction) took a fifth of the
decode. `StreamingDecoder(fast_cpu=True)` (the default) runs the convolutions through oneDNN
(`torch.mkldnn_convolution`) on channels-last (NDHWC) activations, and the norm as
`x * rsqrt(max(sum(x^2), eps^2))` over the channel dimension: the same functions, equal to float
rounding (tests compare the decoded frames with torch's own path); together about 2x faster than
torch's path on the shipped VAE (`python scripts/bench_decoder.py`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d, WanRMS_norm, unpatchify

from arvideo.errors import ConfigError

__all__ = ["StreamingDecoder", "use_fast_cpu_path", "encode_video", "normalise_latents", "denormalise_latents", "to_uint8"]


def _stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1/std) as [1, z, 1, 1, 1] tensors, built exactly as diffusers' pipelines build them."""
    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(like.device, like.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(like.device, like.dtype)
    return mean, inv_std


def denormalise_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Transformer-space latents -> VAE-space latents (`latents / (1/std) + mean`, as the pipeline)."""
    mean, inv_std = _stats(vae, latents)
    return latents / inv_std + mean


def normalise_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """VAE-space latents -> transformer-space latents (`(latents - mean) * (1/std)`, as the i2v pipeline)."""
    mean, inv_std = _stats(vae, latents)
    return (latents - mean) * inv_std


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """Decoder output `[1, 3, F, H, W]` in [-1, 1] -> uint8 `[F, H, W, 3]`, rounded like diffusers' `numpy_to_pil`."""
    x = (video[0] * 0.5 + 0.5).clamp(0, 1)  # [3, F, H, W]
    x = (x.permute(1, 2, 3, 0).float() * 255).round()
    # Quantise on the decoder's device so only uint8 crosses to the host.
    return x.to(torch.uint8).cpu().numpy()


FAST_CPU_FLAG = "_arvideo_fast_cpu"  # on the patched root module: False sends it back to torch's own path
_CHANNELS_LAST = torch.channels_last_3d


def _fast_cpu_active(owner: torch.nn.Module, x: torch.Tensor, param: torch.Tensor) -> bool:
    return (getattr(owner, FAST_CPU_FLAG, False) and x.device.type == "cpu" and x.dtype == torch.float32
            and param.dtype == torch.float32 and not torch.is_grad_enabled())


def _channels_last_weight(conv: torch.nn.Conv3d):
    """`conv.weight` in channels-last layout, converted once and again only when the weight changes."""
    cache: dict = {}

    def get(weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version)
        if cache.get("key") != key:
            cache["key"], cache["weight"] = key, weight.contiguous(memory_format=_CHANNELS_LAST)
        return cache["weight"]

    return get


def _onednn(conv: torch.nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, padding: list[int]) -> torch.Tensor:
    return torch.mkldnn_convolution(x.contiguous(memory_format=_CHANNELS_LAST), weight, conv.bias, padding,
                                    list(conv.stride), list(conv.dilation), conv.groups)


def _onednn_conv_forward(conv: torch.nn.Conv3d, owner: torch.nn.Module):
    """A `_conv_forward` for `conv` that runs oneDNN's convolution on channels-last activations for CPU
    float32 inference while `owner`'s flag is set, and the module's own otherwise (GPU, other dtypes,
    autograd). The output stays channels-last, so the next convolution takes it without a copy."""
    generic, weight_cl = conv._conv_forward, _channels_last_weight(conv)

    def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if _fast_cpu_active(owner, x, weight) and weight is conv.weight and bias is conv.bias:
            return _onednn(conv, x, weight_cl(weight), list(conv.padding))
        return generic(x, weight, bias)

    return forward


def _causal_conv_forward(conv: WanCausalConv3d, owner: torch.nn.Module):
    """A `forward` for a `WanCausalConv3d` that gives its spatial zero padding to oneDNN instead of
    materialising a padded copy (`F.pad`: a fill and a copy of the whole activation), on the fast
    path; the module's own otherwise. The causal time padding (cached frames,
    else zeros) is built as diffusers builds it."""
    generic, weight_cl = conv.forward, _channels_last_weight(conv)
    w_pad, w_pad_right, h_pad, h_pad_bottom, _, t_pad_after = conv._padding
    if (w_pad, h_pad, 0) != (w_pad_right, h_pad_bottom, t_pad_after):  # pragma: no cover - not a Wan layout
        return generic

    def forward(x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
        if not _fast_cpu_active(owner, x, conv.weight):
            return generic(x, cache_x)
        t_pad = conv._padding[4]
        if cache_x is not None and t_pad > 0:
            x = torch.cat([cache_x.to(x.device), x], dim=2)
            t_pad -= cache_x.shape[2]
        if t_pad > 0:
            x = F.pad(x, (0, 0, 0, 0, t_pad, 0))
        return _onednn(conv, x, weight_cl(conv.weight), [0, h_pad, w_pad])

    return forward


def _rms_norm_forward(norm: WanRMS_norm, owner: torch.nn.Module):
    """A `forward` for a channel-first `WanRMS_norm`: `F.normalize(x, dim=1)` (`x / max(|x|, 1e-12)`)
    written as `x * rsqrt(max(sum(x^2), 1e-24))`, one contiguous reduction instead of a strided
    one, while `owner`'s flag is set (CPU float32 inference); the module's own otherwise."""
    generic = norm.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if _fast_cpu_active(owner, x, norm.gamma):
            return x * torch.rsqrt(x.pow(2).sum(1, keepdim=True).clamp_min(1e-24)) * (norm.scale * norm.gamma) + norm.bias
        return generic(x)

    return forward


def use_fast_cpu_path(module: torch.nn.Module, enabled: bool = True) -> bool:
    """Route `module`'s zero-padded 3-D convolutions through oneDNN (channels-last) and its channel-first
    RMS norms through the one-reduction form on CPU (see the module docstring), or back to torch's own
    path with `enabled=False`. Patches once; returns whether the fast path is in use (False where this
    torch build has no oneDNN)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch, "mkldnn_convolution")):
        return False
    if not hasattr(module, FAST_CPU_FLAG):
        for m in module.modules():
            if isinstance(m, WanCausalConv3d) and tuple(m.padding) == (0, 0, 0) and m.padding_mode == "zeros":
                m.forward = _causal_conv_forward(m, module)
            elif isinstance(m, torch.nn.Conv3d) and m.padding_mode == "zeros" and not isinstance(m.padding, str):
                m._conv_forward = _onednn_conv_forward(m, module)
            elif isinstance(m, WanRMS_norm) and m.channel_first:
                m.forward = _rms_norm_forward(m, module)
    setattr(module, FAST_CPU_FLAG, bool(enabled))
    return bool(enabled)


def _hook_pre_forward(vae: AutoencoderKLWan) -> None:
    # Same as diffusers' `apply_forward_hook`: lets accelerate's CPU-offload hook move the VAE in.
    hook = getattr(vae, "_hf_hook", None)
    if hook is not None and hasattr(hook, "pre_forward"):
        hook.pre_forward(vae)


class StreamingDecoder:
    """Decodes a video's latents chunk by chunk, carrying the causal-conv cache between calls."""

    def __init__(self, vae: AutoencoderKLWan, fast_cpu: bool = True, pixels_per_call: int = 2**16) -> None:
        if not isinstance(vae, AutoencoderKLWan):
            raise ConfigError(f"StreamingDecoder needs a diffusers AutoencoderKLWan, got {type(vae).__name__}")
        self.vae = vae
        self._num_convs = sum(isinstance(m, WanCausalConv3d) for m in vae.decoder.modules())
        self.fast_cpu = fast_cpu
        self.pixels_per_call = pixels_per_call
        self.reset()

    def reset(self) -> None:
        """Start a new video: forget the causal cache."""
        self._feat_map: list = [None] * self._num_convs
        self._latent_frames_seen = 0

    def state(self) -> dict:
        """The causal cache and position, for resuming a video later (tensors copied to CPU)."""
        cache = [t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t for t in self._feat_map]
        return {"feat_map": cache, "seen": self._latent_frames_seen}

    def load_state(self, state: dict | None) -> None:
        """Continues the video whose `state()` this is."""
        if state is None:
            return
        device = next(self.vae.parameters()).device
        self._feat_map = [t.to(device) if isinstance(t, torch.Tensor) else t for t in state["feat_map"]]
        self._latent_frames_seen = state["seen"]

    @property
    def cache_bytes(self) -> int:
        """Bytes held by the causal cache; constant once a video has started, whatever its length."""
        return sum(t.numel() * t.element_size() for t in self._feat_map if isinstance(t, torch.Tensor))

    @property
    def temporal_factor(self) -> int:
        """Frames per latent frame (after the first)."""
        return 2 ** sum(bool(t) for t in self.vae.config.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel along each side."""
        patch = self.vae.config.patch_size or 1
        return 2 ** len(self.vae.config.temperal_downsample) * patch

    def frames_for_latents(self, num_latent_frames: int) -> int:
        """Number of frames a whole video of `num_latent_frames` latent frames decodes to."""
        if num_latent_frames <= 0:
            return 0
        return 1 + (num_latent_frames - 1) * self.temporal_factor

    def latent_frames_per_call(self, latent_height: int, latent_width: int) -> int:
        """How many latent frames one decoder call takes after a video's first: as many as keep its output
        within `pixels_per_call` (frames x height x width), at least one. On the shipped 64 x 64 model
        that is 8 (a whole chunk: 1.15x faster on CPU than one at a time in `scripts/bench_decoder.py`);
        at 540p it is one, as diffusers decodes, so activation memory does not grow."""
        per_latent = self.temporal_factor * latent_height * latent_width * self.spatial_factor ** 2
        return max(1, self.pixels_per_call // per_latent)

    @property
    def frames_decoded(self) -> int:
        """Frames produced since the last `reset()`."""
        return self.frames_for_latents(self._latent_frames_seen)

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents `[1, z, f, h, w]` -> uint8 frames `[n, H, W, 3]`, continuing the current video."""
        h, w = latents.shape[-2] * self.spatial_factor, latents.shape[-1] * self.spatial_factor
        # Quantised per decoder call (at most `pixels_per_call` pixels): a long chunk's float pixels never exist at once.
        frames = [to_uint8(x) for x in self._decode_frames(latents)]
        return np.concatenate(frames, axis=0) if frames else np.zeros((0, h, w, 3), dtype=np.uint8)

    def decode_tensor(self, latents: torch.Tensor) -> torch.Tensor:
        """Like `decode`, but returns the clamped float pixels `[1, 3, n, H, W]` in [-1, 1] on the VAE's device."""
        return torch.cat(list(self._decode_frames(latents)), dim=2)

    @torch.no_grad()
    def _decode_frames(self, latents: torch.Tensor) -> Iterator[torch.Tensor]:
        """Yields `[1, 3, n_i, H, W]` in [-1, 1] for each decoder call (one or more latent frames), advancing the cache."""
        if latents.ndim != 5 or latents.shape[0] != 1 or latents.shape[1] != self.vae.config.z_dim:
            raise ConfigError(
                f"latents must be [1, {self.vae.config.z_dim}, f, h, w], got {list(latents.shape)}; "
                "decode one video at a time"
            )
        _hook_pre_forward(self.vae)
        use_fast_cpu_path(self.vae.decoder, self.fast_cpu)
        param = next(self.vae.parameters())
        z = denormalise_latents(self.vae, latents.to(param.device, param.dtype))
        # post_quant_conv has a 1x1x1 kernel: no temporal context, safe to apply per chunk.
        x = self.vae.post_quant_conv(z)
        i = 0
        while i < x.shape[2]:
            # A video's first latent frame goes alone (it decodes to one frame: the upsamplers mark their
            # caches "Rep" on it); later ones go `n` at a time, which the causal caches make equal to one at
            # a time (tests/test_vae.py) in fewer, larger operations.
            n = 1 if self._latent_frames_seen == 0 else self.latent_frames_per_call(x.shape[-2], x.shape[-1])
            part = x[:, :, i : i + n]
            out = self.vae.decoder(
                part,
                feat_cache=self._feat_map,
                feat_idx=[0],
                first_chunk=self._latent_frames_seen == 0,
            )
            self._latent_frames_seen += part.shape[2]
            i += part.shape[2]
            if self.vae.config.patch_size is not None:
                out = unpatchify(out, patch_size=self.vae.config.patch_size)
            yield torch.clamp(out, min=-1.0, max=1.0)


@torch.no_grad()
def encode_video(vae: AutoencoderKLWan, frames: np.ndarray) -> torch.Tensor:
    """uint8 frames `[F, H, W, 3]` -> normalised latents `[1, z, f, h, w]` (posterior mean).

    F must be 1 + 4k: diffusers' encoder reads the first frame, then groups of 4.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ConfigError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    num = frames.shape[0]
    if (num - 1) % 4 != 0:
        raise ConfigError(f"encode_video needs 1 + 4k frames, got {num}; trim or pad to {1 + 4 * ((num - 1) // 4)}")
    param = next(vae.parameters())
    x = torch.from_numpy(frames).to(param.device).permute(3, 0, 1, 2)[None]  # [1, 3, F, H, W]
    x = (x.to(param.dtype) / 255.0) * 2.0 - 1.0  # VideoProcessor.preprocess_video convention
    mean = vae.encode(x).latent_dist.mode()
    return normalise_latents(vae, mean)
