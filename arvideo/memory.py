"""Memory planning for batches: what one request needs at its peak, and how many fit under a bound.

An estimate is computed before any weight is loaded: the model folder's configs are
instantiated on PyTorch's `meta` device (shapes, no storage) and its safetensors headers
give the parameter counts. Per request it adds up

- weights: every component the engine puts on the device (transformer in the request's
  dtype, VAE in float32, text encoder as stored); shared by the jobs of one process;
- kv: the KV store at its largest (a `full` store doubles its capacity as it grows, so its
  capacity is simulated chunk by chunk) plus the K/V that skipping cache policies keep;
- decoder: the VAE's causal cache plus the activations of decoding one latent frame,
  measured by running the decoder on meta tensors at a small size and scaling by area;
- activations: the largest live set of one backbone call (one layer at a time, no grad);
- state: the CPU copy of the committed K/V a resumable snapshot takes (CPU devices only);
- other: in-flight latents, one chunk of frames, the mp4 encoder, 64 MiB of runtime slack,
  and 5% of everything above for loader and allocator overheads.

On a CPU device the bound is the process's peak resident memory, so the planner adds the
process's own resident memory at planning time (Python, torch, libraries); on CUDA it is
the allocator's peak (`torch.cuda.max_memory_allocated`). `PeakMeter` measures either.
"""
from __future__ import annotations

import json
import math
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .config import GenerateConfig
from .errors import ConfigError

_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
# activations of one call are summed from the tensors alive at once; allocator slack on top
_ACTIVATION_MARGIN = 1.25
_RUNTIME_SLACK = 64 * 2**20  # lazily created thread pools, codec contexts, PNG encoders
_OVERALL_MARGIN = 0.05


def parse_size(text: str | int) -> int:
    """'8G', '8GB', '8GiB', '512M', '1.5g', '1000000' -> bytes (binary units: G = 2**30)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(text))
    if not m:
        raise ConfigError(f"cannot read size {text!r}; write it like 8G, 8GB, 512M or 1.5GiB (binary units)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(n: float) -> str:
    """Bytes as a short binary-unit string: 1.5 GiB, 640 MiB, 12 KiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}" if n / size < 100 else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


# -- model sizes without loading weights -----------------------------------------------------
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
             "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def stored_parameters(folder: Path) -> tuple[int, int]:
    """(parameter count, stored bytes) of a component folder, from its safetensors headers."""
    numel = stored = 0
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            n = math.prod(entry["shape"])
            numel += n
            stored += n * _ST_BYTES.get(entry["dtype"], 4)
    if numel == 0:  # .bin checkpoints: take the file sizes
        stored = sum(f.stat().st_size for f in folder.glob("*.bin"))
        numel = stored // 4
    return numel, stored


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes of the weights `load_model` puts on the device for this folder and dtype."""
    from .model import DTYPES

    total = 0
    t_numel, _ = stored_parameters(model_dir / "transformer")
    total += t_numel * torch.empty((), dtype=DTYPES[dtype]).element_size()
    v_numel, _ = stored_parameters(model_dir / "vae")
    total += v_numel * 4  # the VAE is always loaded in float32
    if (model_dir / "text_encoder" / "config.json").is_file():
        total += stored_parameters(model_dir / "text_encoder")[1]  # transformers loads as stored
    return total


def meta_bundle(path: str | Path | None):
    """A ModelBundle whose modules live on the meta device: resolves requests, costs nothing."""
    from diffusers import AutoencoderKLWan, SkyReelsV2Transformer3DModel

    from .model import EMBEDDED_MODEL, ModelBundle, check_model_folder

    root = Path(path) if path is not None else EMBEDDED_MODEL
    check_model_folder(root)
    with torch.device("meta"):
        transformer = SkyReelsV2Transformer3DModel.from_config(
            SkyReelsV2Transformer3DModel.load_config(root / "transformer"))
        vae = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(root / "vae"))
    defaults = json.loads((root / "arvideo.json").read_text()) if (root / "arvideo.json").is_file() else {}
    sched = root / "scheduler" / "scheduler_config.json"
    scheduler_config = json.loads(sched.read_text()) if sched.is_file() else {}
    return ModelBundle(root, transformer.eval(), vae.eval(), None, scheduler_config, defaults)


# -- one request ----------------------------------------------------------------------------------
@dataclass
class MemoryEstimate:
    """Peak bytes of one request, by component (see the module docstring)."""

    weights: int
    kv: int
    decoder: int
    activations: int
    state: int
    other: int

    @property
    def dynamic(self) -> int:
        """Everything but the weights: what each additional concurrent job adds."""
        return self.kv + self.decoder + self.activations + self.state + self.other

    def describe(self) -> str:
        parts = [("weights", self.weights), ("KV", self.kv), ("decoder", self.decoder),
                 ("activations", self.activations), ("state copy", self.state), ("other", self.other)]
        return " + ".join(f"{name} {format_size(v)}" for name, v in parts if v)


def _kv_tokens(sched, tokens_per_frame: int, policy: str, budget_tokens: int | None) -> tuple[int, int]:
    """(largest capacity, most committed tokens) of the KV store over the whole schedule.

    Replays the schedule's ticks (lazily, O(in flight) each) through `KVStore`'s rules: a call
    reserves room for its commits and active chunks after the committed tokens, a `full` store
    grows to max(need, 2 x capacity), a bounded one evicts the oldest chunks down to its budget.
    """
    def frames(i: int) -> int:
        start, end = sched.chunk_frames(i)
        return end - start

    scratch = (sched.max_in_flight + 1) * max(frames(0), 1) * tokens_per_frame
    capacity = max((budget_tokens or 0) + scratch, 1)
    committed = peak_committed = 0
    held: list[int] = []
    for tick in sched.ticks():
        commit = [frames(i) * tokens_per_frame for i in tick.commit]
        call = sum(commit) + sum(frames(i) for i, _ in tick.active) * tokens_per_frame
        need = committed + call
        if need > capacity:
            capacity = max(need, 2 * capacity) if budget_tokens is None else need
        held += commit
        committed += sum(commit)
        if budget_tokens is not None:
            keep_first = 1 if policy == "sink-window" else 0
            while committed > budget_tokens and len(held) > keep_first + 1:
                committed -= held.pop(keep_first)
        peak_committed = max(peak_committed, committed)
    return capacity, peak_committed


def decoder_bytes(vae: torch.nn.Module, latent_height: int, latent_width: int, cpu: bool = True) -> int:
    """Causal cache + activations of decoding one latent frame, from a meta-device probe.

    On CPU a 3D convolution unfolds its input (vol2col: in_channels x kernel volume x output
    positions), which dominates the VAE's peak; cuDNN works in place or in a bounded workspace.
    """
    from .vae import StreamingDecoder

    probe_hw = 4
    peak = [0]

    def hook(module, inputs, output):
        size = 2 * sum(t.numel() * t.element_size() for t in inputs if isinstance(t, torch.Tensor))  # + padded copy
        if isinstance(output, torch.Tensor):
            size += output.numel() * output.element_size()
            if cpu and isinstance(module, torch.nn.Conv3d):
                positions = output.numel() // output.shape[1]
                size += module.in_channels * math.prod(module.kernel_size) * positions * output.element_size()
        peak[0] = max(peak[0], size)

    meta_vae = vae if next(vae.parameters()).is_meta else None
    if meta_vae is None:
        with torch.device("meta"):
            meta_vae = type(vae).from_config(vae.config)
    handles = [m.register_forward_hook(hook) for m in meta_vae.decoder.modules()]
    try:
        decoder = StreamingDecoder(meta_vae)
        z = torch.zeros(1, meta_vae.config.z_dim, 2, probe_hw, probe_hw, device="meta")
        decoder.decode_tensor(z)  # the second latent frame is the expensive one (temporal upsampling)
        cache = decoder.cache_bytes
    finally:
        for h in handles:
            h.remove()
    scale = latent_height * latent_width / probe_hw**2
    return int((cache + peak[0] * _ACTIVATION_MARGIN) * scale)


def estimate_request(engine, cfg: GenerateConfig, weights: int, *, save_state: bool = True) -> MemoryEstimate:
    """Peak memory of one request on `engine` (a meta engine is enough: nothing is computed)."""
    from .model import DTYPES

    r = engine.resolve(cfg)
    sched = engine.make_schedule(r)
    tcfg = engine.model.transformer.config
    elem = torch.empty((), dtype=DTYPES[r.cfg.dtype]).element_size()
    batch = 2 if r.guidance > 1 else 1
    lay = engine.backbone.kv_layout(r.latent_height, r.latent_width)
    tpf = lay.tokens_per_frame
    d_model = lay.heads * lay.head_dim
    per_token = lay.num_layers * 2 * batch * lay.heads * lay.head_dim * elem
    window = r.cfg.schedule.name == "window"
    if window:
        kv = kept = 0
        call_tokens = min(r.latent_frames, sched.num_chunks * r.block) * tpf
        if r.cfg.schedule.base_num_frames:
            call_tokens = min(call_tokens, ((r.cfg.schedule.base_num_frames - 1) // engine.model.temporal_factor + 1) * tpf)
        committed = 0
    else:
        kvc = r.cfg.kv
        budget = kvc.budget_frames * tpf if kvc.policy != "full" and kvc.budget_frames else None
        capacity, committed = _kv_tokens(sched, tpf, kvc.policy, budget)
        kv = capacity * per_token + capacity * per_token // (2 * lay.num_layers)  # + one buffer mid-growth
        kept = 0 if r.cfg.cache.preset in ("none", None) else sched.max_in_flight * r.block * tpf * per_token
        call_tokens = (sched.max_in_flight + 1) * r.block * tpf
    kv += kept
    # one layer of one call: x, q/k/v, float64 rotary temporaries, attention outputs, the FFN
    ffn = tcfg.ffn_dim
    per_call_token = max(d_model * (6 * elem + 16), d_model * (2 * elem + 8) + 2 * ffn * elem)
    text_tokens = int(engine.model.defaults.get("max_sequence_length", 512))
    activations = batch * (call_tokens * per_call_token + text_tokens * d_model * 4 * elem)
    activations += 2 * call_tokens * (tcfg.attention_head_dim * 8)  # rotary tables, float64
    activations = int(activations * _ACTIVATION_MARGIN)
    decoder = decoder_bytes(engine.model.vae, r.latent_height, r.latent_width, str(r.cfg.device).startswith("cpu"))
    height, width = r.cfg.height, r.cfg.width
    chunk_frames = r.block * engine.model.temporal_factor
    frames = chunk_frames * height * width * 3  # uint8 chunk, handed to the sinks
    encoder = 24 * height * width * 3 // 2  # x264 reference and lookahead frames (yuv420p)
    latents = sched.max_in_flight * r.block * r.channels * r.latent_height * r.latent_width * 4 * 6
    state = committed * per_token if save_state and not window and str(r.cfg.device).startswith("cpu") else 0
    other = frames * 2 + encoder + latents + _RUNTIME_SLACK
    # loader and allocator overheads nothing above names (measured: +0.8% on a 1.3 GiB run)
    other += int(_OVERALL_MARGIN * (weights + kv + decoder + activations + state))
    return MemoryEstimate(weights, kv, decoder, activations, state, other)


def with_kv_cap(cfg: GenerateConfig, budget_frames: int) -> GenerateConfig:
    """The request with its KV store bounded to a sliding window of `budget_frames` latent frames."""
    return replace(cfg, kv=replace(cfg.kv, policy="window", budget_frames=budget_frames))


# -- a batch ---------------------------------------------------------------------------------------
@dataclass
class JobPlan:
    """One job's estimate, and the KV cap the planner chose for it (None: as requested)."""

    estimate: MemoryEstimate
    kv_budget_frames: int | None = None


@dataclass
class Plan:
    """How a batch runs under a memory bound."""

    limit: int | None
    baseline: int
    weights: int
    parallel: int
    jobs: list[JobPlan]

    @property
    def peak(self) -> int:
        """Estimated peak: baseline + resident weights + the `parallel` largest jobs."""
        largest = sorted((j.estimate.dynamic for j in self.jobs), reverse=True)[: self.parallel]
        return self.baseline + self.weights + sum(largest)


def plan_batch(
    estimates: list[MemoryEstimate],
    weights_by_model: dict[str, int],
    limit: int | None,
    baseline: int,
    max_parallel: int | None,
    *,
    recap: Callable[[int, int], MemoryEstimate | None] | None = None,
    cappable: list[bool] | None = None,
    min_frames: list[int] | None = None,
    max_frames: list[int] | None = None,
) -> Plan:
    """Chooses KV caps and concurrency so the estimated peak stays under `limit`, or raises.

    recap(job, frames) re-estimates job `job` with its KV store capped at `frames` latent
    frames; it is used only for jobs marked `cappable` (their KV policy was left to the
    default `full`), and only when the job would not fit alone otherwise.
    max_parallel: the most jobs to run at once (None: as many as fit, when a limit is given).
    """
    weights = sum(weights_by_model.values())
    jobs = [JobPlan(e) for e in estimates]
    if limit is None:
        return Plan(None, baseline, weights, max(1, max_parallel or 1), jobs)
    room = limit - baseline - weights
    for i, jp in enumerate(jobs):
        if jp.estimate.dynamic <= room:
            continue
        if recap is not None and cappable and cappable[i]:
            lo, hi, best = min_frames[i], max_frames[i] - 1, None
            while lo <= hi:  # the largest window that fits
                mid = (lo + hi) // 2
                est = recap(i, mid)
                if est is not None and est.dynamic <= room:
                    best, lo = (mid, est), mid + 1
                else:
                    hi = mid - 1
            if best is not None:
                jobs[i] = JobPlan(best[1], best[0])
                continue
        need = baseline + weights + jp.estimate.dynamic
        raise ConfigError(
            f"--max-memory {format_size(limit)} is too small: job {i + 1} alone needs about {format_size(need)} "
            f"(process {format_size(baseline)} + weights {format_size(weights)} + "
            f"{jp.estimate.describe().replace('weights ' + format_size(jp.estimate.weights) + ' + ', '')}); "
            f"the whole batch would fit one job at a time in --max-memory {format_size(_needed_for(jobs, baseline, weights, 1))}"
            + ("" if not (cappable and cappable[i]) else "; even a one-chunk KV window does not fit")
            + ", or lower frames/height/width"
        )
    dyn = sorted((j.estimate.dynamic for j in jobs), reverse=True)
    parallel, total = 0, 0
    for d in dyn[: max_parallel or len(dyn)]:
        if total + d > room:
            break
        parallel, total = parallel + 1, total + d
    return Plan(limit, baseline, weights, max(1, parallel), jobs)


def _needed_for(jobs: list[JobPlan], baseline: int, weights: int, parallel: int) -> int:
    largest = sorted((j.estimate.dynamic for j in jobs), reverse=True)[:parallel]
    return baseline + weights + sum(largest)


# -- measuring --------------------------------------------------------------------------------------
MMAP_THRESHOLD_BYTES = 8 * 2**20
TRIM_THRESHOLD_BYTES = 64 * 2**20


def return_freed_memory_to_the_os(mmap_threshold: int = MMAP_THRESHOLD_BYTES,
                                  trim_threshold: int = TRIM_THRESHOLD_BYTES) -> bool:
    """glibc only: serve allocations of `mmap_threshold` bytes and more with mmap, so freeing them
    lowers the RSS, and keep at most `trim_threshold` free bytes at the top of the heap.

    By default glibc raises its mmap threshold up to 32 MiB as large blocks are freed and then
    keeps freed memory in the heap, where fragmentation decides how much of it is reused: the
    process's resident memory stays at its high-water mark plus fragmentation, and that peak
    varies from run to run (measured on the tiny model at 128x128: +290 MiB retained on a 110 MiB
    working set; on the embedded model, 160 frames, `--cache fast`, before the VAE's oneDNN path:
    peaks of 552-593 MiB over five runs, 537 MiB with this setting). With a fixed threshold,
    blocks above it are mapped and returned on free; the trim threshold stops glibc from
    returning (and faulting back) the heap top on every free, which a fixed mmap threshold
    otherwise does (a 4 MiB threshold with the default trim cost about 20% of the run time).
    Returns whether it applied.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(-3, int(mmap_threshold)))  # M_MMAP_THRESHOLD
        return ok and bool(libc.mallopt(-1, int(trim_threshold)))  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def proc_status_bytes(key: str, pid: int | str = "self") -> int | None:
    """A size field (kB) of /proc/PID/status in bytes (this process by default); None where unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_resident_bytes() -> int:
    """Current resident memory of this process (Linux /proc; 0 where unavailable)."""
    return proc_status_bytes("VmRSS") or 0


def process_peak_bytes() -> int:
    """Peak resident set of this process: VmHWM on Linux (per address space, so a process
    started by another counts only itself), else ru_maxrss. ru_maxrss is not used on Linux
    because it survives exec: a child spawned from a big parent reports the parent's peak."""
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_bytes(device: str = "cpu") -> int:
    """Peak memory so far, without resetting it: the allocator's peak on CUDA, else the process's peak RSS."""
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    return process_peak_bytes()


class PeakMeter:
    """Peak memory since `reset()`: process peak RSS on CPU, allocator peak on CUDA."""

    def __init__(self, device: str = "cpu") -> None:
        self.cuda = str(device).startswith("cuda") and torch.cuda.is_available()
        self.device = torch.device(device) if self.cuda else None
        self.reset()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:  # Linux: writing 5 resets VmHWM to the current RSS
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak(self) -> int:
        return peak_bytes(str(self.device) if self.cuda else "cpu")

    def baseline(self) -> int:
        """What the bound already holds before any job: resident memory (CPU) or allocated bytes (CUDA)."""
        if self.cuda:
            return int(torch.cuda.memory_allocated(self.device))
        return process_resident_bytes()
