"""Prompt sections: a prompt that changes at given frames, chunk by chunk."""
import numpy as np
import pytest
import torch

from arvideo.config import GenerateConfig, PromptSection, build_config
from arvideo.engine import Engine
from arvideo.errors import ConfigError
from arvideo.kvstore import KVStore, ScoredEviction
from arvideo.model import load_model
from arvideo.sections import SectionPlan, first_video_frame
from arvideo.state import RunState
from tests.tiny import save_tiny_model_folder

A = "a large blue square on a gray background"
B = "a small red circle and a medium green triangle on a navy background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def engine(folder):
    return Engine(load_model(folder))


def _cfg(frames=33, sections=(), overrides=()):
    sec = [{"frame": f, "prompt": p} for f, p in sections]
    return build_config(prompt=A, frames=frames, seed=5, overrides=["sampler.steps=4", *overrides],
                        **({"sections": sec} if sec else {}))


# -- the plan ----------------------------------------------------------------------------------
def test_a_section_starts_at_the_first_chunk_boundary_at_or_after_its_frame():
    # tf 4, chunks of 2 latent frames: chunk i starts at latent 2i, i.e. video frames 0, 5, 13, 21, ...
    starts = [0, 2, 4, 6, 8]
    assert [first_video_frame(s, 4) for s in starts] == [0, 5, 13, 21, 29]
    cfg = GenerateConfig(prompt=A, frames=33, sections=[PromptSection(5, B), PromptSection(14, A)])
    plan = SectionPlan.from_config(cfg, 4, starts, fps=16)
    assert plan.switch_frames() == [0, 5, 21]
    assert plan.chunk_sections == (0, 1, 1, 2, 2) == tuple(plan.section_of(s) for s in starts)
    assert plan.openers() == {1, 3}


def test_a_section_may_start_in_seconds_at_the_requests_frame_rate():
    starts = [0, 2, 4, 6, 8]
    cfg = GenerateConfig(prompt=A, frames=33, sections=[PromptSection(prompt=B, seconds=1.0)])
    assert SectionPlan.from_config(cfg, 4, starts, fps=16).starts == (0, 16)
    assert SectionPlan.from_config(cfg, 4, starts, fps=24).starts == (0, 24)


@pytest.mark.parametrize("sections, message", [
    ([PromptSection(0, B)], "after frame 0"),
    ([PromptSection(33, B)], "before the video ends"),
    ([PromptSection(20, B), PromptSection(10, A)], "increasing"),
    ([PromptSection(6, B), PromptSection(9, A)], "no chunk of its own"),  # both before the boundary at 13
    ([PromptSection(30, B)], "no chunk of its own"),  # after the last chunk's first frame (29)
    ([PromptSection(8, "  ")], "empty prompt"),
    ([PromptSection(8, B, seconds=0.5)], "either frame or seconds"),
    ([PromptSection(prompt=B)], "either frame or seconds"),
    ([PromptSection(prompt=B, seconds=2.5)], r"frame 40 = 2.5 s at 16 fps\): a section must start .* before the video ends"),
])
def test_bad_sections_are_refused_with_what_to_change(sections, message):
    cfg = GenerateConfig(prompt=A, frames=33, sections=sections)
    with pytest.raises(ConfigError, match=message):
        SectionPlan.from_config(cfg, 4, [0, 2, 4, 6, 8], fps=16)


# -- generation --------------------------------------------------------------------------------
def test_frames_before_the_switch_are_those_of_the_single_prompt_run(engine):
    single = engine.generate(_cfg())
    calls = engine.model_calls
    cfg = _cfg(sections=[(14, B)])
    sectioned = engine.generate(cfg)
    assert engine.model_calls == calls  # sections cost no extra call
    r = engine.resolve(cfg)
    switch = engine.section_plan(r).switch_frames()[1]
    assert switch == 15  # tiny VAE: 2x temporal, chunks of 2 latent frames start at frames 0, 3, 7, 11, 15
    # block-causal attention: nothing before the switch changes, though the chunk before it was
    # denoised in the same calls as the first chunk of the new prompt
    assert np.array_equal(sectioned[:switch], single[:switch])
    assert np.abs(sectioned[switch:].astype(int) - single[switch:].astype(int)).mean() > 1.0


@pytest.mark.parametrize("overrides", [[], ["cache.preset=deepcache"], ["schedule.ar_step=1"],
                                       ["schedule.name=pipelined", "schedule.window_size=2"]])
def test_a_section_with_the_same_prompt_reproduces_the_single_prompt_run(engine, overrides):
    # per-member cross-attention (one text per chunk in the call) against the shared-text path
    kw = ["kv.section_sink=keep", *overrides]
    single = engine.generate(_cfg(overrides=kw))
    split = _cfg(sections=[(14, A)], overrides=kw)
    seen = []
    orig = engine.backbone.__class__.__call__

    def spy(self, x, t, text, *a, **k):
        seen.append(isinstance(text, list))
        return orig(self, x, t, text, *a, **k)

    engine.backbone.__class__.__call__ = spy
    try:
        sectioned = engine.generate(split)
    finally:
        engine.backbone.__class__.__call__ = orig
    assert any(seen)  # some calls did pack chunks of both sections
    assert np.array_equal(sectioned, single)


def test_section_prompts_are_validated_before_generation(engine):
    with pytest.raises(Exception, match="purple"):
        next(engine.stream(_cfg(sections=[(14, "a small purple circle on a gray background")])))


def test_sections_need_a_chunked_schedule(engine):
    with pytest.raises(ConfigError, match="window mode"):
        engine.generate(_cfg(sections=[(14, B)], overrides=["schedule.name=window"]))


def test_sections_need_the_prompt_encoder(engine):
    r = engine.resolve(_cfg(sections=[(14, B)]))
    with pytest.raises(ConfigError, match="prompt_embeds"):
        engine.encode_text(r, torch.zeros(1, 4, 16), torch.zeros(1, 4, 16), engine.section_plan(r))


def test_a_sectioned_run_resumes_to_the_same_frames(folder, tmp_path):
    overrides = ["kv.policy=scored", "kv.budget_frames=4", "schedule.window_blocks=2"]
    cfg = _cfg(frames=41, sections=[(14, B)], overrides=overrides)
    reference = Engine(load_model(folder)).generate(cfg)
    states, frames = [], []
    for chunk in Engine(load_model(folder)).stream(cfg, on_state=lambda get: states.append(get())):
        frames.append(chunk.frames)
        if len(frames) == 4:
            break
    states[-1].save(tmp_path / "run.state")
    rest = [c.frames for c in Engine(load_model(folder)).stream(cfg, resume=RunState.load(tmp_path / "run.state"))]
    assert np.array_equal(np.concatenate([np.concatenate(frames)[: states[-1].emitted_frames]] + rest), reference)
    # the sections are part of the request: another switch frame is another request
    other = _cfg(frames=41, sections=[(22, B)], overrides=overrides)
    with pytest.raises(ConfigError, match="different request"):
        next(Engine(load_model(folder)).stream(other, resume=RunState.load(tmp_path / "run.state")))


@pytest.mark.parametrize("section_sink, sink_start", [("move", 8), ("keep", 0)])
def test_the_sink_moves_to_the_sections_first_chunk(engine, section_sink, sink_start):
    # the section starts at frame 15 = latent frame 8; the store's protected sink follows it under "move"
    cfg = _cfg(frames=41, sections=[(14, B)], overrides=["kv.policy=scored", "kv.budget_frames=4",
                                                         "schedule.window_blocks=2", f"kv.section_sink={section_sink}"])
    states = []
    for _ in engine.stream(cfg, on_state=lambda get: states.append(get())):
        pass
    store = states[-1].run.store
    assert store.sink_start == sink_start
    assert sink_start in store.frame_of[0].flatten().tolist()


# -- the store ---------------------------------------------------------------------------------
def _store(policy):
    return KVStore(1, 1, 1, 4, policy=policy, budget_tokens=4, scratch_tokens=2, tokens_per_frame=1,
                   scoring=ScoredEviction(protect_recent=False))


def _commit(store, chunk, key, sink=None):
    store.reserve(1)
    k = torch.tensor(key, dtype=torch.float32).view(1, 1, 1, 4)
    store.write(0, k, k.clone())
    store.commit([(chunk, 1)], sink=sink)


@pytest.mark.parametrize("policy", ["scored", "sink-window"])
def test_commit_with_sink_protects_the_new_sink_and_frees_the_old(policy):
    # chunks 0 and 6 (the two sinks) share their key with chunks 7 and 8: the most redundant tokens,
    # so `scored` evicts them first unless protected; `sink-window` evicts the oldest but the sink
    same = [1.0, 0.0, 0.0, 0.0]
    others = [[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0],
              [0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0], [0.0, -1.0, 1.0, 0.0], [0.0, 0.0, -1.0, 1.0]]
    store = _store(policy)
    _commit(store, 0, same)
    for c in range(1, 6):
        _commit(store, c, others[c - 1])
    assert 0 in store.frame_of[0].flatten().tolist()  # the first chunk is the sink
    _commit(store, 6, same, sink=6)
    for c, key in ((7, same), (8, same), (9, others[5]), (10, others[6]), (11, others[7])):
        _commit(store, c, key)
    held = store.frame_of[0].flatten().tolist()
    assert 6 in held and 0 not in held
    assert store.committed == 4


def test_an_unknown_section_sink_is_refused_when_the_request_is_resolved(engine):
    with pytest.raises(ConfigError, match="section_sink"):
        engine.resolve(_cfg(overrides=["kv.section_sink=stay"]))


C = "a medium yellow circle on a black background"


def test_frames_before_a_switch_do_not_depend_on_the_later_prompt_under_scored_eviction(engine):
    # `scored` chooses what to evict from the queries of the chunks in flight; the first chunk of the
    # new section is in flight beside the last chunk of the old one, and must not steer its context
    kw = ["kv.policy=scored", "kv.budget_frames=2", "schedule.window_blocks=2", "kv.protect_sink=false",
          "kv.protect_recent=false"]
    # the switch lands on frame 19, chunk 5, which windows of 2 chunks denoise beside chunk 4
    b = engine.generate(_cfg(frames=41, sections=[(18, B)], overrides=kw))
    c = engine.generate(_cfg(frames=41, sections=[(18, C)], overrides=kw))
    assert np.array_equal(b[:19], c[:19])
    assert np.abs(b[19:].astype(int) - c[19:].astype(int)).mean() > 1.0


def test_bench_sections_script_runs_and_scores_both_parts(folder, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(root / "scripts" / "bench_sections.py"), "--model", str(folder),
                           "--pairs", "2", "--frames", "25", "--switch", "12", "--set", "sampler.steps=3",
                           "--no-doc", "--json", str(out)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and all(r["switch"] == 15 for r in rows)
    for r in rows:
        assert set(r["move"]) >= {"adherence", "persistence", "adherence_to_a"}
        assert r["diff_before"] == 0  # frames before the chunk preceding the switch: the no-switch video's
    assert "| move |" in proc.stdout and "| B alone |" in proc.stdout


def test_states_saved_before_sections_existed_keep_their_fingerprint(engine):
    # requests without sections hash as before the keys existed (a saved run state stays resumable);
    # with sections, both the sections and kv.section_sink are part of the request
    from arvideo.state import request_fingerprint

    def fp(cfg):
        return request_fingerprint(engine.resolve(cfg), "m")

    assert fp(_cfg(overrides=["kv.section_sink=keep"])) == fp(_cfg(overrides=["kv.section_sink=move"]))
    with_sections = _cfg(sections=[(14, B)])
    assert fp(with_sections) != fp(_cfg())
    assert fp(_cfg(sections=[(14, B)], overrides=["kv.section_sink=keep"])) != fp(with_sections)
