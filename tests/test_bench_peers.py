"""scripts/bench_peers.py on a tiny random model: every row runs, the json and the doc get filled."""
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from tests.tiny import save_tiny_model_folder

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"train_clip_latent_frames": 4, "vae_temporal_factor": 2, "context_noise": 20.0}


def _script():
    spec = importlib.util.spec_from_file_location("bench_peers", ROOT / "scripts" / "bench_peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_peers", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny", defaults=DEFAULTS)


def _check_rows(data, rows):
    cpu = data["cpu"]
    for key in ("frames", "speedup_vs_diffusers", "ttff_ratio_vs_diffusers", "peak_mem_ratio_vs_diffusers", "rows",
                "hooks", "meta"):
        assert key in cpu, key
    assert "gpu" in data
    by = {r["row"]: r for r in cpu["rows"]}
    assert set(by) == set(rows)
    for name in rows:
        r = by[name]
        assert r["status"] == "ok", (name, r["status"])
        for key in ("whole_s", "gen_s", "gen_cpu_s", "ttff_s", "peak_rss_mib"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r[key])
        assert r["model_calls"] > 0 and r["attn_tokens"] > 0
        assert r["frames"] == cpu["frames"]
        assert 0 <= r["adherence"] <= 1
    assert by["diffusers"]["psnr"] == "inf" and by["arvideo-full"]["psnr"] == "inf"  # the references
    # diffusers calls the transformer per step-matrix row, cond and uncond apart; arvideo packs both in one call
    assert by["diffusers"]["model_calls"] > by["arvideo-full"]["model_calls"]
    assert by["arvideo-fast"]["model_calls"] < by["arvideo-full"]["model_calls"]
    if "arvideo-quality" in by:  # the quality preset computes more steps than fast, fewer than full
        assert by["arvideo-fast"]["model_calls"] < by["arvideo-quality"]["model_calls"] < by["arvideo-full"]["model_calls"]
        assert by["arvideo-quality"]["psnr"] != "inf"  # measured against the uncached row, not itself
    # a cached row is measured against the uncached row on its own sampler
    for name in ("arvideo-fast", "arvideo-quality"):
        if name in by:
            assert by[name]["reference"] == {"euler": "arvideo-full-euler", "unipc": "arvideo-full"}[by[name]["sampler"]]
    assert by["diffusers+taylorseer"]["attn_tokens"] < by["diffusers"]["attn_tokens"]
    assert by["diffusers+pab"]["attn_tokens"] < by["diffusers"]["attn_tokens"]
    for key in ("speedup_vs_diffusers", "cpu_time_ratio_vs_diffusers", "ttff_ratio_vs_diffusers",
                "peak_mem_ratio_vs_diffusers"):
        assert math.isfinite(cpu[key]) and cpu[key] > 0
    return cpu


def test_bench_peers_all_rows_fill_json_and_doc(model, tmp_path):
    bench = _script()
    out, doc = tmp_path / "peers.json", tmp_path / "benchmarks.md"
    out.write_text(json.dumps({"gpu": {"kept": True}}))
    doc.write_text("# Benchmarks\n\n<!-- peers:start -->\nold\n<!-- peers:end -->\n\ntail\n")
    rows = ["diffusers", "diffusers+taylorseer", "diffusers+pab", "diffusers+fbc", "arvideo-full", "arvideo-full-euler",
            "arvideo-fast", "arvideo-quality"]
    assert bench.main(["--in-process", "--model", str(model), "--frames", "16", "--captions", "1", "--steps", "12",
                       "--rows", ",".join(rows), "--out-json", str(out), "--doc", str(doc)]) == 0
    data = json.loads(out.read_text())
    assert data["gpu"] == {"kept": True}
    by = {r["row"]: r for r in data["cpu"]["rows"]}
    fbc = by.pop("diffusers+fbc")  # diffusers 0.42.1 refuses it here; a later one may not
    hooks = data["cpu"]["hooks"]
    assert fbc["status"] == "ok" or fbc["status"].startswith("refused")
    assert fbc["status"] == "ok" or not hooks["fbc"]["applied"]
    data["cpu"]["rows"] = list(by.values())
    cpu = _check_rows(data, [r for r in rows if r != "diffusers+fbc"])
    assert cpu["frames"] == 15  # 16 rounded down to whole diffusers windows (8 latent frames)
    assert hooks["taylorseer"]["hooked_modules"] > 0 and hooks["pab"]["hooked_modules"] > 0
    for name in ("fbc", "magcache"):
        assert hooks[name]["applied"] or hooks[name]["error"]
    text = doc.read_text()
    assert "old" not in text and text.endswith("tail\n")
    block = text.split("<!-- peers:start -->")[1].split("<!-- peers:end -->")[0]
    assert "| arvideo-fast |" in block and "| arvideo-quality |" in block and "| diffusers+pab |" in block and cpu["meta"]["command"] in block

    # memory sweep: merged into the same json, the main results stay
    assert bench.main(["--in-process", "--model", str(model), "--memory-sweep", "8,16", "--steps", "2",
                       "--out-json", str(out), "--doc", str(doc)]) == 0
    data = json.loads(out.read_text())
    sweep = data["cpu"]["memory_sweep"]
    assert {c["frames"] for c in sweep["cells"]} == {7, 15}
    assert all(c["peak_rss_mib"] > 0 for c in sweep["cells"])
    assert data["cpu"]["rows"] and data["gpu"] == {"kept": True}
    assert "<!-- peers-memory:start -->" in doc.read_text()


def test_bench_peers_rows_take_their_presets_sampler_or_unipc(model, tmp_path):
    bench = _script()
    assert bench.arvideo_sampler("arvideo-fast") == "euler"  # the fast preset's own sampler
    assert bench.reference_of("arvideo-fast") == "arvideo-full-euler"
    assert bench.arvideo_sampler("arvideo-fast", "unipc") == "unipc"
    assert bench.reference_of("arvideo-fast", "unipc") == "arvideo-full"
    assert bench.reference_of("arvideo-full-euler") == "arvideo-full-euler"
    assert bench.reference_of("diffusers+pab") == "diffusers"
    out, doc = tmp_path / "peers.json", tmp_path / "benchmarks.md"
    doc.write_text("<!-- peers:start -->\n<!-- peers:end -->\n")
    assert bench.main(["--in-process", "--model", str(model), "--frames", "16", "--captions", "1", "--steps", "12",
                       "--rows", "diffusers,arvideo-fast", "--arvideo-sampler", "unipc",
                       "--out-json", str(out), "--doc", str(doc)]) == 0
    cpu = json.loads(out.read_text())["cpu"]
    by = {r["row"]: r for r in cpu["rows"]}
    assert set(by) == {"diffusers", "arvideo-fast", "arvideo-full"}  # the reference row was added
    assert by["arvideo-fast"]["sampler"] == "unipc" and by["arvideo-fast"]["reference"] == "arvideo-full"
    assert math.isfinite(by["arvideo-fast"]["psnr"]) and cpu["arvideo_sampler"] == "unipc"
    assert "UniPC for `arvideo-fast` (PSNR against `arvideo-full`)" in doc.read_text()


def test_bench_peers_aligned_frames():
    bench = _script()
    s = {"vae_temporal_factor": 2, "base_latent": 8, "overlap_latent": 4, "causal_block_size": 2}
    assert [bench.aligned_frames(f, s) for f in (48, 160, 320, 640, 10)] == [47, 159, 319, 639, 7]


def test_gpu_end_to_end_script_runs_every_row_on_a_tiny_model_on_the_cpu(tmp_path):
    """scripts/bench_gpu_e2e.py (issue 6's GPU end-to-end rows) in its --tiny smoke mode: every row makes the
    video, the fixed MeanCache schedule makes fewer calls than full compute, and rows measured by separate
    commands land in one json and one table."""
    spec = importlib.util.spec_from_file_location("bench_gpu_e2e", ROOT / "scripts" / "bench_gpu_e2e.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out, doc = tmp_path / "e2e.json", tmp_path / "gpu.md"
    common = ["--tiny", "--device", "cpu", "--dtype", "float32", "--json", str(out), "--doc", str(doc)]
    assert bench.main(["--row", "diffusers", *common]) == 0
    assert bench.main(["--row", "arvideo-full", *common]) == 0
    assert bench.main(["--row", "arvideo-meancache", *common]) == 0
    rows = json.loads(out.read_text())
    assert set(rows) == set(bench.ROWS)
    frames = bench.TINY_SETTINGS["frames"]
    assert all(r["frames"] == frames and r["seconds"] > 0 and r["ttff_s"] <= r["seconds"] for r in rows.values())
    full, mc = rows["arvideo-full"], rows["arvideo-meancache"]
    steps, budget = bench.TINY_SETTINGS["steps"], bench.TINY_SETTINGS["meancache_budget"]
    assert mc["model_calls"] * steps == full["model_calls"] * budget  # the fixed schedule's computed fraction
    assert rows["diffusers"]["model_calls"] > full["model_calls"]  # cond and uncond calls, re-denoised overlap
    text = doc.read_text()
    assert text.count("(TINY) | cpu |") == 3 and "<!-- bench:gpu-e2e -->" in text


def test_bench_peers_arvideo_set_reaches_every_arvideo_row_only(model, tmp_path):
    # --arvideo-set overrides the arvideo rows' config (how a table measured under an older default is
    # reproduced); the diffusers rows do not see it
    bench = _script()
    calls = {}
    for extra in ([], ["--arvideo-set", "sampler.steps=4"]):
        out, doc = tmp_path / f"peers{len(extra)}.json", tmp_path / f"b{len(extra)}.md"
        doc.write_text("<!-- peers:start -->\n<!-- peers:end -->\n")
        assert bench.main(["--in-process", "--model", str(model), "--frames", "16", "--captions", "1", "--steps", "12",
                           "--rows", "diffusers,arvideo-full", *extra, "--out-json", str(out), "--doc", str(doc)]) == 0
        rows = {r["row"]: r for r in json.loads(out.read_text())["cpu"]["rows"]}
        calls[len(extra)] = (rows["diffusers"]["model_calls"], rows["arvideo-full"]["model_calls"])
    assert calls[2][0] == calls[0][0]  # diffusers: unchanged
    assert calls[2][1] * 3 == calls[0][1]  # arvideo: 4 steps instead of 12
