"""COINCIDE core: feature vectors, spherical k-means (vs a numpy reference, 8 CPU devices, resume), selection
formulas (T, D, budgets, MMD picks vs hand / brute-force numpy), baselines, and the recipe end to end on a tiny VLM."""

import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from vlmjax.recipes.coincide import features as F
from vlmjax.recipes.coincide import kmeans as K
from vlmjax.recipes.coincide import select as S
from vlmjax.scoring import ShardWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- features ---------------------------------------------------------------------------------------------------

def _ref_vector(row):
    """numpy formula, written out: row (1, L, 2, D) -> concat_l [l2n(tanh v), l2n(tanh t)] / sqrt(2L)."""
    n_layers = row.shape[1]
    parts = []
    for l in range(n_layers):
        for g in range(2):
            v = np.tanh(row[0, l, g].astype(np.float64))
            parts.append(v / np.linalg.norm(v) if np.linalg.norm(v) > 0 else v)
    f = np.concatenate(parts) / np.sqrt(2 * n_layers)
    return f


def test_sample_vectors_formula_norms_and_text_only():
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(4, 1, 3, 2, 5)).astype(np.float32)
    rows[2, 0, :, 0] = 0.0  # text-only sample: image means are zero
    vec, text_only, bad = F.sample_vectors(rows)
    assert vec.shape == (4, 2 * 3 * 5) and text_only.tolist() == [False, False, True, False] and bad == {}
    for i in (0, 1, 3):
        np.testing.assert_allclose(vec[i], _ref_vector(rows[i]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1.0, atol=1e-6)
    img_half = vec[2].reshape(3, 2, 5)[:, 0]
    assert np.all(img_half == 0) and np.all(np.isfinite(vec))
    np.testing.assert_allclose(vec[2], _ref_vector(rows[2]) * np.sqrt(2), atol=1e-6)
    rows[1, 0, 1, 1] = 0.0  # no text after the image at layer 1: no vector (never NaN)
    rows[3, 0, 2, 0] = 0.0  # an image mean that is zero at one layer only
    vec, text_only, bad = F.sample_vectors(rows)
    assert bad == {1: "zero text mean (no text after the image)", 3: "zero image mean at some layers only"}
    assert np.all(vec[[1, 3]] == 0) and np.all(np.isfinite(vec)) and text_only.tolist() == [False, False, True, False]


def _capture_dir(path, n=10, layers=(3, 7), d=4, span="after_image", seed=0, shard_size=4, centers=None):
    rng = np.random.default_rng(seed)
    meta = {"parts": ["attn"], "layers": list(layers), "groups": ["image", "text"], "span": span}
    rows = rng.normal(size=(n, 1, len(layers), 2, d)).astype(np.float32)
    if centers is not None:
        rows = centers[np.arange(n) % len(centers)] + 0.05 * rows
    ids = [f"s{i}" for i in range(n)]
    with ShardWriter(path, rows.shape[1:], "float16", shard_size=shard_size, meta=meta) as w:
        for s in range(0, n, 3):
            w.add(ids[s: s + 3], rows[s: s + 3])
    return ids, rows.astype(np.float16).astype(np.float32)


def test_build_features_streams_shards_and_checks_meta(tmp_path):
    ids, rows = _capture_dir(tmp_path / "cap", n=10)
    text_only = rows[4:5].copy()
    text_only[0, 0, :, 0] = 0.0
    _capture_dir(tmp_path / "cap2", n=10)
    no_text = rows[:1].copy()
    no_text[0, 0, 1, 1] = 0.0
    w = ShardWriter(tmp_path / "cap", rows.shape[1:], "float16", shard_size=4)  # a text-only sample appended
    w.add(["z", "t"], np.concatenate([no_text, text_only]))  # and one without text after its image: dropped
    w.close()
    info = F.build_features(tmp_path / "cap", tmp_path / "f", expect={"layers": (3, 7)}, model="ref-a")
    assert info["dim"] == 2 * 2 * 4 and info["rows"] == 11 and info["text_only"] == 1 and info["model"] == "ref-a"
    assert info["dropped"] == {"z": "zero text mean (no text after the image)"}
    got_ids, x, meta = F.load_features(tmp_path / "f", expect={"model": "ref-a", "layers": [3, 7]})
    assert got_ids == ids + ["t"] and x.dtype == np.float16 and isinstance(x, np.memmap)
    ref = np.stack([_ref_vector(r) for r in rows] + [_ref_vector(text_only[0]) * np.sqrt(2)])
    np.testing.assert_allclose(x, ref, atol=2e-3)  # fp16 storage
    assert np.all(x[10].reshape(2, 2, 4)[:, 0] == 0)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(x, np.float32), axis=1), 1.0, atol=2e-3)
    # another model / layers / span: an error naming both
    with pytest.raises(ValueError, match=r"model='ref-a'.*expected model='ref-b'"):
        F.load_features(tmp_path / "f", expect={"model": "ref-b"})
    with pytest.raises(ValueError, match=r"layers=\[3, 7\].*expected layers=\[3, 7, 11\]"):
        F.build_features(tmp_path / "cap", tmp_path / "g", expect={"layers": (3, 7, 11)})
    _capture_dir(tmp_path / "all", span="all")
    with pytest.raises(ValueError, match=r"span='all'.*expected span='after_image'"):
        F.build_features(tmp_path / "all", tmp_path / "g")
    (tmp_path / "cap2" / "reference.json").write_text('{"model": "ref-a"}')
    with pytest.raises(ValueError, match=r"model='ref-a'.*expected model='ref-b'"):
        F.build_features(tmp_path / "cap2", tmp_path / "g", expect={"model": "ref-b"})
    # a wrong-shaped feature file (the reference's "all centroids identical")
    np.save(tmp_path / "f" / "features.npy", np.zeros((11, 8), np.float16))
    with pytest.raises(ValueError, match=r"\(11, 8\), expected \(11, 16\)"):
        F.load_features(tmp_path / "f")


# ---- k-means ----------------------------------------------------------------------------------------------------

def numpy_kmeans(x, k, iters, seed):
    """Reference: same init and re-seeding rule, float64, dense argmax assignment."""
    x = np.asarray(x, np.float64)
    idx = np.sort(np.random.default_rng(seed).choice(len(x), k, replace=False))
    c = x[idx] / np.linalg.norm(x[idx], axis=1, keepdims=True)
    objs = []
    for it in range(iters):
        s = x @ c.T
        a = s.argmax(1)
        objs.append(s.max(1).mean())
        sums = np.zeros_like(c)
        np.add.at(sums, a, x)
        counts = np.bincount(a, minlength=k)
        new = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-300)
        c = np.where(counts[:, None] > 0, new, c)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            r = np.sort(np.random.default_rng([seed, it]).choice(len(x), empty.size, replace=False))
            c[empty] = x[r] / np.linalg.norm(x[r], axis=1, keepdims=True)
    return c, (x @ c.T).argmax(1), objs


def _blobs(n=300, d=16, k_true=6, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k_true, d))
    x = centers[rng.integers(0, k_true, n)] + 0.6 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_kmeans_matches_numpy_reference_and_resumes(tmp_path):
    x = _blobs()
    c_ref, a_ref, obj_ref = numpy_kmeans(x, 12, 15, seed=3)
    r = K.spherical_kmeans(x, 12, iters=15, seed=3, block=64)
    np.testing.assert_array_equal(r["assign"], a_ref)
    np.testing.assert_allclose(r["centroids"], c_ref, atol=1e-5)
    np.testing.assert_allclose(r["objective"], obj_ref, atol=1e-5)
    assert r["objective"][-1] > r["objective"][0] and r["counts"].sum() == 300
    # checkpoints every 5 iterations; a run stopped at 10 resumes to the same 15-iteration result
    K.spherical_kmeans(x, 12, iters=10, seed=3, out_dir=tmp_path, save_every=5)
    assert int(np.load(tmp_path / "kmeans_ckpt.npz")["iteration"]) == 10
    r2 = K.spherical_kmeans(x, 12, iters=15, seed=3, out_dir=tmp_path, save_every=5)
    assert r2["resumed_from"] == 10 and len(r2["objective"]) == 15
    np.testing.assert_array_equal(r2["assign"], r["assign"])
    np.testing.assert_allclose(r2["centroids"], r["centroids"], atol=1e-6)
    with pytest.raises(ValueError, match="kmeans_ckpt.npz is from a run with"):
        K.spherical_kmeans(x, 11, iters=15, seed=3, out_dir=tmp_path)


def test_kmeans_reseeds_empty_clusters_like_the_reference():
    x = _blobs(n=60, d=8, k_true=2, seed=1)  # 2 true clusters, 9 centroids: some go empty and are re-seeded
    c_ref, a_ref, _ = numpy_kmeans(x, 9, 6, seed=0)
    r = K.spherical_kmeans(x, 9, iters=6, seed=0, block=16)
    np.testing.assert_array_equal(r["assign"], a_ref)
    np.testing.assert_allclose(r["centroids"], c_ref, atol=1e-5)


def test_kmeans_fails_on_collapse_too_many_empty_and_k_above_n():
    x = np.tile(_blobs(n=1, d=8), (20, 1))  # identical rows: every centroid is the same vector
    with pytest.raises(RuntimeError, match="collapsed: max off-diagonal centroid cosine 1.0"):
        K.spherical_kmeans(x, 3, iters=2)
    c = np.eye(40, dtype=np.float32)
    counts = np.r_[np.zeros(3), np.ones(37)].astype(int)  # 3 of 40 empty = 7.5%
    with pytest.raises(RuntimeError, match="3 of 40 clusters empty"):
        K._finish(c, np.zeros(37, int), counts, [0.0], resumed_from=0)
    K._finish(c, np.zeros(38, int), np.r_[np.zeros(2), np.ones(38)].astype(int), [0.0], resumed_from=0)
    with pytest.raises(ValueError, match="K=40 clusters > N=20 samples"):
        K.spherical_kmeans(x, 40)


def test_kmeans_rows_sharded_over_8_devices_equal_numpy(tmp_path):
    """8 forced CPU devices (XLA_FLAGS before jax is imported: a subprocess): per-device segment sums psum'd."""
    x = _blobs(n=203, d=8, k_true=4, seed=2)  # not a multiple of 8: padded rows carry weight 0
    np.save(tmp_path / "x.npy", x)
    code = ("import numpy as np, jax; from vlmjax.recipes.coincide import kmeans as K; "
            "assert len(jax.devices()) == 8; x = np.load('x.npy'); r = K.spherical_kmeans(x, 7, iters=8, seed=5, "
            "block=8); np.save('a.npy', r['assign']); np.save('c.npy', r['centroids'])")
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"  # keeps conftest's flags
    env = {**os.environ, "XLA_FLAGS": xla_flags, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": ROOT}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=300)
    c_ref, a_ref, _ = numpy_kmeans(x, 7, 8, seed=5)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), a_ref)
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), c_ref, atol=1e-5)


KMEANS_2PROC = """
import sys, numpy as np, jax
coordinator, pid = sys.argv[1], int(sys.argv[2])
jax.distributed.initialize(coordinator, 2, pid)
from vlmjax.recipes.coincide import kmeans as K
assert jax.process_count() == 2 and len(jax.devices()) == 2
r = K.spherical_kmeans(np.load("x.npy", mmap_mode="r"), 7, iters=8, seed=5, block=8)
np.save(f"a{pid}.npy", r["assign"]); np.save(f"c{pid}.npy", r["centroids"])
"""


@pytest.mark.slow
def test_kmeans_two_processes_equal_numpy(tmp_path):
    """Two jax.distributed CPU processes: each places its own rows; per-cluster sums psum'd across processes."""
    import socket

    x = _blobs(n=203, d=8, k_true=4, seed=2)
    np.save(tmp_path / "x.npy", x)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, "-c", KMEANS_2PROC, f"127.0.0.1:{port}", str(i)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    c_ref, a_ref, _ = numpy_kmeans(x, 7, 8, seed=5)
    for i in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"a{i}.npy"), a_ref)
        np.testing.assert_allclose(np.load(tmp_path / f"c{i}.npy"), c_ref, atol=1e-5)


def test_kmeans_faiss_backend_same_init():
    """faiss-cpu (optional) from the same init: same assignments, centroids and objective log (no empty clusters
    here; faiss splits empty clusters its own way). Passes with faiss-cpu 1.15.1."""
    pytest.importorskip("faiss", reason="optional: pip install 'vlmjax[faiss]' (faiss-cpu)")
    x = _blobs()
    r_f = K.spherical_kmeans(x, 6, iters=20, seed=3, backend="faiss")
    r_j = K.spherical_kmeans(x, 6, iters=20, seed=3)
    assert r_f["empty"] == r_j["empty"] == 0
    np.testing.assert_array_equal(r_f["assign"], r_j["assign"])
    np.testing.assert_allclose(r_f["centroids"], r_j["centroids"], atol=1e-5)
    m = len(r_f["objective"])  # faiss stops once converged; ours keeps iterating at the same objective
    np.testing.assert_allclose(r_f["objective"], r_j["objective"][:m], atol=1e-5)
    np.testing.assert_allclose(r_j["objective"][m:], r_f["objective"][-1], atol=1e-5)


# ---- selection formulas -----------------------------------------------------------------------------------------

def test_transferability_hand_example():
    # L = 1, D = 2: a centroid row is [image(2), text(2)]; only text halves count
    t = np.array([[1, 0], [1, 0.01], [0, 1], [-1, 0]], np.float64)  # cos(0,1) ~ 1 > 0.9: masked
    img = np.random.default_rng(0).normal(size=(4, 2))
    c = np.concatenate([img, t], 1)
    got = S.transferability(c, 1)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    cos = tn @ tn.T
    # by hand: cluster 0 sees 2 (cos 0) and 3 (cos -1) -> -0.5; cluster 2 sees 0, 1, 3 -> (0 + 0.0099995 + 0) / 3;
    # cluster 3 sees 0, 1, 2 -> (-1 - 0.99995 + 0) / 3
    assert np.isclose(got[0], -0.5) and np.isclose(got[2], cos[2, 1] / 3) and np.isclose(got[3], (-1 + cos[3, 1] + 0) / 3)
    act = np.array([True, True, True, False])
    got = S.transferability(c, 1, act)
    assert np.isnan(got[3]) and np.isclose(got[0], 0.0)


def test_density_kernel_hand_example():
    x = np.array([[0.0, 0.0], [3.0, 4.0]])  # |x - y|^2 = 25
    assert np.isclose(S.density(x), (2 + 2 * np.exp(-12.5)) / 4)
    x = np.random.default_rng(0).normal(size=(7, 3))
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    assert np.isclose(S.density(x), np.exp(-d2 / 2).mean(), rtol=1e-12)
    assert np.isclose(S.kernel_col_means(x, block=2)[3], np.exp(-d2 / 2)[:, 3].mean())


def test_budgets_sequential_pass_the_rest_on():
    t, d = np.array([0.2, 0.1, 0.0, -0.1]), np.array([0.5, 0.5, 1.0, 0.25])
    p = S.cluster_probs("coincide", t, d, np.ones(4, bool), 0.1)
    z = t / (0.1 * d)
    np.testing.assert_allclose(p, np.exp(z) / np.exp(z).sum())  # softmax([4, 2, 0, -4])
    # by hand, target 10, sizes [3, 50, 50, 50]: cluster 0 gets min(round(10 * .865), 3) = 3; the 7 left go on
    sizes = np.array([3, 50, 50, 50])
    b = S.allocate(p, sizes, 10)
    p1 = p[1] / p[1:].sum()
    assert b[0] == 3 and b[1] == int(np.floor(7 * p1 + 0.5)) and b.sum() == 10
    assert S.allocate(np.array([0.5, 0.3, 0.2]), np.array([1, 1, 8]), 7).tolist() == [1, 1, 5]
    # visit order 2, 1, 0: cluster 2 gets min(8, 1) = 1 and passes 11 on; cluster 1 round(11 * 2 / 3) = 7
    assert S.allocate(np.array([0.1, 0.2, 0.7]), np.array([10, 10, 1]), 12).tolist() == [4, 7, 1]
    # the last cluster too small: 1, 7, then min(4, 2) = 2; a second pass in P order fills cluster 1's room (+2)
    assert S.allocate(np.array([0.7, 0.2, 0.1]), np.array([1, 10, 2]), 12).tolist() == [1, 9, 2]
    with pytest.raises(ValueError, match="budget 30 > N=21 samples"):
        S.allocate(np.ones(3), np.array([10, 10, 1]), 30)
    assert S.cluster_probs("uniform_clusters", t, d, np.array([1, 1, 0, 1], bool), 0.1).tolist() == \
        [1 / 3, 1 / 3, 0, 1 / 3]
    np.testing.assert_allclose(S.cluster_probs("transfer_only", t, d, np.ones(4, bool), 0.1), S.softmax(t / 0.1))
    np.testing.assert_allclose(S.cluster_probs("density_only", t, d, np.ones(4, bool), 0.1), S.softmax(1 / (0.1 * d)))


def _mmd2(x, sel):
    k = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / 2)
    return k.mean() - 2 * k[:, sel].mean() + k[np.ix_(sel, sel)].mean()


def test_mmd_greedy_equals_brute_force_numpy():
    x = np.random.default_rng(1).normal(size=(25, 4)) * 0.7
    picks = S.mmd_greedy(x, 6)
    sel = []
    for _ in range(6):  # brute force: evaluate MMD^2 of every candidate set explicitly
        costs = [np.inf if c in sel else _mmd2(x, sel + [c]) for c in range(len(x))]
        sel.append(int(np.argmin(costs)))
    assert picks == sel
    # the first pick is the row with the largest kernel column mean (the most central sample)
    k = np.exp(-((x[:, None] - x[None]) ** 2).sum(-1) / 2)
    assert picks[0] == int(k.mean(0).argmax())
    with pytest.raises(ValueError, match="budget 26 > cluster size 25"):
        S.mmd_greedy(x, 26)


def test_select_clusters_exact_count_and_errors():
    x = _blobs(n=80, d=8, k_true=4, seed=4)
    r = K.spherical_kmeans(x, 5, iters=5, seed=0)
    x4 = np.concatenate([x, x], 1)  # L = 1, D = 8: [image, text]
    c4 = np.concatenate([r["centroids"]] * 2, 1)
    for method in S.CLUSTER_METHODS:
        out = S.select_clusters(x4, r["assign"], c4, 1, 17, method=method)
        assert len(out["picked"]) == 17 == len(set(out["picked"]))
        assert sum(c["budget"] for c in out["clusters"]) == 17
        for c in out["clusters"]:
            assert c["budget"] <= c["size"]
            assert sum(r["assign"][i] == c["cluster"] for i in out["picked"]) == c["budget"]
    with pytest.raises(ValueError, match="budget 81 > N=80 samples"):
        S.select_clusters(x4, r["assign"], c4, 1, 81)


def test_select_clusters_skips_empty_cluster_ids():
    """A cluster id with no rows (allowed up to 5%) takes no part in T, D or the budgets (the reference's arrays
    assume every id is present)."""
    rng = np.random.default_rng(0)
    x = _l2n_rows(rng.normal(size=(30, 8)))
    cents = _l2n_rows(rng.normal(size=(4, 8)))
    assign = np.array([0, 1, 3] * 10)  # cluster 2 empty
    out = S.select_clusters(x, assign, cents, 1, 9)
    c = out["clusters"]
    assert c[2] == {"cluster": 2, "size": 0, "T": None, "D": None, "P": 0.0, "budget": 0}
    t_ref = S.transferability(cents[[0, 1, 3]], 1)
    assert np.allclose([c[i]["T"] for i in (0, 1, 3)], t_ref)
    assert np.isclose(c[3]["D"], S.density(x[assign == 3]))
    assert sum(v["budget"] for v in c) == 9 == len(out["picked"])


def _l2n_rows(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_baselines_random_stratified_ppl(tmp_path):
    assert S.select_random(10, 4, 0) == S.select_random(10, 4, 0) and len(S.select_random(10, 4, 1)) == 4
    labels = ["yes"] * 14 + ["color"] * 3 + ["shape"] * 3
    picked, budgets = S.select_stratified(labels, 10, 0)
    assert budgets == {"color": 1, "shape": 2, "yes": 7} or budgets == {"color": 2, "shape": 1, "yes": 7}
    assert len(picked) == 10 and sum(labels[i] == "yes" for i in picked) == 7
    scores = tmp_path / "ppl.jsonl"
    scores.write_text("".join(json.dumps({"id": f"s{i}", "perplexity": p}) + "\n" for i, p in
                              enumerate([5.0, 1.0, 3.0, 2.0])) + '{"id": "s9", "error": "x"}\n')
    assert S.select_ppl_low(["s0", "s1", "s2", "s3"], scores, 2) == [1, 3]
    with pytest.raises(KeyError, match="no perplexity for \\['s9'\\]"):
        S.select_ppl_low(["s0", "s9"], scores, 1)


# ---- end to end -------------------------------------------------------------------------------------------------

README_COMMANDS = [
    "python -m vlmjax.recipes.coincide features --capture runs/coincide/capture --out runs/coincide/feats",
    "python -m vlmjax.recipes.coincide kmeans --features runs/coincide/feats --out runs/coincide/clusters --k 4 "
    "--iters 10 --seed 1234",
    "python -m vlmjax.recipes.coincide select --data llava.json --features runs/coincide/feats "
    "--clusters runs/coincide/clusters --out runs/coincide/select --fraction 0.2",
    "python -m vlmjax.recipes.coincide select --data llava.json --features runs/coincide/feats "
    "--out runs/coincide/random --fraction 0.2 --method random --seed 0",
]


def _readme_commands():
    """The commands of the README's COINCIDE section, backslash continuations joined."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## COINCIDE (vlmjax/recipes/coincide)")[1].split("\n## ")[0]
    joined = section.replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines()
            if line.strip().startswith("python -m vlmjax.recipes.coincide ")]  # not .miniature


def test_recipe_end_to_end_on_a_tiny_vlm(tmp_path, monkeypatch):
    """capture (tiny random VLM) -> features -> k-means -> select -> subset file, by the README's commands."""
    from PIL import Image

    from test_generate import smol_vlm
    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.generate import llava_requests
    from vlmjax.recipes.coincide.__main__ import main

    assert _readme_commands() == README_COMMANDS
    monkeypatch.chdir(tmp_path)
    os.makedirs("imgs")
    rng = np.random.default_rng(0)
    recs = []
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(f"imgs/{i}.png")
        recs.append({"id": f"q{i}", "image": f"{i}.png", "kind": ["yes", "color"][i % 2], "conversations": [
            {"from": "human", "value": "<image>\n" + ["Is it red?", "What colour is it?"][i % 2]},
            {"from": "gpt", "value": ["Yes.", "Blue."][i % 2]}]})
    recs += [{"id": f"t{i}", "kind": "text", "conversations": [{"from": "human", "value": f"Say {i}."},
                                                                 {"from": "gpt", "value": f"{i}."}]} for i in range(2)]
    recs.insert(5, {"id": "bad", "image": "gone.png", "kind": "yes", "conversations": recs[0]["conversations"]})
    with open("llava.json", "w") as f:
        json.dump(recs, f)
    tok, model = smollm2_tokenizer(), smol_vlm()
    st = F.capture(model, tok, llava_requests("llava.json", "imgs"), "runs/coincide/capture", layers=(0, 1),
                   model_name="tiny-random", batch_size=8, progress=False)
    assert (st["written"], st["failed"]) == (22, 1)
    outs = [main(shlex.split(c)[3:]) for c in README_COMMANDS]
    _, x, meta = F.load_features("runs/coincide/feats", expect={"model": "tiny-random", "layers": [0, 1]})
    d = model.llm.cfg.hidden_size
    assert x.shape == (22, 2 * 2 * d) and meta["text_only"] == 2 and meta["capture_errors"] == 1
    np.testing.assert_allclose(np.linalg.norm(np.asarray(x, np.float32), axis=1), 1.0, atol=2e-3)
    assert outs[1]["k"] == 4 and outs[2]["selected"] == 4 == outs[3]["selected"]  # floor(0.2 x 22 + 0.5)
    sel = json.load(open("runs/coincide/select/selection.json"))
    assert sel["method"] == "coincide" and sel["target"] == 4 and sel["pool"] == 22 and sel["capture_errors"] == 1
    assert sum(c["budget"] for c in sel["clusters"]) == 4 and sel["tau"] == 0.1
    for r in sel["selected"]:
        c = sel["clusters"][r["cluster"]]
        assert (r["T"], r["D"], r["budget"]) == (c["T"], c["D"], c["budget"])
    subset = json.load(open("runs/coincide/select/llava.json"))
    chosen = {r["id"] for r in sel["selected"]}
    assert [r["id"] for r in subset] == [r["id"] for r in recs if r["id"] in chosen] and "bad" not in chosen
    assert subset[0] == next(r for r in recs if r["id"] == subset[0]["id"])  # the original records, unchanged
    # deterministic: a rerun selects the same rows; another model's features are refused
    assert main(shlex.split(README_COMMANDS[2])[3:] + ["--out", "again"])["selected"] == 4
    assert json.load(open("again/selection.json"))["selected"] == sel["selected"]
    with pytest.raises(ValueError, match="model='tiny-random'.*expected model='other'"):
        main(shlex.split(README_COMMANDS[0])[3:] + ["--model", "other", "--out", "x"])
    with pytest.raises(ValueError, match="K=40 clusters > N=22 samples"):
        main(shlex.split(README_COMMANDS[1])[3:] + ["--k", "40"])
    with pytest.raises(ValueError, match="budget 30 > N=22 samples"):
        main(["select", "--data", "llava.json", "--features", "runs/coincide/feats", "--clusters",
              "runs/coincide/clusters", "--out", "big", "--target", "30"])
    F.build_features("runs/coincide/capture", "feats2")  # same rows, other order: the clusters do not fit them
    ids2 = json.load(open("feats2/ids.json"))
    json.dump(ids2[::-1], open("feats2/ids.json", "w"))
    with pytest.raises(ValueError, match="clustered other rows .* than feats2 holds"):
        main(shlex.split(README_COMMANDS[2].replace("runs/coincide/feats", "feats2"))[3:])
    with open("other.json", "w") as f:
        json.dump(recs[:3], f)
    with pytest.raises(KeyError, match="19 feature ids are not samples of other.json"):
        main(["select", "--data", "other.json", "--features", "runs/coincide/feats", "--out", "o", "--target", "2",
              "--method", "random"])
    out = main(["select", "--data", "llava.json", "--features", "runs/coincide/feats", "--out", "strat",
                "--target", "11", "--method", "stratified", "--label-field", "kind"])
    strat = json.load(open("strat/selection.json"))
    assert out["selected"] == 11 and strat["label_budgets"] == {"color": 5, "text": 1, "yes": 5}
    # --config fills model / layers / K / seed / tau / fraction: the paper-scale reference's are not these features
    with pytest.raises(ValueError, match=r"model='tiny-random', layers=\[0, 1\]; expected "
                                         r"model='llava-hf/llava-interleave-qwen-0.5b-hf', layers=\[3, 7, 11, 15, 19\]"):
        main(["select", "--data", "llava.json", "--features", "runs/coincide/feats", "--clusters",
              "runs/coincide/clusters", "--out", "cfg", "--config", os.path.join(ROOT, "configs/coincide/llava15_7b.py")])
