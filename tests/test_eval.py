"""`arvideo eval` scores files against their captions and generated videos against held-out captions."""
import json

import numpy as np
import pytest

from arvideo.cli import main
from arvideo.world import World, parse_caption
from tests.tiny import save_tiny_model_folder

CAPTION = "a medium green square on a navy background"


def test_eval_scores_a_world_video_file_like_the_world(tmp_path, capsys):
    video = World(parse_caption(CAPTION), seed=3).clip(0, 64)
    path = tmp_path / "world.npy"
    np.save(path, video)
    (tmp_path / "world.json").write_text(json.dumps({"caption": CAPTION}))
    out = tmp_path / "scores.json"
    assert main(["eval", str(path), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mean"]["adherence"] == 1.0  # a single-object world video scores exactly 1.0
    assert result["mean"]["spurious"] == 0.0
    assert "| world |" in capsys.readouterr().out


def test_eval_generate_runs_heldout_captions_with_a_model(tmp_path):
    folder = save_tiny_model_folder(tmp_path / "tiny")
    out = tmp_path / "gen.json"
    assert main(["eval", "--generate", "2", "--frames", "9", "--model", str(folder), "--json", str(out), "--quiet"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["seed"] for r in rows] == [10000, 10001]
    assert all(r["frames"] == 9 and 0.0 <= r["adherence"] <= 1.0 for r in rows)


def test_eval_without_caption_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "v.npy"
    np.save(path, np.zeros((4, 64, 64, 3), np.uint8))
    assert main(["eval", str(path)]) == 2
    assert "--caption" in capsys.readouterr().err


def test_eval_checks_inputs_before_generating(tmp_path, capsys, monkeypatch):
    """A bad setting or a missing file is reported before any video is generated."""
    import arvideo.engine

    def no_model(*args, **kwargs):
        raise AssertionError("the model must not be loaded when the inputs are bad")

    monkeypatch.setattr(arvideo.engine.Engine, "from_folder", no_model)
    assert main(["eval", "--generate", "2", "--frames", "9", "threads=1"]) == 2
    assert "unknown config key 'threads'" in capsys.readouterr().err
    assert main(["eval", "--generate", "2", "--frames", "9", str(tmp_path / "missing.npy")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_paired_difference_and_the_compare_script(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    from arvideo.world.metrics import METRICS, MetricsError, paired_difference

    a = [{"adherence": v} for v in (0.5, 0.9, 0.2)]
    b = [{"adherence": v} for v in (0.4, 0.9, 0.6)]
    d = paired_difference(a, b, "adherence")  # differences 0.1, 0.0, -0.4
    assert abs(d["mean"] - (-0.1)) < 1e-12 and (d["higher"], d["lower"]) == (1, 1)
    assert abs(d["se"] - float(np.std([0.1, 0.0, -0.4], ddof=1)) / 3 ** 0.5) < 1e-12
    with pytest.raises(MetricsError):
        paired_difference(a, b[:2], "adherence")

    def rows(values, seeds):
        return {"rows": [dict({m: v for m in METRICS}, seed=s) for v, s in zip(values, seeds)]}

    (tmp_path / "a.json").write_text(json.dumps(rows([0.5, 0.9, 0.2], [7, 8, 9])))
    (tmp_path / "b.json").write_text(json.dumps(rows([0.6, 0.9, 0.4], [9, 8, 7])))  # matched by seed, not order
    script = Path(__file__).resolve().parents[1] / "scripts" / "compare_evals.py"

    def compare(first, second):
        return subprocess.run([sys.executable, script, first, second], capture_output=True, text=True)

    out = compare(tmp_path / "a.json", tmp_path / "b.json")
    # matched by seed: differences +0.1 (seed 7), 0 (8), -0.4 (9), as in the lists above
    expected = "| adherence | 0.533 | 0.633 | -0.100 +- 0.153 | 1 / 1 |"
    assert out.returncode == 0 and expected in out.stdout
    (tmp_path / "c.json").write_text(json.dumps(rows([0.1, 0.2], [7, 8])))
    bad = compare(tmp_path / "a.json", tmp_path / "c.json")
    assert bad.returncode != 0 and "same --generate N" in bad.stderr
    # a run made in parts (two processes over consecutive seeds) is joined with a comma
    (tmp_path / "a1.json").write_text(json.dumps(rows([0.5, 0.9], [7, 8])))
    (tmp_path / "a2.json").write_text(json.dumps(rows([0.2], [9])))
    joined = compare(f"{tmp_path / 'a1.json'},{tmp_path / 'a2.json'}", tmp_path / "b.json")
    assert joined.returncode == 0 and expected in joined.stdout
    dup = compare(f"{tmp_path / 'a.json'},{tmp_path / 'a2.json'}", tmp_path / "b.json")
    assert dup.returncode != 0 and "appears twice" in dup.stderr
    # a row of scripts/bench_peers.py's json (its per-caption runs), joined like any other part
    peers = {"cpu": {"runs": [dict({m: v for m in METRICS}, seed=s, row=row)
                              for row, v, s in (("x", 0.5, 7), ("x", 0.9, 8), ("y", 0.0, 7))]}}
    (tmp_path / "peers.json").write_text(json.dumps(peers))
    rowwise = compare(f"{tmp_path / 'peers.json'}:x,{tmp_path / 'a2.json'}", tmp_path / "b.json")
    assert rowwise.returncode == 0 and expected in rowwise.stdout
    missing = compare(f"{tmp_path / 'peers.json'}:z", tmp_path / "b.json")
    assert missing.returncode != 0 and "no bench_peers runs of row 'z'" in missing.stderr
    # --by-objects: each run's mean adherence and seconds by the caption's number of objects
    one, two = "a small red circle on a gray background", "a small red circle and a large blue square on a gray background"
    for name, adh in (("o1", (0.2, 0.4, 0.9)), ("o2", (0.6, 0.8, 0.1))):
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": [
            dict({m: v for m in METRICS}, seed=s, caption=c, seconds=sec)
            for v, s, c, sec in zip(adh, (7, 8, 9), (one, one, two), (1.0, 3.0, 5.0))]}))
    grouped = subprocess.run([sys.executable, script, tmp_path / "o1.json", tmp_path / "o2.json", "--by-objects"],
                             capture_output=True, text=True, check=True).stdout
    assert "| 1 | 2 | 0.300 | 0.700 | 2.0 | 2.0 |" in grouped and "| 2 | 1 | 0.900 | 0.100 | 5.0 | 5.0 |" in grouped
