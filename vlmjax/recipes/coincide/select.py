"""COINCIDE steps 3-7: cluster transferability T, density D, budgets, MMD prototypes; plus the baselines.

    T_i = mean cos(c_i, c_j) over clusters j != i with cos <= 0.9, on the text halves of the centroids (the
          reference's choice), re-normalised; 0 when no pair is left. Empty clusters take no part.
    D_i = mean over all pairs (x, y) of cluster i (self-pairs included) of exp(-|x - y|^2 / (2 sigma^2)), in fp64.
    P   = softmax(T / (tau D)) over the non-empty clusters, tau 0.1.
    Budgets: visit clusters by descending P; n_i = min(floor(remaining * P_i / P(unvisited) + 0.5), size_i);
          a cluster that cannot fill its share passes the rest on; if the last ones were too small too, a
          second pass in the same order fills the clusters with room, so exactly `target` samples are picked.
    MMD prototypes: greedily add the row minimising MMD^2(cluster, selected + row) with the same kernel; kept
          O(n) per step by carrying sum_s k(s, .) and the column means of k (O(n m) kernel evaluations per
          cluster, never a candidates x m x m tensor as in the reference).

Methods (same CLI): coincide, transfer_only (P = softmax(T / tau)), density_only (P = softmax(1 / (tau D))),
uniform_clusters (equal P), random_in_cluster (COINCIDE budgets, random rows), random, stratified (oracle:
proportional to a label field, random within), ppl_low (lowest perplexity from `scoring.score_dataset` JSONL).
"""

from __future__ import annotations

import json
import os

import numpy as np

CLUSTER_METHODS = ("coincide", "transfer_only", "density_only", "uniform_clusters", "random_in_cluster")
METHODS = CLUSTER_METHODS + ("random", "stratified", "ppl_low")


def _l2n(x):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def text_halves(v: np.ndarray, n_layers: int) -> np.ndarray:
    """(K, 2LD) -> (K, LD): the text mean half of every layer (layout [v_l, t_l] per layer, see features)."""
    k = v.shape[0]
    return np.asarray(v, np.float64).reshape(k, n_layers, 2, -1)[:, :, 1].reshape(k, -1)


def transferability(centroids: np.ndarray, n_layers: int, active=None, thresh: float = 0.9,
                    block: int = 2048) -> np.ndarray:
    """(K,) T (module docstring); active (K,) bool: clusters taking part (others get NaN)."""
    ct = _l2n(text_halves(centroids, n_layers))
    k = len(ct)
    active = np.ones(k, bool) if active is None else np.asarray(active, bool)
    out = np.full(k, np.nan)
    for s in range(0, k, block):
        sim = ct[s: s + block] @ ct.T
        keep = (sim <= thresh) & active[None, :]
        keep[np.arange(len(sim)), np.arange(s, s + len(sim))] = False
        cnt = keep.sum(1)
        out[s: s + block] = np.where(cnt > 0, (sim * keep).sum(1) / np.maximum(cnt, 1), 0.0)
    out[~active] = np.nan
    return out


def kernel(a: np.ndarray, b: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """exp(-|a_i - b_j|^2 / (2 sigma^2)) in fp64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.exp(-np.maximum(d2, 0.0) / (2 * sigma * sigma))


def kernel_col_means(x: np.ndarray, sigma: float = 1.0, block: int = 2048) -> np.ndarray:
    """(n,) mean_x k(x, c) for every row c, by row blocks (no n x n matrix in memory)."""
    x = np.asarray(x, np.float64)
    out = np.zeros(len(x))
    for s in range(0, len(x), block):
        out += kernel(x[s: s + block], x, sigma).sum(0)
    return out / len(x)


def density(x: np.ndarray, sigma: float = 1.0) -> float:
    """D of one cluster's rows: the mean of the full kernel matrix (self-pairs included)."""
    return float(kernel_col_means(x, sigma).mean())


def mmd_greedy(x: np.ndarray, m: int, sigma: float = 1.0, col_means: np.ndarray | None = None) -> list[int]:
    """Indices of m prototypes of x, in pick order (module docstring); ties go to the lowest index."""
    x = np.asarray(x, np.float64)
    n = len(x)
    if m > n:
        raise ValueError(f"budget {m} > cluster size {n}")
    a = kernel_col_means(x, sigma) if col_means is None else col_means
    b = np.zeros(n)  # sum over selected s of k(s, c)
    sum_a, sum_k, picked = 0.0, 0.0, []
    taken = np.zeros(n, bool)
    for j in range(m):
        size = j + 1
        cost = -2.0 * (sum_a + a) / size + (sum_k + 2.0 * b + 1.0) / size ** 2  # k(c, c) = 1
        cost[taken] = np.inf
        c = int(np.argmin(cost))
        picked.append(c)
        taken[c] = True
        sum_a += a[c]
        sum_k += 2.0 * b[c] + 1.0
        b += kernel(x, x[c: c + 1], sigma)[:, 0]
    return picked


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max())
    return e / e.sum()


def allocate(p: np.ndarray, sizes: np.ndarray, target: int) -> np.ndarray:
    """(K,) integer budgets summing to `target` (module docstring); clusters with p = 0 or size 0 get none."""
    p, sizes = np.asarray(p, np.float64), np.asarray(sizes, np.int64)
    if target > sizes.sum():
        raise ValueError(f"budget {target} > N={int(sizes.sum())} samples")
    order = np.argsort(-p, kind="stable")
    order = order[(p[order] > 0) & (sizes[order] > 0)]
    out = np.zeros(len(p), np.int64)
    remaining = int(target)
    tail = np.cumsum(p[order][::-1])[::-1]  # P mass of the unvisited clusters, from each position on
    for pos, i in enumerate(order):
        share = p[i] / tail[pos] if tail[pos] > 0 else 1.0
        out[i] = min(int(np.floor(remaining * share + 0.5)), sizes[i], remaining)
        remaining -= out[i]
    for i in order:
        if remaining == 0:
            break
        extra = min(remaining, sizes[i] - out[i])
        out[i] += extra
        remaining -= extra
    if remaining:
        raise ValueError(f"budget {target} > {int(sizes[order].sum())} samples in clusters with P > 0")
    return out


def cluster_probs(method: str, t: np.ndarray, d: np.ndarray, active: np.ndarray, tau: float) -> np.ndarray:
    p = np.zeros(len(t))
    ta, da = t[active], d[active]
    if method in ("coincide", "random_in_cluster"):
        p[active] = softmax(ta / (tau * da))
    elif method == "transfer_only":
        p[active] = softmax(ta / tau)
    elif method == "density_only":
        p[active] = softmax(1.0 / (tau * da))
    elif method == "uniform_clusters":
        p[active] = 1.0 / active.sum()
    else:
        raise ValueError(f"method {method!r} is not a cluster method {CLUSTER_METHODS}")
    return p


def select_clusters(x, assign: np.ndarray, centroids: np.ndarray, n_layers: int, target: int, *,
                    method: str = "coincide", tau: float = 0.1, sigma: float = 1.0, seed: int = 0) -> dict:
    """Rows picked by a cluster method: {"picked" (row indices, ascending), "clusters": [{cluster, size, T, D,
    P, budget}]}. x: (N, 2LD) features (memmap is fine: one cluster is read at a time)."""
    n, k = len(assign), len(centroids)
    if target > n:
        raise ValueError(f"budget {target} > N={n} samples")
    if k > n:
        raise ValueError(f"K={k} clusters > N={n} samples")
    sizes = np.bincount(assign, minlength=k)
    active = sizes > 0
    members = np.split(np.argsort(assign, kind="stable"), np.cumsum(sizes)[:-1])
    t = transferability(centroids, n_layers, active)
    d, col_means = np.full(k, np.nan), {}
    for i in np.flatnonzero(active):
        col_means[i] = kernel_col_means(np.asarray(x[members[i]], np.float64), sigma)
        d[i] = col_means[i].mean()
    p = cluster_probs(method, t, d, active, tau)
    budgets = allocate(p, sizes, target)
    rng = np.random.default_rng(seed)
    picked = []
    for i in np.flatnonzero(budgets):
        rows = members[i]
        if method == "random_in_cluster":
            local = rng.choice(len(rows), budgets[i], replace=False)
        else:
            local = mmd_greedy(np.asarray(x[rows], np.float64), int(budgets[i]), sigma, col_means[i])
        picked += rows[np.asarray(local)].tolist()
    clusters = [{"cluster": int(i), "size": int(sizes[i]), "T": _num(t[i]), "D": _num(d[i]), "P": float(p[i]),
                 "budget": int(budgets[i])} for i in range(k)]
    return {"picked": sorted(picked), "clusters": clusters}


def _num(v) -> float | None:
    return None if np.isnan(v) else float(v)


def select_random(n: int, target: int, seed: int) -> list[int]:
    if target > n:
        raise ValueError(f"budget {target} > N={n} samples")
    return sorted(np.random.default_rng(seed).choice(n, target, replace=False).tolist())


def select_stratified(labels, target: int, seed: int) -> tuple[list[int], dict]:
    """Budgets proportional to label counts (largest remainder, ties by label order), random within a label."""
    labels = [str(x) for x in labels]
    if target > len(labels):
        raise ValueError(f"budget {target} > N={len(labels)} samples")
    names = sorted(set(labels))
    idx = {s: [i for i, x in enumerate(labels) if x == s] for s in names}
    quota = np.array([target * len(idx[s]) / len(labels) for s in names])
    budget = np.floor(quota).astype(int)
    for j in np.argsort(-(quota - budget), kind="stable")[: target - budget.sum()]:
        budget[j] += 1
    rng = np.random.default_rng(seed)
    picked = []
    for s, b in zip(names, budget):
        picked += rng.choice(idx[s], int(b), replace=False).tolist() if b else []
    return sorted(picked), dict(zip(names, budget.tolist()))


def select_ppl_low(keys, scores_path, target: int) -> list[int]:
    """The `target` rows with the lowest perplexity in a `score_dataset` JSONL (ties by row order)."""
    ppl = {}
    with open(scores_path, encoding="utf-8") as f:
        for line in filter(str.strip, f):
            r = json.loads(line)
            if "perplexity" in r:
                ppl[r["id"]] = r["perplexity"]
    missing = [k for k in keys if k not in ppl]
    if missing:
        raise KeyError(f"{scores_path}: no perplexity for {missing[:5]} ({len(missing)} samples)")
    if target > len(keys):
        raise ValueError(f"budget {target} > N={len(keys)} samples")
    order = np.argsort([ppl[k] for k in keys], kind="stable")
    return sorted(order[:target].tolist())


def write_outputs(out_dir, records: list, record_keys: list[str], pool_keys: list[str], picked: list[int],
                  info: dict, per_row: dict | None = None, subset_name: str = "subset.json") -> dict:
    """selection.json ({**info, "selected": [{id, cluster, T, D, budget}]}) and the subset file (the selected
    records of the original file, in file order), each temp + rename."""
    pos = {k: i for i, k in enumerate(record_keys)}
    missing = [pool_keys[i] for i in picked if pool_keys[i] not in pos]
    if missing:
        raise KeyError(f"selected ids not in the data file: {missing[:5]}")
    rows = sorted(pos[pool_keys[i]] for i in picked)
    per_row = per_row or {}
    selected = [{"id": pool_keys[i], **per_row.get(i, {})} for i in picked]
    body = {**info, "selected_count": len(picked), "selected": selected}
    os.makedirs(out_dir, exist_ok=True)
    for name, obj in (("selection.json", body), (subset_name, [records[r] for r in rows])):
        path = os.path.join(out_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False)
        os.replace(path + ".tmp", path)
    return body
