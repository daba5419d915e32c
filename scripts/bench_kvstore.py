"""Bounded KV store benchmark: peak memory and time per chunk vs length, world metrics per policy.

Every generation runs in its own subprocess (one torch thread), so "peak memory" is that
process's own peak resident set (VmHWM): model, store, activations, decoder, everything.
Results go to stdout and into docs/kvstore.md between the markers of each section.

  python scripts/bench_kvstore.py memory --frames 160 800 2000 10000     # default settings
  python scripts/bench_kvstore.py quality --frames 2000 --captions 12 \\
      --policies scored window sink-window full --positions reindexed absolute
  python scripts/bench_kvstore.py memory --quick --model /tmp/tiny       # smoke test
  python scripts/bench_kvstore.py process --frames 160 800 2000 --repeat 2 # the real CLI, --cache fast

`--model DIR` picks another model folder (default: the embedded models/shapes-df);
`--jobs N` runs N subprocesses at once (timings then share the CPU: say so when quoting them).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "kvstore.md"
METRICS = ("adherence", "persistence", "spurious", "smoothness", "background", "flicker")
QUARTERS = 4  # quality: the metrics are also reported per quarter of each video


def _rss_mib() -> float:
    from arvideo.memory import process_resident_bytes

    return process_resident_bytes() / 2**20


# -- child: one generation --------------------------------------------------------------------
def child(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from arvideo.config import build_config
    from arvideo.engine import Engine
    from arvideo.evaluate import heldout_captions
    from arvideo.kvstore import DEFAULT_KV_POSITIONS
    from arvideo.memory import process_peak_bytes

    seed, caption = heldout_captions(1, args.seed)[0]
    engine = Engine.from_folder(args.model)
    cfg = build_config(prompt=caption, frames=args.frames, seed=seed, overrides=args.set)
    resolved = engine.resolve(cfg)
    tick_times: list[float] = []
    store_bytes, committed = [], 0
    keep = [] if args.score else None
    total_chunks = engine.make_schedule(resolved).num_chunks
    rss_trace = []  # resident MiB at every tenth of the chunks: growth vs a one-off peak
    t0 = time.perf_counter()
    chunks = 0
    # CPU seconds of this process per tick: on a shared machine wall time measures the neighbours
    for chunk in engine.stream(cfg, callback=lambda ev: tick_times.append(time.process_time())):
        chunks += 1
        if chunks % max(1, total_chunks // 10) == 0:
            rss_trace.append(round(_rss_mib(), 1))
        if engine._run is not None:
            store_bytes.append(engine._run.store.nbytes)
            committed = max(committed, engine._run.store.committed)
        if keep is not None:
            keep.append(chunk.frames)
        # otherwise the frames go nowhere, as they would go straight to a file sink
    seconds = time.perf_counter() - t0
    n = len(tick_times)
    span = max(1, n // 10)
    gaps = np.diff(tick_times)  # from the end of tick 1 on: tick 0 also pays for text encoding and warm-up
    out = {
        "frames": args.frames, "seed": seed, "caption": caption, "set": args.set,
        "policy": resolved.cfg.kv.policy, "budget_frames": resolved.cfg.kv.budget_frames,
        "positions": resolved.cfg.kv.positions or engine.model.defaults.get("kv_positions", DEFAULT_KV_POSITIONS),
        "seconds": seconds, "chunks": chunks, "ticks": n,
        "tick_s_first10": float(np.median(gaps[:span])), "tick_s_last10": float(np.median(gaps[-span:])),
        "kv_bytes_max": max(store_bytes, default=0), "kv_bytes_min": min(store_bytes, default=0),
        "kv_tokens_max": committed,
        "peak_rss_mib": process_peak_bytes() / 2**20, "rss_trace_mib": rss_trace,
    }
    if keep is not None:
        from arvideo.world.metrics import score_video

        video = np.concatenate(keep)
        out.update(score_video(video, caption))
        # the same metrics over each quarter of the video: does a policy lose the objects
        # progressively (memory) or from the start?
        bounds = np.linspace(0, len(video), QUARTERS + 1).round().astype(int)
        out["quarters"] = [score_video(video[a:b], caption) for a, b in zip(bounds[:-1], bounds[1:])]
    print("RESULT " + json.dumps(out), flush=True)


def fidelity_child(args) -> None:
    """Teacher-forced: every policy denoises each chunk from the same (full-context) reference
    history; the relative L2 distance of its clean latents to the full-cache run's is the error
    its eviction alone causes (no compounding)."""
    import numpy as np
    import torch

    torch.set_num_threads(1)
    from arvideo.config import build_config
    from arvideo.engine import Engine
    from arvideo.evaluate import heldout_captions

    seed, caption = heldout_captions(1, args.seed)[0]
    engine = Engine.from_folder(args.model)

    def run(overrides, teacher=None):
        cfg = build_config(prompt=caption, frames=args.frames, seed=seed, overrides=args.set + overrides)
        return {c.index: c.latents for c in engine.stream(cfg, decode=False, teacher=teacher)}

    reference = run(["kv.policy=full", "kv.positions=absolute"])
    budget = engine.resolve(build_config(prompt=caption, overrides=args.set + ["kv.policy=window"])).cfg.kv.budget_frames
    first = budget // engine.resolve(build_config(prompt=caption, overrides=args.set)).block + 1  # chunks after the first eviction
    out = {"frames": args.frames, "seed": seed, "caption": caption, "set": args.set, "budget_frames": budget, "rows": []}
    for variant in args.variants:
        policy, positions, *extra = variant.split("/")  # e.g. scored/absolute/kv.queries=last-frame
        t0 = time.perf_counter()
        got = run([f"kv.policy={policy}", f"kv.positions={positions}", *extra], teacher=lambda i: reference[i])
        err = [float((got[i] - reference[i]).norm() / reference[i].norm()) for i in sorted(got) if i >= first]
        out["rows"].append({"variant": variant, "rel_err_mean": float(np.mean(err)), "rel_err_max": float(np.max(err)),
                            "chunks": len(err), "seconds": time.perf_counter() - t0})
    print("RESULT " + json.dumps(out), flush=True)


def run_child(model: str | None, frames: int, seed: int, overrides: list[str], score: bool) -> dict:
    cmd = [sys.executable, __file__, "child", "--frames", str(frames), "--seed", str(seed)]
    cmd += ["--model", model] if model else []
    cmd += ["--score"] if score else []
    cmd += ["--set", *overrides] if overrides else []
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")


# -- parent: sections --------------------------------------------------------------------------
def caption_set(args) -> str:
    """Names the captions' world seeds: 10000-19999 are the evaluation set, 20000 on development ones."""
    from arvideo.evaluate import describe_seeds

    return describe_seeds(args.seed, args.captions)


def write_section(name: str, text: str) -> None:
    from arvideo.reporting import write_marked_section

    write_marked_section(DOC, f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->", text)


def publish(args, section: str, lines: list[str], rows) -> None:
    """Print the table, put it in docs/kvstore.md (`--section`, else `section`), raw rows to `--json`."""
    text = "\n".join(lines)
    print(text)
    write_section(args.section or section, text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


def command_line() -> str:
    return "python scripts/bench_kvstore.py " + " ".join(sys.argv[1:])


def memory(args) -> None:
    jobs = [(f, []) for f in args.frames]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda j: run_child(args.model, j[0], args.seed, args.set, False), jobs))
    base = rows[0]["peak_rss_mib"]
    lines = [
        f"`{command_line()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; model "
        f"{args.model or 'models/shapes-df'}; {args.jobs} run(s) at a time, 1 torch thread each; "
        f"settings: model defaults{' + ' + ' '.join(args.set) if args.set else ''})",
        "",
        "| frames | policy | budget (latent frames) | peak RSS MiB | vs first | KV store MiB | max tokens held "
        "| CPU s / tick, first 10% | CPU s / tick, last 10% | wall s | chunks |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['frames']} | {r['policy']} | {r['budget_frames']} | {r['peak_rss_mib']:.1f} | "
            f"{100 * (r['peak_rss_mib'] / base - 1):+.1f}% | {r['kv_bytes_max'] / 2**20:.2f} | {r['kv_tokens_max']} | "
            f"{r['tick_s_first10']:.3f} | {r['tick_s_last10']:.3f} | {r['seconds']:.0f} | {r['chunks']} |"
        )
    publish(args, "memory", lines, rows)


def run_cli(model: str | None, frames: int, seed: int, cache: str, overrides: list[str], workdir: Path) -> dict:
    """`arvideo generate` itself (load, generate, decode, mp4 write, state saves: the whole process),
    one torch thread; peak from its own --stats (VmHWM at exit), resident set sampled from outside."""
    import os

    from arvideo.evaluate import heldout_captions
    from arvideo.memory import proc_status_bytes

    seed, caption = heldout_captions(1, seed)[0]
    out = workdir / f"v{frames}.mp4"
    stats = workdir / f"v{frames}.json"
    for stale in (out, stats):  # a repeat of this length (a successful run leaves no state file)
        stale.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "arvideo", "generate", caption, "--frames", str(frames), "--seed", str(seed),
           "--cache", cache, "--out", str(out), "--stats", str(stats), "--quiet", *(["--model", model] if model else []),
           *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    trace = []  # (seconds, resident MiB) every 0.25 s
    while proc.poll() is None:
        rss = proc_status_bytes("VmRSS", proc.pid)
        if rss:
            trace.append((round(time.perf_counter() - t0, 2), round(rss / 2**20, 1)))
        time.sleep(0.25)
    err = proc.stderr.read()
    if proc.returncode != 0 or not stats.exists():
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    st = json.loads(stats.read_text())
    late = [r for t, r in trace if t >= 0.5 * trace[-1][0]] if trace else []
    return {"frames": frames, "cache": cache, "set": overrides, "seconds": st["seconds"], "model_calls": st["model_calls"],
            "peak_rss_mib": st["peak_memory_bytes"] / 2**20, "rss_max_second_half_mib": max(late, default=0.0),
            "rss_trace_mib": trace[:: max(1, len(trace) // 40)]}


def process(args) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="arvideo-mem-") as tmp:
        rows = [run_cli(args.model, f, args.seed, args.cache, args.set, Path(tmp))
                for _ in range(args.repeat) for f in args.frames]
    base = min(r["peak_rss_mib"] for r in rows if r["frames"] == args.frames[0])
    lines = [
        f"`{command_line()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; model "
        f"{args.model or 'models/shapes-df'}; `arvideo generate ... --cache {args.cache}` in a subprocess, one torch "
        f"thread, runs one after another{'; settings: ' + ' '.join(args.set) if args.set else ''})",
        "",
        "| frames | run | peak RSS MiB (whole process) | vs shortest | max RSS, second half of the run MiB | seconds | model calls |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, r in enumerate(rows):
        lines.append(f"| {r['frames']} | {i // len(args.frames) + 1} | {r['peak_rss_mib']:.1f} | "
                     f"{100 * (r['peak_rss_mib'] / base - 1):+.1f}% | {r['rss_max_second_half_mib']:.1f} | "
                     f"{r['seconds']:.1f} | {r['model_calls']} |")
    publish(args, "process", lines, rows)


def quality(args) -> None:
    import numpy as np

    from arvideo.world.metrics import paired_difference

    variants = []
    for policy in args.policies:
        # window keeps contiguous recent frames and full evicts nothing: neither ever re-positions
        # a key, so their videos are the same under both schemes and run once
        name = policy.split("/")[0]
        for pos in args.positions if name not in ("window", "full") else args.positions[:1]:
            variants.append((policy, pos))

    def overrides(policy: str, pos: str) -> list[str]:
        """A policy may carry its own settings: scored/kv.evict_unit=frame."""
        name, *extra = policy.split("/")
        return [f"kv.policy={name}", f"kv.positions={pos}", *extra, *args.set]

    # caption-major, so that the videos finished when a long run is cut short compare every policy
    jobs = [((policy, pos), args.seed + i, overrides(policy, pos))
            for i in range(args.captions) for policy, pos in variants]
    # every finished video is appended to a journal next to --json, so an interrupted run (a
    # 2,000-frame comparison is hours of CPU) continues where it stopped when started again
    journal = Path(args.json + ".partial.jsonl") if args.json else None
    done = {}
    if journal is not None and journal.exists():
        for line in journal.read_text().splitlines():
            rec = json.loads(line)
            if rec["frames"] == args.frames[0] and rec["model"] == args.model:
                done[(tuple(rec["variant"]), rec["world_seed"], tuple(rec["overrides"]))] = rec["result"]
        print(f"{len(done)} run(s) taken from {journal}", flush=True)
    from_journal = set(done)
    wanted = {(job[0], job[1], tuple(job[2])) for job in jobs}
    for path in args.reuse:
        # videos of an earlier, completed run (its --json rows): the same frames, seed and overrides
        # make the same video, so a new policy can be compared with old ones without re-running them
        # (the caller vouches that the model folder has not changed since; the table says what was reused)
        n = len(done)
        for row in json.loads(Path(path).read_text()):
            key = (tuple(row["variant"]), row["seed"], tuple(row["set"]))
            if row["frames"] == args.frames[0] and key in wanted:
                done.setdefault(key, {k: v for k, v in row.items() if k != "variant"})
        print(f"{len(done) - n} run(s) taken from {path}", flush=True)
    reused = set(done) - from_journal  # taken from --reuse files (the journal's are this run's own videos)
    lock = threading.Lock()

    def run(job):
        key = (job[0], job[1], tuple(job[2]))
        if key in done:
            return job[0], done[key]
        result = run_child(args.model, args.frames[0], job[1], job[2], True)
        if journal is not None:
            rec = {"frames": args.frames[0], "model": args.model, "variant": list(job[0]), "world_seed": job[1],
                   "overrides": job[2], "result": result}
            with lock, journal.open("a") as f:
                f.write(json.dumps(rec) + "\n")
        return job[0], result

    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, jobs))
    lines = [
        f"`{command_line()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; model "
        f"{args.model or 'models/shapes-df'}; {args.frames[0]} frames; captions: {caption_set(args)}; "
        f"{args.jobs} run(s) at a time"
        + (f"; {sum(1 for j in jobs if (j[0], j[1], tuple(j[2])) in reused)} of the {len(jobs)} videos taken "
           f"from earlier runs: {', '.join(args.reuse)}" if args.reuse else "") + ")",
        "",
        "| policy | positions | " + " | ".join(METRICS) + " | KV store MiB | peak RSS MiB | s / video |",
        "| --- | --- |" + " ---: |" * (len(METRICS) + 3),
    ]
    for variant in variants:
        rows = [r for v, r in results if v == variant]
        mean = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
        lines.append(
            f"| {variant[0]} | {variant[1]} | " + " | ".join(f"{mean[m]:.3f}" for m in METRICS)
            + f" | {np.mean([r['kv_bytes_max'] for r in rows]) / 2**20:.2f} | "
            f"{np.mean([r['peak_rss_mib'] for r in rows]):.0f} | {np.mean([r['seconds'] for r in rows]):.0f} |"
        )
    if len(variants) > 1 and args.captions > 1:
        # every pair of variants, so each comparison a reader needs (one policy under both
        # position schemes, two policies under one) comes from this script, not by hand
        paired = ("adherence", "persistence", "smoothness", "spurious")
        lines += ["", "Paired by caption, every pair of variants (first minus second: mean difference +- its "
                  "standard error over captions; captions higher / lower = where the first scores higher / lower "
                  "on adherence):", "",
                  "| first - second | " + " | ".join(paired) + " | captions higher / lower (adherence) |",
                  "| --- |" + " ---: |" * len(paired) + " --- |"]
        by = {(v, r["seed"]): r for v, r in results}
        seeds = sorted({r["seed"] for _, r in results})
        for i, first in enumerate(variants):
            for second in variants[i + 1:]:
                cells = {m: paired_difference([by[(first, s)] for s in seeds], [by[(second, s)] for s in seeds], m)
                         for m in paired}
                adh = cells["adherence"]
                lines.append(f"| {first[0]}/{first[1]} - {second[0]}/{second[1]} | "
                             + " | ".join(f"{cells[m]['mean']:+.3f} +- {cells[m]['se']:.3f}" for m in paired)
                             + f" | {adh['higher']} / {adh['lower']} |")
    if results and all("quarters" in r for _, r in results):
        lines += ["", "By quarter of the video (mean over captions; the metrics of each quarter scored "
                  "alone, so persistence there is within the quarter): adherence / persistence", "",
                  "| policy | positions | " + " | ".join(f"quarter {q + 1}" for q in range(QUARTERS)) + " |",
                  "| --- | --- |" + " ---: |" * QUARTERS]
        for variant in variants:
            rows = [r for v, r in results if v == variant]
            cells = [f"{np.mean([r['quarters'][q]['adherence'] for r in rows]):.3f} / "
                     f"{np.mean([r['quarters'][q]['persistence'] for r in rows]):.3f}" for q in range(QUARTERS)]
            lines.append(f"| {variant[0]} | {variant[1]} | " + " | ".join(cells) + " |")
    lines += ["", "Per video (persistence, adherence, background):", ""]
    for variant, r in sorted(results, key=lambda vr: variants.index(vr[0])):
        lines.append(f"- {variant[0]}/{variant[1]} seed {r['seed']}: persistence {r['persistence']:.3f}, "
                     f"adherence {r['adherence']:.3f}, background {r['background']:.3f}")
    publish(args, "quality", lines, [dict(r, variant=list(v)) for v, r in results])
    if journal is not None:
        journal.unlink(missing_ok=True)  # complete: a later run (new weights in the same folder) starts afresh


def fidelity(args) -> None:
    cmd = [sys.executable, __file__, "fidelity-child", "--frames", str(args.frames[0]), "--variants", *args.variants]
    rows = []
    for i in range(args.captions):
        full = cmd + ["--seed", str(args.seed + i)] + (["--model", args.model] if args.model else [])
        full += ["--set", *args.set] if args.set else []
        proc = subprocess.run(full, capture_output=True, text=True, cwd=ROOT)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"{' '.join(full)} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(lines[0][7:]))
    lines = [
        f"`{command_line()}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; model "
        f"{args.model or 'models/shapes-df'}; {args.frames[0]} frames; budget {rows[0]['budget_frames']} latent frames; "
        f"captions: {caption_set(args)})",
        "",
        "Relative L2 error of each chunk's clean latents against the full-cache run, teacher-forced "
        "(every chunk sees the full run's history, so only the eviction differs), over chunks after the first eviction:",
        "",
        "| policy / positions | mean rel. error | max rel. error | chunks |",
        "| --- | ---: | ---: | ---: |",
    ]
    for v in args.variants:
        rs = [r for row in rows for r in row["rows"] if r["variant"] == v]
        lines.append(f"| {v} | {sum(r['rel_err_mean'] for r in rs) / len(rs):.4f} | "
                     f"{max(r['rel_err_max'] for r in rs):.4f} | {sum(r['chunks'] for r in rs)} |")
    publish(args, "fidelity", lines, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["memory", "process", "quality", "fidelity", "child", "fidelity-child"])
    p.add_argument("--model", default=None, help="model folder (default: the embedded models/shapes-df)")
    p.add_argument("--frames", type=int, nargs="+", default=None,
                   help="memory: lengths to run (default 160 800 2000 10000); quality: one length (default 2000)")
    p.add_argument("--captions", type=int, default=12, help="quality: held-out captions per variant")
    p.add_argument("--seed", type=int, default=10_000, help="first held-out world seed")
    p.add_argument("--policies", nargs="+", default=["scored", "window", "sink-window", "full"],
                   help="policies to compare; a policy may carry its own settings after slashes: "
                        "scored/kv.evict_unit=frame")
    p.add_argument("--positions", nargs="+", default=["reindexed", "absolute"])
    p.add_argument("--set", nargs="*", default=[], help="extra config overrides key=value for every run")
    p.add_argument("--jobs", type=int, default=1, help="subprocesses at once")
    p.add_argument("--quick", action="store_true", help="memory 160 800; quality 160 frames, 2 captions")
    p.add_argument("--section", default=None, help="docs/kvstore.md section to write (default: the mode)")
    p.add_argument("--json", default=None, help="also write raw rows here (quality: finished videos are journaled to "
                   "JSON.partial.jsonl until the run completes; an interrupted run started again reuses them)")
    p.add_argument("--reuse", nargs="+", default=[], metavar="JSON",
                   help="quality: take videos already scored in these earlier --json outputs (same frames, seed, "
                   "policy, positions and --set) instead of generating them again")
    p.add_argument("--variants", nargs="+", default=["scored/absolute", "window/absolute", "sink-window/absolute",
                                                      "scored/reindexed", "sink-window/reindexed"],
                   help="fidelity: policy/positions pairs compared with full/absolute")
    p.add_argument("--cache", default="fast", help="process: the --cache preset of arvideo generate")
    p.add_argument("--repeat", type=int, default=1, help="process: runs of each length (the allocator varies)")
    p.add_argument("--score", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode in ("child", "fidelity-child"):
        args.frames = args.frames[0]
        return (child if args.mode == "child" else fidelity_child)(args)
    if args.frames is None:
        args.frames = ([160, 800] if args.quick else [160, 800, 2000, 10000]) if args.mode in ("memory", "process") else (
            [160] if args.quick else [2000] if args.mode == "quality" else [400])
    if args.quick and args.mode != "memory":
        args.captions = min(args.captions, 2 if args.mode == "quality" else 1)
    {"memory": memory, "process": process, "quality": quality, "fidelity": fidelity}[args.mode](args)


if __name__ == "__main__":
    main()
