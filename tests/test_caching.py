"""Cache policies: the JVP estimate, the schedule DP, exactness at zero threshold, per-chunk decisions."""
import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from arvideo.caching import make_policy_factory, parse_preset
from arvideo.caching.base import PolicyContext
from arvideo.caching.flowcache import FlowCache
from arvideo.caching.meancache import MeanCache, average_velocity, finite_difference_jvp
from arvideo.caching.schedule import pair_shortest_path_schedule, shortest_path_schedule
from arvideo.config import build_config
from arvideo.engine import Engine
from arvideo.errors import ConfigError
from arvideo.model import load_model
from tests.tiny import save_tiny_model_folder

CAPTION = "a small red circle on a black background"
STEPS = 6


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model_folder(tmp_path_factory.mktemp("model") / "tiny", defaults={"steps": STEPS})


@pytest.fixture(scope="module")
def engine(folder):
    return Engine(load_model(folder))


@pytest.fixture(scope="module")
def references():
    return {}


def _cfg(preset="none", frames=13, **over):
    overrides = [f"{k.replace('__', '.')}={v}" for k, v in over.items()]
    cfg = build_config(prompt=CAPTION, frames=frames, seed=3, overrides=overrides)
    return replace(cfg, cache=replace(cfg.cache, preset=preset))  # a preset may be a factory object


# -- MeanCache's estimator --------------------------------------------------------------------
def test_jvp_average_velocity_is_exact_for_a_velocity_linear_in_time():
    # dz/dsigma = a + b sigma  =>  z(sigma) = a sigma + b sigma^2 / 2; the average velocity over
    # [t, s] is a + b (t + s) / 2, which the secant-JVP recovers exactly (up to fp64 rounding)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    z = lambda s: a * s + b * s * s / 2  # noqa: E731
    v = lambda s: a + b * s  # noqa: E731
    for r, t, s in [(1.0, 0.8, 0.5), (0.9, 0.7, 0.65), (0.6, 0.3, 0.0)]:
        jvp = finite_difference_jvp(z(t), t, z(r), r, v(r))
        u = average_velocity(v(t), jvp, t, s)
        exact = (z(s) - z(t)) / (s - t)
        assert torch.allclose(u, exact, rtol=0, atol=1e-12)


def test_jvp_of_order_one_under_euler_is_zero_so_meancache_reuses_the_velocity():
    sig = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    ctx = PolicyContext(0, 4, sig, sig[:-1] * 1000, lambda x: x, lambda t: t)
    policy = MeanCache(ctx, {0: 1, 1: 1})
    z0, v0, v1 = torch.randn(4), torch.randn(4), torch.randn(4)
    z1 = z0 + (sig[1] - sig[0]) * v0
    policy.observe(0, z0, v0)
    policy.observe(1, z1, v1)
    z2 = z1 + (sig[2] - sig[1]) * v1
    # float32 rounding of (z1 - z0) / dt - v0: a few ulps of |v| / dt
    assert torch.allclose(policy.reuse(2, z2), v1, atol=1e-5)


def test_slope_estimator_gives_the_exact_step_average_of_a_velocity_linear_in_sigma():
    # v(sigma) = a + b sigma: a skipped Euler step [sigma_i, sigma_i+1] must take the line's average
    # there, a + b (sigma_i + sigma_i+1) / 2, from the two model velocities of steps 0 and 2 alone
    sig = torch.linspace(1, 0, 9, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    ctx = PolicyContext(0, 8, sig, sig[:-1] * 1000, lambda x: x, lambda t: t)
    policy = MeanCache(ctx, {0: 1, 2: 1}, estimator="slope")
    z = torch.zeros(4, dtype=torch.float64)
    policy.observe(0, z, a + b * sig[0])
    assert torch.equal(policy.reuse(1, z), (a + b * sig[0]).float())  # one model velocity: plain reuse
    policy.observe(2, z, a + b * sig[2])
    for i in range(3, 8):
        exact = a + b * (sig[i] + sig[i + 1]) / 2
        assert torch.allclose(policy.reuse(i, z).double(), exact, rtol=0, atol=1e-6)  # float32 history


# -- peak-suppressed shortest path --------------------------------------------------------------
def _brute_force(costs, n, budget, gamma, force=()):
    best = math.inf
    for m in range(0, budget):
        for inner in itertools.combinations(range(1, n), m):
            if not set(force) <= set(inner):
                continue
            nodes = (0, *inner, n)
            total = sum(min(costs[k][t][s] ** gamma for k in costs) for t, s in zip(nodes[:-1], nodes[1:]))
            best = min(best, total)
    return best


@pytest.mark.parametrize("gamma", [1.0, 2.0, 3.0])
def test_shortest_path_dp_finds_the_brute_force_optimum(gamma):
    rng = np.random.default_rng(1)
    n = 7
    costs = {k: rng.uniform(0.05, 1.0, (n + 1, n + 1)).tolist() for k in (1, 2, 3)}
    for budget in range(1, n + 1):
        sched = shortest_path_schedule(costs, budget, gamma)
        nodes = sched.compute + [n]
        recomputed = sum(costs[k][t][s] ** gamma for k, t, s in zip(sched.ks, nodes[:-1], nodes[1:]))
        # same float sums in another order: 1e-12 relative
        assert sched.compute[0] == 0 and len(sched.compute) <= budget
        assert recomputed == pytest.approx(sched.cost, rel=1e-12)
        assert sched.cost == pytest.approx(_brute_force(costs, n, budget, gamma), rel=1e-12)
    # forced steps (MeanCache's warmup / last): the best path among those through them
    for force in [(1,), (1, n - 1), (2, 5)]:
        for budget in range(len(force) + 1, n + 1):
            sched = shortest_path_schedule(costs, budget, gamma, force)
            assert set(force) <= set(sched.compute) and len(sched.compute) <= budget
            assert sched.cost == pytest.approx(_brute_force(costs, n, budget, gamma, force), rel=1e-12)


def _pair_brute_force(first, costs, n, budget, gamma, force=()):
    best, best_nodes = math.inf, None
    for m in range(0, budget):
        for inner in itertools.combinations(range(1, n), m):
            if not set(force) <= set(inner):
                continue
            nodes = (0, *inner, n)
            total = first[nodes[1]] ** gamma + sum(costs[(p, t, s)] ** gamma
                                                   for p, t, s in zip(nodes[:-2], nodes[1:-1], nodes[2:]))
            if total < best:
                best, best_nodes = total, list(nodes[:-1])
    return best, best_nodes


@pytest.mark.parametrize("gamma", [1.0, 2.0])
def test_second_order_shortest_path_finds_the_brute_force_optimum(gamma):
    # the fitted estimator's schedule: an edge's cost depends on the computed step before it
    rng = np.random.default_rng(2)
    n = 7
    # longer edges cost more (so the best path uses its budget) and the step before matters
    first = [None] + [s * s * rng.uniform(0.5, 1.5) for s in range(1, n + 1)]
    costs = {(p, t, s): float((s - t) ** 2 * rng.uniform(0.5, 1.5)) for s in range(n + 1) for t in range(s)
             for p in range(t)}
    for force in [(), (1,), (2, 5)]:
        for budget in range(len(force) + 1, n + 1):
            compute = pair_shortest_path_schedule(first, costs, n, budget, gamma, force)
            best, nodes = _pair_brute_force(first, costs, n, budget, gamma, force)
            path = compute + [n]
            total = first[path[1]] ** gamma + sum(costs[e] ** gamma for e in zip(path[:-2], path[1:-1], path[2:]))
            assert compute[0] == 0 and len(compute) <= budget and set(force) <= set(compute)
            assert total == pytest.approx(best, rel=1e-12), (compute, nodes)
            if not force:
                assert len(compute) == budget  # here every extra edge pays: the whole budget is spent


def _run_fitted_edge(z, v, sig, p, t, s, alpha):
    """The latents the fitted estimator reaches at s: computed steps p and t, t+1..s-1 skipped."""
    ctx = PolicyContext(0, len(sig) - 1, sig, sig[:-1] * 1000, None, None)
    policy = MeanCache(ctx, {p: 1, t: 1, s: 1}, estimator="fitted", edge_alphas={(p, t, s): alpha})
    policy.observe(p, z[p], v[p])
    policy.observe(t, z[t], v[t])
    x = z[t] + (sig[t + 1] - sig[t]) * v[t]
    for i in range(t + 1, s):
        x = x + (sig[i + 1] - sig[i]) * policy.reuse(i, x).double()
    return x


def test_fitted_slope_tables_are_the_least_squares_fit_of_what_the_policy_does():
    # SlopeAccumulator's alpha and error per edge (p, t, s) must be the best damping of the slope
    # for the latents the run-time policy reaches at s, and the RMS error it leaves
    from arvideo.calibrate import SlopeAccumulator, Trajectory

    n, g = 6, torch.Generator().manual_seed(4)
    sig = torch.linspace(1, 0, n + 1, dtype=torch.float64) ** 0.7
    trajs = []
    for _ in range(2):
        v = [torch.randn(3, 4, generator=g, dtype=torch.float64) * 0.3 + 0.5 * k for k in range(n)]
        z = [torch.randn(3, 4, generator=g, dtype=torch.float64)]
        for k in range(n):  # Euler reference with a little off-trajectory noise: no edge is exact
            z.append(z[-1] + (sig[k + 1] - sig[k]) * v[k] + 0.01 * torch.randn(3, 4, generator=g, dtype=torch.float64))
        trajs.append(Trajectory(z, v))
    acc = SlopeAccumulator(sig)
    for tr in trajs:
        acc.add(tr)
    tables = acc.tables()
    checked = 0
    for p, t, s, alpha, err in tables["edges"]:
        if s - t < 2:
            assert alpha == 0.0  # nothing skipped: nothing to fit
            continue
        e0 = [(_run_fitted_edge(tr.latents, tr.velocities, sig, p, t, s, 0.0) - tr.latents[s]) for tr in trajs]
        e1 = [(_run_fitted_edge(tr.latents, tr.velocities, sig, p, t, s, 1.0) - tr.latents[s]) for tr in trajs]
        # the error is linear in alpha: e(a) = e0 + a (e1 - e0); its least-squares minimiser on [0, 1]
        ab = sum(((a0) * (a1 - a0)).sum() for a0, a1 in zip(e0, e1)).item()
        bb = sum(((a1 - a0) ** 2).sum() for a0, a1 in zip(e0, e1)).item()
        best = min(max(-ab / bb, 0.0), 1.0)
        rms = math.sqrt(sum(((a0 + best * (a1 - a0)) ** 2).sum() for a0, a1 in zip(e0, e1)).item() / (2 * 12))
        # float32 policy history against the float64 tables
        assert alpha == pytest.approx(best, abs=1e-4) and err == pytest.approx(rms, rel=1e-4)
        checked += 1
    assert checked > 10
    assert tables["first"][2] == pytest.approx(math.sqrt(sum(
        ((tr.latents[0] + (sig[2] - sig[0]) * tr.velocities[0] - tr.latents[2]) ** 2).sum() for tr in trajs).item() / 24))


def test_fitted_estimator_at_alpha_zero_is_reuse_and_at_one_the_slope():
    sig = torch.linspace(1, 0, 9)
    ctx = PolicyContext(0, 8, sig, sig[:-1] * 1000, None, None)
    z, v0, v2 = torch.randn(4), torch.randn(4), torch.randn(4)
    runs = {}
    for name, est, alpha in [("reuse", "fitted", 0.0), ("one", "fitted", 1.0), ("slope", "slope", None),
                             ("half", "fitted", 0.5)]:
        edges = None if alpha is None else {(0, 2, s): alpha for s in range(3, 9)}
        policy = MeanCache(ctx, {0: 1, 2: 1}, estimator=est, edge_alphas=edges)
        policy.observe(0, z, v0)
        policy.observe(2, z, v2)
        runs[name] = policy.reuse(3, z)
    assert torch.equal(runs["reuse"], v2)
    assert torch.allclose(runs["one"], runs["slope"], atol=1e-6) and not torch.allclose(runs["one"], v2)
    assert torch.allclose(runs["half"], (runs["reuse"] + runs["one"]) / 2, atol=1e-6)


def test_per_edge_fitted_estimate_reaches_the_fitted_edge_whichever_step_computes_next():
    # the combination's fitted estimate does not know the next computed step s while skipping; with
    # the damping of every edge, the latents it reaches at any s must be those of MeanCache's fitted
    # edge t -> s with alpha(p, t, s), and all-zero damping must be plain velocity reuse
    from arvideo.caching.meancache import MeanVelocity

    n, g = 9, torch.Generator().manual_seed(7)
    sig = torch.linspace(1, 0, n + 1, dtype=torch.float64) ** 0.8
    ctx = PolicyContext(0, n, sig, sig[:-1] * 1000, None, None)
    v = [torch.randn(2, 5, generator=g, dtype=torch.float64) + 0.3 * k for k in range(n)]
    z = [torch.randn(2, 5, generator=g, dtype=torch.float64)]
    for k in range(n):
        z.append(z[-1] + (sig[k + 1] - sig[k]) * v[k])
    p, t = 1, 3
    edges = {(p, t, s): 0.05 + 0.9 * ((s * 7) % 5) / 5 for s in range(t + 1, n + 1)}  # uneven in s, on purpose
    zeros = {e: 0.0 for e in edges}
    for s in range(t + 2, n + 1):
        for table, reuse in ((edges, False), (zeros, True)):
            mean = MeanVelocity(ctx, 1, "fitted", edge_alphas=table)
            mean.observe(p, z[p], v[p], 1)
            mean.observe(t, z[t], v[t], 1)
            x = z[t] + (sig[t + 1] - sig[t]) * v[t]
            for i in range(t + 1, s):
                x = x + (sig[i + 1] - sig[i]) * mean.reuse(i, x).double()
            if reuse:
                expected = z[t] + (sig[s] - sig[t]) * v[t]
            else:
                expected = _run_fitted_edge(z, v, sig, p, t, s, table[(p, t, s)])
            assert torch.allclose(x, expected, rtol=0, atol=1e-5), (s, reuse)
    with pytest.raises(ValueError, match="estimator='fitted'"):
        MeanVelocity(ctx, 1, "secant", edge_alphas=edges)


def test_combination_with_the_fitted_estimator_uses_the_calibrated_edges(engine, folder, caplog):
    from arvideo.caching.calibration import FILENAME, edge_alphas, fitted_schedule, save_entry
    from arvideo.calibrate import calibrate

    entry = calibrate(engine, build_config(frames=5, overrides=["sampler.name=euler"]), [(0, CAPTION)],
                      budgets=(3,), gammas=(2.0,), ks=(1,))
    entry["slope"]["edges"] = [[p, t, s, round(0.01 * (p + 1) + 0.1 * t + 0.001 * s, 6), c]
                               for p, t, s, _, c in entry["slope"]["edges"]]
    save_entry(folder / FILENAME, entry)
    sig = torch.tensor(entry["sigmas"])
    ctx = PolicyContext(0, STEPS, sig, sig[:-1] * 1000, None, None)
    try:
        policy = make_policy_factory("combination:tau=0.5,warmup=2,estimator=fitted", STEPS, folder)(ctx)
        floor = make_policy_factory("combination:tau=0.5,warmup=2,budget=4,estimator=fitted", STEPS, folder)(ctx)
        entry["sampler"] = "unipc"  # the only entry for this grid now, with slope tables it must not use
        (folder / FILENAME).unlink()
        save_entry(folder / FILENAME, entry)
        with caplog.at_level("WARNING"):
            fallback = make_policy_factory("combination:tau=0.5,estimator=fitted", STEPS, folder)(ctx)
    finally:
        (folder / FILENAME).unlink()
    assert policy.reuser.estimator == "fitted" and policy.reuser.edge_alphas == edge_alphas(entry["slope"])
    assert policy.schedule == {}
    # with a budget the floor is the fitted schedule through the forced warm-up and last step
    assert sorted(floor.schedule) == sorted(fitted_schedule(entry["slope"], STEPS, 4, 2.0, (0, 1, STEPS - 1))[0])
    assert {0, 1, STEPS - 1} <= set(floor.schedule)
    assert fallback.reuser.estimator == "secant" and "combination estimator=fitted" in caplog.text
    for bad in ("combination:estimator=slope", "combination:estimator=fitted,cost=velocity"):
        with pytest.raises(ConfigError):
            make_policy_factory(bad, STEPS)


# -- exactness through the engine ---------------------------------------------------------------
@pytest.mark.parametrize("preset,ar_step", [
    ("flowcache:tau=0", 1), ("flowcache:tau=0,indicator=modulation", 1), ("combination:tau=0", 1),
    ("combination:tau=0,estimator=fitted", 1), ("combination:tau=0,indicator=slope,estimator=fitted", 1),
    (f"meancache:budget={STEPS}", 1), (f"meancache:budget={STEPS},estimator=fitted", 1), ("teacache:tau=0", 1), ("fora:interval=1", 1), ("deepcache:interval=1", 1),
    ("flowcache:tau=0,reuse=residual", 1),
    ("flowcache:tau=0,reuse=mean,k=3", 0), ("teacache:tau=0", 0), ("deepcache:interval=1", 0),
    # guidance reuse that never skips the unconditional pass: plain CFG, through GuidanceReuse.full
    ("none:guidance_every=1", 1), (f"none:guidance_every=2,guidance_warmup={STEPS}", 1),
    (f"meancache:budget={STEPS},guidance_every=3,guidance_warmup={STEPS}", 0),
])
def test_policy_at_zero_threshold_or_full_budget_reproduces_none_bit_exactly(engine, references, preset, ar_step):
    if ar_step not in references:
        references[ar_step] = (engine.generate(_cfg("none", frames=9, schedule__ar_step=ar_step)), engine.model_calls)
    ref, calls = references[ar_step]
    out = engine.generate(_cfg(preset, frames=9, schedule__ar_step=ar_step))
    assert np.array_equal(out, ref)
    assert engine.model_calls == calls


class _Tokens:
    """Wraps the backbone to count latent frames sent through it."""

    def __init__(self, backbone):
        self.inner, self.frames, self.plans = backbone, 0, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, t, text, plan, store, fps=None):
        self.frames += x.shape[2]
        self.plans.append(plan)
        return self.inner(x, t, text, plan, store, fps=fps)


class _SkipOnce:
    """Test factory: chunk `chunk` skips step `step` (velocity reuse), everything else computes."""

    may_skip = True

    def __init__(self, chunk, step):
        self.chunk, self.step = chunk, step

    def __call__(self, ctx):
        outer = self

        class Policy:
            velocity = None

            def should_compute(self, step, latents):
                return not (ctx.chunk == outer.chunk and step == outer.step)

            def observe(self, step, latents, velocity):
                self.velocity = velocity

            def reuse(self, step, latents):
                return self.velocity

        return Policy()

    def __deepcopy__(self, memo):
        return self


def test_a_skipped_chunk_sends_no_tokens_to_the_backbone_but_stays_visible_as_context(engine, monkeypatch):
    counter = _Tokens(engine.backbone)
    monkeypatch.setattr(engine, "backbone", counter)
    engine.generate(_cfg("none"))
    full = counter.frames
    counter.frames, counter.plans = 0, []
    engine.generate(_cfg(_SkipOnce(chunk=1, step=2)))
    assert full - counter.frames == 2  # chunk 1 is 2 latent frames, skipped once
    with_context = [p for p in counter.plans if p.context]
    assert len(with_context) == 1 and list(with_context[0].context) == [1]


def test_two_chunks_in_flight_decide_alone_from_their_own_inputs():
    sig = torch.linspace(1, 0, 7)
    ctx = lambda i: PolicyContext(i, 6, sig, sig[:-1] * 1000, lambda x: x.reshape(1, -1, 1), lambda t: t)  # noqa: E731
    still, moving = FlowCache(ctx(0), tau=0.05, warmup=1), FlowCache(ctx(1), tau=0.05, warmup=1)
    x = torch.ones(8)
    for p in (still, moving):
        assert p.should_compute(0, x)
        p.observe(0, x, torch.zeros(8))
    # chunk 0's latents change by 1%, chunk 1's by 50%: same step, same tau, opposite decisions
    assert not still.should_compute(1, x * 1.01)
    assert moving.should_compute(1, x * 1.5)


def test_slope_indicator_predicts_each_chunks_drift_from_its_own_model_velocities():
    from arvideo.caching.meancache import slope_weight

    sig = torch.linspace(1, 0, 9) ** 0.8
    ctx = lambda i: PolicyContext(i, 8, sig, sig[:-1] * 1000, None, None)  # noqa: E731
    steady, turning = (FlowCache(ctx(i), tau=0.02, warmup=1, indicator="slope") for i in (0, 1))
    v0, x = torch.ones(6), torch.zeros(6)
    for policy, v1 in ((steady, v0 * 1.01), (turning, v0 * 1.5)):
        assert policy.should_compute(0, x)
        policy.observe(0, x, v0)
        assert policy.should_compute(1, x)  # one model velocity: no slope yet, so it computes
        policy.observe(1, x, v1)
    sigf = [float(s) for s in sig]
    for step in (2, 3):  # the drift predicted for skipping 2..step: c(1, step + 1) mean|D| / mean|v_1|
        expected = slope_weight(sigf, 1, step + 1) * (0.5 / (sigf[0] - sigf[1])) / 1.5
        assert turning.slope.predicted(step) == pytest.approx(expected, rel=1e-5)
    # same step, same tau: the chunk whose velocity barely moves skips, the turning one computes
    assert not steady.should_compute(2, x) and turning.should_compute(2, x)
    with pytest.raises(ValueError, match="reuse='mean'"):
        FlowCache(ctx(0), tau=0.1, estimator="fitted")


def test_combination_last_false_lets_the_indicator_skip_the_last_step():
    sig = torch.linspace(1, 0, 7)
    ctx = PolicyContext(0, 6, sig, sig[:-1] * 1000, lambda x: x.reshape(1, -1, 1), lambda t: t)
    x = torch.ones(8)
    for last, expected in (("true", True), ("false", False)):
        policy = make_policy_factory(f"combination:tau=100,warmup=1,last={last}", 6)(ctx)
        policy.observe(0, x, torch.zeros(8))
        assert [policy.should_compute(s, x) for s in range(1, 6)] == [False] * 4 + [expected]


def test_flowcache_chunks_in_flight_make_different_decisions_in_the_engine(engine, monkeypatch):
    decisions = {}
    original = FlowCache.should_compute

    def record(self, step, latents):
        out = original(self, step, latents)
        decisions[(self.ctx.chunk, step)] = out
        return out

    monkeypatch.setattr(FlowCache, "should_compute", record)
    # chunks of one window share every step (ar_step 0) but start from different noise
    engine.generate(_cfg("flowcache:tau=0.042,warmup=1", frames=17))
    per_step = {}
    for (_chunk, step), d in decisions.items():
        per_step.setdefault(step, set()).add(d)
    assert any(len(ds) == 2 for ds in per_step.values())


def test_teacache_makes_one_decision_per_tick_for_all_chunks(engine, monkeypatch):
    from arvideo.caching.baselines import TeaCache

    decisions, original = [], TeaCache.should_compute

    def record(self, step, latents):
        out = original(self, step, latents)
        decisions.append((self.shared, self.forced(step), out))
        return out

    monkeypatch.setattr(TeaCache, "should_compute", record)
    engine.generate(_cfg("teacache:tau=0.3,warmup=1", frames=17))
    assert len({id(s) for s, _, _ in decisions}) == 1  # one shared state for the run
    assert {d for _, forced, d in decisions if not forced} == {True, False}


def test_teacache_decides_the_same_in_every_window_of_a_sync_schedule():
    # Sync diffusion forcing: chunk 0 runs steps 0..N-1, then chunk 2 starts again at step 0. The
    # change between the last window's clean step and the new window's noisy one is far outside
    # the polynomial's fitted range; this one (the shape of the embedded model's: negative at both
    # ends) once sent the accumulator to -40,000 there and no later tick computed again.
    from arvideo.caching.baselines import TeaCache, TickDecision

    n = 20
    sig = torch.linspace(1, 0, n + 1)
    poly = (-16289.6, 5955.58, -729.97, 35.752, -0.542)

    def ctx(chunk):  # modulation: a smooth function of the timestep, one feature per sample
        return PolicyContext(chunk, n, sig, sig[:-1] * 1000, None, lambda t: torch.stack([1 + t / 1000, 2 - t / 900]))

    shared = TickDecision(0.2, poly)
    windows = []
    for chunk in (0, 2, 4):
        policy, out = TeaCache(ctx(chunk), shared, warmup=1), [True]
        policy.shared.stepped()  # the engine computes a chunk's first step without asking its policy
        for step in range(1, n):
            out.append(policy.should_compute(step, None))
            policy.shared.stepped()
        windows.append(out)
    assert windows[0] == windows[1] == windows[2]
    assert 2 < sum(windows[0]) < n  # it skips some steps and computes more than the forced ones


# -- calibration and presets --------------------------------------------------------------------
def test_calibration_writes_schedules_that_the_meancache_preset_follows(engine, folder, monkeypatch):
    from arvideo.caching.calibration import FILENAME, save_entry
    from arvideo.calibrate import calibrate

    cfg = build_config(frames=5, overrides=["sampler.name=euler"])
    entry = calibrate(engine, cfg, [(0, CAPTION), (1, CAPTION)], budgets=(3,), gammas=(2.0,), ks=(1, 2))
    # under Euler a single-step edge is exact: C(t, t+1) = 0 up to float32 rounding
    assert max(entry["costs"]["1"][t][t + 1] for t in range(STEPS)) < 1e-5
    assert len(entry["modulation_poly"]) == 5
    save_entry(folder / FILENAME, entry)
    sched = entry["schedules"][0]
    assert sched["cost_kind"] == "displacement"  # what the preset uses by default
    seen = {}
    original = MeanCache.should_compute

    def record(self, step, latents):
        out = original(self, step, latents)
        seen.setdefault(self.ctx.chunk, []).append(out)
        return out

    monkeypatch.setattr(MeanCache, "should_compute", record)
    try:
        engine.generate(_cfg("meancache:budget=3,gamma=2", frames=5, sampler__name="euler"))
    finally:
        (folder / FILENAME).unlink()
    # step 0 is forced by the engine without asking; the rest follow the calibrated schedule
    assert [s for s, d in enumerate([True] + seen[0][:STEPS - 1]) if d] == sched["compute"]
    with pytest.raises(ValueError, match="evaluation range"):
        calibrate(engine, cfg, [(10_000, CAPTION)])


def test_the_fitted_estimator_follows_its_calibrated_schedule_and_damping(engine, folder, monkeypatch, caplog):
    from arvideo.caching.calibration import FILENAME, fitted_schedule, save_entry
    from arvideo.calibrate import calibrate

    cfg = build_config(frames=5, overrides=["sampler.name=euler"])
    entry = calibrate(engine, cfg, [(0, CAPTION), (1, CAPTION)], budgets=(3,), gammas=(2.0,), ks=(1,))
    fitted = [s for s in entry["schedules"] if s["cost_kind"] == "fitted"][0]
    assert fitted["compute"][0] == 0 and len(fitted["compute"]) <= 3 and len(fitted["alpha"]) == len(fitted["compute"])
    assert all(0.0 <= a <= 1.0 for a in fitted["alpha"]) and len(entry["slope"]["first"]) == STEPS + 1
    # the tiny model's own alphas may all be 0; give every edge a distinct one so a mix-up shows
    entry["slope"]["edges"] = [[p, t, s, round(0.01 * (p + 1) + 0.1 * t + 0.001 * s, 6), c]
                               for p, t, s, _, c in entry["slope"]["edges"]]
    compute, alphas = fitted_schedule(entry["slope"], STEPS, 3)
    fitted = {"compute": sorted(compute), "alpha": [alphas[t] for t in sorted(compute)]}
    save_entry(folder / FILENAME, entry)
    policies = []
    original = MeanCache.__init__

    def keep(self, *args, **kwargs):
        original(self, *args, **kwargs)
        policies.append(self)

    monkeypatch.setattr(MeanCache, "__init__", keep)
    try:
        engine.generate(_cfg("meancache:budget=3,estimator=fitted", frames=5, sampler__name="euler"))
    finally:
        (folder / FILENAME).unlink()
    assert sorted(policies[0].schedule) == fitted["compute"]
    # the policy damps by the table's alpha of each edge; per computed step along the schedule
    # that is the calibration's reported damping (the alpha of its edge, given the step before it)
    table = {(p, t, s): a for p, t, s, a, _ in entry["slope"]["edges"]}
    assert policies[0].mean.edge_alphas == table
    nodes = fitted["compute"] + [STEPS]
    assert len(nodes) == 4 and fitted["alpha"][1:] == [table[e] for e in zip(nodes[:-2], nodes[1:-1], nodes[2:])]
    # without slope tables (no calibration, or one from before them): the secant estimator, and a warning
    sig = torch.linspace(1, 0, STEPS + 1)
    with caplog.at_level("WARNING"):
        policy = make_policy_factory("meancache:budget=3,estimator=fitted", STEPS)(
            PolicyContext(0, STEPS, sig, sig[:-1] * 1000, None, None))
    assert policy.mean.estimator == "secant" and "arvideo calibrate --sampler euler" in caplog.text
    # under another sampler (its calibration has no slope tables: calibrate fits them for Euler only)
    unipc = calibrate(engine, build_config(frames=5, overrides=["sampler.name=unipc"]), [(0, CAPTION)],
                      budgets=(3,), gammas=(2.0,), ks=(1,))
    assert "slope" not in unipc and not any(s["cost_kind"] == "fitted" for s in unipc["schedules"])
    entry["sampler"] = "unipc"  # even slope tables would not be used under UniPC
    save_entry(folder / FILENAME, entry)
    caplog.clear()
    try:
        with caplog.at_level("WARNING"):
            policy = make_policy_factory("meancache:budget=3,estimator=fitted", STEPS, folder)(
                PolicyContext(0, STEPS, torch.tensor(entry["sigmas"]), torch.tensor(entry["sigmas"][:-1]) * 1000,
                              None, None))
    finally:
        (folder / FILENAME).unlink()
    assert policy.mean.estimator == "secant" and "measured worse under unipc" in caplog.text
    with pytest.raises(ConfigError, match="cost=displacement"):
        make_policy_factory("meancache:estimator=fitted,cost=velocity", STEPS)


def test_presets_resolve_from_configs_and_bad_names_say_what_to_change():
    name, params = parse_preset("fast:budget=5")
    assert name == "meancache" and params["budget"] == 5 and params["sampler"] == "euler"
    assert parse_preset("quality") == ("meancache", {"budget": 10, "gamma": 2.0, "cost": "displacement",
                                                     "estimator": "fitted", "sampler": "euler"})
    with pytest.raises(ConfigError, match="available: .*fast"):
        make_policy_factory("fastest", STEPS)
    with pytest.raises(ConfigError, match="no parameter tua; valid: tau"):
        make_policy_factory("flowcache:tua=1", STEPS)
    with pytest.raises(ConfigError, match="key=value"):
        make_policy_factory("fora:3", STEPS)
    with pytest.raises(ConfigError, match="choose one of patch, modulation"):
        make_policy_factory("flowcache:indicator=pixels", STEPS)
    # MeanCache's forced steps hold without a calibration too (the even-spread fallback)
    sig = torch.linspace(1, 0, STEPS + 1)
    policy = make_policy_factory("meancache:budget=3,warmup=2,last=true", STEPS)(
        PolicyContext(0, STEPS, sig, sig[:-1] * 1000, None, None))
    assert set(policy.schedule) == {0, 1, STEPS - 1}
    with pytest.raises(ConfigError, match="warmup >= 1"):
        make_policy_factory("meancache:warmup=0", STEPS)


def test_a_preset_names_its_sampler_unless_the_user_chose_one(engine):
    from arvideo.caching import preset_sampler

    assert preset_sampler("fast") == preset_sampler("quality") == "euler"
    assert preset_sampler("meancache:budget=4") is None and preset_sampler("none") is None
    assert engine.resolve(_cfg("fast")).cfg.sampler.name == "euler"
    assert engine.resolve(_cfg("none")).cfg.sampler.name == "unipc"  # the model's default
    assert engine.resolve(_cfg("fast", sampler__name="unipc")).cfg.sampler.name == "unipc"
    assert make_policy_factory("fast", STEPS).may_skip  # the sampler key never reaches the policy
    with pytest.raises(ConfigError, match="choose one of unipc, euler"):
        preset_sampler("meancache:sampler=heun")


# -- DeepCache partial compute ---------------------------------------------------------------------
@pytest.mark.parametrize("first,last", [(1, 1), (0, 0)])  # DeepCache; FlowCache residual reuse (head only)
def test_shallow_step_with_its_own_residual_and_kv_reproduces_the_full_step(first, last):
    from arvideo.backbones import CallPlan, WanFamilyBackbone
    from arvideo.caching.deepcache import DeepPlan
    from arvideo.kvstore import KVStore
    from tests.tiny import tiny_transformer

    bb = WanFamilyBackbone(tiny_transformer(layers=4))
    lay = bb.kv_layout(8, 8)
    x, t, text = torch.randn(2, 4, 4, 8, 8), torch.tensor([[700, 700, 300, 300]] * 2), bb.prepare_text(torch.randn(2, 5, 16))

    def call(deep):
        store = KVStore(lay.num_layers, 2, lay.heads, lay.head_dim)
        plan = CallPlan([2, 2], torch.arange(4), keep_kv=True)
        return bb(x, t, text, plan, store, deep=deep)

    plain = call(None)
    full = call({0: DeepPlan(first, last), 1: DeepPlan(first, last)})
    residual, kv = bb.deep_residuals[0], bb.kept_kv[0]
    # member 0 skips blocks 1-2 using the residual and K/V of that same input; member 1 (full)
    # attends to member 0's kept middle-layer K/V: same numbers, other summation order (1e-5)
    shallow = call({0: DeepPlan(first, last, residual, kv), 1: DeepPlan(first, last)})
    assert torch.equal(plain, full)
    assert torch.allclose(shallow, full, rtol=0, atol=1e-5)
    assert len(bb.kept_kv[0]) == 4 and bb.kept_kv[0][1][0] is kv[1][0]
    assert (bb.kept_kv[0][0][0] is kv[0][0]) == (first == 0)


def test_deepcache_shallow_steps_run_and_stay_close_to_full_compute(engine, references):
    from arvideo.caching.deepcache import DeepCache

    ref = engine.generate(_cfg("none"))
    for preset in ("deepcache:interval=2,first=1,last=0", "flowcache:tau=0.1,warmup=1,reuse=residual"):
        out = engine.generate(_cfg(preset))
        assert 0 < np.abs(out.astype(float) - ref).mean() < 20  # uint8 frames, random tiny model
    assert DeepCache(PolicyContext(0, STEPS, torch.linspace(1, 0, STEPS + 1), torch.zeros(STEPS), None, None),
                     interval=2).full == {0, 1, 3, 5}


# -- guidance reuse (caching/guidance.py) -----------------------------------------------------------
class _Batches:
    """Wraps the backbone: records each call's batch and checks a conditional-only call against the
    conditional half of the same call run with both passes, on a copy of the store."""

    def __init__(self, backbone, engine):
        self.inner, self.engine, self.batches, self.commits, self.max_err = backbone, engine, [], [], 0.0
        self.kept_before, self.uncond_kept = None, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _check_kept_kv(self):
        """After a conditional-only call, a chunk's kept K/V get new conditional halves and keep their
        unconditional halves from before the call."""
        now = {i: c.kv for i, c in self.engine._run.chunks.items() if c.kv}
        if self.batches and self.batches[-1] == 1:
            for i, kv in now.items():
                before = self.kept_before.get(i)
                if before is not None and kv is not before:
                    assert all(torch.equal(k[1:], kb[1:]) and torch.equal(v[1:], vb[1:])
                               for (k, v), (kb, vb) in zip(kv, before))
                    self.uncond_kept += 1
        self.kept_before = now

    def __call__(self, x, t, text, plan, store, fps=None):
        import copy

        self._check_kept_kv()
        self.batches.append(x.shape[0])
        self.commits.append(plan.commit)
        if x.shape[0] == 1:
            both = copy.deepcopy(store)
            full_text = self.full_text
            v2 = self.inner(x.expand(2, -1, -1, -1, -1), t.expand(2, -1), full_text, plan, both, fps=fps)
            kept2 = self.inner.kept_kv
        v = self.inner(x, t, text, plan, store, fps=fps)
        if x.shape[0] == 1:
            self.max_err = max(self.max_err, (v - v2[0:1]).abs().max().item())
            for j, layers in self.inner.kept_kv.items():  # the conditional K/V kept are the same too
                for (k1, v1), (k2, v2_) in zip(layers, kept2[j]):
                    self.max_err = max(self.max_err, (k1 - k2[0:1]).abs().max().item(),
                                       (v1 - v2_[0:1]).abs().max().item())
        else:
            self.full_text = text
        return v


@pytest.mark.parametrize("preset", ["none:guidance_every=2", f"meancache:budget={STEPS - 2},guidance_every=2"])
def test_guidance_reuse_runs_conditional_only_calls_that_equal_the_conditional_pass(engine, monkeypatch, preset):
    # sync windows of 2 chunks (the embedded model's schedule): commits open every window
    over = dict(frames=49, schedule__ar_step=0, schedule__window_blocks=2)
    ref = engine.generate(_cfg("none", **over))
    spy = _Batches(engine.backbone, engine)
    monkeypatch.setattr(engine, "backbone", spy)
    out = engine.generate(_cfg(preset, **over))
    assert spy.batches.count(1) >= len(spy.batches) // 4  # a real share of the calls skipped the CFG pass
    # kept K/V (a skipping policy's) after conditional-only calls were checked; `none` keeps none
    assert (spy.uncond_kept > 0) == preset.startswith("meancache")
    assert any(spy.commits) and all(b == 2 for b, c in zip(spy.batches, spy.commits) if c)  # commits: both passes
    # a conditional-only call is the conditional half of the full call: same K/V read, same numbers
    # up to the summation order of a batch of 1 against 2 (float32, 1e-5)
    assert spy.max_err < 1e-5
    assert 0 < np.abs(out.astype(float) - ref).mean() < 20  # an approximation, not a different video


def test_guidance_reuse_decides_per_chunk_and_rejects_bad_settings():
    from arvideo.caching import GuidanceReuse

    g = GuidanceReuse(every=2, warmup=2)
    v_c, v_u = torch.ones(2), torch.zeros(2)
    pattern = []
    for _ in range(7):
        need = g.needs_uncond()
        pattern.append(need)
        out = g.full(v_c, v_u, 4.0) if need else g.reuse(3 * v_c, 4.0)
        assert torch.equal(out, 4 * v_c if need else 3 * v_c + 3 * (v_c - v_u))
    assert pattern == [True, True, False, True, False, True, False]
    with pytest.raises(ConfigError, match="guidance_every=0: must be an integer >= 1"):
        make_policy_factory("fast:guidance_every=0", STEPS)
    with pytest.raises(ConfigError, match="guidance_warmup"):
        make_policy_factory("none:guidance_warmup=0", STEPS)
    assert make_policy_factory("fast:guidance_every=3", STEPS).guidance == (3, 1)


def test_cache_decisions_script_prints_the_steps_each_chunk_computed(folder, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "cache_decisions.py"
    spec = importlib.util.spec_from_file_location("cache_decisions", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # uncalibrated meancache at budget 3 of 6 steps: the even spread 0, 2, 4 in every chunk
    assert script.main(["meancache:budget=3", "--model", str(folder), "--frames", "9", "--caption", CAPTION,
                        "--chunks", "0", "1", "7"]) == 0
    out = capsys.readouterr().out
    assert "chunk 0: computed 3 of 6 steps: 0, 2, 4" in out and "chunk 1: computed 3 of 6 steps: 0, 2, 4" in out
    assert "chunk 7: not in this video" in out


def test_bench_caching_compares_two_rows_caption_by_caption():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_caching.py"
    spec = importlib.util.spec_from_file_location("bench_caching_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = [{"family": "presets", "label": "fast", "seed": s, "psnr_tf": 30.0 + s, "psnr_first": None} for s in range(3)]
    rows += [{"family": "x", "label": "B 1/4", "seed": s, "psnr_tf": 29.0 + s + (0.5 if s == 2 else 0.0),
              "psnr_first": 20.0} for s in range(3)]
    lines = bench.paired(rows, ("x", "B 1/4"), ("presets", "fast"))
    assert lines == ["- x B 1/4 - presets fast, teacher-forced PSNR: -0.83 +- 0.17 dB (higher on 0, lower on 3 of 3 captions)"]
    assert "fewer than 2 captions" in bench.paired(rows[:1] + rows[3:4], ("x", "B 1/4"), ("presets", "fast"))[0]

    # --only / --label pick settings of the sweep; an unknown label is an error that lists the labels
    configs = bench.sweep_configs("default", 20)
    picked = bench.select_configs(configs, "combination-slope", ["tau 0.01", "B 1/5 + tau 0.3"])
    assert [(c[0], c[1]) for c in picked] == [("combination-slope", "tau 0.01"), ("combination-slope", "B 1/5 + tau 0.3")]
    assert "budget=4" in picked[1][2] and "tau=0.3" in picked[1][2]  # a fifth of 20 steps as the floor
    assert {c[0] for c in bench.select_configs(configs, "fora,teacache")} == {"fora", "teacache"}
    with pytest.raises(ValueError, match="no such setting.*labels: tau 0.01"):
        bench.select_configs(configs, "combination-slope", ["tau 9"])
