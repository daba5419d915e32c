"""Memory planning of a batch: per-job estimates, KV caps and concurrency, and their description."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from .jobs import Job, _meta_engine


def describe_plan(plan, jobs: list[Job]) -> str:
    from ..memory import format_size

    lines = []
    for job, jp in zip(jobs, plan.jobs):
        cap = f"; KV bounded to a {jp.kv_budget_frames}-latent-frame window to fit" if jp.kv_budget_frames else ""
        lines.append(f"  {job.name}: {jp.estimate.describe()}{cap}")
    bound = f" under --max-memory {format_size(plan.limit)}" if plan.limit else ""
    lines.insert(0, f"memory plan: {plan.parallel} job(s) at a time{bound}; estimated peak {format_size(plan.peak)} "
                    f"(process {format_size(plan.baseline)} + weights {format_size(plan.weights)} + jobs)")
    return "\n".join(lines)


def plan_jobs(jobs: list[Job], limit: int | None, max_parallel: int | None, *, baseline: int,
              separate_processes: bool = False, save_state: bool = True):
    """Estimates every job (meta device: no weights loaded) and plans KV caps and concurrency.

    Jobs whose model folder is missing are left out (they fail when run). With
    `separate_processes` (Ray) each job carries its own copy of the weights.
    Returns (plan, jobs with any KV caps applied).
    """
    from ..memory import (
        MemoryEstimate,
        estimate_request,
        plan_batch,
        weight_bytes,
        with_kv_cap,
    )

    engines: dict[str | None, Any] = {}
    weights: dict[tuple, int] = {}
    estimates: list[MemoryEstimate] = []
    for job in jobs:
        engine = _meta_engine(engines, job.model)
        if engine is None:
            estimates.append(MemoryEstimate(0, 0, 0, 0, 0, 0))
            continue
        key = (job.model, job.cfg.dtype)
        if key not in weights:
            weights[key] = weight_bytes(engine.model.path, job.cfg.dtype)
        est = estimate_request(engine, job.cfg, weights[key], save_state=save_state)
        if separate_processes:  # every worker holds its own weights: count them per job
            est = replace(est, other=est.other + est.weights)
        estimates.append(est)
    shared = {} if separate_processes else {str(k): v for k, v in weights.items()}
    cappable, mins, maxs = [], [], []
    for job in jobs:
        engine = engines[job.model]
        if engine is None:
            cappable.append(False), mins.append(1), maxs.append(1)
            continue
        r = engine.resolve(job.cfg)
        cappable.append(job.kv_default and r.cfg.kv.policy == "full" and r.cfg.schedule.name != "window")
        mins.append(r.block)
        maxs.append(r.latent_frames)

    def recap(i: int, frames: int):
        job = jobs[i]
        est = estimate_request(engines[job.model], with_kv_cap(job.cfg, frames), estimates[i].weights,
                               save_state=save_state)
        return replace(est, other=est.other + est.weights) if separate_processes else est

    plan = plan_batch(estimates, shared, limit, baseline, max_parallel, recap=recap, cappable=cappable,
                      min_frames=mins, max_frames=maxs)
    capped = [replace(j, cfg=with_kv_cap(j.cfg, jp.kv_budget_frames)) if jp.kv_budget_frames else j
              for j, jp in zip(jobs, plan.jobs)]
    return plan, capped
