"""Continuous batching: a fixed set of decode slots, each finished row's slot refilled with the next request.

The static engine (`engine.generate`) runs a batch until its longest row ends, so rows that finished early hold
their slots idle. Here the device keeps `slots` rows in flight: a jitted `lax.while_loop` decodes them until a
few have finished (`refill_at`) or a chunk ends, the host reads the finished rows out, and one jitted prefill
writes the next requests' prompts into those slots' KV-cache rows (the other slots' rows are untouched). Shapes
stay static: the slot count and cache length are fixed, prefills pad to power-of-two batch buckets and `pad_to`
prompt buckets; a request whose prompt does not fit the cache grows it once to the next `cache_bucket`.

Each slot carries its own position, length and token count, and samples with its request's key stream
(fold_in(key(seed), row_seed), then the request's own step), exactly as the static engine does, so a request's
tokens do not depend on its neighbours, its slot or when it was admitted: greedy and seeded outputs equal the
static engine's token for token. Finished slot-steps are counted on device (`slot_stats`).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
from typing import Iterable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax import sharding
from vlmjax.generate.engine import (EOS, FINISH_NAMES, LENGTH, RUNNING, STOP, Generation, GenerationConfig, _find_stop,
                                    _layer_states, _no_early_eos, slot_stats)
from vlmjax.generate.quant import dequantized
from vlmjax.generate.sampling import SamplingConfig, row_keys, sample
from vlmjax.models.config import to_dtype
from vlmjax.models.llm import KVCache
from vlmjax.models.vlm import embed_inputs, llm_of


class Prompt(NamedTuple):
    ids: list  # prompt ids, image placeholders expanded
    pixels: np.ndarray | None = None  # (k, H, W, 3) this prompt's image tiles
    image_pos: np.ndarray | None = None  # LLaVA-1.6 layouts (`Encoded.image_pos`)
    seed: int | None = None  # row seed: the sampling stream (default: the prompt's index, as `generate`)


class _Slots(NamedTuple):
    cache: KVCache  # per-layer tuples (unrolled decode) or stacked (layers, S, kv_heads, C, head_dim)
    tokens: jax.Array  # (S, N) the slot's request's generated ids
    last: jax.Array  # (S,) token to feed next
    pos: jax.Array  # (S,) its cache slot = RoPE position
    count: jax.Array  # (S,) tokens sampled for the slot's request (its sampling step)
    lengths: jax.Array  # (S,) tokens kept (EOS excluded)
    done: jax.Array  # (S,) bool; empty slots are done
    finish: jax.Array  # (S,)
    keys: jax.Array  # (S,) the slot's request's PRNG key
    idle: jax.Array  # () decode slot-steps spent on done / empty slots
    steps: jax.Array  # () decode steps run


def _record(s: _Slots, tok_s, sampled_s, eos_ids, max_new: int) -> _Slots:
    """Store the tokens of the slots that sampled this step (their own column), stop on EOS / max_new."""
    is_eos = jnp.isin(tok_s, eos_ids) & sampled_s if eos_ids.size else jnp.zeros_like(sampled_s)
    rows = jnp.arange(tok_s.shape[0])
    col = jnp.where(sampled_s, s.count, max_new)  # out of range: dropped
    tokens = s.tokens.at[rows, col].set(tok_s, mode="drop")
    count = s.count + sampled_s
    full = sampled_s & ~is_eos & (count >= max_new)
    return s._replace(
        tokens=tokens, last=jnp.where(sampled_s, tok_s, s.last), count=count,
        lengths=s.lengths + (sampled_s & ~is_eos), done=s.done | is_eos | full,
        finish=jnp.where(is_eos, EOS, jnp.where(full, LENGTH, s.finish)))


def _init(llm, slots: int, cache_len: int, max_new: int, unroll: bool) -> _Slots:
    cache = llm.init_cache(slots, cache_len)
    if unroll:
        cache = KVCache(tuple(cache.k), tuple(cache.v))
    z = jnp.zeros((slots,), jnp.int32)
    return _Slots(cache, jnp.zeros((slots, max_new), jnp.int32), z, z, z, z, jnp.ones((slots,), bool), z,
                  row_keys(jax.random.key(0), z), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))


def _grow(s: _Slots, cache_len: int) -> _Slots:
    """Longer cache rows (zeros appended on the length axis) for a prompt that does not fit."""
    def pad(c):
        widths = [(0, 0)] * c.ndim
        widths[-2] = (0, cache_len - c.shape[-2])
        return jnp.pad(c, widths)

    return s._replace(cache=jax.tree.map(pad, s.cache))


def _put_rows(cache: KVCache, slot_b, new: KVCache) -> KVCache:
    """Write each new row's prompt entries (slots 0..p-1) into cache row slot_b[i] (out of range: dropped)."""
    if isinstance(cache.k, tuple):
        put = lambda c, n: c.at[slot_b, :, : n.shape[2]].set(n.astype(c.dtype), mode="drop")  # noqa: E731
        return KVCache(tuple(map(put, cache.k, new.k)), tuple(map(put, cache.v, new.v)))
    put = lambda c, n: c.at[:, slot_b, :, : n.shape[3]].set(n.astype(c.dtype), mode="drop")  # noqa: E731
    return KVCache(put(cache.k, new.k), put(cache.v, new.v))


def _admit(graphdef, state, s: _Slots, ids_bp, lens_b, slot_b, seeds_b, base_key, eos_ids, pixel_values, image_rows,
           image_pos, layer_states, *, sampling: SamplingConfig, max_new: int, min_new: int):
    """Prefill B new requests and place them in slots slot_b (index S = a padding row), first token sampled."""
    model = nnx.merge(graphdef, state)
    llm = llm_of(model)
    layer_states = dequantized(layer_states, to_dtype(llm.cfg.dtype))
    b, p = ids_bp.shape
    x_bpd = embed_inputs(model, ids_bp, pixel_values, image_rows, image_pos)
    new = llm.init_cache(b, p)
    if isinstance(s.cache.k, tuple):
        new = KVCache(tuple(new.k), tuple(new.v))
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
    h_bpd, new = llm.hidden_states_cached(x_bpd, positions, new, jnp.zeros((b,), jnp.int32), prefill=True,
                                          layer_states=layer_states)
    h_bd = jnp.take_along_axis(h_bpd, (lens_b - 1)[:, None, None], axis=1)[:, 0]
    logits_bv = _no_early_eos(llm.logits(h_bd[:, None])[:, 0], eos_ids, 0, min_new)
    keys_b = row_keys(base_key, seeds_b)
    tok_b = sample(logits_bv, sampling, keys_b, 0)

    def put(a, v):
        return a.at[slot_b].set(v, mode="drop")

    n_slots = s.done.shape[0]
    fresh = put(jnp.zeros((n_slots,), bool), True)
    s = s._replace(
        cache=_put_rows(s.cache, slot_b, new), tokens=jnp.where(fresh[:, None], 0, s.tokens), pos=put(s.pos, lens_b),
        count=put(s.count, 0), lengths=put(s.lengths, 0), done=put(s.done, False), finish=put(s.finish, RUNNING),
        keys=put(s.keys, keys_b))
    return _record(s, put(s.last, tok_b), fresh, eos_ids, max_new)


def _decode(graphdef, state, s: _Slots, n_steps, refill_at, eos_ids, layer_states, *, sampling: SamplingConfig,
            unroll: bool, max_new: int, min_new: int):
    """Up to n_steps decode steps over all slots; stops early once `refill_at` slots are done (or all are)."""
    model = nnx.merge(graphdef, state)
    llm = llm_of(model)
    layer_states = dequantized(layer_states, to_dtype(llm.cfg.dtype))

    def cond(c):
        i, sl = c
        n_done = jnp.sum(sl.done, dtype=jnp.int32)
        return (i < n_steps) & (n_done < refill_at) & (n_done < sl.done.shape[0])

    def body(c):
        i, sl = c
        active = ~sl.done
        h_s1d, cache = llm.hidden_states_cached(llm.embed(sl.last[:, None]), sl.pos[:, None], sl.cache, sl.pos,
                                                unroll=unroll, layer_states=layer_states)
        logits = _no_early_eos(llm.logits(h_s1d)[:, 0], eos_ids, sl.count, min_new)
        tok_s = sample(logits, sampling, sl.keys, sl.count)
        sl = sl._replace(cache=cache, pos=sl.pos + active, idle=sl.idle + jnp.sum(sl.done, dtype=jnp.int32),
                         steps=sl.steps + 1)
        return i + 1, _record(sl, tok_s, active, eos_ids, max_new)

    return jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), s))[1]


@functools.lru_cache(maxsize=None)
def _jitted(donate: bool):
    statics = ("sampling", "max_new", "min_new")
    admit = jax.jit(_admit, static_argnums=(0,), static_argnames=statics, donate_argnums=(2,) if donate else ())
    decode = jax.jit(_decode, static_argnums=(0,), static_argnames=statics + ("unroll",),
                     donate_argnums=(2,) if donate else ())
    return admit, decode


def _bucket(n: int, cap: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, cap)


def iter_generate(model, prompts: Iterable[Prompt], config: GenerationConfig = GenerationConfig(), *,
                  slots: int | None = None, refill_at: int | None = None, tokenizer=None, mesh=None,
                  stats: dict | None = None) -> Iterator[tuple[int, Generation]]:
    """Continuous batching over `prompts` (read lazily): yields (prompt index, Generation) as each finishes.

    slots: rows decoded together (default config.slots, else 32). refill_at: return to the host to admit new
    requests once this many slots are free (default slots // 8, at least 1); fewer means fewer, larger prefills
    and more idle slot-steps. stats: filled at the end with `slot_stats` (+ prefill calls, decode calls).
    """
    cfg = config
    if cfg.stop_strings and tokenizer is None:
        raise ValueError("stop strings need a tokenizer")
    n_slots = slots or cfg.slots or 32
    if mesh is not None:
        dp = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
        n_slots = -(-n_slots // dp) * dp
    refill_at = max(1, min(refill_at or n_slots // 8, n_slots))
    max_new = cfg.max_new_tokens
    chunk = cfg.chunk_steps if cfg.stop_strings else max_new
    llm = llm_of(model)
    eos_ids = np.full((-(-len(cfg.eos_token_ids) // 8) * 8,), -1, np.int32)
    eos_ids[: len(cfg.eos_token_ids)] = cfg.eos_token_ids

    def put(x):
        if x is None or mesh is None:
            return None if x is None else jnp.asarray(x)
        return jax.device_put(x, sharding.batch_sharding(mesh, np.shape(x)))

    source = iter(enumerate(prompts))
    queue: collections.deque = collections.deque()

    def top_up():
        while len(queue) < n_slots:
            nxt = next(source, None)
            if nxt is None:
                return
            i, pr = nxt
            if len(pr.ids) < 1:
                raise ValueError(f"prompt {i}: needs at least one token")
            queue.append(nxt)

    graphdef, state = nnx.split(model)
    admit, decode = _jitted(jax.default_backend() != "cpu")
    ctx = sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    owner = [-1] * n_slots  # prompt index per slot, -1 = empty
    stopped: dict[int, tuple[int, str]] = {}
    base_key = jax.random.key(cfg.seed)
    n_admit = n_decode = 0
    s = None
    with ctx:
        layer_states = (_layer_states(llm, cfg.fuse_projections, cfg.weights) if cfg.unroll_decode else None)
        while True:
            top_up()
            free = [k for k in range(n_slots) if owner[k] < 0]
            if queue and free:
                batch = [queue.popleft() for _ in range(min(len(free), len(queue)))]
                nb = _bucket(len(batch), n_slots)
                p = -(-max(len(pr.ids) for _, pr in batch) // cfg.pad_to) * cfg.pad_to
                need = -(-(p + max_new) // cfg.cache_bucket) * cfg.cache_bucket
                if s is None:
                    s = _init(llm, n_slots, need, max_new, cfg.unroll_decode)
                cur = (s.cache.k[0] if isinstance(s.cache.k, tuple) else s.cache.k).shape[-2]
                if need > cur:
                    s = _grow(s, need)
                ids = np.zeros((nb, p), np.int32)
                lens = np.ones((nb,), np.int32)
                slot_b = np.full((nb,), n_slots, np.int32)
                seeds = np.zeros((nb,), np.int64)
                for r, ((i, pr), k) in enumerate(zip(batch, free)):
                    ids[r, : len(pr.ids)], lens[r], slot_b[r] = pr.ids, len(pr.ids), k
                    seeds[r] = i if pr.seed is None else pr.seed
                    owner[k] = i
                px, rows, ipos = _images(model, ids, [pr for _, pr in batch], nb)
                s = admit(graphdef, state, s, put(ids), put(lens), put(slot_b), put((seeds % 2**32).astype(np.uint32)),
                          base_key, eos_ids, put(px), put(rows), put(ipos), layer_states, sampling=cfg.sampling,
                          max_new=max_new, min_new=cfg.min_new_tokens)
                n_admit += 1
            if s is None:  # nothing was ever submitted
                break
            if cfg.stop_strings:
                s = _host_stops(s, owner, tokenizer, cfg.stop_strings, stopped, put)
            done = np.asarray(jax.device_get(s.done))
            finished = [k for k in range(n_slots) if owner[k] >= 0 and done[k]]
            if finished:
                tokens, lengths, finish = jax.device_get((s.tokens, s.lengths, s.finish))
                for k in finished:
                    i, owner[k] = owner[k], -1
                    yield i, _result(i, tokens[k], int(lengths[k]), int(finish[k]), stopped, tokenizer)
            top_up()
            if not queue and all(o < 0 for o in owner):
                break
            # with requests waiting, come back once refill_at slots are free; without, run the rest out
            at = min(refill_at, len(queue)) if queue else n_slots
            if queue and sum(o < 0 for o in owner) >= at:
                continue
            s = decode(graphdef, state, s, jnp.int32(chunk), jnp.int32(at), eos_ids, layer_states,
                       sampling=cfg.sampling, unroll=cfg.unroll_decode, max_new=max_new, min_new=cfg.min_new_tokens)
            n_decode += 1
    if stats is not None:
        steps, idle = (0, 0) if s is None else map(int, jax.device_get((s.steps, s.idle)))
        cache_len = 0 if s is None else (s.cache.k[0] if isinstance(s.cache.k, tuple) else s.cache.k).shape[-2]
        stats.update(slot_stats(n_slots * steps, idle, slots=n_slots, decode_steps=steps, prefill_calls=n_admit,
                                decode_calls=n_decode, cache_len=cache_len))


def generate_continuous(model, prompts: Iterable[Prompt], config: GenerationConfig = GenerationConfig(),
                        **kw) -> list[Generation]:
    """`iter_generate` collected in prompt order."""
    out = dict(iter_generate(model, prompts, config, **kw))
    return [out[i] for i in range(len(out))]


def generate_requests(model, batches, config: GenerationConfig, *, seed_of, on_failed, tokenizer=None, mesh=None,
                      stats: dict | None = None) -> Iterator[tuple]:
    """`generate_dataset`'s continuous path: (item, Generation) as each finishes, from `dataset.iter_batches`
    output (read as slots free up); seed_of(item) is the item's sampling seed; on_failed(failed) for each batch's
    items that could not be encoded."""
    held = {}
    index = itertools.count()

    def prompts():
        for batch, enc, failed in batches:
            on_failed(failed)
            for r, e in zip(batch, enc):
                held[next(index)] = r
                yield Prompt(e.ids, e.pixels, e.image_pos, seed_of(r))

    for i, g in iter_generate(model, prompts(), config, tokenizer=tokenizer, mesh=mesh, stats=stats):
        yield held.pop(i), g


def _result(i, tokens_n, length: int, finish: int, stopped: dict, tokenizer) -> Generation:
    if i in stopped:
        keep, text = stopped.pop(i)
        return Generation(tokens_n[:keep].tolist(), "stop", text)
    toks = tokens_n[:length].tolist()
    text = tokenizer.decode(toks, skip_special_tokens=True) if tokenizer is not None else None
    return Generation(toks, FINISH_NAMES.get(finish, "length"), text)


def _images(model, ids, batch: list[Prompt], nb: int):
    """Pixel values / image rows / image positions of a prefill batch (fixed tile slots per row: fewer compiles)."""
    if not any(pr.pixels is not None and len(pr.pixels) for pr in batch):
        return None, None, None
    from vlmjax.models.vlm import host_image_inputs

    per_row = max(len(pr.pixels) for pr in batch if pr.pixels is not None)
    shape = next(pr.pixels.shape[1:] for pr in batch if pr.pixels is not None and len(pr.pixels))
    px = np.zeros((nb * per_row,) + shape, np.float32)
    rows = np.full((nb * per_row,), -1, np.int32)
    j = 0
    for r, pr in enumerate(batch):
        if pr.pixels is not None:
            px[j: j + len(pr.pixels)], rows[j: j + len(pr.pixels)] = pr.pixels, r
            j += len(pr.pixels)
    pos = [pr.image_pos for pr in batch] + [None] * (nb - len(batch))
    rows, ipos = host_image_inputs(model.cfg, ids, px, rows, pos if any(x is not None for x in pos) else None)
    return px, rows, ipos


def _host_stops(s: _Slots, owner: list, tokenizer, stops, stopped: dict, put) -> _Slots:
    """Mark running slots whose text now shows a stop string as done (finish STOP)."""
    tokens, lengths, done, finish = jax.device_get((s.tokens, s.lengths, s.done, s.finish))
    newly = []
    for k, i in enumerate(owner):
        if i >= 0 and not done[k] and i not in stopped and lengths[k]:
            hit = _find_stop(tokenizer, tokens[k, : lengths[k]].tolist(), stops)
            if hit is not None:
                stopped[i] = hit
                newly.append(k)
    if not newly:
        return s
    done, finish = done.copy(), finish.copy()
    done[newly], finish[newly] = True, STOP
    return s._replace(done=put(done), finish=put(finish))
