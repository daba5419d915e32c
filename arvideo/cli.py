"""Command line: arvideo generate | render | preview | info | eval."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .errors import ArvideoError

log = logging.getLogger("arvideo")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate a video (streams frames to --out as chunks finish)")
    p.add_argument("prompt", help="text prompt (the embedded model takes shapes-world captions)")
    p.add_argument("--model", default=None, help="model folder in diffusers layout (default: embedded shapes model)")
    p.add_argument("--frames", type=int, default=None, help="number of video frames (default 48)")
    p.add_argument("--section", nargs=2, action="append", default=None, metavar=("START", "PROMPT"),
                   help="from START on (a video frame, or seconds: 5s), generate with PROMPT instead (repeatable, "
                        "in increasing order; starts at the next chunk boundary; docs/sections.md)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps per chunk")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--schedule", choices=["diffusion-forcing", "pipelined", "window"], default=None)
    p.add_argument("--cache", default=None, help="cache policy or preset: none (full compute, default), fast, quality, meancache:budget=8, "
                   "flowcache:tau=0.3, combination, deepcache, teacache, fora (docs/caching.md)")
    p.add_argument("--out", action="append", default=None,
                   help="output path: .mp4, .gif, .npy, or a directory for PNG frames (repeatable; default video.mp4)")
    p.add_argument("--preview", default=None, metavar="DIR|FILE.png",
                   help="directory of live previews (newest frame, in-flight chunks, status.json); "
                        "a .png path instead keeps just the newest finished frame there")
    p.add_argument("--serve", nargs="?", type=int, const=8765, default=None, metavar="PORT",
                   help="serve the live preview page on http://127.0.0.1:PORT while generating (default 8765)")
    p.add_argument("--resume", action="store_true",
                   help="continue a killed run from its last finished chunk (state in OUT.arvideo-state)")
    p.add_argument("--state-every", type=float, default=0.0, metavar="SECONDS",
                   help="save the resumable state at most this often (default 0: after every chunk)")
    p.add_argument("--no-state", action="store_true", help="do not save a resumable state")
    p.add_argument("--stats", default=None, metavar="FILE.json",
                   help="write the run's figures here: frames, seconds, model calls, peak memory (whole process)")
    p.add_argument("--config", action="append", default=None, help="YAML config file (repeatable, merged in order)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="any config key, e.g. kv.policy=window")


def _add_render(sub) -> None:
    p = sub.add_parser("render", help="render a batch of videos from a YAML jobs file",
                       description="Render every job of a YAML jobs file (a list of {prompt, frames, seed, out, "
                                   "...any generate setting}). Failed jobs are reported and the others finish; "
                                   "the exit code is 1 if any job failed.")
    p.add_argument("jobs", help="YAML jobs file")
    p.add_argument("--out-dir", default=None, help="directory for relative output paths (default: current)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="peak memory bound, e.g. 12G (process RSS on CPU, allocator peak on CUDA): bounds KV "
                        "stores left at the default and runs as many jobs together as fit, or refuses")
    p.add_argument("--parallel", type=int, default=None, metavar="N",
                   help="most jobs at once in this process (default 1; with --max-memory as many as fit, up to 4)")
    p.add_argument("--plan", action="store_true", help="print the memory plan and exit")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run jobs as Ray tasks: on the cluster at ADDRESS (auto, ray://host:10001, host:6379) "
                        "or on a local Ray (no address)")
    p.add_argument("--cpus-per-job", type=float, default=1.0, help="Ray: CPUs each job reserves")
    p.add_argument("--gpus-per-job", type=float, default=None,
                   help="Ray: GPUs each job reserves (default 1 for device=cuda jobs, else 0; 0.5 packs two a GPU)")
    p.add_argument("--retries", type=int, default=3, help="Ray: retries of a job whose worker was lost")
    p.add_argument("--resume", action="store_true", help="continue interrupted jobs from their state files")
    p.add_argument("--state-every", type=float, default=0.0, metavar="SECONDS",
                   help="save each job's resumable state at most this often (default 0: after every chunk)")
    p.add_argument("--no-state", action="store_true", help="do not save resumable states")
    p.add_argument("--preview", default=None, metavar="DIR", help="live previews, one subdirectory per job")
    p.add_argument("--serve", nargs="?", type=int, const=8765, default=None, metavar="PORT",
                   help="serve the live preview page on http://127.0.0.1:PORT while rendering (default 8765)")
    p.add_argument("--model", default=None, help="model folder for jobs that name none (default: embedded)")
    p.add_argument("--config", action="append", default=None, help="YAML config applied to every job (repeatable)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="setting for every job (a job's own wins)")


def _add_preview(sub) -> None:
    p = sub.add_parser("preview", help="serve a live preview directory as a web page")
    p.add_argument("dir", help="the --preview directory of a running (or finished) generate/render")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free port)")


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a model folder")
    p.add_argument("model", nargs="?", default=None, help="model folder (default: embedded model)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score videos with the shapes-world metrics")
    p.add_argument("files", nargs="*", help=".npy/.mp4 files to score (caption from --caption or a sidecar .json)")
    p.add_argument("--caption", default=None, help="caption of the given files")
    p.add_argument("--generate", type=int, default=0, metavar="N", help="generate N videos from held-out seeds instead")
    p.add_argument("--seed-offset", type=int, default=10_000, help="first world seed for --generate captions")
    p.add_argument("--frames", type=int, default=160)
    p.add_argument("--model", default=None)
    p.add_argument("--config", action="append", default=None)
    p.add_argument("--json", default=None, help="write results as JSON here")
    p.add_argument("--save-dir", default=None, help="keep generated videos (.npy) here")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="key=value")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arvideo", description="Streaming autoregressive long-video generation")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    _add_render(sub)
    _add_preview(sub)
    _add_info(sub)
    _add_eval(sub)
    # the calibration command owns its arguments (arvideo/calibrate.py); importing it here would
    # load torch for every command
    cal = sub.add_parser("calibrate", add_help=False,
                         help="fit cache calibration: MeanCache schedules, FlowCache polynomial (see --help)")
    cal.add_argument("rest", nargs=argparse.REMAINDER)
    bench = sub.add_parser("bench", add_help=False,
                           help="benchmarks from a source checkout: `arvideo bench peers` (vs diffusers, see --help)")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def _config_from_args(args, prompt: str | None = None):
    from .config import build_config

    overrides = list(args.overrides or [])
    for flag, key in (("steps", "sampler.steps"), ("schedule", "schedule.name"), ("cache", "cache.preset")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    values = dict(
        prompt=prompt, frames=getattr(args, "frames", None), seed=getattr(args, "seed", None),
        guidance_scale=getattr(args, "guidance", None), device=getattr(args, "device", None),
        dtype=getattr(args, "dtype", None),
    )
    if getattr(args, "section", None):
        values["sections"] = [{**_section_start(start), "prompt": text} for start, text in args.section]
    return build_config(args.config, overrides, **values)


def _section_start(text: str) -> dict:
    """`--section` start: a video frame number (80) or seconds (5s, 2.5s)."""
    try:
        return {"seconds": float(text[:-1])} if text.endswith("s") else {"frame": int(text)}
    except ValueError:
        raise ArvideoError(f"--section takes a start (a video frame number, or seconds like 5s) and a prompt, "
                           f"e.g. --section 80 \"a ...\" or --section 5s \"a ...\"; got {text!r}") from None


def _start_server(port: int | None, directory: str | None):
    """A PreviewServer on `port` for `directory` (a temporary one if None), or None without --serve."""
    if port is None:
        return None, directory
    import tempfile

    from .preview import PreviewServer

    directory = directory or tempfile.mkdtemp(prefix="arvideo-preview-")
    server = PreviewServer(directory, port=port).start()
    print(f"live preview: {server.url}", file=sys.stderr)
    return server, directory


def cmd_generate(args) -> int:
    from .engine import Engine
    from .render import Job, check_output_path, run_job

    cfg = _config_from_args(args, args.prompt)
    if not str(cfg.device).startswith("cuda"):
        from .memory import return_freed_memory_to_the_os

        return_freed_memory_to_the_os()  # a peak that does not drift with length (memory.py says why)
    engine = Engine.from_folder(args.model, cfg.device, cfg.dtype, cfg.attention)
    resolved = engine.resolve(cfg)  # validate everything before any file is touched
    engine.make_schedule(resolved)
    sections = engine.section_plan(resolved)
    engine.check_prompts(resolved, sections)
    if sections.sectioned and not args.quiet:
        starts = sections.switch_frames()
        print("prompt sections: " + "; ".join(f"from frame {f}: {p!r}" for f, p in zip(starts, sections.prompts)),
              file=sys.stderr)
    outs = args.out or ["video.mp4"]
    for out in outs:
        check_output_path(out)
    job = Job(0, Path(outs[0]).stem, cfg, [Path(o) for o in outs], args.model)
    if job.state_path.exists() and not args.resume:
        raise ArvideoError(f"{job.state_path} holds an interrupted run of this output: pass --resume to continue it, "
                           "or delete it to start over")
    png_preview = args.preview if args.preview and args.preview.lower().endswith(".png") else None
    preview_dir = args.preview if args.preview and not png_preview else None
    server, preview_dir = _start_server(args.serve, preview_dir)
    on_chunk = None
    if png_preview:
        from .sinks import PreviewSink

        sink = PreviewSink(png_preview)
        on_chunk = lambda chunk: sink.write(chunk.frames)  # noqa: E731
    from tqdm.auto import tqdm

    bar = tqdm(total=resolved.cfg.frames, unit="frame", desc="frames", disable=args.quiet)
    done = [0]

    def progress(n: int) -> None:
        bar.update(n - done[0])
        done[0] = n

    start = time.perf_counter()
    try:
        result = run_job(job, engine, atomic=False, resume=args.resume, save_state=not args.no_state,
                         state_every=args.state_every, preview=preview_dir, on_progress=progress, on_chunk=on_chunk)
    except KeyboardInterrupt:
        bar.close()
        hint = "; continue with --resume" if job.state_path.exists() else ""
        print(f"interrupted: {done[0]} frames written to {', '.join(outs)}{hint}", file=sys.stderr)
        return 130
    finally:
        bar.close()
        if server is not None:
            server.close()
    if not result.ok:
        if result.input_error:
            print(f"error: {result.reason}", file=sys.stderr)
            return 2
        print(f"error: {result.reason}\n{result.frames} frames already written stay playable in: {', '.join(outs)}",
              file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    from .memory import format_size, peak_bytes

    peak = peak_bytes(resolved.cfg.device)  # whole run, from process start (never reset in generate)
    if args.stats:
        import json

        stats = {"frames": result.frames, "seconds": seconds, "model_calls": engine.model_calls,
                 "peak_memory_bytes": peak, "device": resolved.cfg.device, "resumed_from": result.resumed_from, "outputs": outs}
        if sections.sectioned:
            stats["sections"] = [{"frame": f, "prompt": p} for f, p in zip(
                sections.switch_frames(), sections.prompts)]
        Path(args.stats).write_text(json.dumps(stats, indent=1) + "\n")
    if not args.quiet:
        resumed = f" (resumed at frame {result.resumed_from})" if result.resumed_from else ""
        print(f"wrote {result.frames} frames ({result.frames / resolved.fps:.1f} s at {resolved.fps} fps) to "
              f"{', '.join(outs)} in {seconds:.1f} s, {engine.model_calls} model calls, peak memory "
              f"{format_size(peak)}{resumed}", file=sys.stderr)
    return 0


def _ray_address_fixup(args) -> None:
    """`--ray key=value` means a local Ray followed by an override (an address never holds '=')."""
    if args.ray and "=" in args.ray and not args.ray.startswith("ray://"):
        args.overrides = [args.ray] + list(args.overrides or [])
        args.ray = "local"


def cmd_render(args) -> int:
    from . import sinks  # noqa: F401 - imported before the baseline is measured
    from .memory import PeakMeter, Plan, format_size, parse_size, return_freed_memory_to_the_os
    from .render import (
        describe_plan,
        load_jobs,
        plan_jobs,
        remove_resume_leftovers,
        render_local,
        render_ray,
        stale_states,
        summary_table,
        validate_jobs,
    )

    _ray_address_fixup(args)
    overrides = [f"{k}={v}" for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None]
    jobs = load_jobs(args.jobs, out_dir=args.out_dir, model=args.model, configs=args.config,
                     overrides=overrides + list(args.overrides or []))
    validate_jobs(jobs)
    if not args.resume:
        stale = stale_states(jobs)
        if stale:
            raise ArvideoError(f"interrupted runs left state files ({', '.join(map(str, stale))}): pass --resume to "
                               "continue them, or delete them to start over")
    limit = parse_size(args.max_memory) if args.max_memory else None
    devices = {"cuda" if str(j.cfg.device).startswith("cuda") else "cpu" for j in jobs}
    if limit and len(devices) > 1:
        raise ArvideoError("--max-memory needs every job on one kind of device (all cpu or all cuda)")
    device = jobs[0].cfg.device
    if limit and devices == {"cpu"} and args.ray is None:
        return_freed_memory_to_the_os()
    meter = PeakMeter(device)
    max_parallel = args.parallel if args.parallel is not None else (min(4, len(jobs)) if limit else 1)
    if max_parallel < 1:
        raise ArvideoError(f"--parallel must be >= 1, got {max_parallel}")
    if limit or args.plan or args.verbose:  # estimating costs a meta-device pass per job (seconds, once)
        plan, jobs = plan_jobs(jobs, limit, max_parallel, baseline=meter.baseline(),
                               separate_processes=args.ray is not None, save_state=not args.no_state)
        print(describe_plan(plan, jobs), file=sys.stderr)
    else:
        plan = Plan(None, 0, 0, max_parallel, [])
    if args.plan:
        return 0
    remove_resume_leftovers(jobs)
    server, preview_dir = _start_server(args.serve, args.preview)
    meter.reset()
    try:
        if args.ray is not None:
            memory = [plan.baseline + jp.estimate.weights + jp.estimate.dynamic for jp in plan.jobs] if limit else None
            results = render_ray(jobs, address=args.ray, cpus_per_job=args.cpus_per_job,
                                 gpus_per_job=args.gpus_per_job, memory_per_job=memory, retries=args.retries,
                                 save_state=not args.no_state, state_every=args.state_every, preview=preview_dir,
                                 progress=not args.quiet)
        else:
            results = render_local(jobs, parallel=plan.parallel, resume=args.resume, save_state=not args.no_state,
                                   state_every=args.state_every, preview=preview_dir, progress=not args.quiet,
                                   measure_each=plan.parallel == 1)
    except KeyboardInterrupt:
        print("interrupted: finished outputs stay; continue the rest with --resume", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            server.close()
    print(summary_table(results))
    if limit and args.ray is None:
        print(f"peak memory {format_size(meter.peak())} (estimated {format_size(plan.peak)}, "
              f"bound {format_size(limit)})")
    return 0 if all(r.ok for r in results) else 1


def cmd_preview(args) -> int:
    from .preview import PreviewServer

    server = PreviewServer(args.dir, host=args.host, port=args.port)
    print(f"serving {Path(args.dir).resolve()} on {server.url} (Ctrl-C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()
    return 0


def cmd_info(args) -> int:
    from .model import describe_model

    print(describe_model(args.model))
    return 0


def cmd_eval(args) -> int:
    from .evaluate import run_eval

    return run_eval(args)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like parser.parse_args, but `key=value` overrides may come before, between or after options."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["calibrate"]:  # its own parser (arvideo/calibrate.py) takes everything after it
        return argparse.Namespace(command="calibrate", rest=argv[1:], verbose=False)
    if argv[:1] == ["bench"]:  # scripts/bench_*.py own their arguments
        return argparse.Namespace(command="bench", rest=argv[1:], verbose=False)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse stops filling a positional list at the first option; parse the subcommand intermixed
        sub = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
        at = argv.index(args.command)
        sub_args = sub.choices[args.command].parse_intermixed_args(argv[at + 1 :])
        for key, value in vars(sub_args).items():
            setattr(args, key, value)
    return args


def cmd_calibrate(args) -> int:
    from .calibrate import main as calibrate_main

    return calibrate_main(args.rest)


def cmd_bench(args) -> int:
    import importlib.util

    if args.rest[:1] != ["peers"]:
        raise ArvideoError("usage: arvideo bench peers [options]  (arvideo bench peers --help lists them)")
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_peers.py"
    if not script.is_file():
        raise ArvideoError(f"arvideo bench needs a source checkout: {script} is missing")
    spec = importlib.util.spec_from_file_location("bench_peers", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(args.rest[1:], prog="arvideo bench peers")


def main(argv: list[str] | None = None) -> int:
    # OpenMP threads that spin while waiting make every torch op crawl when the cores are shared
    # (measured: 48 frames took 130 s with the default policy on a busy 2-core machine, 15 s with
    # this); must be set before torch is imported, which the subcommands do lazily.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"generate": cmd_generate, "render": cmd_render, "preview": cmd_preview, "info": cmd_info,
                "eval": cmd_eval, "calibrate": cmd_calibrate, "bench": cmd_bench}
    try:
        return handlers[args.command](args)
    except ArvideoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
