"""scripts/probe_composed_guidance.py: its passes, and that with no object weight it is plain guidance."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from arvideo.config import build_config
from arvideo.engine import Engine
from tests.tiny import save_tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
CAPTION = "a small red circle and a large blue square on a gray background"


def _script():
    spec = importlib.util.spec_from_file_location("probe_composed_guidance",
                                                  ROOT / "scripts" / "probe_composed_guidance.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("probe_composed_guidance", module)
    spec.loader.exec_module(module)
    return module


def test_passes_cut_the_caption_into_one_object_captions():
    probe = _script()
    assert probe.passes(CAPTION, "and", 4.0, 2.0) == (
        ["a small red circle on a gray background", "a large blue square on a gray background"], [2.0, 2.0])
    assert probe.passes(CAPTION, "full", 4.0, 1.0)[1] == [4.0, 1.0, 1.0]
    assert probe.passes("a small red circle on a gray background", "and", 4.0, 2.0) == (
        ["a small red circle on a gray background"], [4.0])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny")


def _video(model, monkeypatch, install=None):
    monkeypatch.setattr(Engine, "encode_text", Engine.encode_text)  # undone after the test
    monkeypatch.setattr(Engine, "_guide", Engine.__dict__["_guide"])  # the staticmethod itself
    if install is not None:
        install()
    engine = Engine.from_folder(model)
    return engine.generate(build_config(prompt=CAPTION, frames=9, seed=3)), engine.model_calls


def test_zero_object_weight_is_plain_guidance_and_a_weight_changes_the_video(model, monkeypatch):
    probe = _script()
    plain, calls = _video(model, monkeypatch)
    zero, zero_calls = _video(model, monkeypatch, lambda: probe.install("full", 0.0))
    composed, _ = _video(model, monkeypatch, lambda: probe.install("and", 4.0))
    assert calls == zero_calls
    # three conditional passes and one unconditional pass instead of two, the object passes weighted 0
    assert np.array_equal(zero, plain)
    assert np.abs(composed.astype(int) - plain.astype(int)).max() > 5
