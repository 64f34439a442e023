"""COINCIDE benchmark: spherical k-means, JAX backend vs faiss-cpu from the same init, and the selection step.

    python bench/coincide.py                                   # issue 17's size: 100k x 2048, K 1000, 10 iterations
    python bench/coincide.py --n 20000 --d 512 --k 200 --iters 5

k-means: s/iter for both backends (JAX: after a compiling step, device step + host update as in the loop; faiss stops early
once converged, so its s/iter divides by the iterations it ran) and the final objective of each (mean cosine of
a row to its centroid; the same init should give the same objective to ~1e-4). Selection: wall-clock of
`select_clusters` (T, D, budgets, MMD prototypes) for 20% of the rows with the JAX clusters. Not measured here
yet: capture samples/s vs transformers + o_proj hooks. Data: unit rows around `--k` random directions (noise 1.0).
Ends with `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def data(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)).astype(np.float32)
    x = centers[rng.integers(0, k, n)] + rng.normal(size=(n, d)).astype(np.float32) * np.sqrt(1.0)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    a = p.parse_args()
    from vlmjax.recipes.coincide import kmeans as K
    from vlmjax.recipes.coincide import select as S

    x = data(a.n, a.d, a.k)
    res = {"n": a.n, "d": a.d, "k": a.k, "iters": a.iters}
    from vlmjax.sharding import make_mesh

    rows, c = K._JaxRows(x, make_mesh(), 4096), K.init_centroids(x, a.k, a.seed)
    rows.step(c, a.k)  # compile
    t1 = time.perf_counter()
    for it in range(a.iters):  # the iteration of spherical_kmeans: device step + host update / re-seeding
        _, sums, counts, _ = rows.step(c, a.k)
        c = K.reseed(x, np.where(counts[:, None] > 0, K._l2n(sums), c).astype(np.float32), counts, a.seed, it)
    res["jax_s_per_iter"] = (time.perf_counter() - t1) / a.iters
    r = K.spherical_kmeans(x, a.k, iters=a.iters, seed=a.seed)
    res["jax_objective"] = r["objective"][-1]
    try:
        import faiss  # noqa: F401

        t3 = time.perf_counter()
        f = K.spherical_kmeans(x, a.k, iters=a.iters, seed=a.seed, backend="faiss")
        res["faiss_s_per_iter"] = (time.perf_counter() - t3) / len(f["objective"])
        res["faiss_objective"] = f["objective"][-1]
        res["faiss_iters_run"] = len(f["objective"])
        res["objective_diff"] = abs(res["faiss_objective"] - res["jax_objective"])
    except ImportError:
        res["faiss"] = "not installed (pip install 'vlmjax[faiss]')"
    t4 = time.perf_counter()
    n_layers = 1  # rows read as one layer's [image, text] halves
    out = S.select_clusters(x, r["assign"], r["centroids"], n_layers, int(0.2 * a.n + 0.5))
    res["select_s"] = time.perf_counter() - t4
    res["selected"] = len(out["picked"])
    for k, v in res.items():
        print(f"{k}: {v}")
    print("RESULT " + json.dumps(res))
    return res


if __name__ == "__main__":
    main()
