"""Bounded KV store: exact budgets, scored eviction maths, positions, flat memory over long runs."""
import math
import tracemalloc

import numpy as np
import pytest
import torch

from arvideo import eviction
from arvideo.backbones.wan_family import WanFamilyBackbone, _apply_rope
from arvideo.config import build_config
from arvideo.engine import Engine
from arvideo.errors import ConfigError
from arvideo.kvstore import KVStore, ScoredEviction, TemporalRope
from arvideo.model import load_model
from arvideo.state import RunState
from tests.tiny import save_tiny_model_folder, tiny_transformer

CAPTION = "a small red circle on a black background"
TPF = 4  # tokens per latent frame in the hand-built stores below


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


def _filled_store(policy="scored", *, layers=2, batch=2, heads=3, d=8, chunks=6, chunk_frames=2, budget_frames=6,
                  scoring=None, positions="absolute"):
    """A store fed `chunks` committed chunks of random K/V; returns it with every chunk's K/V, per layer."""
    torch.manual_seed(0)
    length = chunk_frames * TPF
    store = KVStore(layers, batch, heads, d, policy=policy, budget_tokens=budget_frames * TPF,
                    scratch_tokens=length, tokens_per_frame=TPF, scoring=scoring, positions=positions,
                    rope=TemporalRope(4) if positions == "reindexed" else None)
    fed = []
    for c in range(chunks):
        kv = [(torch.randn(batch, heads, length, d), torch.randn(batch, heads, length, d)) for _ in range(layers)]
        store.reserve(length)
        for layer, (k, v) in enumerate(kv):
            store.write(layer, k, v)
            store.observe_queries(layer, torch.randn(batch, heads, length + 5, d), commit_tokens=length)
        store.commit([(c, length)])
        fed.append(kv)
    return store, fed


def _load_bench(name: str):
    """scripts/bench_kvstore.py as a module (scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_kvstore.py"
    spec = importlib.util.spec_from_file_location(name, path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def _all_tokens(fed, layer, which):
    return torch.cat([kv[layer][which] for kv in fed], dim=2)  # [B, H, total, d]


def test_scored_eviction_keeps_exactly_the_budget_per_head_in_one_fixed_allocation():
    store, _ = _filled_store(chunks=2)
    capacity, nbytes = store.capacity, store.nbytes
    assert store.committed == 4 * TPF  # under budget: nothing evicted
    for c in range(2, 9):
        store.reserve(2 * TPF)
        for layer in range(store.num_layers):
            store.write(layer, torch.randn(2, 3, 2 * TPF, 8), torch.randn(2, 3, 2 * TPF, 8))
        store.commit([(c, 2 * TPF)])
        assert store.committed == 6 * TPF  # exactly the budget, every head
        assert all(f.shape == (3, 6 * TPF) for f in store.frame_of)
    assert (store.capacity, store.nbytes) == (capacity, nbytes)
    # heads choose for themselves: not all heads of all layers keep the same frames
    assert len({tuple(f[h].tolist()) for f in store.frame_of for h in range(3)}) > 1


def test_redundancy_in_linear_time_equals_naive_pairwise_mean_cosine():
    keys = torch.randn(3, 50, 16, dtype=torch.float64)
    unit = keys / keys.norm(dim=-1, keepdim=True)
    cos = unit @ unit.transpose(1, 2)  # [H, L, L], O(L^2)
    naive = torch.softmax((cos.sum(dim=-1) - 1.0) / keys.shape[1], dim=-1)
    # float32 inside `redundancy`: agreement to float32 rounding of sums of 50 unit dot products
    assert torch.allclose(eviction.redundancy(keys), naive.float(), atol=1e-6, rtol=1e-5)


def test_importance_is_mean_softmax_over_queries_with_max_over_grouped_heads():
    q = torch.randn(4, 7, 8)  # 4 query heads over 2 KV heads
    k = torch.randn(2, 11, 8)
    got = eviction.attention_importance(q, k, block=3)  # blocks of 3 queries: the accumulation is exact
    probs = torch.softmax(q @ k.repeat_interleave(2, dim=0).transpose(1, 2) / math.sqrt(8), dim=-1).mean(dim=1)
    assert torch.allclose(got, probs.view(2, 2, 11).amax(dim=1), atol=1e-6)
    pooled = eviction.smooth(torch.tensor([[0.0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]]), 7)
    assert pooled.tolist() == [[0.0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0]]


def test_attention_after_scored_eviction_equals_attention_over_the_kept_subset_per_head():
    store, fed = _filled_store(chunks=5)
    q = torch.randn(2, 3, 6, 8)
    for layer in range(store.num_layers):
        keys, values = _all_tokens(fed, layer, 0), _all_tokens(fed, layer, 1)
        frames = torch.arange(keys.shape[2]) // TPF
        k_view, v_view = store.view(layer, 0)
        got = torch.nn.functional.scaled_dot_product_attention(q, k_view, v_view)
        for h in range(3):
            slots = store.frame_of[layer][h]
            # recover the kept token indices: kept tokens stay in order, and frames map back to tokens
            kept = torch.nonzero((keys[0, h][None] == k_view[0, h][:, None]).all(-1))[:, 1]
            assert torch.equal(frames[kept], slots)
            for b in range(2):  # both CFG passes keep the same tokens
                assert torch.equal(k_view[b, h], keys[b, h, kept]) and torch.equal(v_view[b, h], values[b, h, kept])
            mask = torch.full((keys.shape[2],), float("-inf"))
            mask[kept] = 0.0
            weights = torch.softmax(q[:, h] @ keys[:, h].transpose(1, 2) / math.sqrt(8) + mask, dim=-1)
            # float32 SDPA against an explicit masked softmax over the full set: rounding only
            assert torch.allclose(got[:, h], weights @ values[:, h], atol=1e-5)


def test_scored_eviction_protects_sink_and_most_recent_chunk():
    store, _ = _filled_store(chunks=6, budget_frames=6)
    for f in store.frame_of:
        for h in range(3):
            held = set(f[h].tolist())
            assert {0, 1} <= held and {10, 11} <= held  # chunk 0 (frames 0-1) and chunk 5 (frames 10-11)
    with pytest.raises(ConfigError, match="protected"):
        _filled_store(chunks=4, chunk_frames=2, budget_frames=3)


def test_select_keeps_top_scores_in_token_order_and_protected_tokens():
    score = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.8]])
    assert eviction.select(score, 2).tolist() == [[2, 4]]
    protected = torch.tensor([[False, True, False, False, False]])
    assert eviction.select(score, 2, protected).tolist() == [[1, 2]]


def test_temporal_rotation_of_a_cached_key_equals_rope_at_the_new_position():
    bb = WanFamilyBackbone(tiny_transformer())
    t_dim = bb.model.rope.t_dim
    k = torch.randn(1, 2 * 3 * 3, 2, bb.head_dim)  # [B, L, H, d]: 2 frames of 3x3 tokens
    at = _apply_rope(k, *bb._rope(torch.tensor([5, 6]), 3, 3)).transpose(1, 2)  # [B, H, L, d]
    moved = _apply_rope(k, *bb._rope(torch.tensor([1005, 2]), 3, 3)).transpose(1, 2)
    delta = torch.tensor([1000] * 9 + [-4] * 9).expand(2, -1)
    # float32 rotations of an angle computed in float64: rounding of a few ulps
    assert torch.allclose(TemporalRope(t_dim).rotate(at, delta), moved, atol=1e-5)


def test_reindexed_positions_put_kept_frames_right_before_the_next_frame():
    store, fed = _filled_store("sink-window", chunks=6, budget_frames=8, positions="reindexed")
    # kept: sink frames 0-1 and frames 6-11; ranks place the sink at 4-5, the window at 6-11
    assert store.frame_of[0][0].unique().tolist() == [0, 1, 6, 7, 8, 9, 10, 11]
    assert store.rotated_to[0][0].unique().tolist() == list(range(4, 12))
    sink = store.keys[0][:, :, : 2 * TPF]
    expected = TemporalRope(4).rotate(fed[0][0][0], torch.full((3, 2 * TPF), 4))
    assert torch.allclose(sink, expected, atol=1e-6)
    assert torch.equal(store.keys[0][:, :, 2 * TPF : 8 * TPF], _all_tokens(fed[3:], 0, 0))  # window untouched


def test_frame_unit_keeps_whole_frames_ranked_by_mean_token_score():
    frames = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]] * 2)
    score = torch.tensor([[5.0, 5, 1, 1, 3, 3, 0, 0], [0, 0, 9, 9, 1, 1, 2, 2]])
    protected = torch.zeros_like(frames, dtype=torch.bool)
    protected[:, 6:] = True  # frame 3 (a protected chunk) stays whatever its score
    assert eviction.select_frames(score, frames, 2, protected).tolist() == [[0, 1, 6, 7], [2, 3, 6, 7]]
    # a frame's score is the mean of its tokens: one high token does not carry a frame
    score = torch.tensor([[4.0, -4, 1, 1, 0.9, 0.9, 0, 0]])
    assert eviction.select_frames(score, frames[:1], 1).tolist() == [[2, 3]]
    # in the store: exactly the budget, whole frames per head, the sink and latest chunk kept
    store, _ = _filled_store(chunks=6, budget_frames=6, scoring=ScoredEviction(unit="frame"))
    for f in store.frame_of:
        assert f.shape == (3, 6 * TPF)
        for h in range(3):
            held = f[h].tolist()
            assert all(held.count(x) == TPF for x in set(held))  # whole frames only
            assert {0, 1, 10, 11} <= set(held)
    with pytest.raises(ConfigError, match="evict_unit"):
        _filled_store(scoring=ScoredEviction(unit="chunk"))


@pytest.mark.parametrize("unit", ["token", "frame"])
def test_engine_scored_policy_stays_within_budget_and_uses_query_importance(folder, monkeypatch, unit):
    engine = Engine(load_model(folder))
    seen = []
    original = KVStore.commit

    def commit(self, chunks, **kw):
        if self.committed + sum(n for _, n in chunks) > self.budget:
            seen.append(all(i is not None and float(i.sum()) > 0 for i in self.importance))
        original(self, chunks, **kw)
        assert self.committed <= self.budget
        if unit == "frame":  # whole latent frames per head
            assert all(int((row == x).sum()) % self.tokens_per_frame == 0
                       for f in self.frame_of for row in f for x in row.unique())

    monkeypatch.setattr(KVStore, "commit", commit)
    cfg = build_config(prompt=CAPTION, frames=33, overrides=[
        "schedule.ar_step=1", "kv.policy=scored", "kv.budget_frames=6", "kv.positions=reindexed",
        f"kv.evict_unit={unit}"])
    video = engine.generate(cfg)
    assert video.shape[0] == 33 and len(seen) >= 4 and all(seen)


def test_resume_with_scored_reindexed_store_reproduces_uninterrupted_frames(folder, tmp_path):
    cfg = build_config(prompt=CAPTION, frames=29, seed=3, overrides=[
        "schedule.ar_step=1", "kv.policy=scored", "kv.budget_frames=4", "kv.positions=reindexed",
        "kv.protect_sink=false"])
    reference = Engine(load_model(folder)).generate(cfg)
    states, frames = [], []
    for chunk in Engine(load_model(folder)).stream(cfg, on_state=lambda get: states.append(get())):
        frames.append(chunk.frames)
        if len(frames) == 5:
            break
    states[-1].save(tmp_path / "run.state")
    written = np.concatenate(frames)[: states[-1].emitted_frames]
    rest = [c.frames for c in Engine(load_model(folder)).stream(cfg, resume=RunState.load(tmp_path / "run.state"))]
    assert np.array_equal(np.concatenate([written] + rest), reference)


def test_thousands_of_frames_keep_store_and_process_memory_flat(folder):
    psutil = pytest.importorskip("psutil")
    engine = Engine(load_model(folder))
    cfg = build_config(prompt=CAPTION, frames=4001, height=16, width=16, overrides=[
        "sampler.steps=1", "kv.policy=scored", "kv.budget_frames=6", "schedule.window_blocks=8"])
    proc = psutil.Process()
    sizes, rss, py = set(), [], []
    tracemalloc.start()
    try:
        for i, chunk in enumerate(engine.stream(cfg, decode=False)):  # noqa: B007 (last chunk checked below)
            store = engine._run.store
            sizes.add((store.capacity, store.nbytes))
            # every held chunk holds at least one of the budget's slots in some head of some layer
            assert store.committed <= store.budget and len(store.segments) <= store.budget * store.heads * 2
            assert len(engine._run.chunks) <= 2 * 8  # in-flight chunks only
            if i % 25 == 0:
                rss.append(proc.memory_info().rss)
                py.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert chunk.index == 1000  # 2001 latent frames in chunks of 2
    assert len(sizes) == 1  # allocated once
    quarter = len(rss) // 4
    # after warm-up nothing may grow with length. Tolerances: RSS 1 MiB of allocator noise (one
    # leaked latent chunk per chunk would add 1000 x 4 KiB pages); the Python heap 128 KiB, since
    # torch itself keeps ~50 B per op call in a pool that fills up and stops after ~2,000 chunks
    # (the same with the window policy: see docs/kvstore.md)
    assert max(rss[quarter:]) - max(rss[:quarter]) < 2**20
    assert max(py[quarter:]) - max(py[:quarter]) < 128 * 2**10


@pytest.mark.slow
def test_whole_process_peak_memory_at_4000_frames_within_5_percent_of_400(folder):
    """Each length in its own process (scripts/bench_kvstore.py child), decoding every frame."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_kvstore.py"
    peaks = {}
    for frames in (401, 4001):
        out = subprocess.run([sys.executable, str(script), "child", "--model", str(folder), "--frames", str(frames),
                              "--set", "kv.policy=scored", "kv.budget_frames=6", "sampler.steps=1"],
                             capture_output=True, text=True, check=True).stdout
        row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
        assert row["kv_bytes_max"] == row["kv_bytes_min"] and row["kv_tokens_max"] == 6 * 16
        peaks[frames] = row["peak_rss_mib"]
    assert peaks[4001] <= 1.05 * peaks[401], peaks


def test_quality_benchmark_resumes_from_its_journal(tmp_path, monkeypatch):
    """An interrupted `bench_kvstore.py quality` run reuses its finished videos when started again,
    and a completed run removes the journal (so new weights in the same folder are measured afresh)."""
    import argparse
    import json

    bench = _load_bench("bench_kvstore_under_test")
    calls, interrupt_after = [], [3]

    def fake_child(model, frames, seed, overrides, score):
        if len(calls) == interrupt_after[0]:
            raise RuntimeError("interrupted")
        calls.append((seed, tuple(overrides)))
        return {"seed": seed, "kv_bytes_max": 1, "peak_rss_mib": 1.0, "seconds": 1.0,
                **{m: 0.5 for m in bench.METRICS}}

    published = []
    monkeypatch.setattr(bench, "run_child", fake_child)
    monkeypatch.setattr(bench, "publish", lambda args, section, lines, rows: published.append(rows))
    args = argparse.Namespace(policies=["scored", "window"], positions=["reindexed"], captions=2, seed=10_000,
                              set=[], jobs=1, frames=[9], model=None, json=str(tmp_path / "q.json"), reuse=[])
    with pytest.raises(RuntimeError):
        bench.quality(args)
    journal = tmp_path / "q.json.partial.jsonl"
    kept = [json.loads(line) for line in journal.read_text().splitlines()]
    # caption-major: both policies of caption 0, then the first policy of caption 1
    assert [(r["world_seed"], r["variant"][0]) for r in kept] == [(10_000, "scored"), (10_000, "window"),
                                                                  (10_001, "scored")]
    interrupt_after[0] = None
    bench.quality(args)
    assert len(calls) == 4 and calls[-1][0] == 10_001  # 3 before the interruption + the 1 missing video
    assert len(published[-1]) == 4 and not journal.exists()


def test_quality_benchmark_reuses_the_videos_of_an_earlier_run(tmp_path, monkeypatch):
    """`--reuse OLD.json` takes the videos an earlier run already scored (same frames, seed, policy and
    overrides) and generates only the rest, so a new policy is compared with old ones paired by caption."""
    import argparse
    import json

    bench = _load_bench("bench_kvstore_reuse_under_test")
    calls, published = [], []

    def fake_child(model, frames, seed, overrides, score):
        calls.append((seed, tuple(overrides)))
        return {"frames": frames, "seed": seed, "set": overrides, "kv_bytes_max": 1, "peak_rss_mib": 1.0,
                "seconds": 1.0, **{m: 0.5 for m in bench.METRICS}}

    monkeypatch.setattr(bench, "run_child", fake_child)
    monkeypatch.setattr(bench, "publish", lambda args, section, lines, rows: published.append((lines, rows)))

    def run(policies, frames, overrides, reuse):
        bench.quality(argparse.Namespace(policies=policies, positions=["reindexed"], captions=2, seed=10_000,
                                         set=overrides, jobs=1, frames=[frames], model=None, json=None, reuse=reuse))

    run(["scored", "window"], 9, ["cache.preset=fast"], [])
    old = tmp_path / "old.json"
    old.write_text(json.dumps(published[-1][1]))
    calls.clear()
    run(["scored", "window", "full"], 9, ["cache.preset=fast"], [str(old)])
    assert sorted(calls) == [(10_000, ("kv.policy=full", "kv.positions=reindexed", "cache.preset=fast")),
                             (10_001, ("kv.policy=full", "kv.positions=reindexed", "cache.preset=fast"))]
    assert len(published[-1][1]) == 6 and "4 of the 6 videos taken from earlier runs" in published[-1][0][0]
    # another length or other overrides are other videos: nothing is reused
    calls.clear()
    run(["scored"], 17, ["cache.preset=fast"], [str(old)])
    run(["scored"], 9, [], [str(old)])
    assert len(calls) == 4


def test_quality_benchmark_tabulates_each_quarter_of_the_videos(monkeypatch):
    """The per-quarter table averages each quarter's metrics over captions, per policy, and is left
    out when some videos (reused from a run before quarters were recorded) lack them."""
    import argparse

    bench = _load_bench("bench_kvstore_quarters_under_test")
    published = []

    def fake_child(model, frames, seed, overrides, score):
        policy = overrides[0].split("=")[1]
        base = 0.1 if policy == "scored" else 0.5
        quarters = [{"adherence": base + q / 10 + (seed - 10_000) / 100, "persistence": 1.0 - q / 10}
                    for q in range(bench.QUARTERS)]
        return {"seed": seed, "kv_bytes_max": 1, "peak_rss_mib": 1.0, "seconds": 1.0, "quarters": quarters,
                **{m: 0.5 for m in bench.METRICS}}

    monkeypatch.setattr(bench, "run_child", fake_child)
    monkeypatch.setattr(bench, "publish", lambda args, section, lines, rows: published.append(lines))
    bench.quality(argparse.Namespace(policies=["scored", "window"], positions=["reindexed"], captions=2,
                                     seed=10_000, set=[], jobs=1, frames=[9], model=None, json=None, reuse=[]))
    lines = published[-1]
    # captions 10000 and 10001: quarter q's adherence is base + q/10 + 0.005 on average
    assert "| scored | reindexed | 0.105 / 1.000 | 0.205 / 0.900 | 0.305 / 0.800 | 0.405 / 0.700 |" in lines
    assert "| window | reindexed | 0.505 / 1.000 | 0.605 / 0.900 | 0.705 / 0.800 | 0.805 / 0.700 |" in lines

    def without_quarters(*a):
        row = fake_child(*a)
        return row if a[2] == 10_000 else {k: v for k, v in row.items() if k != "quarters"}

    monkeypatch.setattr(bench, "run_child", without_quarters)
    bench.quality(argparse.Namespace(policies=["scored"], positions=["reindexed"], captions=2,
                                     seed=10_000, set=[], jobs=1, frames=[9], model=None, json=None, reuse=[]))
    assert not any("quarter 1" in line for line in published[-1])


def test_quality_benchmark_policies_carry_their_own_settings(monkeypatch):
    import argparse

    bench = _load_bench("bench_kvstore_settings_under_test")
    seen, published = [], []

    def fake_child(model, frames, seed, overrides, score):
        seen.append(list(overrides))
        return {"seed": seed, "kv_bytes_max": 1, "peak_rss_mib": 1.0, "seconds": 1.0, **{m: 0.5 for m in bench.METRICS}}

    monkeypatch.setattr(bench, "run_child", fake_child)
    monkeypatch.setattr(bench, "publish", lambda args, section, lines, rows: published.append(lines))
    bench.quality(argparse.Namespace(policies=["scored", "scored/kv.evict_unit=frame", "window/kv.budget_frames=8"],
                                     positions=["reindexed", "absolute"], captions=1, seed=20_000,
                                     set=["cache.preset=fast"], jobs=1, frames=[9], model=None, json=None, reuse=[]))
    assert ["kv.policy=scored", "kv.positions=absolute", "kv.evict_unit=frame", "cache.preset=fast"] in seen
    assert ["kv.policy=window", "kv.positions=reindexed", "kv.budget_frames=8", "cache.preset=fast"] in seen
    assert len(seen) == 5  # window runs under one positions scheme only, whatever its settings
    assert any(line.startswith("| scored/kv.evict_unit=frame | reindexed |") for line in published[-1])


def test_quality_benchmark_names_its_caption_set():
    import argparse

    bench = _load_bench("bench_kvstore_captions_under_test")

    def name(seed, captions):
        return bench.caption_set(argparse.Namespace(seed=seed, captions=captions))

    assert name(10_000, 12) == "held-out world seeds 10000..10011"
    assert name(20_000, 24) == "world seeds 20000..20023 (development captions, not the evaluation set)"
    assert name(19_995, 10) == "world seeds 19995..20004"  # straddles both sets: named by seeds only


def test_quality_child_scores_each_quarter_of_its_video_alone(folder):
    """`bench_kvstore.py child --score` adds the world metrics of each quarter of the video, and the
    whole-video metrics are still those of the whole video."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_kvstore.py"
    out = subprocess.run([sys.executable, str(script), "child", "--model", str(folder), "--frames", "33",
                          "--score", "--set", "sampler.steps=2"], capture_output=True, text=True, check=True).stdout
    row = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    assert len(row["quarters"]) == 4
    assert all({"adherence", "persistence", "background"} <= set(q) <= set(row) for q in row["quarters"])
    # background is a plain mean over frames, so the quarters' (frames 0-7, 8-15, 16-24, 25-32)
    # weighted by their lengths give the whole video's
    backgrounds = [q["background"] for q in row["quarters"]]
    assert abs(sum(b * n for b, n in zip(backgrounds, (8, 8, 9, 8))) / 33 - row["background"]) < 1e-9


def test_model_folder_sets_the_default_positions_and_a_request_overrides_them(tmp_path):
    # a model folder's arvideo.json names its default positions (the embedded model's: reindexed,
    # chosen by measurement, docs/kvstore.md); the engine must take it from the folder, and
    # kv.positions on the request must still win
    kv = {"kv_policy": "sink-window", "kv_window_latent_frames": 4}
    ab = save_tiny_model_folder(tmp_path / "ab", defaults=dict(kv, kv_positions="absolute"))
    re = save_tiny_model_folder(tmp_path / "re", defaults=dict(kv, kv_positions="reindexed"))
    cfg = dict(prompt=CAPTION, frames=29, seed=3, overrides=["schedule.ar_step=1"])

    def run(folder, *extra):
        c = dict(cfg, overrides=cfg["overrides"] + list(extra))
        return Engine(load_model(folder)).generate(build_config(**c))

    from_ab, from_re = run(ab), run(re)
    assert not np.array_equal(from_ab, from_re)  # eviction with a sink: the two schemes differ
    assert np.array_equal(from_ab, run(re, "kv.positions=absolute"))
    assert np.array_equal(from_re, run(ab, "kv.positions=reindexed"))


def test_model_folder_sets_the_default_pool_width_and_a_request_overrides_it(tmp_path):
    # the embedded model's arvideo.json sets kv_pool_width (15, measured in docs/kvstore.md); a folder
    # without it gets methods.md's 7; kv.pool_width on the request wins; and the width reaches the store
    kv = {"kv_policy": "scored", "kv_window_latent_frames": 4}
    wide = Engine(load_model(save_tiny_model_folder(tmp_path / "wide", defaults=dict(kv, kv_pool_width=15))))
    plain = Engine(load_model(save_tiny_model_folder(tmp_path / "plain", defaults=kv)))
    cfg = dict(prompt=CAPTION, frames=29, seed=3)
    assert wide.resolve(build_config(**cfg)).cfg.kv.pool_width == 15
    assert plain.resolve(build_config(**cfg)).cfg.kv.pool_width == 7
    assert wide.resolve(build_config(**cfg, overrides=["kv.pool_width=3"])).cfg.kv.pool_width == 3
    r = wide.resolve(build_config(**cfg))
    assert wide._make_store(r, wide.make_schedule(r), 2).scoring.pool_width == 15


@pytest.mark.parametrize("policy", ["window", "full"])
def test_window_and_full_videos_do_not_depend_on_the_positions_scheme(folder, policy):
    # window keeps contiguous recent frames (rank = own position) and full evicts nothing, so
    # neither ever re-positions a key: bench_kvstore.py runs them under one scheme only
    cfg = dict(prompt=CAPTION, frames=29, seed=3)

    def run(positions):
        over = [f"kv.policy={policy}", "kv.budget_frames=4", f"kv.positions={positions}", "schedule.ar_step=1"]
        return Engine(load_model(folder)).generate(build_config(**cfg, overrides=over))

    assert np.array_equal(run("absolute"), run("reindexed"))


def test_evict_unit_is_checked_up_front_and_its_default_keeps_saved_states_resumable(folder):
    import hashlib
    import json
    from dataclasses import asdict

    from arvideo.state import request_fingerprint

    engine = Engine(load_model(folder))

    def cfg(*extra):
        return build_config(prompt=CAPTION, frames=9, overrides=["kv.policy=scored", *extra])

    with pytest.raises(ConfigError, match="evict_unit"):
        engine.resolve(cfg("kv.evict_unit=chunk"))
    token = engine.resolve(cfg())
    # the hash a state saved before the key existed carries: the same request without it
    old = asdict(token.cfg)
    for key in ("device", "attention", "decode_ahead", "sections"):
        old.pop(key, None)
    old["kv"].pop("section_sink")
    old["kv"].pop("evict_unit")
    blob = json.dumps({"cfg": old, "model": "m"}, sort_keys=True, default=str)
    assert request_fingerprint(token, "m") == hashlib.sha256(blob.encode()).hexdigest()[:16]
    assert request_fingerprint(engine.resolve(cfg("kv.evict_unit=frame")), "m") != request_fingerprint(token, "m")
