"""Cache-policy benchmark: speed against fidelity on held-out captions, every policy in one engine.

For each held-out caption (world seeds >= 10000) it runs full compute (`none`, the reference),
then each policy over a sweep of thresholds / budgets, and plain fewer sampling steps. Per run:
whole-process wall time (text encoding, denoising, decoding), backbone calls and computed
tokens relative to `none` in the same run; fidelity to `none`: teacher-forced PSNR (each chunk
denoised from the reference's context: the main figure), PSNR of the first chunk of a plain
run, free-running PSNR, SSIM; and the world metrics of the plain run. Writes a results section
into docs/caching.md, a speed-quality plot to assets/caching_speed_quality.png and raw rows to
runs/bench_caching.json.

    python scripts/bench_caching.py                       # embedded model, 320 frames, 4 captions
    python scripts/bench_caching.py --quick --model DIR   # smoke run on any model folder
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from arvideo.caching.fidelity import psnr, ssim
from arvideo.config import build_config
from arvideo.engine import Engine
from arvideo.evaluate import heldout_captions
from arvideo.reporting import device_line, write_marked_section
from arvideo.world.metrics import score_video

ROOT = Path(__file__).resolve().parents[1]
WORLD = ("adherence", "persistence", "smoothness", "spurious", "background", "flicker")
START, END = "<!-- bench:start -->", "<!-- bench:end -->"

# family -> list of (label, preset, steps override); steps None = the model's steps
SLOPE = "indicator=slope,estimator=fitted,warmup=1,last=false"
SWEEPS = {
    "quick": {
        "fewer-steps": [("1/2 steps", "none", 0.5), ("1/4 steps", "none", 0.25)],
        "fora": [("interval 2", "fora:interval=2", None), ("interval 4", "fora:interval=4", None)],
        "teacache": [("tau 0.3", "teacache:tau=0.3", None), ("tau 1.0", "teacache:tau=1.0", None)],
        "flowcache": [("tau 0.2", "flowcache:tau=0.2,warmup=2", None), ("tau 0.6", "flowcache:tau=0.6,warmup=2", None)],
        "flowcache-residual": [("tau 0.2", "flowcache:tau=0.2,warmup=2,reuse=residual", None)],
        "meancache": [("B 1/2", "meancache:budget={half}", None), ("B 1/4", "meancache:budget={quarter}", None)],
        "combination": [("tau 0.2", "combination:tau=0.2,warmup=2", None),
                        ("tau 0.6", "combination:tau=0.6,warmup=2", None)],
        "combination-slope": [("B 1/4 + tau 0.15", f"combination:tau=0.15,budget={{quarter}},{SLOPE}", None)],
        "deepcache": [("1:2", "deepcache:interval=2", None), ("1:4", "deepcache:interval=4", None)],
        "presets": [("fast", "fast", None), ("quality", "quality", None)],
    },
    "default": {
        "fewer-steps": [("1/2 steps", "none", 0.5), ("1/3 steps", "none", 1 / 3), ("1/4 steps", "none", 0.25),
                        ("1/5 steps", "none", 0.2)],
        "fora": [("interval 2", "fora:interval=2", None), ("interval 3", "fora:interval=3", None),
                 ("interval 5", "fora:interval=5", None)],
        "teacache": [("tau 0.2", "teacache:tau=0.2", None), ("tau 0.5", "teacache:tau=0.5", None),
                     ("tau 1.0", "teacache:tau=1.0", None)],
        "flowcache": [("tau 0.1", "flowcache:tau=0.1,warmup=2", None), ("tau 0.3", "flowcache:tau=0.3,warmup=2", None),
                      ("tau 0.8", "flowcache:tau=0.8,warmup=2", None),
                      ("tau 0.3 warm-up 5", "flowcache:tau=0.3,warmup=5", None)],
        "flowcache-residual": [("tau 0.1", "flowcache:tau=0.1,warmup=2,reuse=residual", None),
                               ("tau 0.3", "flowcache:tau=0.3,warmup=2,reuse=residual", None),
                               ("tau 0.8", "flowcache:tau=0.8,warmup=2,reuse=residual", None)],
        "meancache": [("B 1/2", "meancache:budget={half}", None), ("B 1/3", "meancache:budget={third}", None),
                      ("B 1/4", "meancache:budget={quarter}", None), ("B 1/5", "meancache:budget={fifth}", None)],
        "meancache-fitted": [("B 1/2", "meancache:budget={half},estimator=fitted", None),
                             ("B 1/3", "meancache:budget={third},estimator=fitted", None),
                             ("B 1/4", "meancache:budget={quarter},estimator=fitted", None),
                             ("B 1/5", "meancache:budget={fifth},estimator=fitted", None)],
        "combination": [("tau 0.1", "combination:tau=0.1,warmup=2", None),
                        ("tau 0.3", "combination:tau=0.3,warmup=2", None),
                        ("tau 0.8", "combination:tau=0.8,warmup=2", None),
                        ("B 1/5 + tau 0.5", "combination:tau=0.5,warmup=1,budget={fifth}", None)],
        # the combination as it works best on v5 (session 14): FlowCache's per-chunk decisions by the
        # slope indicator, the fitted estimator for skipped steps, optionally on a calibrated floor
        "combination-slope": [("tau 0.01", f"combination:tau=0.01,{SLOPE}", None),
                              ("tau 0.02", f"combination:tau=0.02,{SLOPE}", None),
                              ("tau 0.04", f"combination:tau=0.04,{SLOPE}", None),
                              ("B 1/3 + tau 0.15", f"combination:tau=0.15,budget={{third}},{SLOPE}", None),
                              ("B 1/4 + tau 0.15", f"combination:tau=0.15,budget={{quarter}},{SLOPE}", None),
                              ("B 1/5 + tau 0.08", f"combination:tau=0.08,budget={{fifth}},{SLOPE}", None),
                              ("B 1/5 + tau 0.3", f"combination:tau=0.3,budget={{fifth}},{SLOPE}", None)],
        "deepcache": [("1:2", "deepcache:interval=2", None), ("1:4", "deepcache:interval=4", None),
                      ("1:4 non-uniform", "deepcache:interval=4,schedule=nonuniform", None)],
        "presets": [("fast", "fast", None), ("quality", "quality", None)],
    },
}


class Counter:
    """Wraps the engine's backbone: counts calls and computed latent frames (tokens = frames x per-frame).

    A DeepCache-shallow member counts only the fraction of blocks it ran; frames count once per
    pass of the call's batch (2 with CFG, 1 in a conditional-only call under guidance reuse).
    """

    def __init__(self, backbone) -> None:
        self.inner, self.calls, self.frames = backbone, 0, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, t, text, plan, store, **kwargs):
        self.calls += 1
        frames = float(x.shape[2])
        shallow = [j for j, d in (kwargs.get("deep") or {}).items() if d.residual is not None]
        if shallow:
            n = len(self.inner.model.blocks)
            deep = kwargs["deep"]
            skipped = max(0, n - min(d.last for d in deep.values()) - min(d.first for d in deep.values()))
            frames -= skipped / n * sum(plan.sizes[j] for j in shallow)
        self.frames += frames * x.shape[0]
        return self.inner(x, t, text, plan, store, **kwargs)


class DecodeTimer:
    """Wraps the streaming decoder: seconds spent decoding (a cost no cache policy touches)."""

    def __init__(self, decoder) -> None:
        self.inner, self.seconds = decoder, 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def decode(self, latents):
        t0 = time.perf_counter()
        out = self.inner.decode(latents)
        self.seconds += time.perf_counter() - t0
        return out


def run_video(engine: Engine, counter: Counter, cfg, teacher=None) -> dict:
    """One whole-process generation: frames, per-chunk latents, first chunk's frames, cost."""
    counter.calls = counter.frames = 0
    engine.decoder.seconds = 0.0
    frames, latents, first = [], {}, None
    t0 = time.perf_counter()
    for chunk in engine.stream(cfg, teacher=teacher):
        frames.append(chunk.frames)
        latents[chunk.index] = chunk.latents.cpu()
        if first is None:
            first = chunk.frames
    seconds = time.perf_counter() - t0
    return {"frames": np.concatenate(frames), "latents": latents, "first": first, "seconds": seconds,
            "decode": engine.decoder.seconds, "calls": counter.calls, "tokens": counter.frames}


def sweep_configs(name: str, steps: int) -> list[tuple[str, str, str, int]]:
    """(family, label, preset, steps) for every run of the sweep."""
    fill = {"half": max(1, round(steps / 2)), "third": max(1, round(steps / 3)), "quarter": max(1, round(steps / 4)),
            "fifth": max(1, round(steps / 5))}
    out = []
    for family, items in SWEEPS[name].items():
        for label, preset, fraction in items:
            s = steps if fraction is None else max(1, round(steps * fraction))
            out.append((family, label if fraction is None else f"{s} steps", preset.format(**fill), s))
    return out


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of y at x on (x, y) points; None outside their range."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    if pts and abs(pts[0][0] - x) < 1e-9:
        return pts[0][1]
    return None


def summarise(rows: list[dict]) -> list[dict]:
    """Means over captions per configuration; speed relative to `none` of the same captions."""
    ref = [r for r in rows if r["family"] == "none"]
    ref_s = sum(r["seconds"] for r in ref)
    ref_model = sum(r["seconds"] - r["decode"] for r in ref)
    ref_calls = sum(r["calls"] for r in ref)
    ref_tokens = sum(r["tokens"] for r in ref)
    out = []
    keys = []
    for r in rows:
        if (r["family"], r["label"]) not in keys:
            keys.append((r["family"], r["label"]))
    for family, label in keys:
        group = [r for r in rows if r["family"] == family and r["label"] == label]
        s = {"family": family, "label": label, "preset": group[0]["preset"], "steps": group[0]["steps"],
             "captions": len(group), "seconds": float(np.mean([r["seconds"] for r in group])),
             "speedup": ref_s / max(1e-9, sum(r["seconds"] for r in group)) * len(group) / len(ref),
             "decode": float(np.mean([r["decode"] for r in group])),
             "speedup_model": ref_model / max(1e-9, sum(r["seconds"] - r["decode"] for r in group))
             * len(group) / len(ref),
             "calls": sum(r["calls"] for r in group) / max(1, ref_calls) * len(ref) / len(group),
             "tokens": sum(r["tokens"] for r in group) / max(1, ref_tokens) * len(ref) / len(group)}
        for key in ("psnr_tf", "ssim_tf", "psnr_first", "psnr_free", "ssim_free", *WORLD):
            vals = [r[key] for r in group if r.get(key) is not None]
            s[key] = float(np.mean(vals)) if vals else None
        out.append(s)
    return out


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(summary: list[dict], meta: dict) -> str:
    ref = next(s for s in summary if s["family"] == "none")
    lines = [
        f"Measured {meta['date']} on {meta['device']}; model `{meta['model']}` ({meta['model_note']}); "
        f"{meta['captions']} captions, {meta.get('seed_set') or 'world seeds ' + meta['seeds']}, {meta['frames']} frames, "
        f"{meta['steps']} {meta['sampler']} steps, schedule {meta['schedule']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        "calls / tokens: backbone calls and computed latent frames relative to `none` (tokens are what a "
        "skipped chunk saves). speedup: whole-process wall time of `none` / this run's (text, denoising, "
        "decoding). PSNR/SSIM against the `none` video: TF = teacher-forced (main figure), first = first "
        "chunk of a plain run, free = whole free-running video. World metrics of the plain run.",
        "",
        "| method | setting | calls | tokens | speedup | w/o decode | TF PSNR | first PSNR | free PSNR | TF SSIM "
        "| free SSIM | adherence | persistence | smoothness | spurious |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        lines.append(
            f"| {s['family']} | {s['label']} | {s['calls']:.2f} | {s['tokens']:.2f} | {s['speedup']:.2f}x "
            f"| {s['speedup_model']:.2f}x "
            f"| {_f(s['psnr_tf'], '{:.1f}')} | {_f(s['psnr_first'], '{:.1f}')} | {_f(s['psnr_free'], '{:.1f}')} "
            f"| {_f(s['ssim_tf'], '{:.3f}')} | {_f(s['ssim_free'], '{:.3f}')} | {_f(s['adherence'], '{:.3f}')} "
            f"| {_f(s['persistence'], '{:.3f}')} | {_f(s['smoothness'], '{:.3f}')} | {_f(s['spurious'], '{:.3f}')} |")
    lines += ["", f"`none` took {ref['seconds']:.1f} s per video, {ref['decode']:.1f} s of it decoding (the same "
              "for every policy: it bounds the whole-process speedup at "
              f"{ref['seconds'] / max(ref['decode'], 1e-9):.1f}x). \"w/o decode\": speedup of the time outside "
              "the decoder (text encoding, denoising, sampler, policies).", ""]
    lines += goals(summary)
    return "\n".join(lines)


# the combination (as methods.md writes it, and with the slope indicator); what the presets run
CONTENDERS = ("combination", "combination-slope", "meancache-fitted")


def seed_meta(seeds: list[int]) -> dict:
    """meta's "seeds" ("10000..10003") and "seed_set" (held-out evaluation seeds, or development captions)."""
    from arvideo.evaluate import describe_seeds

    if not seeds:
        return {"seeds": "none", "seed_set": "no captions"}
    return {"seeds": f"{seeds[0]}..{seeds[-1]}", "seed_set": describe_seeds(seeds[0], seeds[-1] - seeds[0] + 1)}


def goals(summary: list[dict]) -> list[str]:
    """The issue's goals, checked on these numbers."""
    ref = next(s for s in summary if s["family"] == "none")
    out = ["Goals (issue #4), checked on the rows above:", ""]
    fast = next((s for s in summary if s["label"] == "fast"), None)
    if fast is not None:
        world_ok = all(abs((fast[k] or 0) - (ref[k] or 0)) <= 0.02 for k in ("adherence", "persistence", "smoothness"))
        checks = [
            (f"`fast` whole-process speedup >= 5x: {fast['speedup']:.2f}x", fast["speedup"] >= 5),
            ("`fast` adherence/persistence/smoothness within 0.02 of `none`: "
             + ", ".join(f"{(fast[k] or 0) - (ref[k] or 0):+.3f}" for k in ("adherence", "persistence", "smoothness")),
             world_ok),
            (f"`fast` teacher-forced PSNR >= 35 dB: {_f(fast['psnr_tf'], '{:.1f}')}", (fast["psnr_tf"] or 0) >= 35),
            (f"`fast` first-chunk PSNR >= 35 dB: {_f(fast['psnr_first'], '{:.1f}')}", (fast["psnr_first"] or 0) >= 35),
        ]
        out += [f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in checks]
    curves = {}
    for s in summary:
        if s["family"] not in ("none", "presets") and s["psnr_tf"] is not None:
            curves.setdefault(s["family"], []).append((s["tokens"], s["psnr_tf"]))
    for contender in CONTENDERS:
        for x, y in sorted(curves.get(contender, [])):
            rivals = []
            for fam, pts in curves.items():
                if fam in CONTENDERS:
                    continue
                other = interpolate(pts, x)
                if other is not None:
                    rivals.append(f"{fam} {other:.1f} ({'beaten' if y > other else 'NOT beaten'})")
            out.append(f"- {contender} at {x:.2f} of the tokens: TF PSNR {y:.1f} dB; others interpolated at the "
                       f"same tokens: {', '.join(rivals) or 'none in range'}")
    pairs = [(1 / max(s["tokens"], 1e-9), s["speedup"], s["speedup_model"]) for s in summary if s["family"] != "none"]
    if pairs:
        whole = np.mean([sp / ts for ts, sp, _ in pairs])
        model = np.mean([sm / ts for ts, _, sm in pairs])
        out.append(f"- speedup / token saving (1 / tokens), mean over runs: whole process {whole:.2f}, without "
                   f"decoding {model:.2f} (1.0 = wall time tracks computed tokens exactly)")
    return out + [""]


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    families = [f for f in dict.fromkeys(s["family"] for s in summary) if f != "none"]
    for fam in families:
        pts = sorted((s["tokens"], s["psnr_tf"] or 0, s["label"]) for s in summary if s["family"] == fam)
        style = "*" if fam == "presets" else "o-"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], style, label=fam, markersize=9 if fam == "presets" else 5)
        if fam == "presets":
            for x, y, label in pts:
                ax1.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5))
        sp = sorted((1 / max(s["tokens"], 1e-9), s["speedup"], s["speedup_model"])
                    for s in summary if s["family"] == fam)
        line = ax2.plot([p[0] for p in sp], [p[1] for p in sp], "o" if fam != "presets" else "*", label=fam)[0]
        ax2.plot([p[0] for p in sp], [p[2] for p in sp], "x", color=line.get_color())
    ax1.set_xlabel("computed tokens relative to none")
    ax1.set_ylabel("teacher-forced PSNR vs none (dB)")
    ax1.axhline(35, color="grey", lw=0.8, ls="--")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    top = max([1 / max(s["tokens"], 1e-9) for s in summary] + [1.0])
    ax2.plot([1, top], [1, top], color="grey", lw=0.8, ls="--", label="wall = tokens")
    ax2.set_xlabel("token saving (none tokens / run tokens)")
    ax2.set_ylabel("wall-clock speedup (o whole process, x without decoding)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_doc(path: Path, text: str) -> None:
    write_marked_section(path, START, END, text, header="# Cache policies\n\n## Results\n\n")


def paired(rows: list[dict], first: tuple[str, str], second: tuple[str, str]) -> list[str]:
    """Per-caption comparison of two rows of the table, (family, label) each: first minus second."""
    from arvideo.world.metrics import paired_difference

    a = {r["seed"]: r for r in rows if (r["family"], r["label"]) == first}
    b = {r["seed"]: r for r in rows if (r["family"], r["label"]) == second}
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return [f"- {first[1]} - {second[1]}: fewer than 2 captions in common, no paired comparison"]
    out = []
    for metric, name in (("psnr_tf", "teacher-forced PSNR"), ("psnr_first", "first-chunk PSNR")):
        both = [s for s in seeds if a[s].get(metric) is not None and b[s].get(metric) is not None]
        if len(both) < 2:
            continue
        d = paired_difference([a[s] for s in both], [b[s] for s in both], metric)
        out.append(f"- {first[0]} {first[1]} - {second[0]} {second[1]}, {name}: {d['mean']:+.2f} +- {d['se']:.2f} dB "
                   f"(higher on {d['higher']}, lower on {d['lower']} of {len(both)} captions)")
    return out


def report(rows: list[dict], meta: dict, args) -> None:
    summary = summarise(rows)
    text = markdown(summary, meta)
    pairs = [line for fa, la, fb, lb in getattr(args, "pair", None) or [] for line in paired(rows, (fa, la), (fb, lb))]
    if pairs:
        text = text.rstrip("\n") + "\n\nPaired by caption (first minus second: mean +- standard error over captions):\n\n" + "\n".join(pairs)
    print(text)
    write_doc(Path(args.doc), text)
    plot(summary, Path(args.plot))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows, "summary": summary}, indent=1))


def merge(args, argv) -> int:
    """Summarises rows of several runs (same captions); their `none` rows are pooled."""
    rows, metas = [], []
    for path in args.merge:
        data = json.loads(Path(path).read_text())
        if isinstance(data, list):  # rows written while the run was still going
            data = {"rows": data, "meta": None}
        # tokens in units of the same file's `none` run of the caption: files written before tokens
        # counted CFG passes (x2) merge with later ones (`none` tokens are equal across captions)
        ref = {r["seed"]: r["tokens"] for r in data["rows"] if r["family"] == "none"}
        rows += [dict(r, tokens=r["tokens"] / ref[r["seed"]]) if r["seed"] in ref else r for r in data["rows"]]
        metas.append(data["meta"])
    # an interrupted run: keep only the captions every configuration finished
    configs = {(r["family"], r["label"]) for r in rows}
    complete = [seed for seed in dict.fromkeys(r["seed"] for r in rows)
                if {(r["family"], r["label"]) for r in rows if r["seed"] == seed} == configs]
    rows = [r for r in rows if r["seed"] in complete]
    meta = dict(next((m for m in metas if m), None) or {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "device": device_line(),
        "model": args.model or "models/shapes-df", "model_note": "see the model's arvideo.json", "frames": args.frames,
        "steps": "?", "sampler": "(see command)", "schedule": "model default", "command": ""})
    meta["captions"] = len(complete)
    meta.update(seed_meta(complete))
    meta["command"] = " ; ".join(m["command"] for m in metas if m) + " ; python scripts/bench_caching.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    report(rows, meta, args)
    return 0


def select_configs(configs: list[tuple], only: str | None = None, labels: list[str] | None = None) -> list[tuple]:
    """The sweep's (family, label, preset, steps) settings in the families `only` (comma-separated) and,
    within them, with the given labels; a label that names no selected setting is an error."""
    if only:
        keep = set(only.split(","))
        configs = [c for c in configs if c[0] in keep]
    if labels:
        unknown = set(labels) - {c[1] for c in configs}
        if unknown:
            raise ValueError(f"--label {', '.join(sorted(unknown))}: no such setting in the selected families "
                             f"(labels: {', '.join(c[1] for c in configs)})")
        configs = [c for c in configs if c[1] in labels]
    return configs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the embedded shapes model)")
    p.add_argument("--frames", type=int, default=320)
    p.add_argument("--captions", type=int, default=4, help="held-out captions (world seeds from --seed-offset)")
    p.add_argument("--seed-offset", type=int, default=10_000)
    p.add_argument("--sweep", choices=sorted(SWEEPS), default="default")
    p.add_argument("--quick", action="store_true", help="smoke run: 24 frames, 1 caption, the quick sweep")
    p.add_argument("--only", default=None, help="comma-separated families to run (besides none)")
    p.add_argument("--label", action="append", default=None, metavar="LABEL",
                   help="run only the settings with this label within the selected families, e.g. --only "
                        "combination-slope --label 'tau 0.01' (repeatable)")
    p.add_argument("--extra", action="append", default=None, metavar="PRESET",
                   help="another preset to run, e.g. combination:tau=0.5,warmup=2 or none@5 (5 steps) (repeatable)")
    p.add_argument("--no-teacher", action="store_true", help="skip the teacher-forced runs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--doc", default=str(ROOT / "docs" / "caching.md"))
    p.add_argument("--plot", default=str(ROOT / "assets" / "caching_speed_quality.png"))
    p.add_argument("--json", default=str(ROOT / "runs" / "bench_caching.json"))
    p.add_argument("--config", action="append", default=None, help="YAML config (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. sampler.name=euler")
    p.add_argument("--pair", nargs=4, action="append", metavar=("FAMILY", "LABEL", "FAMILY2", "LABEL2"),
                   help="also compare two rows caption by caption (first minus second), e.g. "
                        "--pair combination-slope 'B 1/4 + tau 0.15' presets fast (repeatable)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="no runs: summarise the rows of these --json files (e.g. two processes, each with --only)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge:
        return merge(args, argv)
    if args.quick:
        args.frames, args.captions, args.sweep = min(args.frames, 24), 1, "quick"

    engine = Engine.from_folder(args.model)
    counter = Counter(engine.backbone)
    engine.backbone = counter
    engine.decoder = DecodeTimer(engine.decoder)
    base = build_config(args.config, list(args.overrides), frames=args.frames)
    r = engine.resolve(base)
    # One sampler for every row, the reference's: a preset's own `sampler:` key would otherwise make
    # it differ from `none`, and PSNR against another sampler's video measures the sampler, not the
    # cache. The presets name Euler, so `sampler.name=euler` measures them as they run.
    base = replace(base, sampler=replace(base.sampler, name=r.cfg.sampler.name))
    steps = r.steps
    configs = sweep_configs(args.sweep, steps)
    try:
        configs = select_configs(configs, args.only, args.label)
    except ValueError as e:
        p.error(str(e))
    for item in args.extra or []:
        preset, _, at = item.partition("@")
        name = preset.partition(":")[0]
        family = ("guidance" if "guidance_every" in preset else "fewer-steps" if name == "none"
                  else "presets" if name in ("fast", "quality") else name)
        configs.append((family, item, preset, int(at) if at else steps))
    captions = heldout_captions(args.captions, args.seed_offset)
    # warm-up (lazy imports, allocator, kernels) so the first timed run is not charged for it
    engine.generate(replace(base, prompt=captions[0][1], seed=captions[0][0], frames=min(args.frames, 16)))
    rows: list[dict] = []
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    for seed, caption in captions:
        cfg0 = replace(base, prompt=caption, seed=seed)
        ref = run_video(engine, counter, cfg0)
        ref_world = score_video(ref["frames"], caption)
        rows.append({"family": "none", "label": "full compute", "preset": "none", "steps": steps, "seed": seed,
                     "seconds": ref["seconds"], "decode": ref["decode"], "calls": ref["calls"], "tokens": ref["tokens"], **ref_world})
        print(f"seed {seed}: none {ref['seconds']:.1f} s, {ref['calls']} calls", file=sys.stderr, flush=True)
        teacher_latents = ref["latents"]
        for family, label, preset, s in configs:
            cfg = replace(cfg0, cache=replace(cfg0.cache, preset=preset), sampler=replace(cfg0.sampler, steps=s))
            plain = run_video(engine, counter, cfg)
            row = {"family": family, "label": label, "preset": preset, "steps": s, "seed": seed,
                   "seconds": plain["seconds"], "decode": plain["decode"], "calls": plain["calls"], "tokens": plain["tokens"],
                   "psnr_free": psnr(plain["frames"], ref["frames"]), "ssim_free": ssim(plain["frames"], ref["frames"]),
                   "psnr_first": psnr(plain["first"], ref["first"]), **score_video(plain["frames"], caption)}
            if not args.no_teacher:
                tf = run_video(engine, counter, cfg, teacher=lambda i, t=teacher_latents: t[i])
                row.update(psnr_tf=psnr(tf["frames"], ref["frames"]), ssim_tf=ssim(tf["frames"], ref["frames"]))
            rows.append(row)
            print(f"  {family:12s} {label:18s} {plain['seconds']:6.1f} s  tokens {plain['tokens'] / ref['tokens']:.2f}"
                  f"  TF {row.get('psnr_tf', float('nan')):.1f}  first {row['psnr_first']:.1f}"
                  f"  free {row['psnr_free']:.1f}", file=sys.stderr, flush=True)
            json_path.write_text(json.dumps(rows, indent=1))
    model_dir = Path(engine.model.path)
    note = ""
    arv = model_dir / "arvideo.json"
    if arv.is_file():
        d = json.loads(arv.read_text())
        if "trained_steps" in d:
            note = f"{d['trained_steps']} training steps, {d.get('trained_minutes', '?')} min"
    meta = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_line(), "model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
        "model_note": note or "no training record", "captions": len(captions),
        **seed_meta([seed for seed, _ in captions]), "frames": args.frames, "steps": steps,
        "sampler": r.cfg.sampler.name, "schedule": f"{r.cfg.schedule.name} ar_step={r.cfg.schedule.ar_step} "
        f"block={r.block}", "command": "python scripts/bench_caching.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    report(rows, meta, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
