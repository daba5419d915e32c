"""Streaming VAE decode matches diffusers' whole-video decode, on tiny random Wan VAEs."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor

from arvideo.errors import ConfigError
from arvideo.vae import StreamingDecoder, encode_video, to_uint8

MEAN = [0.1, -0.2, 0.3, 0.0]
STD = [1.5, 0.8, 2.0, 1.2]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These convolutions are tiny: a second OpenMP thread only adds spin-wait, and on a
    # shared 2-core machine it made each decode ~50x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_vae(temperal_downsample: list[bool]) -> AutoencoderKLWan:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2],
        num_res_blocks=1,
        temperal_downsample=temperal_downsample,
        latents_mean=MEAN,
        latents_std=STD,
    )
    return vae.eval().float()


@pytest.fixture(scope="module", params=[[False, True], [True, True]], ids=["temporal2x", "temporal4x"])
def vae(request) -> AutoencoderKLWan:
    return tiny_vae(request.param)


def pipeline_decode(vae: AutoencoderKLWan, latents: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """What diffusers' SkyReels-V2 pipeline does at the end: un-normalise, decode whole, postprocess."""
    mean = torch.tensor(vae.config.latents_mean).view(1, 4, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    pil = VideoProcessor(vae_scale_factor=4).postprocess_video(video, output_type="pil")[0]
    return video, np.stack([np.asarray(im) for im in pil])


def test_chunked_decode_equals_whole_decode_for_chunks_1_2_3_2(vae):
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 8, 4, 4)
    ref_float, ref_uint8 = pipeline_decode(vae, latents)

    dec = StreamingDecoder(vae)
    tf = dec.temporal_factor
    floats, frames, start = [], [], 0
    for n in [1, 2, 3, 2]:
        chunk = latents[:, :, start : start + n]
        expected = n * tf - (tf - 1 if start == 0 else 0)
        floats.append(dec.decode_tensor(chunk))
        assert floats[-1].shape[2] == expected
        start += n
    dec.reset()
    start = 0
    for n in [1, 2, 3, 2]:
        frames.append(dec.decode(latents[:, :, start : start + n]))
        start += n

    assert ref_uint8.shape == (dec.frames_for_latents(8), 16, 16, 3)
    got_float = torch.cat(floats, dim=2)
    # Same ops in the same order; only post_quant_conv (a 1x1x1 conv) sees a different tensor
    # length, which may change float32 summation order: allow 1e-5 of the [-1, 1] range
    # (observed: exactly 0 on CPU).
    assert (got_float - ref_float).abs().max().item() <= 1e-5
    got = np.concatenate(frames)
    assert got.shape == ref_uint8.shape and got.dtype == np.uint8
    # A 1e-5 float difference can flip a .5 rounding: at most one uint8 step.
    assert np.abs(got.astype(int) - ref_uint8.astype(int)).max() <= 1


def test_factors_and_frame_counts(vae):
    dec = StreamingDecoder(vae)
    tf = 2 ** sum(vae.config.temperal_downsample)
    assert dec.temporal_factor == tf
    assert dec.spatial_factor == 4
    assert [dec.frames_for_latents(n) for n in (0, 1, 2, 5)] == [0, 1, 1 + tf, 1 + 4 * tf]
    out = dec.decode(torch.zeros(1, 4, 3, 5, 6))
    assert out.shape == (1 + 2 * tf, 20, 24, 3)
    assert dec.frames_decoded == 1 + 2 * tf


def test_reset_starts_a_new_video_with_identical_frames(vae):
    torch.manual_seed(2)
    latents = torch.randn(1, 4, 3, 4, 4)
    dec = StreamingDecoder(vae)
    first = dec.decode(latents)
    dec.decode(torch.randn(1, 4, 2, 4, 4))
    dec.reset()
    np.testing.assert_array_equal(dec.decode(latents), first)


def test_cache_size_is_constant_as_the_video_grows(vae):
    dec = StreamingDecoder(vae)
    dec.decode(torch.randn(1, 4, 2, 4, 4))
    after_two = dec.cache_bytes
    for _ in range(4):
        dec.decode(torch.randn(1, 4, 2, 4, 4))
    assert after_two > 0 and dec.cache_bytes == after_two


def test_encode_video_returns_normalised_posterior_mean():
    vae = tiny_vae([False, True])
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, size=(9, 16, 16, 3), dtype=np.uint8)
    latents = encode_video(vae, frames)
    assert latents.shape == (1, 4, 5, 4, 4)

    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 255 * 2 - 1
    with torch.no_grad():
        mu = vae.encode(x).latent_dist.mean
    expected = (mu - torch.tensor(MEAN).view(1, 4, 1, 1, 1)) / torch.tensor(STD).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-6)  # 1/std vs /std: float rounding only


def test_encode_video_rejects_frame_counts_not_1_plus_4k():
    vae = tiny_vae([False, True])
    with pytest.raises(ConfigError, match="1 \\+ 4k"):
        encode_video(vae, np.zeros((6, 16, 16, 3), dtype=np.uint8))


def test_decode_rejects_a_batch_of_videos():
    dec = StreamingDecoder(tiny_vae([False, True]))
    with pytest.raises(ConfigError, match="one video at a time"):
        dec.decode(torch.zeros(2, 4, 1, 4, 4))


def test_fast_cpu_path_matches_torch_own_path_on_the_shipped_vae(monkeypatch):
    """The CPU fast path (oneDNN channels-last 3-D convolutions, one-reduction RMS norm) decodes the
    same frames as torch's own path, and really replaces both operations."""
    from pathlib import Path

    import torch.nn.functional as F

    from arvideo.vae import use_fast_cpu_path

    folder = Path(__file__).resolve().parents[1] / "models" / "shapes-df" / "vae"
    shipped = AutoencoderKLWan.from_pretrained(folder).eval()
    if not use_fast_cpu_path(shipped.decoder):
        pytest.skip("this torch build has no oneDNN")
    calls = {"onednn": 0, "normalize": 0}
    real_conv, real_normalize = torch.mkldnn_convolution, F.normalize

    def counting_conv(*args):
        calls["onednn"] += 1
        return real_conv(*args)

    def counting_normalize(*args, **kwargs):
        calls["normalize"] += 1
        return real_normalize(*args, **kwargs)

    real_pad = F.pad

    def counting_pad(x, pad, *args, **kwargs):
        calls["pad"] += any(pad)  # (post_quant_conv, outside the decoder, "pads" by zero)
        return real_pad(x, pad, *args, **kwargs)

    monkeypatch.setattr(torch, "mkldnn_convolution", counting_conv)
    monkeypatch.setattr(F, "normalize", counting_normalize)
    monkeypatch.setattr(F, "pad", counting_pad)
    calls["pad"] = 0
    torch.manual_seed(3)
    latents = torch.randn(1, shipped.config.z_dim, 4, 16, 16)
    generic = StreamingDecoder(shipped, fast_cpu=False)
    ref = generic.decode_tensor(latents[:, :, :1])
    ref = torch.cat([ref, generic.decode_tensor(latents[:, :, 1:])], dim=2)
    assert calls["onednn"] == 0 and calls["normalize"] > 0
    calls["normalize"] = 0
    assert calls["pad"] > 0
    fast = StreamingDecoder(shipped)
    first = [fast.decode_tensor(latents[:, :, :1]), fast.decode_tensor(latents[:, :, 1:2])]
    calls["pad"] = 0
    got = torch.cat([*first, fast.decode_tensor(latents[:, :, 2:])], dim=2)
    # from the third latent frame on every causal convolution has two cached frames, so nothing is
    # padded in time, and oneDNN pads the borders itself
    assert calls["onednn"] > 0 and calls["normalize"] == 0 and calls["pad"] == 0
    assert got.shape == ref.shape == (1, 3, 7, 64, 64)
    # Same functions, different summation order: float32 rounding only (observed ~2e-6).
    assert (got - ref).abs().max().item() <= 1e-4
    # And the uint8 frames a user gets differ by at most one level where a value sits on a rounding edge.
    assert np.abs(to_uint8(got).astype(int) - to_uint8(ref).astype(int)).max() <= 1


def test_several_latent_frames_per_decoder_call_equal_one_at_a_time_in_fewer_calls(vae):
    """After a video's first latent frame the decoder takes as many latent frames per call as
    `pixels_per_call` allows; the causal caches make that equal to one at a time."""
    torch.manual_seed(4)
    latents = torch.randn(1, 4, 9, 4, 4)
    one = StreamingDecoder(vae, pixels_per_call=1)
    many = StreamingDecoder(vae)
    assert one.latent_frames_per_call(4, 4) == 1 and many.latent_frames_per_call(4, 4) > 4
    calls = []
    hook = vae.decoder.register_forward_pre_hook(lambda module, args, kwargs: calls.append(args[0].shape[2]),
                                                 with_kwargs=True)
    try:
        ref = torch.cat([one.decode_tensor(latents[:, :, s:e]) for s, e in ((0, 3), (3, 5), (5, 9))], dim=2)
        assert calls == [1] * 9
        calls.clear()
        got = torch.cat([many.decode_tensor(latents[:, :, s:e]) for s, e in ((0, 3), (3, 5), (5, 9))], dim=2)
        assert calls == [1, 2, 2, 4]
    finally:
        hook.remove()
    assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-5
    assert many.frames_decoded == one.frames_decoded == got.shape[2]
