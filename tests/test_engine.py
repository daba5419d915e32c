"""Engine behaviour on a tiny random model: streaming, lengths, errors, KV budgets."""
import numpy as np
import pytest
import torch

from arvideo.config import build_config
from arvideo.engine import Engine
from arvideo.errors import ConfigError, ModelFolderError, NonFiniteError, PromptError
from arvideo.model import check_model_folder, load_model
from tests.tiny import save_tiny_model_folder

CAPTION = "a small red circle on a black background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="module")
def engine(folder):
    return Engine(load_model(folder))


@pytest.mark.parametrize("frames", [1, 2, 10, 11, 16])
def test_stream_yields_exactly_the_requested_frames_in_order(engine, frames):
    chunks = list(engine.stream(build_config(prompt=CAPTION, frames=frames)))
    total = sum(len(c.frames) for c in chunks)
    assert total == frames
    assert [c.start for c in chunks] == list(np.cumsum([0] + [len(c.frames) for c in chunks[:-1]]))
    assert chunks[0].frames.shape[1:] == (32, 32, 3) and chunks[0].frames.dtype == np.uint8


def test_first_chunk_arrives_before_generation_finishes(engine):
    cfg = build_config(prompt=CAPTION, frames=21, overrides=["schedule.ar_step=1"])
    it = engine.stream(cfg)
    first = next(it)
    calls_at_first = engine.model_calls
    rest = list(it)
    assert first.index == 0 and len(rest) >= 4
    assert calls_at_first < engine.model_calls


def test_generation_is_deterministic_per_seed(engine):
    a = engine.generate(build_config(prompt=CAPTION, frames=9, seed=5))
    b = engine.generate(build_config(prompt=CAPTION, frames=9, seed=5))
    c = engine.generate(build_config(prompt=CAPTION, frames=9, seed=6))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_pipelined_schedule_with_magi_grid_generates_all_frames(engine):
    cfg = build_config(prompt=CAPTION, frames=17, overrides=[
        "schedule.name=pipelined", "schedule.window_size=2", "sampler.name=euler", "sampler.grid=magi",
        "sampler.steps=4", "sampler.shift=3.0"])
    assert len(engine.generate(cfg)) == 17
    # 9 latent frames in chunks of 2 -> 5 chunks; 2 steps per stage: 2 * (5 + 2 - 1) calls
    assert engine.model_calls == 12


def test_bounded_kv_window_never_exceeds_budget(engine, monkeypatch):
    from arvideo import kvstore

    seen = []
    original = kvstore.KVStore.commit

    def commit(self, chunks, **kw):
        original(self, chunks, **kw)
        seen.append((self.committed, self.budget, self.capacity))

    monkeypatch.setattr(kvstore.KVStore, "commit", commit)
    cfg = build_config(prompt=CAPTION, frames=41, overrides=["schedule.ar_step=1", "kv.policy=window", "kv.budget_frames=4"])
    assert len(engine.generate(cfg)) == 41
    tokens_per_frame = 16  # 8x8 latents, patch 2x2
    assert max(c for c, _, _ in seen) == 4 * tokens_per_frame
    assert {cap for _, _, cap in seen} == {seen[0][2]}  # allocated once, never grown


def test_last_step_commit_mode_runs_without_extra_tokens(engine):
    clean = engine.generate(build_config(prompt=CAPTION, frames=13, overrides=["schedule.ar_step=1"]))
    last = engine.generate(build_config(prompt=CAPTION, frames=13, overrides=["schedule.ar_step=1", "kv.commit=last-step"]))
    assert clean.shape == last.shape
    # different context K/V (noisy last step vs clean re-run), same first chunk
    assert np.array_equal(clean[:3], last[:3])


def test_nan_in_latents_names_chunk_and_step_and_keeps_earlier_frames(engine, monkeypatch):
    calls = {"n": 0}
    original = engine.backbone.__class__.__call__

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            out = out * float("nan")
        return out

    monkeypatch.setattr(engine.backbone.__class__, "__call__", poisoned)
    got = []
    with pytest.raises(NonFiniteError, match=r"chunk \d+ .*step \d"):
        for c in engine.stream(build_config(prompt=CAPTION, frames=13, overrides=["schedule.ar_step=1"])):
            got.append(c)
    assert len(got) >= 1  # chunks finished before the NaN were handed out


def _slow_decoder(monkeypatch, seconds=0.05):
    import time

    from arvideo.vae import StreamingDecoder

    original = StreamingDecoder.decode

    def slow(self, latents):
        time.sleep(seconds)
        return original(self, latents)

    monkeypatch.setattr(StreamingDecoder, "decode", slow)


def test_decode_ahead_gives_the_synchronous_frames_in_the_same_chunks(engine):
    over = ["schedule.ar_step=1", "kv.policy=window", "kv.budget_frames=4"]
    ahead = list(engine.stream(build_config(prompt=CAPTION, frames=29, overrides=over)))
    inline = list(engine.stream(build_config(prompt=CAPTION, frames=29, overrides=over + ["decode_ahead=false"])))
    assert [(c.index, c.start, len(c.frames)) for c in ahead] == [(c.index, c.start, len(c.frames)) for c in inline]
    assert np.array_equal(np.concatenate([c.frames for c in ahead]), np.concatenate([c.frames for c in inline]))


def test_decode_queue_stays_bounded_when_decoding_is_slower_than_generation(engine, monkeypatch):
    from arvideo import decode_worker
    from arvideo.engine import DECODE_QUEUE

    _slow_decoder(monkeypatch)
    depth = []
    original = decode_worker.DecodeWorker.submit

    def submit(self, index, latents):
        original(self, index, latents)
        depth.append(len(self))

    monkeypatch.setattr(decode_worker.DecodeWorker, "submit", submit)
    frames = engine.generate(build_config(prompt=CAPTION, frames=41, overrides=["schedule.ar_step=1"]))
    assert len(frames) == 41
    assert len(depth) == 11 and max(depth) == DECODE_QUEUE + 1  # it did fall behind, and no further


@pytest.mark.parametrize("ahead", ["true", "false"])
def test_chunks_decoding_when_generation_fails_are_still_handed_out(engine, monkeypatch, ahead):
    _slow_decoder(monkeypatch)
    calls = {"n": 0}
    original = engine.backbone.__class__.__call__

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 7 else out

    monkeypatch.setattr(engine.backbone.__class__, "__call__", poisoned)
    got = []
    with pytest.raises(NonFiniteError):
        for c in engine.stream(build_config(prompt=CAPTION, frames=41, overrides=["schedule.ar_step=1", f"decode_ahead={ahead}"])):
            got.append(c)
    # staggered by one step: chunk n finishes on call n + 3, so chunks 0-3 were done before the NaN of call 7
    assert [c.index for c in got] == [0, 1, 2, 3]


@pytest.mark.parametrize("override, message", [
    ("sampler.steps=0", "sampler.steps must be >= 1"),
    ("kv.budget_frames=0", "kv.budget_frames must be >= 1"),
    ("schedule.causal_block_size=0", "schedule.causal_block_size must be >= 1"),
    ("schedule.window_blocks=0", "schedule.window_blocks must be >= 1"),
    ("fps=0", "fps must be >= 1"),
    ("height=-8", "height must be >= 1"),
    ("sampler.shift=0", "sampler.shift must be > 0"),
    ("kv.context_noise=-5", r"kv.context_noise must be in \[0, 1000\]"),
    ("schedule.addnoise_condition=1001", r"schedule.addnoise_condition must be in \[0, 1000\]"),
])
def test_out_of_range_settings_are_errors_not_defaults(engine, override, message):
    # a 0 must not read as "unset" (which would silently run the model's default)
    with pytest.raises(ConfigError, match=message):
        engine.resolve(build_config(prompt=CAPTION, frames=9, overrides=[override]))


def test_settings_at_their_range_edges_resolve(engine):
    r = engine.resolve(build_config(prompt=CAPTION, frames=9, overrides=[
        "sampler.steps=1", "kv.budget_frames=1", "kv.context_noise=0", "schedule.addnoise_condition=1000", "fps=1"]))
    assert r.steps == 1 and r.cfg.kv.budget_frames == 1 and r.context_noise == 0.0 and r.fps == 1


def test_unusable_device_is_a_config_error():
    from arvideo.model import check_device

    check_device("cpu")
    with pytest.raises(ConfigError, match="unknown device"):
        check_device("foo")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="needs a CUDA build of torch"):
            check_device("cuda")


def test_bad_input_errors_say_what_to_change(engine, tmp_path):
    with pytest.raises(ConfigError, match="frames must be >= 1"):
        engine.resolve(build_config(prompt=CAPTION, frames=0))
    with pytest.raises(ConfigError, match="multiples of 8"):
        engine.resolve(build_config(prompt=CAPTION, height=36))
    with pytest.raises(ConfigError, match="unknown config key.*valid keys"):
        build_config(overrides=["schedule.arstep=2"])
    with pytest.raises(ConfigError, match="ar_step"):
        engine.make_schedule(engine.resolve(build_config(frames=41, overrides=["schedule.ar_step=1", "schedule.window_blocks=2"])))
    with pytest.raises(PromptError, match="purple"):
        engine.generate(build_config(prompt="a small purple circle on a black background", frames=3))
    bad = tmp_path / "bad.yaml"
    bad.write_text("frames: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        build_config([bad])
    with pytest.raises(ModelFolderError, match="does not exist"):
        check_model_folder(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model_index.json").write_text("{}")
    with pytest.raises(ModelFolderError, match="transformer/config.json is missing"):
        check_model_folder(tmp_path / "half")


def test_step_callback_sees_predicted_clean_latents(engine):
    events = []
    engine.generate(build_config(prompt=CAPTION, frames=9), callback=events.append)
    assert events and all(ev.chunks for ev in events)
    idx, k, x0 = events[0].chunks[0]
    assert k == 0 and x0.shape[1] == 4
