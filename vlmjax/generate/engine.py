"""Batched generation with a KV cache: one jitted prefill, then a jitted `lax.while_loop` decode.

Layout. Prompts of different lengths share a batch without left padding inside the model: each row's prompt
occupies cache slots 0..len-1 (prefill sees a right-padded block; causal attention keeps the tail padding
invisible), so a token's cache slot is its RoPE position, and each new token is scattered at its own row's next
slot. Positions therefore start at 0 at every row's first real token, and `decode_attention`'s per-row
`kv_lengths` are exactly the valid prefix. Callers holding a left-padded batch use `unpad_left`.

Stopping. EOS ids stop a row on device. Stop strings are checked on the host between chunks of `chunk_steps`
decode steps (text-level matching is immune to tokenisation differences that token-sequence matching on
device would miss); a stopped row is marked done and its text cut before the stop string, costing at most one
chunk of wasted steps for that row. The loop exits early once every row is done.

Shapes are static: the prefill per (batch, prompt bucket), the decode loop per (batch, cache length,
max_new_tokens); prompt lengths round up to `pad_to` and cache lengths to `cache_bucket`, so a dataset compiles a
handful of programs. The functions are mesh-agnostic: run inside `vlmjax.sharding.use_mesh(mesh)` (or
pass `mesh=`) with a sharded model; batch arrays are placed with `sharding.batch_sharding`, the cache follows the
logical axes of `llm.CACHE_AXES`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import weakref
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax import sharding
from vlmjax.generate.quant import FORMATS, convert_layer_states, dequantized, kernel_inputs, split_in_place
from vlmjax.generate.sampling import SamplingConfig, row_keys, sample
from vlmjax.models.config import to_dtype
from vlmjax.models.llm import KVCache, stack_cache, unstack_cache
from vlmjax.models.vlm import embed_inputs, llm_of

RUNNING, EOS, STOP, LENGTH = 0, 1, 2, 3
FINISH_NAMES = {EOS: "eos", STOP: "stop", LENGTH: "length"}


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 128
    min_new_tokens: int = 0  # EOS ids cannot be sampled before this many tokens (as transformers' min_new_tokens)
    sampling: SamplingConfig = SamplingConfig()
    eos_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    chunk_steps: int = 32  # decode steps per device call when stop strings need host checks
    pad_to: int = 32  # prompt lengths round up to a multiple of this (fewer prefill compiles)
    cache_bucket: int = 128  # cache length (prompt bucket + max_new_tokens) rounds up to this (fewer decode compiles)
    # static per-layer loop in decode over weights split per layer once per call: faster steps (no per-step weight
    # copies), compile time grows with depth, the decoder's weights are held twice during the call
    unroll_decode: bool = True
    # with unroll_decode on one device: q|k|v and gate|up as one matmul each over concatenated kernels (fewer,
    # larger weight streams); not with LoRA adapters on them or with weights spread over several devices
    fuse_projections: bool = True
    # decoder projection kernels as held for generation: float32 | bfloat16 | int8 (weight-only, per-channel
    # scales; see generate/quant.py). Needs unroll_decode (the engine's per-layer copy is what gets converted)
    weights: str = "float32"
    # generate_dataset: continuous batching over this many slots (finished rows refilled with the next request,
    # see generate/continuous.py) instead of static batches of batch_size; 0 = static batches
    slots: int = 0

    def __post_init__(self):
        if self.weights not in FORMATS:
            raise ValueError(f"GenerationConfig.weights={self.weights!r}: expected one of {FORMATS}")
        if self.weights != "float32" and not self.unroll_decode:
            raise ValueError(f"GenerationConfig.weights={self.weights!r} needs unroll_decode=True")


@dataclasses.dataclass
class Generation:
    tokens: list[int]  # generated ids, EOS excluded; cut at the stop string's last token when one matched
    finish_reason: str  # eos | stop | length
    text: str | None = None  # decoded (and cut before a stop string) when a tokenizer was given


class _Loop(NamedTuple):
    cache: KVCache
    tokens: jax.Array  # (B, N) generated ids (pad after a row stops)
    last: jax.Array  # (B,) token to feed next
    pos: jax.Array  # (B,) its cache slot = RoPE position
    lengths: jax.Array  # (B,) tokens kept (EOS excluded)
    done: jax.Array  # (B,) bool
    finish: jax.Array  # (B,) RUNNING / EOS / STOP / LENGTH
    step: jax.Array  # () tokens sampled so far
    keys: jax.Array  # (B,) per-row PRNG keys
    idle: jax.Array  # () decode slot-steps spent on rows already done (padding rows included)


def unpad_left(ids_bs, mask_bs) -> list[list[int]]:
    """A left-padded batch (HF `padding_side='left'`) -> per-row prompt lists."""
    ids, mask = np.asarray(ids_bs), np.asarray(mask_bs).astype(bool)
    return [ids[r][mask[r]].tolist() for r in range(ids.shape[0])]


def _record(loop: _Loop, tok_b, eos_ids) -> _Loop:
    active = ~loop.done
    is_eos = jnp.isin(tok_b, eos_ids) & active if eos_ids.size else jnp.zeros_like(active)
    step = loop.step
    tokens = jax.lax.dynamic_update_slice(loop.tokens, jnp.where(active, tok_b, 0)[:, None], (0, step))
    return loop._replace(
        tokens=tokens,
        last=tok_b,
        lengths=loop.lengths + (active & ~is_eos),
        done=loop.done | is_eos,
        finish=jnp.where(is_eos, EOS, loop.finish),
        step=step + 1,
    )


def _no_early_eos(logits_bv, eos_ids, step, min_new: int):
    """Mask the EOS ids while fewer than `min_new` tokens have been generated (step: () or per row (B,))."""
    if not min_new or not eos_ids.size:
        return logits_bv
    is_eos_v = jnp.isin(jnp.arange(logits_bv.shape[-1]), eos_ids)
    early = (jnp.asarray(step) < min_new)[..., None]
    return jnp.where(is_eos_v & early, jnp.finfo(logits_bv.dtype).min, logits_bv)


def _prefill(graphdef, state, ids_bp, lens_b, pixel_values, image_rows, row_seeds_b, done0_b, eos_ids, base_key,
             image_pos=None, layer_states=None, *, sampling: SamplingConfig, max_new: int, cache_len: int,
             min_new: int = 0):
    model = nnx.merge(graphdef, state)
    llm = llm_of(model)
    layer_states = dequantized(layer_states, to_dtype(llm.cfg.dtype))
    b, p = ids_bp.shape
    x_bpd = embed_inputs(model, ids_bp, pixel_values, image_rows, image_pos)
    cache = llm.init_cache(b, cache_len)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    h_bpd, cache = llm.hidden_states_cached(x_bpd, positions, cache, jnp.zeros((b,), jnp.int32), prefill=True,
                                            layer_states=layer_states)
    h_bd = jnp.take_along_axis(h_bpd, (lens_b - 1)[:, None, None], axis=1)[:, 0]
    logits_bv = _no_early_eos(llm.logits(h_bd[:, None])[:, 0], eos_ids, 0, min_new)
    keys = row_keys(base_key, row_seeds_b)
    tok_b = sample(logits_bv, sampling, keys, 0)
    loop = _Loop(cache, jnp.zeros((b, max_new), jnp.int32), tok_b, lens_b, jnp.zeros((b,), jnp.int32), done0_b,
                 jnp.zeros((b,), jnp.int32), jnp.zeros((), jnp.int32), keys, jnp.zeros((), jnp.int32))
    return _record(loop, tok_b, eos_ids)


def _decode(graphdef, state, loop: _Loop, end_step, eos_ids, layer_states=None, *, sampling: SamplingConfig,
            unroll: bool, min_new: int = 0):
    model = nnx.merge(graphdef, state)
    llm = llm_of(model)
    layer_states = dequantized(layer_states, to_dtype(llm.cfg.dtype))

    def cond(lp: _Loop):
        return (lp.step < end_step) & ~jnp.all(lp.done)

    def body(lp: _Loop):
        x_b1d = llm.embed(lp.last[:, None])
        h_b1d, cache = llm.hidden_states_cached(x_b1d, lp.pos[:, None], lp.cache, lp.pos, unroll=unroll,
                                                layer_states=layer_states)
        tok_b = sample(_no_early_eos(llm.logits(h_b1d)[:, 0], eos_ids, lp.step, min_new), sampling, lp.keys, lp.step)
        idle = lp.idle + jnp.sum(lp.done, dtype=jnp.int32)
        return _record(lp._replace(cache=cache, pos=lp.pos + 1, idle=idle), tok_b, eos_ids)

    if not unroll:
        return jax.lax.while_loop(cond, body, loop)
    # the unrolled loop carries one cache array per layer: a stacked cache's static slices would be copied
    # every step (XLA:CPU materialises them), costing more than the attention itself
    out = jax.lax.while_loop(cond, body, loop._replace(cache=unstack_cache(loop.cache)))
    return out._replace(cache=stack_cache(out.cache))


_SPLIT: list = []  # at most one (weakrefs to the stacked layer weights, (fuse, format) asked, per-layer copies, token)
_OWNED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # llm -> ((fuse, format), per-layer weights)


def _split(llm, fuse: bool, weights: str):
    leaves = jax.tree.leaves(nnx.state(llm.layers))
    single = all(len(x.sharding.device_set) == 1 for x in leaves)  # else a concatenation would reshard
    return convert_layer_states(llm.split_layers(fuse=fuse and single), weights, kernel_inputs(llm.layers))


def _layer_states(llm, fuse: bool, weights: str = "float32"):
    """`llm.split_layers(fuse)` (kernels converted to `weights`), reused while the same weight arrays are alive (a
    dataset run calls `generate` per batch; splitting copies every weight). Dropped as soon as any of those arrays
    is freed (e.g. donated by a train step), so a stale copy is not held. After `own_weights` the engine's copy is
    the only one and is used as is."""
    if llm in _OWNED:
        asked, split = _OWNED[llm]
        if asked != (fuse, weights):
            raise ValueError(f"the model's weights were handed to the engine as (fuse_projections, weights)={asked}; "
                             f"this call asks for {(fuse, weights)}")
        return split
    leaves = jax.tree.leaves(nnx.state(llm.layers))
    if _SPLIT:
        refs, asked, split, _ = _SPLIT[0]
        if asked == (fuse, weights) and len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
            return split
    split, token = _split(llm, fuse, weights), object()

    def drop(_):
        if _SPLIT and _SPLIT[0][3] is token:
            _SPLIT.clear()

    _SPLIT[:] = [([weakref.ref(x, drop) for x in leaves], (fuse, weights), split, token)]
    return split


def own_weights(model, config: GenerationConfig = GenerationConfig()) -> None:
    """Hand the decoder's weights to the engine for a generation-only process: split per layer (fused /
    converted as `config` asks) and the model's stacked layer arrays replaced by empty ones, so one copy of the
    weights is held instead of two (the per-layer copy the unrolled decode reads, plus the stacked original).
    One-way: afterwards the model can only `generate` with the same fuse_projections / weights settings."""
    if not config.unroll_decode:
        raise ValueError("own_weights serves the unrolled decode (GenerationConfig.unroll_decode=True)")
    llm = llm_of(model)
    if llm in _OWNED:
        return
    _SPLIT.clear()  # a cached split of these arrays would be a second copy
    leaves = jax.tree.leaves(nnx.state(llm.layers))
    single = all(len(x.sharding.device_set) == 1 for x in leaves)
    del leaves
    split = split_in_place(llm, config.fuse_projections and single, config.weights)
    _OWNED[llm] = ((config.fuse_projections, config.weights), split)


@functools.lru_cache(maxsize=None)
def _jitted(donate: bool):
    prefill = jax.jit(_prefill, static_argnums=(0,), static_argnames=("sampling", "max_new", "cache_len", "min_new"))
    decode = jax.jit(_decode, static_argnums=(0,), static_argnames=("sampling", "unroll", "min_new"),
                     donate_argnums=(2,) if donate else ())
    return prefill, decode


def _find_stop(tokenizer, toks: list[int], stops: Sequence[str]) -> tuple[int, str] | None:
    """(tokens to keep, text cut before the stop string) if decoding `toks` shows a stop string."""
    text = tokenizer.decode(toks, skip_special_tokens=True)
    hits = [text.find(s) for s in stops]
    hits = [h for h in hits if h >= 0]
    if not hits:
        return None
    cut = min(hits)
    n = next(n for n in range(1, len(toks) + 1)
             if any(s in tokenizer.decode(toks[:n], skip_special_tokens=True) for s in stops))
    return n, text[:cut]


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig = GenerationConfig(),
    *,
    pixel_values=None,
    image_rows=None,
    image_pos: Sequence[np.ndarray | None] | None = None,
    tokenizer=None,
    row_seeds: Sequence[int] | None = None,
    batch_size: int | None = None,
    mesh=None,
    on_chunk: Callable[[int], None] | None = None,
    stats: dict | None = None,
) -> list[Generation]:
    """Continue every prompt (lists of ids, image placeholders already expanded) in one batch.

    pixel_values (N, H, W, 3) / image_rows (N,) as for the model (row = prompt index, -1 = padding slot).
    image_pos: per prompt, its image tokens' feature positions (`Encoded.image_pos`; LLaVA-1.6 layouts only).
    tokenizer: needed for stop strings; when given, `Generation.text` is filled. row_seeds: per-prompt sampling
    streams (default: the prompt index). batch_size: pad the batch to this many rows (stable shapes for the last
    batch of a dataset; padding rows cost compute but never run the loop longer). on_chunk(step) after each chunk.
    stats: a dict to fill with `slot_stats` (decode slot-steps, and how many went to rows already done).
    """
    cfg = config
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    n = len(prompts)
    if n == 0:
        return []
    lens = np.array([len(p) for p in prompts], np.int32)
    if lens.min() < 1:
        raise ValueError("every prompt needs at least one token")
    b = max(batch_size or n, n)
    if mesh is not None:
        dp = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
        b = -(-b // dp) * dp
    p = -(-int(lens.max()) // cfg.pad_to) * cfg.pad_to
    ids = np.zeros((b, p), np.int32)
    for r, row in enumerate(prompts):
        ids[r, : len(row)] = row
    lens_b = np.ones((b,), np.int32)
    lens_b[:n] = lens
    done0 = np.arange(b) >= n
    seeds = np.arange(b, dtype=np.int64) if row_seeds is None else np.concatenate(
        [np.asarray(row_seeds, np.int64), np.arange(n, b, dtype=np.int64)])
    seeds = (seeds % (2**32)).astype(np.uint32)
    if pixel_values is not None:
        from vlmjax.models.vlm import host_image_inputs

        if image_rows is None and n > 1:
            raise ValueError("image_rows is required with pixel_values for more than one prompt")
        image_rows, image_pos = host_image_inputs(model.cfg, ids, pixel_values, image_rows, image_pos)
    # padded to a multiple of 8 with -1 (never a token) so changing the EOS set does not recompile
    eos_ids = np.full((-(-len(cfg.eos_token_ids) // 8) * 8,), -1, np.int32)
    eos_ids[: len(cfg.eos_token_ids)] = cfg.eos_token_ids

    def put(x):
        if x is None:
            return None
        if mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, sharding.batch_sharding(mesh, np.shape(x)))

    graphdef, state = nnx.split(model)
    prefill, decode = _jitted(jax.default_backend() != "cpu")
    ctx = sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    chunk = cfg.chunk_steps if (cfg.stop_strings or on_chunk) else cfg.max_new_tokens
    stopped: dict[int, tuple[int, str]] = {}
    with ctx:
        # per-layer weights for the unrolled decode (and prefill), split once per call (see LLM.split_layers)
        layer_states = (_layer_states(llm_of(model), cfg.fuse_projections, cfg.weights)
                        if cfg.unroll_decode else None)
        loop = prefill(graphdef, state, put(ids), put(lens_b), put(pixel_values), put(image_rows), put(seeds),
                       put(done0), eos_ids, jax.random.key(cfg.seed), put(image_pos), layer_states, sampling=cfg.sampling, max_new=cfg.max_new_tokens, min_new=cfg.min_new_tokens,
                       cache_len=-(-(p + cfg.max_new_tokens) // cfg.cache_bucket) * cfg.cache_bucket)
        step = 1
        while True:
            if cfg.stop_strings:
                loop, step = _host_stops(loop, tokenizer, cfg.stop_strings, stopped, n, put)
            all_done = bool(np.all(jax.device_get(loop.done)))  # waits for the device: on_chunk sees finished work
            if on_chunk is not None:
                on_chunk(step)
            if step >= cfg.max_new_tokens or all_done:
                break
            loop = decode(graphdef, state, loop, jnp.int32(min(step + chunk, cfg.max_new_tokens)), eos_ids,
                          layer_states, sampling=cfg.sampling, unroll=cfg.unroll_decode, min_new=cfg.min_new_tokens)
            step = int(loop.step)
    tokens, lengths, finish, idle, step = jax.device_get((loop.tokens, loop.lengths, loop.finish, loop.idle,
                                                         loop.step))
    if stats is not None:
        stats.update(slot_stats(b * (int(step) - 1), int(idle)))
    out = []
    for r in range(n):
        if r in stopped:
            keep, text = stopped[r]
            out.append(Generation(tokens[r, :keep].tolist(), "stop", text))
            continue
        toks = tokens[r, : lengths[r]].tolist()
        reason = FINISH_NAMES.get(int(finish[r]), "length")
        text = tokenizer.decode(toks, skip_special_tokens=True) if tokenizer is not None else None
        out.append(Generation(toks, reason, text))
    return out


def slot_stats(slot_steps: int, finished: int, **extra) -> dict:
    """Decode slot-steps (rows x decode steps) and the fraction spent on rows already done: the waste continuous
    batching removes."""
    return {"slot_steps": slot_steps, "finished_slot_steps": finished,
            "finished_fraction": finished / slot_steps if slot_steps else 0.0, **extra}


def _host_stops(loop: _Loop, tokenizer, stops, stopped: dict, n: int, put):
    """Mark rows whose text now contains a stop string as done (finish STOP)."""
    tokens, lengths, done, finish = jax.device_get((loop.tokens, loop.lengths, loop.done, loop.finish))
    newly = []
    for r in range(n):
        if r not in stopped and lengths[r]:
            hit = _find_stop(tokenizer, tokens[r, : lengths[r]].tolist(), stops)
            if hit is not None:
                stopped[r] = hit
                newly.append(r)
    if newly:
        done, finish = done.copy(), finish.copy()
        done[newly], finish[newly] = True, STOP
        loop = loop._replace(done=put(done), finish=put(finish))
    return loop, int(loop.step)
