"""Multi-host dataset runs: which share of the samples a host takes, where its output goes, and the merge.

Each host runs every `shard_count`-th sample (`take_shard`) and writes its own resumable output
(`out.jsonl` -> `out-00001-of-00004.jsonl`); `merge_shards` then joins the shard files into one, refusing a
merge that would lose or double a sample: every expected id must be present exactly once (an `{"id", "error"}`
record counts as present: the sample was tried and its failure is on disk).

Hosts work independently (no collectives while running), so a slow or preempted host only delays the merge.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence


class IncompleteShards(ValueError):
    """Expected ids are missing from the shards (a host has not finished yet, or its output was lost)."""


def host_shard(shard_index: int | None = None, shard_count: int | None = None) -> tuple[int, int]:
    """(index, count), each defaulting to this process's jax.process_index() / process_count()."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
    return int(shard_index), int(shard_count)


def take_shard(items: Sequence, shard_index: int, shard_count: int) -> list:
    """Every `shard_count`-th item from `shard_index` (round-robin, so hosts get equal work on sorted inputs)."""
    return list(items)[shard_index::shard_count]


def shard_path(path, index: int, count: int) -> str:
    """`out.jsonl` -> `out-00001-of-00004.jsonl` (unchanged when count == 1)."""
    path = os.fspath(path)
    if count <= 1:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}-{index:05d}-of-{count:05d}{ext}"


def shard_paths(path, count: int) -> list[str]:
    return [shard_path(path, i, count) for i in range(count)]


def is_process_sharded(shard_count: int) -> bool:
    """True when the shards are this job's jax processes (so a barrier can wait for all of them)."""
    import jax

    return shard_count > 1 and jax.process_count() == shard_count


def barrier(name: str) -> None:
    """Wait until every process of a jax.distributed job gets here (no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def all_ok(ok: bool) -> bool:
    """Process 0's `ok`, on every process (no-op with one process): lets the others fail with it, not hang."""
    import jax

    if jax.process_count() == 1:
        return ok
    import numpy as np
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _preview(xs: Sequence[str], n: int = 10) -> str:
    return ", ".join(repr(x) for x in xs[:n]) + (f" ... ({len(xs)} in all)" if len(xs) > n else "")


def check_coverage(found: Iterable[tuple[str, str]], ids: Sequence[str] | None) -> None:
    """found: (id, where) pairs from every shard. Raises on an id found twice (naming both places), on ids that
    are not expected, and (IncompleteShards) on expected ids found nowhere."""
    where: dict[str, str] = {}
    dups = []
    for i, loc in found:
        if i in where:
            dups.append(f"{i!r} in {where[i]} and {loc}")
        else:
            where[i] = loc
    if dups:
        raise ValueError(f"{len(dups)} ids occur more than once across shards: " + "; ".join(dups[:10]))
    if ids is None:
        return
    expected = [str(i) for i in ids]
    want = set(expected)
    if len(want) != len(expected):
        raise ValueError("the expected ids repeat: pass unique keys (vlmjax.generate.dataset.sample_keys)")
    extra = sorted(set(where) - want)
    if extra:
        raise ValueError(f"{len(extra)} ids in the shards are not expected: {_preview(extra)}")
    missing = [i for i in expected if i not in where]
    if missing:
        raise IncompleteShards(f"{len(missing)} of {len(expected)} ids are missing from the shards: "
                               f"{_preview(missing)}")


def _read(path: str, key: str) -> list[tuple[str, str, str]]:
    if not os.path.exists(path):
        raise IncompleteShards(f"shard {path} does not exist (has its host run?)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not line.endswith("\n"):
                raise IncompleteShards(f"{path}:{n}: torn last line (its host is still running or crashed)")
            try:
                out.append((str(json.loads(line)[key]), f"{path}:{n}", line))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not a JSON record with {key!r}: {e}") from None
    return out


def merge_shards(paths: Sequence, out_path, *, ids: Sequence[str] | None = None, key: str = "id") -> dict:
    """Join JSONL shard files into `out_path` (atomically), in `ids` order when given, else shard order.

    Checks first, writes nothing on failure: an id in two shards (or twice in one) is an error naming both
    lines; with `ids`, an unexpected id is an error and missing ids raise `IncompleteShards` listing them.
    Returns {"records", "errors" (records with an "error" field), "out"}."""
    rows = [r for p in paths for r in _read(os.fspath(p), key)]
    check_coverage(((i, loc) for i, loc, _ in rows), ids)
    by_id = {i: line for i, _, line in rows}
    order = [str(i) for i in ids] if ids is not None else [i for i, _, _ in rows]
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = f"{out_path}.tmp{os.getpid()}"
    errors = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for i in order:
            f.write(by_id[i])
            errors += '"error"' in by_id[i] and "error" in json.loads(by_id[i])
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)
    return {"records": len(order), "errors": errors, "out": out_path}
