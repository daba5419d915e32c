"""The KV-cached, chunk-by-chunk path equals diffusers' own block-causal forward."""
import pytest
import torch

from arvideo.backbones import CallPlan, WanFamilyBackbone
from arvideo.kvstore import KVStore
from tests.tiny import tiny_transformer

# float32 on CPU; only summation order differs (SDPA over a slice vs a masked SDPA): 1e-5 relative
RTOL = 1e-5


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("inject_fps", [False, True])
def test_kv_cached_calls_equal_full_block_causal_forward(inject_fps):
    model = tiny_transformer(inject_sample_info=inject_fps)
    # diffusers' fps injection only broadcasts for batch 1 (its pipeline runs cond/uncond apart)
    batch = 1 if inject_fps else 2
    block, frames, h, w = 2, 6, 8, 8
    x = torch.randn(batch, 4, frames, h, w)
    t = torch.tensor([[0, 0, 500, 500, 900, 900]]).expand(batch, -1)
    text = torch.randn(batch, 5, 16)
    model._set_ar_attention(block)
    # the pipeline maps fps 16 -> id 0, anything else -> 1
    ref = model(x, t, text, enable_diffusion_forcing=True, fps=[0] if inject_fps else None,
                return_dict=False)[0]

    bb = WanFamilyBackbone(model)
    lay = bb.kv_layout(h, w)
    store = KVStore(lay.num_layers, batch, lay.heads, lay.head_dim)
    txt = bb.prepare_text(text)
    fps = 16 if inject_fps else None
    # call 1: chunk 0 committed alone; call 2: chunks 1 and 2 packed, attending to the store
    v0 = bb(x[:, :, 0:2], t[:, 0:2], txt, CallPlan([2], torch.arange(0, 2), commit=1), store, fps=fps)
    store.commit([(0, 2 * lay.tokens_per_frame)])
    v12 = bb(x[:, :, 2:6], t[:, 2:6], txt, CallPlan([2, 2], torch.arange(2, 6)), store, fps=fps)
    assert _rel(v0, ref[:, :, 0:2]) < RTOL
    assert _rel(v12, ref[:, :, 2:6]) < RTOL
    assert store.committed == 2 * lay.tokens_per_frame


def test_packed_call_without_store_is_block_causal():
    model = tiny_transformer()
    x = torch.randn(1, 4, 4, 8, 8)
    t = torch.tensor([[100, 100, 700, 700]])
    text = torch.randn(1, 3, 16)
    model._set_ar_attention(2)
    ref = model(x, t, text, enable_diffusion_forcing=True, return_dict=False)[0]
    bb = WanFamilyBackbone(model)
    out = bb(x, t, bb.prepare_text(text), CallPlan([2, 2], torch.arange(4)), None)
    assert _rel(out, ref) < RTOL


def test_bidirectional_window_equals_unmasked_forward():
    model = tiny_transformer()
    x = torch.randn(1, 4, 5, 8, 8)
    t = torch.tensor([[20, 20, 600, 600, 999]])
    text = torch.randn(1, 3, 16)
    ref = model(x, t, text, enable_diffusion_forcing=True, return_dict=False)[0]
    bb = WanFamilyBackbone(model)
    out = bb(x, t, bb.prepare_text(text), CallPlan([5], torch.arange(5), bidirectional=True), None)
    assert _rel(out, ref) < RTOL


def test_skipped_chunk_context_kv_gives_identical_later_chunks():
    """A chunk that skips its call stays visible to later chunks through its kept K/V."""
    model = tiny_transformer()
    bb = WanFamilyBackbone(model)
    lay = bb.kv_layout(8, 8)
    x = torch.randn(1, 4, 6, 8, 8)
    t = torch.tensor([[0, 0, 300, 300, 800, 800]])
    txt = bb.prepare_text(torch.randn(1, 3, 16))
    store = KVStore(lay.num_layers, 1, lay.heads, lay.head_dim)
    full = bb(x, t, txt, CallPlan([2, 2, 2], torch.arange(6), keep_kv=True), store)
    kept = bb.kept_kv
    assert sorted(kept) == [0, 1, 2] and len(kept[1]) == lay.num_layers
    # member 1 skipped: only members 0 and 2 computed, member 1 supplied from its kept K/V
    x02 = torch.cat([x[:, :, 0:2], x[:, :, 4:6]], dim=2)
    t02 = torch.cat([t[:, 0:2], t[:, 4:6]], dim=1)
    plan = CallPlan([2, 2, 2], torch.tensor([0, 1, 4, 5]), context={1: kept[1]})
    part = bb(x02, t02, txt, plan, store)
    assert _rel(part[:, :, 2:4], full[:, :, 4:6]) < RTOL
    assert _rel(part[:, :, 0:2], full[:, :, 0:2]) < RTOL
