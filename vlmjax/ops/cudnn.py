"""cuDNN fused attention through `jax.nn.dot_product_attention`: the fastest path where it applies.

cuDNN's flash kernel knows causal and GQA but neither our packed segments nor the bidirectional prefix,
so `supported` is strict and `attention(impl="auto")` only routes here when the request needs neither,
T == S, the dtype is half precision and the device is an sm80+ GPU. Anything else raises instead of
silently computing a different mask.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gpu_compute_capability() -> float | None:
    """Compute capability of the first GPU (e.g. 8.6 for an A6000), None without an NVIDIA GPU."""
    try:
        dev = jax.devices("gpu")[0]
    except RuntimeError:
        return None
    cc = getattr(dev, "compute_capability", None)
    try:
        return float(cc) if cc is not None else None
    except (TypeError, ValueError):
        return None


def supported(q, k, *, segment_ids, prefix_mask) -> bool:
    """Whether cuDNN computes exactly our semantics for this call on this machine."""
    if segment_ids is not None or prefix_mask is not None:
        return False
    if q.shape[1] != k.shape[1] or q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
        return False
    d = q.shape[-1]
    if d % 8 or d > 128:
        return False
    cc = gpu_compute_capability()
    return cc is not None and cc >= 8.0


def cudnn_attention(q_bthd, k_bskd, v_bskd, *, segment_ids=None, causal=True, prefix_mask=None, scale=None,
                    implementation: str = "cudnn") -> jax.Array:
    """`attention(..., impl="cudnn")`. `implementation="xla"` runs the same wrapper anywhere (tests)."""
    if segment_ids is not None or prefix_mask is not None:
        raise ValueError("impl='cudnn' supports neither segment_ids nor prefix_mask; use pallas_gpu or xla_flash")
    if q_bthd.shape[2] % k_bskd.shape[2]:
        raise ValueError(f"query heads ({q_bthd.shape[2]}) must be a multiple of kv heads ({k_bskd.shape[2]})")
    if causal and q_bthd.shape[1] != k_bskd.shape[1]:
        raise ValueError("impl='cudnn' with causal needs T == S")
    return jax.nn.dot_product_attention(
        q_bthd, k_bskd, v_bskd, scale=scale, is_causal=causal, implementation=implementation
    ).astype(q_bthd.dtype)
