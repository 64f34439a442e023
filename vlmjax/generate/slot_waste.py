"""Decode slot-steps spent on finished rows, counted from a run's output lengths alone.

Every decode step runs all rows of a batch (static engine) or all slots (continuous batching); a row that has
finished (EOS, max_new_tokens), a padding row and an empty slot still cost their share. The engines count this on
device (`engine.slot_stats`, `generate(..., stats={})`); these functions count it from what a run wrote
(`num_tokens`, `finish_reason`). The two engines emit the same tokens for the same requests (greedy or seeded
sampling), so one run's outputs tell what the static engine at any batch size and continuous batching at any slot
count would waste, without running them.

A request's sampled tokens s: its kept tokens plus the EOS it stopped on (`sampled_tokens`); the prefill samples
the first, decode steps the other s - 1.

Static batches of B rows (`static_slot_stats`): consecutive requests, the last batch padded to B rows. A batch
runs K = max(s) - 1 decode steps; row i is active in s_i - 1 of them and wastes K - (s_i - 1) = max(s) - s_i;
a padding row wastes K. Example, B = 2, s = [3, 5, 2]: batch [3, 5] runs 4 steps, row 3 wastes 2; batch [2, pad]
runs 1 step, the padding row wastes 1: 3 of 2*4 + 2*1 = 10 slot-steps.

Continuous slots (`continuous_slot_stats`): replays `continuous.iter_generate`'s schedule (without stop strings,
so its chunk limit never binds): admit queued requests into free slots (the prefill samples each one's first
token), free the finished slots, and unless `refill_at` slots (or, with fewer requests left, that many) are
already free, decode all slots until that many are done or empty, every step costing one slot-step per done or
empty slot. Tests check both against the engines' own counts.
"""

from __future__ import annotations

import collections
from typing import Sequence

from vlmjax.generate.engine import slot_stats


def sampled_tokens(num_tokens: int, finish_reason: str) -> int:
    """Tokens a request sampled: the kept ones plus the EOS it stopped on. A stop-string finish keeps a prefix of
    what was sampled, so its count is unknown: an error."""
    if finish_reason == "eos":
        return int(num_tokens) + 1
    if finish_reason == "length":
        return int(num_tokens)
    raise ValueError(f"finish_reason {finish_reason!r}: sampled tokens are known only for 'eos' and 'length'")


def _check(sampled: Sequence[int], rows: int, what: str) -> list[int]:
    if rows < 1:
        raise ValueError(f"{what} must be >= 1, got {rows}")
    out = [int(s) for s in sampled]
    bad = [i for i, s in enumerate(out) if s < 1]
    if bad:
        raise ValueError(f"requests {bad[:5]}: every request samples at least one token, "
                         f"got {[out[i] for i in bad[:5]]}")
    return out


def static_slot_stats(sampled: Sequence[int], batch: int) -> dict:
    """`slot_stats` of the static engine over consecutive batches of `batch` rows (the last one padded)."""
    sampled = _check(sampled, batch, "batch")
    slot_steps = finished = 0
    for i in range(0, len(sampled), batch):
        chunk = sampled[i: i + batch]
        k = max(chunk) - 1
        slot_steps += batch * k
        finished += sum(k - (s - 1) for s in chunk) + (batch - len(chunk)) * k
    return slot_stats(slot_steps, finished)


def continuous_slot_stats(sampled: Sequence[int], slots: int, refill_at: int | None = None) -> dict:
    """`slot_stats` of continuous batching over `slots` slots (refill_at as `iter_generate`: default slots // 8,
    at least 1), plus decode_steps and prefill_calls."""
    sampled = _check(sampled, slots, "slots")
    refill_at = max(1, min(refill_at or slots // 8, slots))
    queue = collections.deque(sampled)
    left = [0] * slots  # decode steps the slot's request still needs (0: done or empty)
    busy = [False] * slots
    steps = idle = prefills = 0
    while True:
        free = [k for k in range(slots) if not busy[k]]
        if queue and free:
            for k in free[: len(queue)]:
                left[k], busy[k] = queue.popleft() - 1, True
            prefills += 1
        busy = [b and n > 0 for b, n in zip(busy, left)]  # the host reads the finished rows out
        if not queue and not any(busy):
            break
        at = min(refill_at, len(queue)) if queue else slots
        if queue and busy.count(False) >= at:
            continue
        done = left.count(0)
        while done < at and done < slots:
            steps += 1
            idle += done
            left = [max(n - 1, 0) for n in left]
            done = left.count(0)
    return slot_stats(slots * steps, idle, slots=slots, decode_steps=steps, prefill_calls=prefills)
