"""Preference losses on per-sequence log-probs (sums over response tokens), pure functions.

Inputs are (B,) arrays: policy/reference log-probs of the chosen and rejected responses, plus token counts for
the length-normalised losses. Each returns (mean loss, metrics) with the usual reward metrics; every
log-sigmoid is the stable `jax.nn.log_sigmoid`, so extreme margins give finite losses and gradients.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]


def _mean(x, w=None):
    """Mean over pairs; `w` (0/1) drops padding pairs (packed DPO batches have empty pair slots)."""
    if w is None:
        return x.mean()
    return (x * w).sum() / jnp.maximum(w.sum(), 1.0)


def _reward_metrics(beta, pc, pr, rc, rr, w=None) -> Metrics:
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return {
        "rewards/chosen": _mean(chosen, w),
        "rewards/rejected": _mean(rejected, w),
        "rewards/margin": _mean(chosen - rejected, w),
        "rewards/accuracy": _mean((chosen > rejected).astype(jnp.float32), w),
        "logps/chosen": _mean(pc, w),
        "logps/rejected": _mean(pr, w),
    }


def _log_ratio_margin(pc, pr, rc, rr):
    return (pc - rc) - (pr - rr)


def dpo_loss(pc, pr, rc, rr, *, beta: float = 0.1, label_smoothing: float = 0.0, mask=None, **_) -> tuple[jax.Array, Metrics]:
    """DPO (Rafailov et al.); label_smoothing > 0 is conservative DPO / robust to flipped labels (cDPO)."""
    logits = beta * _log_ratio_margin(pc, pr, rc, rr)
    losses = -(1 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(-logits)
    return _mean(losses, mask), _reward_metrics(beta, pc, pr, rc, rr, mask)


def ipo_loss(pc, pr, rc, rr, *, beta: float = 0.1, chosen_len=None, rejected_len=None, mask=None, **_):
    """IPO (Azar et al.): squared distance of the (length-averaged) log-ratio margin to 1/(2 beta)."""
    if chosen_len is not None:
        pc, rc = pc / chosen_len, rc / chosen_len
        pr, rr = pr / rejected_len, rr / rejected_len
    losses = jnp.square(_log_ratio_margin(pc, pr, rc, rr) - 1.0 / (2.0 * beta))
    return _mean(losses, mask), _reward_metrics(beta, pc, pr, rc, rr, mask)


def hinge_loss(pc, pr, rc, rr, *, beta: float = 0.1, mask=None, **_):
    """SLiC-style hinge on the scaled log-ratio margin."""
    losses = jax.nn.relu(1.0 - beta * _log_ratio_margin(pc, pr, rc, rr))
    return _mean(losses, mask), _reward_metrics(beta, pc, pr, rc, rr, mask)


def simpo_loss(pc, pr, rc=None, rr=None, *, beta: float = 2.0, gamma: float = 0.5, chosen_len, rejected_len, mask=None, **_):
    """SimPO (Meng et al.): reference-free, length-normalised rewards with a target margin gamma."""
    avg_c, avg_r = pc / chosen_len, pr / rejected_len
    losses = -jax.nn.log_sigmoid(beta * (avg_c - avg_r) - gamma)
    zeros = jnp.zeros_like(pc)
    m = _reward_metrics(beta, avg_c, avg_r, zeros, zeros, mask)
    return _mean(losses, mask), m


def _log1m_exp(x):
    """log(1 - exp(x)) for x < 0, accurate near 0 and for very negative x."""
    return jnp.where(x > -0.693, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(pc, pr, rc=None, rr=None, *, beta: float = 0.1, chosen_len, rejected_len, mask=None, **_):
    """ORPO (Hong et al.): NLL of chosen (length-averaged) - beta * log sigmoid(log odds ratio). Reference-free."""
    avg_c, avg_r = pc / chosen_len, pr / rejected_len
    avg_c, avg_r = jnp.minimum(avg_c, -1e-6), jnp.minimum(avg_r, -1e-6)  # log-probs are < 0; keep log1m_exp finite
    log_odds = (avg_c - avg_r) - (_log1m_exp(avg_c) - _log1m_exp(avg_r))
    ratio = jax.nn.log_sigmoid(log_odds)
    losses = -avg_c - beta * ratio
    zeros = jnp.zeros_like(pc)
    m = _reward_metrics(beta, avg_c, avg_r, zeros, zeros, mask)
    m["orpo/log_odds"] = _mean(log_odds, mask)
    return _mean(losses, mask), m


def stic_loss(pc, pr, rc, rr, *, beta: float = 0.1, alpha: float = 1.0 / 1024, mask=None, **_):
    """STIC stage 1: DPO plus alpha * NLL of the chosen response (sum of log-probs), see shared/recipes/stic.md."""
    dpo, m = dpo_loss(pc, pr, rc, rr, beta=beta, mask=mask)
    nll = -_mean(pc, mask)
    m["nll/chosen"] = nll
    return dpo + alpha * nll, m


PREFERENCE_LOSSES: dict[str, Callable[..., tuple[jax.Array, Metrics]]] = {
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
    "stic": stic_loss,
}
REFERENCE_FREE = ("simpo", "orpo")


def preference_loss(name: str, pc, pr, rc=None, rr=None, **kw) -> tuple[jax.Array, Metrics]:
    try:
        fn = PREFERENCE_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown preference loss {name!r}; known: {sorted(PREFERENCE_LOSSES)}") from None
    if name not in REFERENCE_FREE and (rc is None or rr is None):
        raise ValueError(f"{name} needs reference log-probs")
    return fn(pc, pr, rc, rr, **kw)
