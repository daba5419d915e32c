"""Peak-suppressed shortest path: which steps compute under a budget of model calls (MeanCache).

Nodes are step indices 0..N. Edge t -> s with label K: compute at t, extrapolate with the
K-step JVP through s - 1. Its weight is C_K(t, s)^gamma (gamma > 1 makes one long jump cost
more than several short ones). A path 0 -> N with at most B edges of least total weight:
    D_b(s) = min_t D_{b-1}(t) + w(t, s),   O(B N^2 |K|).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Schedule:
    """compute: the computed steps (ascending, starts at 0); ks: the JVP K of each; cost: sum C^gamma."""

    compute: list[int]
    ks: list[int]
    cost: float

    def as_dict(self) -> dict[int, int]:
        return dict(zip(self.compute, self.ks))


def displacement_costs(costs: dict[int, list[list[float]]], sigmas) -> dict[int, list[list[float]]]:
    """C_K(t, s) * |sigma_s - sigma_t|: the mean error of the latents reached at s."""
    sig = [float(x) for x in sigmas]
    return {k: [[abs(sig[s] - sig[t]) * c for s, c in enumerate(row)] for t, row in enumerate(table)]
            for k, table in costs.items()}


def edge_weights(costs: dict[int, list[list[float]]], gamma: float) -> tuple[list[list[float]], list[list[int]]]:
    """Best K per edge: w[t][s] = min_K C_K[t][s]^gamma and that K (inf where no K is defined)."""
    n = len(next(iter(costs.values()))) - 1
    w = [[math.inf] * (n + 1) for _ in range(n + 1)]
    best = [[0] * (n + 1) for _ in range(n + 1)]
    for k in sorted(costs):
        c = costs[k]
        for t in range(n):
            for s in range(t + 1, n + 1):
                value = c[t][s]
                if value is None or not math.isfinite(value):
                    continue
                cost = max(value, 0.0) ** gamma
                if cost < w[t][s]:
                    w[t][s], best[t][s] = cost, k
    return w, best


def shortest_path_schedule(costs: dict[int, list[list[float]]], budget: int, gamma: float = 2.0,
                           force: tuple[int, ...] = ()) -> Schedule:
    """The 0 -> N path with at most `budget` edges minimising sum C_K(t, s)^gamma.

    costs[K][t][s]: error of computing at t and extrapolating with K through s - 1, for
    0 <= t < s <= N (a [N+1, N+1] table per K; other entries ignored).
    force: steps that must compute (nodes on the path): no edge may jump over one. With more
    forced steps than the budget allows, the shortest path through all of them is returned.
    """
    w, best = edge_weights(costs, gamma)
    n = len(w) - 1
    forced = sorted({int(f) for f in force if 0 < int(f) < n})
    for t in range(n):
        for s in range(t + 2, n + 1):
            if any(t < f < s for f in forced):
                w[t][s] = math.inf
    budget = max(1, min(max(int(budget), len(forced) + 1), n))
    inf = math.inf
    d = [0.0] + [inf] * n  # D_0: only node 0 is reachable with no edge
    parents: list[list[int]] = []
    best_cost, best_b = inf, 0
    for b in range(1, budget + 1):
        nd, par = [inf] * (n + 1), [-1] * (n + 1)
        for s in range(1, n + 1):
            for t in range(s):
                if d[t] < inf and d[t] + w[t][s] < nd[s]:
                    nd[s], par[s] = d[t] + w[t][s], t
        parents.append(par)
        d = nd
        if d[n] < best_cost:
            best_cost, best_b = d[n], b
    if best_b == 0:
        raise ValueError("no path from step 0 to the last step: every edge cost is undefined")
    nodes, s = [n], n
    for b in range(best_b, 0, -1):
        s = parents[b - 1][s]
        nodes.append(s)
    nodes.reverse()
    compute = nodes[:-1]
    ks = [best[t][s] for t, s in zip(nodes[:-1], nodes[1:])]
    return Schedule(compute, ks, best_cost)


def pair_shortest_path_schedule(first: list[float], costs: dict[tuple[int, int, int], float], n: int, budget: int,
                                gamma: float = 2.0, force: tuple[int, ...] = ()) -> list[int]:
    """The compute steps of the 0 -> n path with at most `budget` edges minimising sum cost^gamma,
    where an edge's cost depends on the node before it as well (a second-order shortest path).

    first[s]: cost of the first edge 0 -> s (no earlier computed step). costs[(p, t, s)]: cost of
    the edge t -> s when the computed step before t was p (p < t < s). The fitted slope estimator
    needs this: its skipped steps extrapolate from the model velocities at p and t.
    D_b(t, s) = min_p D_{b-1}(p, t) + w(p, t, s), O(B n^3).
    force: steps the path must compute. Returns the computed steps (ascending, 0 first).
    """
    forced = sorted({int(f) for f in force if 0 < int(f) < n})
    inf = math.inf

    def w(cost: float | None, t: int, s: int) -> float:
        if cost is None or not math.isfinite(cost) or any(t < f < s for f in forced):
            return inf
        return max(cost, 0.0) ** gamma

    budget = max(1, min(max(int(budget), len(forced) + 1), n))
    d = {(0, s): w(first[s], 0, s) for s in range(1, n + 1)}  # D_1: state = the last edge (t, s)
    parents: list[dict[tuple[int, int], int]] = [{}]
    best_cost, best_state, best_b = inf, None, 0
    for b in range(1, budget + 1):
        for t in range(n):
            if d.get((t, n), inf) < best_cost:
                best_cost, best_state, best_b = d[(t, n)], (t, n), b
        if b == budget:
            break
        nd: dict[tuple[int, int], float] = {}
        par: dict[tuple[int, int], int] = {}
        for (p, t), dist in d.items():
            if not math.isfinite(dist) or t == n:
                continue
            for s in range(t + 1, n + 1):
                value = dist + w(costs.get((p, t, s)), t, s)
                if value < nd.get((t, s), inf):
                    nd[(t, s)], par[(t, s)] = value, p
        parents.append(par)
        d = nd
    if best_state is None:
        raise ValueError("no path from step 0 to the last step: every edge cost is undefined")
    nodes, (t, s) = [n], best_state
    for b in range(best_b, 1, -1):
        nodes.append(t)
        t, s = parents[b - 1][(t, s)], t
    nodes.append(t)
    return sorted(nodes[1:])
