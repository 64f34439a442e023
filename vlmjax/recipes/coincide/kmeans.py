"""COINCIDE step 2: spherical k-means (cosine), seeded, resumable; JAX by default, faiss-cpu optional.

One iteration: assign every row to its most similar centroid (blocked matmul + argmax, rows sharded over the
mesh's `data` axis), then each centroid = l2n(sum of its rows) from per-device `segment_sum`s psum'd over `data`.
A cluster left empty is re-seeded with rows drawn by np.random.default_rng([seed, iteration]) (deterministic, the
same in the numpy reference of the tests). Init: K distinct rows drawn by default_rng(seed), shared by both
backends. The objective (mean cosine of each row to its centroid) is logged per iteration; the run fails on
collapse (max off-diagonal centroid cosine > 0.999: the "all centroids identical" the reference's users hit) or
when more than 5% of the clusters are empty at the end. Centroids are checkpointed every `save_every` iterations
(`out_dir/kmeans_ckpt.npz`, temp + rename) and a rerun resumes from there.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)
COLLAPSE_COS, MAX_EMPTY_FRAC = 0.999, 0.05


def init_centroids(x, k: int, seed: int) -> np.ndarray:
    n = len(x)
    if k > n:
        raise ValueError(f"K={k} clusters > N={n} samples")
    idx = np.sort(np.random.default_rng(seed).choice(n, k, replace=False))
    return _l2n(np.asarray(x[idx], np.float32))


def reseed(x, centroids: np.ndarray, counts: np.ndarray, seed: int, iteration: int) -> np.ndarray:
    """Empty clusters get rows drawn by default_rng([seed, iteration]) (distinct, in cluster order)."""
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        idx = np.random.default_rng([seed, iteration]).choice(len(x), empty.size, replace=False)
        centroids = centroids.copy()
        centroids[empty] = _l2n(np.asarray(x[np.sort(idx)], np.float32))
    return centroids


def _l2n(x):
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def _local_step(x, w, c, *, k: int, block: int):
    """Per-device rows x (n, d) with weights w (n,) (0 = padding): (assign, per-cluster sums, counts, sum cos)."""
    n, d = x.shape
    xb = x.reshape(n // block, block, d)

    def assign(xi):
        s = xi @ c.T
        return jnp.argmax(s, axis=1), jnp.max(s, axis=1)

    a, best = jax.lax.map(assign, xb)
    a, best = a.reshape(n), best.reshape(n)
    sums = jax.ops.segment_sum(x * w[:, None], a, num_segments=k)
    counts = jax.ops.segment_sum(w, a, num_segments=k)
    return a, sums, counts, jnp.sum(best * w)


@functools.lru_cache(maxsize=8)
def _step_fn(mesh, k: int, block: int):
    def f(x, w, c):
        a, sums, counts, obj = _local_step(x, w, c, k=k, block=block)
        return a, jax.lax.psum(sums, "data"), jax.lax.psum(counts, "data"), jax.lax.psum(obj, "data")

    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("data"), P("data"), P()),
                                 out_specs=(P("data"), P(), P(), P())))


class _JaxRows:
    """The rows on the mesh once (padded to a multiple of devices x block), reused every iteration."""

    def __init__(self, x, mesh, block: int):
        self.mesh, self.n = mesh, len(x)
        nd = mesh.shape["data"]
        self.block = max(1, min(block, -(-self.n // nd)))
        total = -(-self.n // (nd * self.block)) * nd * self.block
        d = x.shape[1]

        def rows(idx):  # one device's block of rows, read from the (memmapped) features and cast on the way
            lo, hi, _ = idx[0].indices(total)
            out = np.zeros((hi - lo, d), np.float32)
            if lo < self.n:
                out[: min(hi, self.n) - lo] = x[lo: min(hi, self.n)]
            return out

        w = np.zeros(total, np.float32)
        w[: self.n] = 1.0
        sh = NamedSharding(mesh, P("data"))  # each process reads only its own devices' rows
        self.x = jax.make_array_from_callback((total, d), sh, rows)
        self.w = jax.make_array_from_callback(w.shape, sh, lambda i: w[i])

    def step(self, c: np.ndarray, k: int):
        a, sums, counts, obj = _step_fn(self.mesh, k, self.block)(self.x, self.w, jnp.asarray(c))
        if jax.process_count() > 1:
            from jax.experimental.multihost_utils import process_allgather

            a = process_allgather(a, tiled=True)
        return (np.asarray(a)[: self.n], np.asarray(sums, np.float64), np.rint(np.asarray(counts)).astype(np.int64),
                float(obj) / self.n)


def max_offdiag_cos(c: np.ndarray, block: int = 4096) -> float:
    cj = jnp.asarray(c, jnp.float32)
    best = -1.0
    for s in range(0, len(c), block):
        g = cj[s: s + block] @ cj.T
        g = g.at[jnp.arange(g.shape[0]), jnp.arange(s, s + g.shape[0])].set(-jnp.inf)
        best = max(best, float(jnp.max(g)))
    return best


def _save_ckpt(path: str, c: np.ndarray, it: int, history: list, key: dict) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, centroids=c, iteration=it, history=np.asarray(history, np.float64), key=json.dumps(key))
    os.replace(tmp, path)


def spherical_kmeans(x, k: int, *, iters: int = 50, seed: int = 1234, backend: str = "jax", mesh=None,
                     block: int = 4096, out_dir=None, save_every: int = 10) -> dict:
    """x (N, D) unit rows (array or memmap). Returns {"centroids" (K, D) fp32, "assign" (N,), "counts" (K,),
    "objective" [per iteration], "empty", "max_centroid_cos", "resumed_from"}. out_dir: checkpoint folder."""
    n, d = x.shape
    if k > n:
        raise ValueError(f"K={k} clusters > N={n} samples")
    if backend == "faiss":
        return _faiss_kmeans(x, k, iters=iters, seed=seed)
    if backend != "jax":
        raise ValueError(f"backend={backend!r}: use 'jax' or 'faiss'")
    if mesh is None:
        from vlmjax.sharding import make_mesh

        mesh = make_mesh()
    key = {"n": n, "d": d, "k": k, "seed": seed}
    ckpt = os.path.join(out_dir, "kmeans_ckpt.npz") if out_dir else None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
    c, start, history = init_centroids(x, k, seed), 0, []
    if ckpt and os.path.exists(ckpt):
        z = np.load(ckpt)
        if json.loads(str(z["key"])) != key:
            raise ValueError(f"{ckpt} is from a run with {json.loads(str(z['key']))}, not {key}: use another folder")
        c, start, history = z["centroids"], int(z["iteration"]), list(z["history"])
        log.info("k-means: resuming at iteration %d from %s", start, ckpt)
    rows = _JaxRows(x, mesh, block)
    for it in range(start, iters):
        _, sums, counts, obj = rows.step(c, k)
        history.append(obj)
        c = np.where(counts[:, None] > 0, _l2n(sums), c).astype(np.float32)
        c = reseed(x, c, counts, seed, it)
        log.info("k-means iter %d/%d: objective %.6f, empty %d", it + 1, iters, obj, int((counts == 0).sum()))
        if ckpt and ((it + 1) % save_every == 0 or it + 1 == iters):
            _save_ckpt(ckpt, c, it + 1, history, key)
    assign, _, counts, _ = rows.step(c, k)
    return _finish(c, assign, counts, history, resumed_from=start)


def _finish(c, assign, counts, history, **extra) -> dict:
    k = len(c)
    empty = int((counts == 0).sum())
    cos = max_offdiag_cos(c) if k > 1 else -1.0
    if cos > COLLAPSE_COS:
        raise RuntimeError(f"k-means collapsed: max off-diagonal centroid cosine {cos:.6f} > {COLLAPSE_COS} "
                           "(check the features' dimension and that rows differ)")
    if empty > MAX_EMPTY_FRAC * k:
        raise RuntimeError(f"k-means: {empty} of {k} clusters empty (> {MAX_EMPTY_FRAC:.0%}): lower K")
    return {"centroids": np.asarray(c, np.float32), "assign": np.asarray(assign, np.int64),
            "counts": np.asarray(counts, np.int64), "objective": [float(o) for o in history], "empty": empty,
            "max_centroid_cos": cos, **extra}


def _faiss_kmeans(x, k: int, *, iters: int, seed: int) -> dict:
    try:
        import faiss
    except ImportError as e:
        raise ImportError("backend='faiss' needs faiss-cpu: pip install 'vlmjax[faiss]'") from e
    xs = np.ascontiguousarray(np.asarray(x, np.float32))
    km = faiss.Kmeans(xs.shape[1], k, niter=iters, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=len(xs), min_points_per_centroid=1)
    km.train(xs, init_centroids=init_centroids(xs, k, seed))
    sims, assign = km.index.search(xs, 1)
    counts = np.bincount(assign[:, 0], minlength=k)
    history = [float(o) / len(xs) for o in km.obj]
    return _finish(km.centroids, assign[:, 0], counts, history, resumed_from=0)


def save_clusters(out_dir, result: dict, ids, info: dict) -> None:
    """centroids.npy, assign.npy and kmeans.json (objective log, counts, settings), each temp + rename."""
    os.makedirs(out_dir, exist_ok=True)
    for name in ("centroids", "assign"):
        tmp = os.path.join(out_dir, f"{name}.tmp.npy")
        np.save(tmp, result[name])
        os.replace(tmp, os.path.join(out_dir, f"{name}.npy"))
    body = {**info, "n": len(ids), "objective": result["objective"], "empty": result["empty"],
            "max_centroid_cos": result["max_centroid_cos"], "resumed_from": result["resumed_from"],
            "counts": result["counts"].tolist()}
    tmp = os.path.join(out_dir, "kmeans.json.tmp")
    with open(tmp, "w") as f:
        json.dump(body, f)
    os.replace(tmp, os.path.join(out_dir, "kmeans.json"))


def load_clusters(out_dir) -> tuple[np.ndarray, np.ndarray, dict]:
    with open(os.path.join(out_dir, "kmeans.json")) as f:
        info = json.load(f)
    return np.load(os.path.join(out_dir, "centroids.npy")), np.load(os.path.join(out_dir, "assign.npy")), info
