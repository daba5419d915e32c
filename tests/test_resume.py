"""A run snapshotted at a tick boundary continues to exactly the frames of an uninterrupted run."""
import numpy as np
import pytest

from arvideo.config import build_config
from arvideo.engine import Engine
from arvideo.errors import ConfigError
from arvideo.model import load_model
from arvideo.state import RunState
from tests.tiny import save_tiny_model_folder

CAPTION = "a large blue square on a gray background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


@pytest.mark.parametrize("overrides", [["schedule.ar_step=1"], ["schedule.ar_step=1", "kv.policy=window", "kv.budget_frames=4"],
                                       ["schedule.name=pipelined", "schedule.window_size=3", "sampler.steps=3"]])
def test_resume_from_snapshot_reproduces_uninterrupted_frames(folder, tmp_path, overrides):
    cfg = build_config(prompt=CAPTION, frames=25, seed=4, overrides=overrides)
    reference = Engine(load_model(folder)).generate(cfg)

    engine = Engine(load_model(folder))
    states, frames = [], []
    for chunk in engine.stream(cfg, on_state=lambda get: states.append(get())):
        frames.append(chunk.frames)
        if len(frames) == 3:
            break  # "killed" after three chunks were written
    path = tmp_path / "run.state"
    states[-1].save(path)
    # the last snapshot was taken when the 3rd chunk was asked for: 2 chunks written by then
    written = np.concatenate(frames)[: states[-1].emitted_frames]
    assert states[-1].emitted_frames == sum(len(f) for f in frames[:2])
    resumed_engine = Engine(load_model(folder))  # a fresh process would load everything anew
    rest = [c.frames for c in resumed_engine.stream(cfg, resume=RunState.load(path))]
    video = np.concatenate([written] + rest)
    assert np.array_equal(video, reference)


def test_resume_keeps_each_chunks_guidance_reuse_state(folder, tmp_path):
    # guidance reuse: a chunk in flight carries its cached CFG direction and its call count; resume
    # from a snapshot where a chunk's next call reuses that direction (without the state it would
    # run both passes there, and the video would differ)
    cfg = build_config(prompt=CAPTION, frames=49, seed=4, overrides=[
        "schedule.window_blocks=2", "sampler.steps=6", "cache.preset=meancache:budget=4,guidance_every=2"])
    reference = Engine(load_model(folder)).generate(cfg)
    engine, states, frames = Engine(load_model(folder)), [], []
    for chunk in engine.stream(cfg, on_state=lambda get: states.append(get())):
        frames.append(chunk.frames)
    state = next(s for s in states if any(c.step < 6 and not c.guidance.needs_uncond() for c in s.run.chunks.values()))
    path = tmp_path / "run.state"
    state.save(path)
    rest = [c.frames for c in Engine(load_model(folder)).stream(cfg, resume=RunState.load(path))]
    video = np.concatenate([np.concatenate(frames)[: state.emitted_frames]] + rest)
    assert np.array_equal(video, reference)


def test_resume_while_chunks_wait_for_the_decoder(folder, tmp_path, monkeypatch):
    """Decode ahead with a decoder slower than generation: snapshots carry the queued chunks as latents."""
    import time

    from arvideo.vae import StreamingDecoder

    cfg = build_config(prompt=CAPTION, frames=33, seed=2, overrides=["schedule.ar_step=1"])
    reference = Engine(load_model(folder)).generate(cfg)
    original = StreamingDecoder.decode

    def slow(self, latents):
        time.sleep(0.05)
        return original(self, latents)

    monkeypatch.setattr(StreamingDecoder, "decode", slow)
    engine = Engine(load_model(folder))
    states, frames = [], []
    for chunk in engine.stream(cfg, on_state=lambda get: states.append(get())):
        frames.append(chunk.frames)
        if len(frames) == 5:
            break
    assert states[-1].pending  # finished chunks were still waiting for the decoder
    path = tmp_path / "run.state"
    states[-1].save(path)
    written = np.concatenate(frames)[: states[-1].emitted_frames]
    monkeypatch.setattr(StreamingDecoder, "decode", original)
    rest = [c.frames for c in Engine(load_model(folder)).stream(cfg, resume=RunState.load(path))]
    assert np.array_equal(np.concatenate([written] + rest), reference)


def _first_snapshot(engine, cfg):
    """Streams until the engine offers its first snapshot (after one chunk was consumed)."""
    states = []
    for _ in engine.stream(cfg, on_state=lambda get: states.append(get())):
        if states:
            break
    assert states
    return states


def test_resume_with_a_different_request_is_an_error(folder, tmp_path):
    engine = Engine(load_model(folder))
    cfg = build_config(prompt=CAPTION, frames=13, seed=4, overrides=["schedule.ar_step=1"])
    states = _first_snapshot(engine, cfg)
    other = build_config(prompt=CAPTION, frames=13, seed=5, overrides=["schedule.ar_step=1"])
    with pytest.raises(ConfigError, match="different request"):
        list(engine.stream(other, resume=states[-1]))


def test_snapshot_does_not_carry_the_model(folder, tmp_path):
    """Policies reach the backbone through a probe that is never copied or pickled."""
    engine = Engine(load_model(folder))
    cfg = build_config(prompt=CAPTION, frames=21, seed=4, overrides=["schedule.ar_step=1"])
    states = _first_snapshot(engine, cfg)
    import io
    import pickle

    import torch

    modules = []

    class Spy(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.nn.Module):
                modules.append(type(obj).__name__)
            return None

    Spy(io.BytesIO()).dump(states[-1])
    assert modules == []  # no model (or any module) inside a snapshot
    path = tmp_path / "s.state"
    states[-1].save(path)
    loaded = RunState.load(path)
    assert loaded.run.probe.backbone is None
    assert all(c.policy.ctx.features.__self__ is loaded.run.probe for c in loaded.run.chunks.values())
