"""Every attention implementation against `reference_attention`: forward and d/d(q, k, v).

Batches are randomised like real VLM batches: packed rows with random segment boundaries, trailing
padding (and one all-padding row), a bidirectional prefix at the start of each segment, GQA ratios 1/3/8,
lengths that are not block multiples. Pallas kernels run in interpret mode on CPU with tiny shapes.

Tolerances: fp32 compares against the fp32 reference (atol/rtol 2e-5 on O(1) values). bf16 inputs are
compared against the fp32 reference on the same bf16 inputs with atol/rtol 3e-2: both bf16 paths round
probabilities and outputs to bf16 (8 bits of mantissa), so ~1e-2 differences are expected.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlmjax.ops import masking
from vlmjax.ops.attention import attention, decode_attention, reference_attention, select_impl
from vlmjax.ops.cudnn import cudnn_attention
from vlmjax.ops.flash_xla import flash_attention
from vlmjax.ops.pallas_gpu import pallas_gpu_attention
from vlmjax.ops.pallas_tpu import pallas_tpu_attention

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def make_batch(seed, b, t, h, kv, d, dtype, *, packed=True, prefix=False):
    """Random q/k/v plus packed segment ids (trailing padding; row 1 all padding if b > 1) and prefix mask."""
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((b, t, n, d)).astype(np.float32) for n in (h, kv, kv))
    seg = np.zeros((b, t), np.int32)
    pre = np.zeros((b, t), bool)
    for r in range(b):
        if not packed:
            seg[r] = 1
        elif r == 1:
            continue  # fully padded row: outputs and gradients must be exactly 0
        else:
            used = int(rng.integers(t // 2, t + 1))  # trailing padding of random length (maybe none)
            cuts = np.sort(rng.choice(np.arange(1, used), size=min(3, used - 1), replace=False))
            for i, (a, z) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, used])):
                seg[r, a:z] = i + 1
                if prefix:
                    pre[r, a:a + int(rng.integers(0, z - a + 1))] = True  # image tokens + prompt
    cast = lambda x: jnp.asarray(x, dtype)
    return cast(q), cast(k), cast(v), jnp.asarray(seg), jnp.asarray(pre)


def loss_and_grads(fn, q, k, v, ct):
    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * ct)

    return jax.jit(lambda q, k, v: (fn(q, k, v), *jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


def assert_matches_reference(fn, q, k, v, seg, pre, *, causal=True, use_prefix=False, use_seg=True):
    kw = dict(segment_ids=seg if use_seg else None, causal=causal, prefix_mask=pre if use_prefix else None)
    ct = jax.random.normal(jax.random.key(0), q.shape, jnp.float32)
    got = loss_and_grads(functools.partial(fn, **kw), q, k, v, ct)
    f32 = lambda x: x.astype(jnp.float32)  # reference in fp32 on the same (possibly bf16-rounded) inputs
    want = loss_and_grads(functools.partial(reference_attention, **kw), f32(q), f32(k), f32(v), ct)
    tol = TOL[q.dtype.type]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        g = np.asarray(g.astype(jnp.float32))
        assert np.isfinite(g).all(), name
        np.testing.assert_allclose(g, np.asarray(w), atol=tol, rtol=tol, err_msg=name)
    if use_seg:  # padding tokens: exactly zero output and zero gradient, never NaN
        pad = np.asarray(seg) == 0
        for name, g in zip(("out", "dq", "dk", "dv"), got):
            assert not np.asarray(g.astype(jnp.float32))[pad].any(), f"{name} nonzero on padding"


# (mask layout) -> kwargs for assert_matches_reference
LAYOUTS = {
    "causal": dict(use_seg=False),
    "packed": dict(),
    "packed_prefix": dict(use_prefix=True),
    "bidirectional_packed": dict(causal=False),
}


# Every layout and every GQA ratio, without the full cross product (compiles dominate the test time).
FLASH_FP32_CASES = [("packed_prefix", 1), ("packed_prefix", 3), ("packed_prefix", 8), ("causal", 3), ("packed", 8),
                    ("bidirectional_packed", 1)]


@pytest.mark.parametrize("layout,groups", FLASH_FP32_CASES)
def test_xla_flash_fp32(layout, groups):
    # T=45 with 16/8 blocks: ragged last block, several blocks per segment, skipping on every path.
    q, k, v, seg, pre = make_batch(groups, 3, 45, 2 * groups, 2, 16, jnp.float32, prefix=True)
    fn = functools.partial(flash_attention, block_q=16, block_k=8)
    assert_matches_reference(fn, q, k, v, seg, pre, **LAYOUTS[layout])


@pytest.mark.parametrize("layout,groups", [("causal", 8), ("packed_prefix", 3)])
def test_xla_flash_bf16(layout, groups):
    q, k, v, seg, pre = make_batch(10 + groups, 2, 37, groups, 1, 32, jnp.bfloat16, prefix=True)
    fn = functools.partial(flash_attention, block_q=16, block_k=16)
    assert_matches_reference(fn, q, k, v, seg, pre, **LAYOUTS[layout])


def test_xla_flash_unsorted_segments():
    """Block skipping only uses necessary conditions: ids that reappear, padding in the middle still work."""
    q, k, v, _, _ = make_batch(5, 1, 40, 4, 2, 8, jnp.float32)
    seg = jnp.asarray([[1] * 6 + [0] * 9 + [2] * 5 + [1] * 7 + [3] * 4 + [0] * 3 + [2] * 6], jnp.int32)
    pre = jnp.asarray(np.arange(40)[None] % 5 < 2)
    fn = functools.partial(flash_attention, block_q=8, block_k=8)
    assert_matches_reference(fn, q, k, v, seg, pre, use_prefix=True)


def test_xla_flash_default_blocks_through_attention():
    q, k, v, seg, pre = make_batch(7, 2, 300, 4, 2, 8, jnp.float32, prefix=True)  # > 1 default block
    fn = functools.partial(attention, impl="xla_flash")
    assert_matches_reference(fn, q, k, v, seg, pre, use_prefix=True)


# Interpret-mode Pallas is slow: tiny shapes, few cases, every masking feature and GQA ratio still covered.
PALLAS_CASES = [
    ("packed_prefix", jnp.float32, 1),
    ("bidirectional_packed", jnp.float32, 3),
    ("causal", jnp.bfloat16, 8),
]


@pytest.mark.parametrize("layout,dtype,groups", PALLAS_CASES)
def test_pallas_gpu_interpret(layout, dtype, groups):
    q, k, v, seg, pre = make_batch(20 + groups, 2, 40, groups, 1, 16, dtype, prefix=True)
    fn = functools.partial(pallas_gpu_attention, block_q=16, block_k=16, interpret=True)
    assert_matches_reference(fn, q, k, v, seg, pre, **LAYOUTS[layout])


@pytest.mark.parametrize("layout,dtype,interpret", [("packed_prefix", jnp.float32, "generic"),
                                                     ("bidirectional_packed", jnp.bfloat16, "tpu_simulator")])
def test_pallas_tpu_interpret(layout, dtype, interpret):
    from jax.experimental.pallas import tpu as pltpu

    q, k, v, seg, pre = make_batch(30, 2, 24, 3, 1, 8, dtype, prefix=True)
    mode = True if interpret == "generic" else pltpu.InterpretParams()
    fn = functools.partial(pallas_tpu_attention, block_q=8, block_k=16, interpret=mode)
    assert_matches_reference(fn, q, k, v, seg, pre, **LAYOUTS[layout])


def test_pallas_gpu_lowers_to_triton():
    """Interpret mode cannot catch Triton-only limits (2^n tensors, dot shapes); the real lowering can."""
    q = jnp.zeros((1, 100, 4, 80), jnp.bfloat16)  # d=80 is padded to 128 inside
    k = jnp.zeros((1, 100, 2, 80), jnp.bfloat16)
    seg, pre = jnp.ones((1, 100), jnp.int32), jnp.zeros((1, 100), bool)
    fn = functools.partial(pallas_gpu_attention, segment_ids=seg, prefix_mask=pre)
    grad = jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    text = jax.jit(grad).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 3  # forward, dq, dk/dv


def test_pallas_tpu_lowers_to_mosaic(monkeypatch):
    """Same for Mosaic (tile shapes, SMEM scalars); lowering for a v5e without a TPU attached."""
    from jax._src.pallas.mosaic import tpu_info

    monkeypatch.setitem(tpu_info.registry, jax.devices()[0].device_kind,
                        lambda: tpu_info.get_tpu_info_for_chip(tpu_info.ChipVersion.TPU_V5E, 1))
    q = jnp.zeros((1, 300, 4, 128), jnp.bfloat16)
    k = jnp.zeros((1, 300, 2, 128), jnp.bfloat16)
    seg, pre = jnp.ones((1, 300), jnp.int32), jnp.zeros((1, 300), bool)
    fn = functools.partial(pallas_tpu_attention, segment_ids=seg, prefix_mask=pre, block_q=128, block_k=128)
    grad = jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2))
    text = jax.jit(grad).trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3


def test_cudnn_wrapper_semantics():
    """The cuDNN path's argument plumbing (layout, GQA, causal, scale), run through XLA on CPU."""
    q, k, v, seg, pre = make_batch(40, 2, 33, 4, 1, 16, jnp.float32, packed=False)
    for causal in (True, False):
        fn = functools.partial(cudnn_attention, implementation="xla", scale=0.3)
        got = fn(q, k, v, causal=causal)
        want = reference_attention(q, k, v, causal=causal, scale=0.3)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError):
        cudnn_attention(q, k, v, segment_ids=seg)


def test_mask_spec_matches_make_mask():
    """The per-token MaskSpec that every kernel uses rebuilds exactly the reference mask."""
    from vlmjax.ops.attention import make_mask

    _, _, _, seg, pre = make_batch(50, 3, 29, 1, 1, 4, jnp.float32, prefix=True)
    for causal, p in ((True, pre), (True, None), (False, None)):
        spec = masking.full_spec(3, 29, 29, seg, p, causal)
        want = make_mask(29, 29, segment_ids=seg, causal=causal, prefix_mask=p, batch=3)
        np.testing.assert_array_equal(np.asarray(masking.dense_mask(spec, causal)), np.asarray(want))


def test_block_table_is_conservative_and_skips():
    """A dead tile must contain no live pair; causal packed rows must skip most tiles."""
    _, _, _, seg, pre = make_batch(60, 3, 64, 1, 1, 4, jnp.float32, prefix=True)
    spec = masking.full_spec(3, 64, 64, seg, pre, True)
    table = np.asarray(masking.block_table(spec, 8, 8, True))
    live = np.asarray(masking.dense_mask(spec, True)).reshape(3, 8, 8, 8, 8).any((2, 4))
    assert not (live & ~table).any()
    assert table.mean() < 0.5


@pytest.mark.parametrize("impl,kv_layout", [("reference", "bskd"), ("xla_flash", "bskd"), ("pallas_gpu", "bskd"),
                                            ("pallas_tpu", "bskd"), ("reference", "bksd"), ("xla_flash", "bksd")])
def test_decode_equals_last_rows_of_causal_attention(impl, kv_layout):
    b, s, t, h, kv, d = 3, 48, 3, 4, 2, 16
    rng = np.random.default_rng(70)
    q_full, k_full, v_full = (jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32) for n in (h, kv, kv))
    lengths = np.array([48, 20, 2])  # full cache, partial cache, fewer keys than queries
    # Ground truth: causal reference over each row's first `length` tokens (the rest is padding).
    seg = jnp.asarray((np.arange(s)[None] < lengths[:, None]).astype(np.int32))
    full = np.asarray(jax.jit(reference_attention)(q_full, k_full, v_full, segment_ids=seg))  # jit: one compile
    want = np.zeros((b, t, h, d), np.float32)
    q_new = np.zeros((b, t, h, d), np.float32)
    for r, n in enumerate(lengths):
        for i in range(t):
            pos = n - t + i
            if pos >= 0:
                want[r, i], q_new[r, i] = full[r, pos], q_full[r, pos]
    garbage = jnp.where(seg[:, :, None, None] == 1, 0.0, 1e3)  # stale cache slots must be ignored
    opts = {"xla_flash": dict(block_q=8, block_k=16), "pallas_gpu": dict(block_q=16, block_k=16),
            "pallas_tpu": dict(block_q=8, block_k=16)}.get(impl, {})  # Pallas: interpreted on CPU
    k_cache, v_cache = k_full + garbage, v_full + garbage
    if kv_layout == "bksd":  # the model's cache layout: heads before slots
        k_cache, v_cache = k_cache.transpose(0, 2, 1, 3), v_cache.transpose(0, 2, 1, 3)
    decode = jax.jit(lambda q, k, v, n: decode_attention(q, k, v, kv_lengths=n, impl=impl, kv_layout=kv_layout, **opts))
    got = decode(jnp.asarray(q_new), k_cache, v_cache, jnp.asarray(lengths))
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_auto_policy():
    q = jnp.zeros((1, 4096, 8, 64), jnp.bfloat16)
    k = jnp.zeros((1, 4096, 2, 64), jnp.bfloat16)
    seg = jnp.ones((1, 4096), jnp.int32)
    assert select_impl(q, k, backend="cpu") == "xla_flash"
    assert select_impl(q[:, :64], k[:, :64], backend="cpu") == "reference"
    assert select_impl(q, k, backend="tpu") == "pallas_tpu"
    assert select_impl(q, k, segment_ids=seg, backend="gpu") != "cudnn"  # cuDNN cannot do segments
    if jax.default_backend() == "cpu":
        assert select_impl(q, k, backend="gpu") != "cudnn"  # no GPU attached: cudnn.supported is False


def test_auto_logs_choice_once(caplog):
    from vlmjax.ops import attention as att

    att._LOGGED.clear()
    q = jnp.zeros((1, 8, 2, 4), jnp.float32)
    with caplog.at_level("INFO", logger="vlmjax.ops.attention"):
        attention(q, q, q)
        attention(q, q, q)
    assert sum("using impl" in r.message for r in caplog.records) == 1
