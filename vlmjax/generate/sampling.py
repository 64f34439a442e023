"""Next-token choice from logits: greedy, temperature, top-k, top-p (nucleus), per row, on device.

Randomness is per row and per step: row b at step s draws with fold_in(fold_in(key(seed), row_seed[b]), s), so a
sample's continuation depends only on (seed, its row seed, the model), not on its batch neighbours, the batch size
or a resumed run. top-k runs first (lax.top_k, static k), then top-p over what is left; both keep at least one
token, so top_k=1 is greedy whatever the temperature.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy (top_k/top_p ignored); top_k 0 = off; top_p 1.0 = off. Static under jit."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"bad sampling settings {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def _top_p_mask(logits_bk: jax.Array, top_p: float) -> jax.Array:
    """Logits (sorted or not) with everything outside the smallest set of mass >= top_p set to -inf-ish."""
    sorted_bk = jnp.sort(logits_bk, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_bk, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly better tokens
    keep = mass_before < top_p  # always keeps the best token
    threshold = jnp.min(jnp.where(keep, sorted_bk, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits_bk >= threshold, logits_bk, _NEG)


def row_keys(base_key: jax.Array, row_seeds_b: jax.Array) -> jax.Array:
    """(B,) typed keys, one stream per row, from jax.random.key(seed)."""
    return jax.vmap(lambda s: jax.random.fold_in(base_key, s))(row_seeds_b.astype(jnp.uint32))


def sample(logits_bv: jax.Array, cfg: SamplingConfig, keys_b: jax.Array, step) -> jax.Array:
    """(B, V) logits -> (B,) int32 tokens. step: () or (B,) (each row's own count, continuous batching)."""
    logits_bv = logits_bv.astype(jnp.float32)
    if cfg.greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv / cfg.temperature
    idx_bk = None
    if cfg.top_k and cfg.top_k < logits_bv.shape[-1]:
        logits_bv, idx_bk = jax.lax.top_k(logits_bv, cfg.top_k)
    if cfg.top_p < 1.0:
        logits_bv = _top_p_mask(logits_bv, cfg.top_p)
    step_keys = jax.vmap(jax.random.fold_in)(keys_b, jnp.broadcast_to(jnp.asarray(step, jnp.int32), keys_b.shape))
    choice_b = jax.vmap(jax.random.categorical)(step_keys, logits_bv).astype(jnp.int32)
    if idx_bk is not None:
        choice_b = jnp.take_along_axis(idx_bk, choice_b[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return choice_b
