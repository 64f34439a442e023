"""Losses against independent numpy formulas (float64), values and gradients, including extreme inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.losses import cross_entropy, preference_loss, sequence_logprobs, token_logprobs


def np_log_softmax(x):
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("t,chunk,remat", [(13, 4, True), (16, 16, True), (7, 256, True), (13, 4, False)])
def test_chunked_token_logprobs_match_full_softmax(t, chunk, remat):
    rng = np.random.default_rng(0)
    h, w = rng.normal(size=(3, t, 8)), rng.normal(size=(50, 8))
    y = rng.integers(0, 50, (3, t))
    logp, lse = token_logprobs(jnp.asarray(h, jnp.float32), jnp.asarray(w, jnp.float32), jnp.asarray(y), chunk_size=chunk,
                               remat=remat)
    full = np_log_softmax(h @ w.T)
    np.testing.assert_allclose(np.asarray(logp), np.take_along_axis(full, y[..., None], -1)[..., 0], atol=1e-4)
    logits = h @ w.T
    np.testing.assert_allclose(np.asarray(lse), np.log(np.exp(logits).sum(-1)), atol=1e-4)
    # gradient w.r.t. hidden states equals the dense formula: (softmax - onehot) @ W, masked
    mask = (rng.random((3, t)) > 0.3).astype(np.float32)
    g = jax.grad(lambda hh: cross_entropy(token_logprobs(hh, jnp.asarray(w, jnp.float32), jnp.asarray(y), chunk_size=chunk,
                                                         remat=remat)[0], jnp.asarray(mask))[0])(jnp.asarray(h, jnp.float32))
    p = np.exp(full)
    p[np.arange(3)[:, None], np.arange(t)[None], y] -= 1
    ref = (p * mask[..., None] / mask.sum()) @ w
    np.testing.assert_allclose(np.asarray(g), ref, atol=1e-5)


def test_cross_entropy_reductions_and_z_loss():
    rng = np.random.default_rng(1)
    logp = -rng.random((2, 6)) * 3
    lse = rng.normal(size=(2, 6))
    mask = np.array([[0, 1, 1, 1, 0, 1], [0, 0, 1, 1, 1, 1]], np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2], [1, 1, 1, 1, 1, 0]])
    loss, m = cross_entropy(jnp.asarray(logp), jnp.asarray(mask))
    np.testing.assert_allclose(loss, -(logp * mask).sum() / mask.sum(), rtol=1e-6)
    loss, _ = cross_entropy(jnp.asarray(logp), jnp.asarray(mask), reduction="sequence")
    per_row = -(logp * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(loss, per_row.mean(), rtol=1e-6)
    loss, _ = cross_entropy(jnp.asarray(logp), jnp.asarray(mask), reduction="sequence", segment_ids_bt=jnp.asarray(seg))
    samples = []
    for r in range(2):
        for s in (1, 2):
            sel = (seg[r] == s) & (mask[r] > 0)
            if sel.any():
                samples.append(-logp[r][sel].mean())
    np.testing.assert_allclose(loss, np.mean(samples), rtol=1e-6)
    loss, m = cross_entropy(jnp.asarray(logp), jnp.asarray(mask), lse_bt=jnp.asarray(lse), z_loss=1e-2)
    np.testing.assert_allclose(loss, -(logp * mask).sum() / mask.sum() + 1e-2 * (lse**2 * mask).sum() / mask.sum(), rtol=1e-6)
    s, n = sequence_logprobs(jnp.asarray(logp), jnp.asarray(mask))
    np.testing.assert_allclose(s, (logp * mask).sum(1), rtol=1e-6)
    np.testing.assert_array_equal(n, mask.sum(1))


def logsig(x):
    return -np.logaddexp(0, -x)


def np_pref(name, pc, pr, rc, rr, lc, lr, beta, **kw):
    m = (pc - rc) - (pr - rr)
    if name == "dpo":
        ls = kw.get("label_smoothing", 0.0)
        return np.mean(-(1 - ls) * logsig(beta * m) - ls * logsig(-beta * m))
    if name == "ipo":
        mm = (pc / lc - rc / lc) - (pr / lr - rr / lr)
        return np.mean((mm - 1 / (2 * beta)) ** 2)
    if name == "hinge":
        return np.mean(np.maximum(0, 1 - beta * m))
    if name == "simpo":
        return np.mean(-logsig(beta * (pc / lc - pr / lr) - kw["gamma"]))
    if name == "orpo":
        ac, ar = pc / lc, pr / lr
        odds = (ac - ar) - (np.log(-np.expm1(ac)) - np.log(-np.expm1(ar)))
        return np.mean(-ac - beta * logsig(odds))
    if name == "stic":
        return np.mean(-logsig(beta * m)) + kw["alpha"] * np.mean(-pc)
    raise KeyError(name)


CASES = [("dpo", {}), ("dpo", {"label_smoothing": 0.1}), ("ipo", {}), ("hinge", {}), ("simpo", {"gamma": 0.5}),
         ("orpo", {}), ("stic", {"alpha": 1 / 1024})]


@pytest.mark.parametrize("name,kw", CASES)
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_preference_losses_match_numpy_value_and_grad(name, kw, scale):
    rng = np.random.default_rng(2)
    lc, lr = rng.integers(5, 40, 4).astype(np.float64), rng.integers(5, 40, 4).astype(np.float64)
    pc, pr = -rng.random(4) * lc * 2, -rng.random(4) * lr * 2
    rc, rr = pc + rng.normal(size=4) * scale, pr + rng.normal(size=4) * scale  # scale=1e3: extreme margins
    beta = 0.1
    extra = dict(chosen_len=jnp.asarray(lc, jnp.float32), rejected_len=jnp.asarray(lr, jnp.float32)) if name in ("ipo", "simpo", "orpo") else {}
    f = lambda a, b: preference_loss(name, a, b, jnp.asarray(rc, jnp.float32), jnp.asarray(rr, jnp.float32),  # noqa: E731
                                     beta=beta, **kw, **extra)[0]
    val = f(jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32))
    ref = np_pref(name, pc, pr, rc, rr, lc if extra else None, lr if extra else None, beta, **kw)
    np.testing.assert_allclose(float(val), ref, rtol=2e-4, atol=1e-4)
    ga, gb = jax.grad(f, argnums=(0, 1))(jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32))
    assert np.isfinite(np.asarray(ga)).all() and np.isfinite(np.asarray(gb)).all()
    eps = 1e-4 * max(1.0, np.abs(pc).max())
    for i in range(4):  # central differences of the float64 numpy formula
        d = np.zeros(4)
        d[i] = eps
        num_a = (np_pref(name, pc + d, pr, rc, rr, lc, lr, beta, **kw) - np_pref(name, pc - d, pr, rc, rr, lc, lr, beta, **kw)) / (2 * eps)
        num_b = (np_pref(name, pc, pr + d, rc, rr, lc, lr, beta, **kw) - np_pref(name, pc, pr - d, rc, rr, lc, lr, beta, **kw)) / (2 * eps)
        np.testing.assert_allclose(float(ga[i]), num_a, rtol=2e-3, atol=1e-5)
        np.testing.assert_allclose(float(gb[i]), num_b, rtol=2e-3, atol=1e-5)


def test_dpo_metrics_and_reference_required():
    pc, pr, rc, rr = (jnp.array(v, jnp.float32) for v in ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]))
    _, m = preference_loss("dpo", pc, pr, rc, rr, beta=0.5)
    np.testing.assert_allclose(m["rewards/chosen"], 0.5 * np.mean([1.0, 0.0]))
    np.testing.assert_allclose(m["rewards/accuracy"], 0.5)
    with pytest.raises(ValueError, match="needs reference"):
        preference_loss("dpo", pc, pr)


def test_pair_mask_equals_dropping_pairs():
    rng = np.random.default_rng(3)
    pc, pr, rc, rr = (jnp.asarray(-rng.random(6) * 10, jnp.float32) for _ in range(4))
    w = jnp.array([1, 1, 0, 1, 0, 1], jnp.float32)
    keep = np.asarray(w) > 0
    for name in ("dpo", "stic", "hinge"):
        full, mf = preference_loss(name, pc, pr, rc, rr, mask=w)
        sub, ms = preference_loss(name, pc[keep], pr[keep], rc[keep], rr[keep])
        np.testing.assert_allclose(full, sub, rtol=1e-6)
        np.testing.assert_allclose(mf["rewards/margin"], ms["rewards/margin"], rtol=1e-6)


def test_remat_logits_auto_keeps_logits_within_budget():
    from ml_collections import ConfigDict

    from vlmjax.train.step import remat_logits

    batch = {"targets": np.zeros((4, 256), np.int32)}  # x 49216 vocab x 4 bytes = 192 MiB of logits
    assert not remat_logits(ConfigDict(dict(remat_logits="auto", logits_budget_mb=1024)), batch, 49216)
    assert remat_logits(ConfigDict(dict(remat_logits="auto", logits_budget_mb=100)), batch, 49216)
    assert remat_logits(ConfigDict(dict(remat_logits=True)), batch, 10)
