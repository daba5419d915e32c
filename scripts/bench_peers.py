"""Side-by-side benchmark against diffusers' SkyReels-V2 DF pipeline and its cache hooks (CPU).

Every row makes the same videos: the same held-out captions (world seeds from --seed-offset),
seeds, frame count, step count and guidance. Each (row, caption) runs in its own subprocess,
so its peak memory is that whole process's peak resident set (VmHWM), and the rows are
run in an order rotated per caption, so machine noise hits all rows alike.

Rows:
  diffusers             SkyReelsV2DiffusionForcingPipeline.from_pretrained(model), no cache; a long
                        video as diffusers makes it: windows of base_num_frames (the model's training
                        clip), overlap_history frames of the previous window re-noised by
                        addnoise_condition; decoded once at the end
  diffusers+taylorseer  the same with diffusers' TaylorSeer hooks on the transformer
  diffusers+pab         the same with diffusers' Pyramid Attention Broadcast hooks
  diffusers+fbc         first-block cache (only if diffusers accepts this transformer: see "hooks")
  arvideo-full          arvideo's Engine, streaming, cache none, default KV store
  arvideo-full-euler    the same with the Euler sampler: the uncached reference of the preset rows
                        that run Euler (their presets' sampler)
  arvideo-fast          the same with cache preset `fast`, on its preset's sampler (Euler; UniPC with
                        --arvideo-sampler unipc), fidelity against the uncached row on the same sampler
  arvideo-quality       the same with cache preset `quality` (a speed level between arvideo-full and
                        arvideo-fast, for comparisons with the diffusers caches at similar speed)
Prompt embeddings come from arvideo's prompt encoder for every row. Every row writes its mp4
with arvideo's Mp4Sink. Fidelity (PSNR/SSIM, first chunk and whole video) is measured against the
same system's own uncached video; the world metrics against the caption.

    python scripts/bench_peers.py                                  # 320 frames, 4 captions, all rows
    python scripts/bench_peers.py --frames 48 --captions 1 --steps 4
    python scripts/bench_peers.py --memory-sweep 160,320,640       # peak RSS vs length (one caption)
    arvideo bench peers [the same arguments]

Writes docs/benchmarks/peers.json ("cpu" entry; a "gpu" entry already there is kept) and the
tables between the markers in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
DOC = ROOT / "docs" / "benchmarks.md"
JSON = ROOT / "docs" / "benchmarks" / "peers.json"
WORLD = ("adherence", "persistence", "smoothness", "spurious", "background", "flicker")
ALL_ROWS = ("diffusers", "diffusers+taylorseer", "diffusers+pab", "diffusers+fbc",
            "arvideo-full", "arvideo-full-euler", "arvideo-fast", "arvideo-quality")
DEFAULT_ROWS = ("diffusers", "diffusers+taylorseer", "diffusers+pab", "arvideo-full", "arvideo-full-euler",
                "arvideo-fast", "arvideo-quality")
# arvideo rows: (cache preset, sampler); sampler None = the preset's own (`preset_sampler`), unless
# --arvideo-sampler unipc puts every row on UniPC, the diffusers pipeline's scheduler
ARVIDEO_ROWS = {"arvideo-full": ("none", "unipc"), "arvideo-full-euler": ("none", "euler"),
                "arvideo-fast": ("fast", None), "arvideo-quality": ("quality", None)}
UNCACHED_BY_SAMPLER = {"unipc": "arvideo-full", "euler": "arvideo-full-euler"}

# Hook settings (diffusers 0.42.1 defaults unless noted; see docs/benchmarks.md):
# TaylorSeer: diffusers' defaults (cache_interval 5, disable_cache_before_step 3, max_order 1), Taylor
# factors in float32 (CPU); its default identifiers ("^blocks.*attn", re.fullmatch) match no module of
# SkyReelsV2Transformer3DModel (its attention modules are blocks.N.attn1 / attn2), so the hooks go on
# whole transformer blocks instead (the pattern diffusers' lite mode uses for blocks).
TAYLORSEER = dict(cache_interval=5, disable_cache_before_step=3, max_order=1, cache_identifiers=[r"blocks\.\d+"])
# PAB: diffusers' documented example setting: spatial self-attention recomputed every 2nd call while
# the timestep is inside (100, 800). The diffusion-forcing pipeline's current_timestep is a vector (one
# timestep per latent frame); the callback hands PAB its largest entry (the noisiest frame denoised).
PAB = dict(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800))
FBC = dict(threshold=0.05)
MAGCACHE = dict(calibrate=True)  # probed only: MagCache needs mag_ratios calibrated for the model


def _rss_peak_bytes() -> int:
    from arvideo.memory import process_peak_bytes

    return process_peak_bytes()


# -- model settings ------------------------------------------------------------------------------------
def model_settings(model: Path, steps: int | None, base_num_frames: int | None,
                   overlap_history: int | None) -> dict:
    """Steps, guidance, fps, size, block, temporal factor and the diffusers window settings from arvideo.json."""
    d = json.loads((model / "arvideo.json").read_text()) if (model / "arvideo.json").is_file() else {}
    vae_cfg = json.loads((model / "vae" / "config.json").read_text())
    tf = int(d.get("vae_temporal_factor") or 2 ** sum(bool(x) for x in vae_cfg.get("temperal_downsample", [])))
    tcfg = json.loads((model / "transformer" / "config.json").read_text())
    block = int(d.get("causal_block_size") or max(1, tcfg.get("num_frame_per_block", 1)))
    if base_num_frames is None:
        if "train_clip_latent_frames" not in d:
            raise SystemExit(f"{model}/arvideo.json has no train_clip_latent_frames: pass --base-num-frames")
        base_num_frames = (int(d["train_clip_latent_frames"]) - 1) * tf + 1
    base_latent = (base_num_frames - 1) // tf + 1
    if overlap_history is None:  # about half the window, whole causal blocks (diffusers truncates to blocks)
        overlap_latent = max(block, base_latent // 2 // block * block)
        overlap_history = (overlap_latent - 1) * tf + 1
    overlap_latent = (overlap_history - 1) // tf + 1
    if overlap_latent >= base_latent:
        raise SystemExit(f"overlap_history {overlap_history} must be shorter than base_num_frames {base_num_frames}")
    return {
        "steps": int(steps or d.get("steps", 30)), "guidance_scale": float(d.get("guidance_scale", 5.0)),
        "fps": int(d.get("fps", 24)), "height": int(d.get("height", 544)), "width": int(d.get("width", 960)),
        "causal_block_size": block, "vae_temporal_factor": tf, "base_num_frames": base_num_frames,
        "overlap_history": overlap_history, "addnoise_condition": float(d.get("context_noise", 0.0)),
        "ar_step": 0, "max_sequence_length": int(d.get("max_sequence_length", 512)),
        "prompt_grammar": d.get("prompt_grammar"), "negative_prompt": d.get("negative_prompt", ""),
        "base_latent": base_latent, "overlap_latent": overlap_latent,
    }


def aligned_frames(requested: int, s: dict) -> int:
    """The largest frame count <= `requested` that diffusers' windows cover without a noise tail.

    diffusers rounds num_frames to 1 + k * temporal factor, and its last window must end on whole
    causal blocks after the overlap (else it leaves latent frames as noise or fails); latent frame
    counts base + k * (base - overlap) do. Both systems then make exactly these frames.
    """
    tf, base, stride = s["vae_temporal_factor"], s["base_latent"], s["base_latent"] - s["overlap_latent"]
    latent = (requested - 1) // tf + 1
    if latent <= base:  # one window: whole blocks only
        latent = latent // s["causal_block_size"] * s["causal_block_size"]
    else:
        latent = base + (latent - base) // stride * stride
    if latent < s["causal_block_size"]:
        raise SystemExit(f"--frames {requested} is shorter than one causal block")
    return (latent - 1) * tf + 1


# -- child: one (row, caption) ---------------------------------------------------------------------------
class WorkCounter:
    """Counts transformer calls and the tokens its blocks' self-attention and FFN actually computed.

    Hooks sit on the transformer (one per forward) and on blocks[i].attn1.to_q / blocks[i].ffn, which
    run only when a block's attention / FFN is computed (diffusers' cache hooks skip them, arvideo's
    backbone drives the same submodules). Tokens count every batch row (cond and uncond).
    """

    def __init__(self, transformer, count_forward: bool) -> None:
        self.calls = self.attn_tokens = self.ffn_tokens = 0
        self.context = None
        self.attn_by_context: dict[str, int] = {}
        if count_forward:
            transformer.register_forward_pre_hook(self._call)
        for block in transformer.blocks:
            q = getattr(block.attn1, "to_qkv", None) if getattr(block.attn1, "fused_projections", False) else None
            (q or block.attn1.to_q).register_forward_pre_hook(self._attn)
            block.ffn.register_forward_pre_hook(self._ffn)

    def _call(self, module, args):
        self.calls += 1

    def _attn(self, module, args):
        n = args[0].shape[0] * args[0].shape[1]
        self.attn_tokens += n
        key = self.context or "-"
        self.attn_by_context[key] = self.attn_by_context.get(key, 0) + n

    def _ffn(self, module, args):
        self.ffn_tokens += args[0].shape[0] * args[0].shape[1]


def _hook_config(name: str, pipe, steps: int, defaults: bool = False):
    import torch
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    if name == "taylorseer":
        kw = dict(TAYLORSEER)
        if defaults:
            kw.pop("cache_identifiers")
        return TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, **kw)
    if name == "pab":
        def current_timestep() -> int:
            t = pipe.current_timestep
            return int(t.max()) if torch.is_tensor(t) else int(t)

        return PyramidAttentionBroadcastConfig(current_timestep_callback=current_timestep, **PAB)
    if name == "fbc":
        return FirstBlockCacheConfig(**FBC)
    if name == "magcache":
        return MagCacheConfig(num_inference_steps=steps, **MAGCACHE)
    raise ValueError(name)


def _hooked_modules(module) -> list[str]:
    return [n for n, m in module.named_modules()
            if getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook.hooks]


def probe_hooks(spec: dict) -> dict:
    """Applies each diffusers cache hook to a fresh copy of the model's transformer: accepted or refused."""
    from types import SimpleNamespace

    from diffusers import SkyReelsV2Transformer3DModel

    out = {}
    for name, defaults in (("taylorseer", True), ("taylorseer", False), ("pab", False), ("fbc", False),
                           ("magcache", False)):
        key = name + (" (default identifiers)" if defaults else "")
        transformer = SkyReelsV2Transformer3DModel.from_pretrained(Path(spec["model"]) / "transformer")
        try:
            cfg = _hook_config(name, SimpleNamespace(current_timestep=0), spec["steps"], defaults=defaults)
            transformer.enable_cache(cfg)
        except Exception as exc:
            out[key] = {"applied": False, "error": " ".join(f"{type(exc).__name__}: {exc}".split())}
            continue
        hooked = [h for h in _hooked_modules(transformer) if h]  # "" = the root registry enable_cache creates
        out[key] = {"applied": True, "hooked_modules": len(hooked), "examples": hooked[:4],
                    "config": " ".join(repr(cfg).split())}
        if not hooked:
            names = [n for n, _ in transformer.named_modules() if re.fullmatch(r"blocks\.0\.[^.]+", n)]
            out[key]["note"] = f"no module matched (block 0 children: {', '.join(names)})"
    return out


def _diffusers_child(spec: dict, t_spawn: float) -> dict:
    import numpy as np
    import torch
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    from arvideo.model import PromptEncoder
    from arvideo.sinks import open_sink

    t_load = time.perf_counter()
    pipe = SkyReelsV2DiffusionForcingPipeline.from_pretrained(spec["model"])
    pipe.set_progress_bar_config(disable=True)
    hook = spec["row"].partition("+")[2]
    counter = WorkCounter(pipe.transformer, count_forward=True)
    cache_context = pipe.transformer.cache_context

    def tracked_context(name, *args, **kwargs):  # which call (cond / uncond) the counted tokens belong to
        counter.context = name
        return cache_context(name, *args, **kwargs)

    pipe.transformer.cache_context = tracked_context
    if hook:
        try:
            pipe.transformer.enable_cache(_hook_config(hook, pipe, spec["steps"]))
        except Exception as exc:
            return {"refused": f"{type(exc).__name__}: {exc}"}
    encoder = PromptEncoder(pipe.tokenizer, pipe.text_encoder, spec["max_sequence_length"], spec["prompt_grammar"])
    load_s = time.perf_counter() - t_load

    t0, c0 = time.perf_counter(), time.process_time()
    guided = spec["guidance_scale"] > 1
    embeds = encoder([spec["caption"]] + ([spec["negative_prompt"]] if guided else []), torch.device("cpu"),
                     torch.float32)
    torch.manual_seed(spec["seed"])  # addnoise_condition draws from the global generator
    video = pipe(
        prompt=None, prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:] if guided else None,
        height=spec["height"], width=spec["width"], num_frames=spec["frames"],
        num_inference_steps=spec["steps"], guidance_scale=spec["guidance_scale"],
        generator=torch.Generator().manual_seed(spec["seed"]), output_type="np",
        overlap_history=spec["overlap_history"], addnoise_condition=spec["addnoise_condition"],
        base_num_frames=spec["base_num_frames"], causal_block_size=spec["causal_block_size"],
        ar_step=spec["ar_step"], fps=spec["fps"],
    ).frames
    ttff = time.perf_counter() - t0  # diffusers decodes once, at the end: the first frame comes with the last
    frames = (np.asarray(video[0]) * 255).round().clip(0, 255).astype(np.uint8)  # diffusers' numpy_to_pil rounding
    t_write = time.perf_counter()
    sink = open_sink(spec["mp4"], spec["fps"])
    sink.write(frames)
    sink.close()
    t_end, c_end = time.perf_counter(), time.process_time()
    written = time.time()
    peak = _rss_peak_bytes()
    np.save(spec["npy"], frames)  # for the fidelity and world metrics, after every measurement
    return {"load_s": load_s, "gen_s": t_end - t0, "gen_cpu_s": c_end - c0, "ttff_s": ttff, "write_s": t_end - t_write,
            "whole_s": written - t_spawn, "ttff_process_s": written - t_spawn - (t_end - t0) + ttff,
            "peak_rss_bytes": peak, "model_calls": counter.calls, "attn_tokens": counter.attn_tokens,
            "ffn_tokens": counter.ffn_tokens, "attn_tokens_by_context": counter.attn_by_context,
            "frames_out": int(frames.shape[0]),
            "hooked_modules": len([h for h in _hooked_modules(pipe.transformer) if h]) if hook else 0}


def _arvideo_child(spec: dict, t_spawn: float) -> dict:
    import torch  # noqa: F401 - imported before the clock like the diffusers child

    from arvideo.config import build_config
    from arvideo.engine import Engine
    from arvideo.memory import return_freed_memory_to_the_os
    from arvideo.sinks import NpySink, open_sink

    return_freed_memory_to_the_os()  # as `arvideo generate` does on CPU
    t_load = time.perf_counter()
    engine = Engine.from_folder(spec["model"])
    counter = WorkCounter(engine.model.transformer, count_forward=False)
    load_s = time.perf_counter() - t_load
    cfg = build_config(prompt=spec["caption"], negative_prompt=spec["negative_prompt"], frames=spec["frames"],
                       seed=spec["seed"], guidance_scale=spec["guidance_scale"],
                       # the row's sampler (run_main picks it): a cached row's PSNR is taken against the
                       # uncached row on the same sampler, so that it measures the cache alone
                       overrides=[f"sampler.steps={spec['steps']}", f"sampler.name={spec['sampler']}",
                                  f"cache.preset={spec['cache']}", *spec.get("arvideo_set", [])])
    side = NpySink(spec["npy"])  # for fidelity and world metrics: its time is taken out of every figure
    aux = aux_cpu = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    ttff = None
    sink = open_sink(spec["mp4"], spec["fps"])
    write_s = 0.0
    for chunk in engine.stream(cfg):
        if ttff is None:
            ttff = time.perf_counter() - t0
        tw = time.perf_counter()
        sink.write(chunk.frames)
        ta, ca = time.perf_counter(), time.process_time()
        side.write(chunk.frames)
        aux += time.perf_counter() - ta
        aux_cpu += time.process_time() - ca
        write_s += ta - tw
    tw = time.perf_counter()
    sink.close()
    t_end, c_end = time.perf_counter(), time.process_time()
    write_s += t_end - tw
    written = time.time()
    peak = _rss_peak_bytes()
    side.close()
    gen = t_end - t0 - aux
    return {"load_s": load_s, "gen_s": gen, "gen_cpu_s": c_end - c0 - aux_cpu, "ttff_s": ttff, "write_s": write_s,
            "whole_s": written - t_spawn - aux, "ttff_process_s": written - t_spawn - aux - gen + ttff,
            "peak_rss_bytes": peak, "model_calls": engine.model_calls, "attn_tokens": counter.attn_tokens,
            "ffn_tokens": counter.ffn_tokens, "frames_out": side.frames_written}


def child(spec_text: str) -> None:
    spec = json.loads(spec_text)
    import diffusers
    import torch
    import transformers

    torch.set_num_threads(spec["threads"])
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    if spec["row"] == "probe-hooks":
        out = probe_hooks(spec)
    elif spec["row"].startswith("diffusers"):
        out = _diffusers_child(spec, spec["t_spawn"])
    else:
        out = _arvideo_child(spec, spec["t_spawn"])
    print("RESULT " + json.dumps(out), flush=True)


IN_PROCESS = False  # --in-process (tests): rows run in this process; peak RSS is then not per row


def run_child(spec: dict) -> dict:
    """One subprocess; its result, or {"error": ...} with the tail of its stderr."""
    if IN_PROCESS:
        import io
        from contextlib import redirect_stdout

        buf = io.StringIO()
        try:
            with redirect_stdout(buf):
                child(json.dumps(dict(spec, t_spawn=time.time())))
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        return json.loads(buf.getvalue().split("RESULT ", 1)[1])
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["OMP_NUM_THREADS"] = str(spec["threads"])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    spec = dict(spec, t_spawn=time.time())
    proc = subprocess.run([sys.executable, str(SCRIPT), "--child", json.dumps(spec)], capture_output=True,
                          text=True, cwd=ROOT, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"error": f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["(no output)"])[-1],
            "stderr_tail": proc.stderr[-2000:]}


# -- parent ----------------------------------------------------------------------------------------------
def score(run: dict, ref: dict | None, caption: str, first_n: int) -> dict:
    import numpy as np

    from arvideo.caching.fidelity import psnr, ssim
    from arvideo.world.metrics import score_video

    video = np.load(run["npy"])
    out = dict(score_video(video, caption))
    if ref is not None and "npy" in ref and Path(ref["npy"]).is_file():
        other = np.load(ref["npy"])
        n = min(len(video), len(other))
        out.update(psnr=psnr(video[:n], other[:n]), ssim=ssim(video[:n], other[:n]),
                   psnr_first=psnr(video[:first_n], other[:first_n]), ssim_first=ssim(video[:first_n], other[:first_n]))
    return out


def _mean(vals):
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(sum(vals) / len(vals)) if vals else None


def arvideo_sampler(row: str, mode: str = "preset") -> str:
    """The sampler an arvideo row runs: its own, its preset's (mode "preset"), or UniPC (mode "unipc")."""
    from arvideo.caching import preset_sampler

    preset, sampler = ARVIDEO_ROWS[row]
    if sampler is not None:
        return sampler
    return "unipc" if mode == "unipc" else (preset_sampler(preset) or "unipc")


def reference_of(row: str, mode: str = "preset") -> str:
    """The uncached row a row's PSNR/SSIM is measured against: diffusers for diffusers' rows, the arvideo
    row without a cache on the same sampler for arvideo's."""
    if not row.startswith("arvideo"):
        return "diffusers"
    return row if ARVIDEO_ROWS[row][0] == "none" else UNCACHED_BY_SAMPLER[arvideo_sampler(row, mode)]


def summarise(runs: list[dict], rows: list[str], mode: str = "preset") -> list[dict]:
    out = []
    keys = ("whole_s", "gen_s", "gen_cpu_s", "ttff_s", "ttff_process_s", "load_s", "write_s", "peak_rss_mib", "model_calls",
            "attn_tokens", "ffn_tokens", "psnr_first", "ssim_first", "psnr", "ssim", *WORLD)
    for row in rows:
        group = [r for r in runs if r["row"] == row]
        ok = [r for r in group if "error" not in r and "refused" not in r]
        ref = reference_of(row, mode)
        s = {"row": row, "reference": ref, "captions": len(ok)}
        if row.startswith("arvideo"):
            s["sampler"] = arvideo_sampler(row, mode)
        if not ok:
            bad = next((r for r in group if "refused" in r or "error" in r), None)
            s["status"] = ("refused: " + bad["refused"]) if bad and "refused" in bad else (
                "error: " + bad["error"] if bad else "not run")
            out.append(s)
            continue
        s["status"] = "ok" if len(ok) == len(group) else f"{len(group) - len(ok)} run(s) failed"
        for k in keys:
            s[k] = _mean([r.get(k) for r in ok])
        s["frames"] = ok[0]["frames_out"]
        if ref == row:  # the reference itself
            s.update(psnr=math.inf, ssim=1.0, psnr_first=math.inf, ssim_first=1.0)
        out.append(s)
    base = next((s for s in out if s["row"] == "diffusers" and s.get("gen_s")), None)
    for s in out:
        if base and s.get("gen_s"):
            s["speedup_vs_diffusers"] = base["gen_s"] / s["gen_s"]
            s["speedup_whole_vs_diffusers"] = base["whole_s"] / s["whole_s"]
            if base.get("gen_cpu_s") and s.get("gen_cpu_s"):
                s["cpu_time_ratio_vs_diffusers"] = base["gen_cpu_s"] / s["gen_cpu_s"]
            s["attn_tokens_vs_diffusers"] = s["attn_tokens"] / base["attn_tokens"] if base["attn_tokens"] else None
    return out


def _f(v, fmt="{:.2f}") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf (ref)"
    return fmt.format(v)


def meta_info(args, argv, prog: str) -> dict:
    import diffusers
    import torch

    try:
        from bench_caching import device_line  # scripts/ is on sys.path (see the bottom of this file)

        device = device_line()
    except Exception:
        device = platform.processor() or platform.machine()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(), "python": platform.python_version(), "device": device,
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "threads_per_process": args.threads, "loadavg_start": list(os.getloadavg()),
        "command": f"{prog} " + " ".join(argv),
    }


def _model_label(model: Path) -> str:
    return str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else str(model)


def markdown(cpu: dict) -> str:
    m, st = cpu["meta"], cpu["settings"]
    arv = [r for r in cpu["rows"] if r.get("sampler")]
    samplers = "UniPC for diffusers' rows (the pipeline's scheduler)" + "".join(
        f", {r['sampler'].replace('unipc', 'UniPC').replace('euler', 'Euler')} for `{r['row']}`"
        + (f" (PSNR against `{r['reference']}`)" if r["reference"] != r["row"] else "") for r in arv)
    lines = [
        f"Measured {m['date']} on {m['device']} ({m['cpu_count']} CPUs, {m['platform']}); torch {m['torch']}, "
        f"diffusers {m['diffusers']}; {m['threads_per_process']} torch thread per process; load average "
        f"{m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at the end.",
        "",
        f"Command: `{m['command']}`",
        "",
        f"Model `{cpu['model']}`; {cpu['captions']} held-out caption(s) (world seeds {cpu['seeds']}); "
        f"{cpu['frames']} frames (requested {cpu['frames_requested']}); {st['steps']} steps in every row, "
        f"{samplers}; guidance "
        f"{st['guidance_scale']}; diffusers windows: base_num_frames {st['base_num_frames']}, overlap_history "
        f"{st['overlap_history']}, addnoise_condition {st['addnoise_condition']}, causal_block_size "
        f"{st['causal_block_size']}, ar_step {st['ar_step']}. First chunk = the first {cpu['first_chunk_frames']} "
        "frames (causal_block_size x VAE temporal factor).",
        "",
        "| row | whole process s | gen+decode+write s | speedup vs diffusers | its CPU s | TTFF s | peak RSS MiB | model calls "
        "| attn tokens vs diffusers "
        "| first PSNR | first SSIM | PSNR | SSIM | adherence | persistence | smoothness | spurious | background "
        "| flicker | status |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | --- |",
    ]
    for s in cpu["rows"]:
        if not s.get("gen_s"):
            lines.append(f"| {s['row']} |" + " - |" * 18 + f" {s['status']} |")
            continue
        lines.append(
            f"| {s['row']} | {s['whole_s']:.1f} | {s['gen_s']:.1f} | {_f(s.get('speedup_vs_diffusers'))} | "
            f"{_f(s.get('gen_cpu_s'), '{:.1f}')} | {s['ttff_s']:.2f} | "
            f"{s['peak_rss_mib']:.0f} | {s['model_calls']:.0f} | {_f(s.get('attn_tokens_vs_diffusers'))} | "
            f"{_f(s.get('psnr_first'), '{:.1f}')} | {_f(s.get('ssim_first'), '{:.3f}')} | "
            f"{_f(s.get('psnr'), '{:.1f}')} | {_f(s.get('ssim'), '{:.3f}')} | "
            + " | ".join(_f(s.get(k), "{:.3f}") for k in WORLD) + f" | {s['status']} |")
    r = cpu
    lines += [
        "",
        f"arvideo-fast vs diffusers: speedup {_f(r['speedup_vs_diffusers'])}x (gen+decode+write, model loaded; "
        f"whole process {_f(r['speedup_whole_vs_diffusers'])}x; in CPU time of generation + decode + write "
        f"{_f(r.get('cpu_time_ratio_vs_diffusers'))}x), time to first frame ratio "
        f"{_f(r['ttff_ratio_vs_diffusers'], '{:.3f}')}, peak memory ratio {_f(r['peak_mem_ratio_vs_diffusers'], '{:.3f}')}.",
        "",
        "Columns: whole process = from spawning the subprocess to the mp4 closed (interpreter, imports, loading, "
        "text encoding, denoising, decoding, writing); gen+decode+write = the same without start-up and loading; "
        "speedup vs diffusers = diffusers' gen+decode+write time over the row's; "
        "its CPU s = the CPU time (user + system, all threads) the subprocess spent in that span: above the wall "
        "time where arvideo's decoder ran on its own thread beside generation (decode ahead, the default) on a "
        "free core, which one-thread diffusers has no use for; "
        "TTFF = from the start of generation to the first frame in hand (diffusers: when the pipeline returns, as it "
        "decodes once at the end; arvideo: when the first chunk is yielded); peak RSS = the subprocess's own peak resident set (VmHWM); "
        "model calls = transformer invocations (diffusers calls cond and uncond separately, arvideo batches them "
        "into one call); attn tokens = tokens (all batch rows) the blocks' self-attention actually computed, "
        "relative to diffusers; PSNR/SSIM against the same system's uncached video (cached diffusers rows vs "
        "diffusers, arvideo's cached rows vs arvideo's uncached row on the same sampler); world metrics against "
        "the caption.",
        "",
        "diffusers cache hooks on SkyReelsV2Transformer3DModel:",
        "",
        "| hook | applied | modules hooked | message |",
        "| --- | --- | ---: | --- |",
    ]
    for name, h in cpu["hooks"].items():
        msg = h.get("error") or h.get("note") or ", ".join(h.get("examples", []))
        lines.append(f"| {name} | {'yes' if h.get('applied') else 'refused'} | {h.get('hooked_modules', '-')} "
                     f"| {msg.replace('|', '/')} |")
    return "\n".join(lines)


def markdown_sweep(sweep: dict) -> str:
    m = sweep["meta"]
    lines = [
        f"Measured {m['date']} on {m['device']} ({m['cpu_count']} CPUs); torch {m['torch']}, diffusers "
        f"{m['diffusers']}; load average {m['loadavg_start'][0]:.2f} at the start, {m['loadavg_end'][0]:.2f} at "
        f"the end. Command: `{m['command']}`",
        "",
        f"Caption {sweep['caption']!r} (seed {sweep['seed']}), {sweep['steps']} steps; one subprocess per cell, "
        "peak RSS = its own peak resident set (VmHWM).",
        "",
        "| frames | " + " | ".join(f"{row} peak RSS MiB | {row} gen s" for row in sweep["rows_run"]) + " |",
        "| ---: |" + " ---: | ---: |" * len(sweep["rows_run"]),
    ]
    for frames in sorted({c["frames"] for c in sweep["cells"]}):
        cells = []
        for row in sweep["rows_run"]:
            c = next((c for c in sweep["cells"] if c["frames"] == frames and c["row"] == row), None)
            ok = c is not None and "error" not in c
            cells.append(f"{c['peak_rss_mib']:.0f} | {c['gen_s']:.1f}" if ok else "- | -")
        lines.append(f"| {frames} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_section(path: Path, name: str, text: str) -> None:
    from arvideo.reporting import write_marked_section

    write_marked_section(path, f"<!-- {name}:start -->", f"<!-- {name}:end -->", text, header="# Benchmarks\n")


def load_json(path: Path) -> dict:
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("cpu", {})
    if data.get("gpu") is None:
        data["gpu"] = None
        data["gpu_note"] = "not measured: no GPU lent"
    return data


def save_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(v):  # JSON has no inf: written as the string "inf"
        if isinstance(v, float) and math.isinf(v):
            return "inf"
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    path.write_text(json.dumps(clean(data), indent=1) + "\n")


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _base_spec(args, s: dict, frames: int) -> dict:
    return {"model": str(args.model), "threads": args.threads, "frames": frames,
            "arvideo_set": list(args.arvideo_set or []), **{k: s[k] for k in (
        "steps", "guidance_scale", "fps", "height", "width", "causal_block_size", "base_num_frames",
        "overlap_history", "addnoise_condition", "ar_step", "max_sequence_length", "prompt_grammar",
        "negative_prompt")}}


def _row_spec(base: dict, row: str, seed: int, caption: str, work: Path, mode: str = "preset") -> dict:
    tag = f"{row.replace('+', '_')}_{seed}_{base['frames']}"
    spec = dict(base, row=row, seed=seed, caption=caption, mp4=str(work / f"{tag}.mp4"), npy=str(work / f"{tag}.npy"))
    if row.startswith("arvideo"):
        spec["cache"] = ARVIDEO_ROWS[row][0]
        spec["sampler"] = arvideo_sampler(row, mode)
    return spec


def run_main(args, s: dict, data: dict, meta: dict, work: Path) -> None:
    from arvideo.evaluate import heldout_captions

    frames = aligned_frames(args.frames, s)
    base = _base_spec(args, s, frames)
    hooks = run_child(dict(base, row="probe-hooks"))
    mode = args.arvideo_sampler
    rows = list(args.rows)
    for ref in dict.fromkeys(reference_of(r, mode) for r in args.rows):
        if ref not in rows:  # a cached row's PSNR needs its uncached reference
            _log(f"adding row {ref}: the uncached reference of " + ", ".join(
                r for r in args.rows if reference_of(r, mode) == ref))
            rows.append(ref)
    if "diffusers+fbc" in rows and not hooks.get("fbc", {}).get("applied"):
        _log("diffusers+fbc: diffusers refuses first-block cache on this transformer (see hooks)")
    captions = heldout_captions(args.captions, args.seed_offset)
    first_n = s["causal_block_size"] * s["vae_temporal_factor"]
    runs: list[dict] = []
    for i, (seed, caption) in enumerate(captions):
        order = rows[i % len(rows):] + rows[: i % len(rows)]  # rotated per caption: noise hits all rows alike
        for row in order:
            spec = _row_spec(base, row, seed, caption, work, mode)
            load = os.getloadavg()[0]
            res = run_child(spec)
            run = {"row": row, "seed": seed, "caption": caption, "loadavg_at_start": load, **res}
            if "error" not in res and "refused" not in res:
                run["npy"] = spec["npy"]
                run["peak_rss_mib"] = res["peak_rss_bytes"] / 2**20
            runs.append(run)
            _log(f"seed {seed} {row:22s} " + (
                f"gen {res['gen_s']:.1f} s, ttff {res['ttff_s']:.2f} s, peak {res['peak_rss_bytes'] / 2**20:.0f} MiB, "
                f"{res['model_calls']} calls" if "gen_s" in res else res.get("refused") or res.get("error")))
        for run in runs:
            if run["seed"] == seed and "npy" in run:
                ref = next((r for r in runs if r["seed"] == seed and r["row"] == reference_of(run["row"], mode)), None)
                run.update(score(run, None if ref is run else ref, caption, first_n))
    summary = summarise(runs, rows, mode)
    by = {x["row"]: x for x in summary}
    d, fast = by.get("diffusers", {}), by.get("arvideo-fast", {})
    both = bool(d.get("gen_s")) and bool(fast.get("gen_s"))
    for run in runs:
        run.pop("npy", None)
    meta["loadavg_end"] = list(os.getloadavg())
    cpu = data["cpu"]
    cpu.update({
        "meta": meta, "model": _model_label(args.model), "frames": frames, "frames_requested": args.frames,
        "captions": len(captions), "seeds": f"{captions[0][0]}..{captions[-1][0]}",
        "first_chunk_frames": first_n, "settings": {k: s[k] for k in (
            "steps", "guidance_scale", "fps", "height", "width", "causal_block_size", "vae_temporal_factor",
            "base_num_frames", "overlap_history", "addnoise_condition", "ar_step")},
        "hook_settings": {"taylorseer": TAYLORSEER, "pab": {**PAB, "current_timestep_callback": "max of the row"},
                          "fbc": FBC, "magcache": MAGCACHE},
        "arvideo_sampler": mode,
        "speedup_basis": "gen+decode+write wall time, model loaded, mean over captions (diffusers / arvideo-fast)",
        "speedup_vs_diffusers": d["gen_s"] / fast["gen_s"] if both else None,
        "speedup_whole_vs_diffusers": d["whole_s"] / fast["whole_s"] if both else None,
        "cpu_time_ratio_vs_diffusers": fast.get("cpu_time_ratio_vs_diffusers") if both else None,
        "ttff_ratio_vs_diffusers": fast["ttff_s"] / d["ttff_s"] if both else None,
        "peak_mem_ratio_vs_diffusers": fast["peak_rss_mib"] / d["peak_rss_mib"] if both else None,
        "peak_mem_source": "main run, mean peak RSS over captions (a later --memory-sweep replaces it)",
        "hooks": hooks, "rows": summary, "runs": runs,
    })
    text = markdown(cpu)
    print(text)
    write_section(Path(args.doc), "peers", text)


def run_sweep(args, s: dict, data: dict, meta: dict, work: Path) -> None:
    from arvideo.evaluate import heldout_captions

    seed, caption = heldout_captions(1, args.seed_offset)[0]
    rows = [r for r in ("diffusers", "arvideo-fast") if r in args.rows] or ["diffusers", "arvideo-fast"]
    cells = []
    for requested in args.memory_sweep:
        frames = aligned_frames(requested, s)
        base = _base_spec(args, s, frames)
        for row in rows:
            res = run_child(_row_spec(base, row, seed, caption, work))
            cell = {"row": row, "frames_requested": requested, "frames": frames}
            if "gen_s" in res:
                cell.update(peak_rss_mib=res["peak_rss_bytes"] / 2**20, gen_s=res["gen_s"], ttff_s=res["ttff_s"],
                            whole_s=res["whole_s"], model_calls=res["model_calls"])
            else:
                cell["error"] = res.get("refused") or res.get("error")
            cells.append(cell)
            _log(f"{frames} frames {row:14s} " + (f"peak {cell['peak_rss_mib']:.0f} MiB, gen {cell['gen_s']:.1f} s"
                                                   if "gen_s" in cell else cell["error"]))
    meta["loadavg_end"] = list(os.getloadavg())
    sweep = {"meta": meta, "model": _model_label(args.model), "caption": caption, "seed": seed,
             "steps": s["steps"], "rows_run": rows, "cells": cells}
    data["cpu"]["memory_sweep"] = sweep
    # The sweep's runs are the dedicated memory measurement: where it covers the main run's
    # frame count, its diffusers / arvideo-fast ratio is the one quoted.
    at = {c["row"]: c for c in cells if c["frames"] == data["cpu"].get("frames") and "peak_rss_mib" in c}
    if "diffusers" in at and "arvideo-fast" in at:
        data["cpu"]["peak_mem_ratio_vs_diffusers"] = at["arvideo-fast"]["peak_rss_mib"] / at["diffusers"]["peak_rss_mib"]
        data["cpu"]["peak_mem_source"] = f"memory sweep at {data['cpu']['frames']} frames"
    text = markdown_sweep(sweep)
    print(text)
    write_section(Path(args.doc), "peers-memory", text)


def main(argv: list[str] | None = None, prog: str = "python scripts/bench_peers.py") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "shapes-df"), help="model folder (diffusers layout)")
    p.add_argument("--frames", type=int, default=320,
                   help="video frames (rounded down to what diffusers' windows cover without a noise tail)")
    p.add_argument("--captions", type=int, default=4, help="held-out captions (world seeds from --seed-offset)")
    p.add_argument("--seed-offset", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help=f"comma-separated subset of {', '.join(ALL_ROWS)}")
    p.add_argument("--base-num-frames", type=int, default=None,
                   help="diffusers window (default: arvideo.json train_clip_latent_frames in video frames)")
    p.add_argument("--overlap-history", type=int, default=None, help="diffusers overlap (default: about half a window)")
    p.add_argument("--memory-sweep", default=None, metavar="F1,F2,...",
                   help="instead: peak RSS of diffusers and arvideo-fast at these frame counts (one caption)")
    p.add_argument("--quick", action="store_true", help="smoke run: 48 frames, 1 caption, 4 steps")
    p.add_argument("--threads", type=int, default=1, help="torch threads per subprocess")
    p.add_argument("--arvideo-set", nargs="+", default=None, metavar="KEY=VALUE",
                   help="config overrides for every arvideo row, e.g. kv.pool_width=7 (the default before session 17)")
    p.add_argument("--out-json", default=str(JSON))
    p.add_argument("--doc", default=str(DOC))
    p.add_argument("--keep-videos", default=None, metavar="DIR", help="keep every row's mp4 (and npy) here")
    p.add_argument("--arvideo-sampler", choices=("preset", "unipc"), default="preset",
                   help="sampler of the cached arvideo rows: their presets' own (default; Euler for fast and quality) "
                   "or UniPC like diffusers (then measured against arvideo-full)")
    p.add_argument("--in-process", action="store_true",
                   help="tests only: run every row in this process (fast; peak RSS is then not per row)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return 0
    global IN_PROCESS
    IN_PROCESS = args.in_process
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args.model = Path(args.model).resolve()
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ALL_ROWS]
    if unknown:
        p.error(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ALL_ROWS)}")
    if args.quick:
        args.frames, args.captions, args.steps = min(args.frames, 48), 1, args.steps or 4
    if args.memory_sweep:
        args.memory_sweep = [int(x) for x in args.memory_sweep.split(",") if x.strip()]
    import torch

    torch.set_num_threads(args.threads)
    s = model_settings(args.model, args.steps, args.base_num_frames, args.overlap_history)
    data = load_json(Path(args.out_json))
    meta = meta_info(args, argv, prog)
    meta["isolation"] = "in-process (test run: peak RSS is not per row)" if args.in_process else "one subprocess per run"
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        work = Path(args.keep_videos) if args.keep_videos else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.memory_sweep:
            run_sweep(args, s, data, meta, work)
        else:
            run_main(args, s, data, meta, work)
    save_json(Path(args.out_json), data)
    return 0


if str(SCRIPT.parent) not in sys.path:  # bench_caching's helpers, also when loaded by `arvideo bench peers`
    sys.path.insert(0, str(SCRIPT.parent))

if __name__ == "__main__":
    sys.exit(main())
