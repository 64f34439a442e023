"""Run the model over a list of requests in batches: resume, host-side prefetch, progress, JSONL output.

Generation, scoring and feature capture all walk a dataset the same way: key every sample uniquely (`sample_keys`),
take this host's shard (`shard_work`), skip keys already written, encode the next batch (tokenise + decode/resize
images) in a background thread while the device works on the current one, and write each finished batch before
starting the next, so a crash loses at most the batch in flight. Samples that cannot be encoded are written as
error records and counted ("failed"), never dropped silently.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import zlib
from typing import Callable, Iterator, Sequence

from vlmjax.generate.engine import GenerationConfig, generate, slot_stats
from vlmjax.generate.jsonl import ResumableJsonl
from vlmjax.generate.requests import Encoder, Request, collate_images, image_pos_of, image_slots
from vlmjax.generate.shards import all_ok, barrier, host_shard, is_process_sharded, merge_shards, shard_path, take_shard

log = logging.getLogger(__name__)


def sample_keys(requests: Sequence[Request]) -> list[str]:
    """The output key of every request: its id when the ids are unique, else "{source}:{index}" for all of them
    (source = meta["source"], default "row"; index = position among that source's requests), so that no
    sample is dropped as a duplicate (LLaVA-665k-style files repeat ids). Records keep the id as "sample_id"."""
    ids = [r.id for r in requests]
    repeated = {i: c for i, c in collections.Counter(ids).items() if c > 1}
    if not repeated:
        return ids
    examples = ", ".join(f"{i!r} x{c}" for i, c in list(repeated.items())[:5])
    log.warning("%d ids repeat (%s); outputs are keyed by source:index instead", len(repeated), examples)
    seen: collections.Counter = collections.Counter()
    keys = []
    for r in requests:
        src = str(r.meta.get("source", "row"))
        keys.append(f"{src}:{seen[src]}")
        seen[src] += 1
    if len(set(keys)) != len(keys):
        raise ValueError("source:index keys collide: give the requests' sources distinct names")
    return keys


def record_head(key: str, req: Request) -> dict:
    """Leading fields of a sample's output record: its key, its original id when that differs, its meta."""
    return {"id": key, **({"sample_id": req.id} if key != req.id else {}), **req.meta}


def shard_work(requests: Sequence[Request], out, shard_index: int | None = None, shard_count: int | None = None
               ) -> tuple[list[str], list[tuple[str, Request]], dict]:
    """(all keys, this host's (key, request) pairs not yet on disk, run stats). `out` has `.done` and `.errors`
    (keys already written, keys written as error records)."""
    keys = sample_keys(requests)
    i, n = host_shard(shard_index, shard_count)
    mine = take_shard(list(zip(keys, requests)), i, n)
    todo = [(k, r) for k, r in mine if k not in out.done]
    prev_errors = sum(k in out.errors for k, _ in mine)
    stats = {"requests": len(mine), "written": 0, "failed": 0, "skipped_done": len(mine) - len(todo) - prev_errors,
             "previous_errors": prev_errors, "shard": [i, n]}
    if prev_errors:
        log.warning("%d samples failed in an earlier run and are not retried (retry_errors=True retries them)",
                    prev_errors)
    return keys, todo, stats


def check_local_mesh(mesh, shard_count: int) -> None:
    """Hosts run their shards independently: a mesh must hold only this process's devices."""
    if mesh is None or shard_count == 1:
        return
    import jax

    if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
        raise ValueError("mesh spans several processes, but each host runs its own shard of the samples: "
                         "build it from jax.local_devices()")


def merge_hosts(out_path: str, keys: Sequence[str], shard_index: int, shard_count: int, merge) -> str | None:
    """When the shards are this job's processes: wait for all, merge on process 0, wait again; returns the merged
    path (None when the shards are separate jobs: the caller merges once all are done)."""
    if shard_count == 1:
        return out_path
    if not is_process_sharded(shard_count):
        return None
    barrier(f"vlmjax shards done: {out_path}")
    error = None
    if shard_index == 0:
        try:
            merge(out_path, keys)
        except Exception as e:  # noqa: BLE001 (re-raised below, after telling the other processes)
            error = e
    if not all_ok(error is None):  # every process leaves together: none waits on a failed merge
        raise error or RuntimeError(f"process 0 could not merge the shards of {out_path} (see its log)")
    return out_path


def _encode_all(encode: Callable, batch: list) -> tuple[list, list, list]:
    ok, enc, failed = [], [], []
    for item in batch:
        try:
            enc.append(encode(item))
            ok.append(item)
        except (ValueError, OSError) as e:  # data.BadSample is a ValueError: a missing/corrupt image, bad turns
            failed.append((item, f"{type(e).__name__}: {e}"))
    return ok, enc, failed


def iter_batches(items: Sequence, batch_size: int, encode: Callable, *, desc: str = "", progress: bool = True
                 ) -> Iterator[tuple[list, list, list]]:
    """Yield (batch, [encode(item) ...], [(item, error) ...]) with the items that failed to encode left out of the
    batch; the next batch is encoded in a thread while the caller works on this one."""
    from tqdm.auto import tqdm

    batches = [list(items[i: i + batch_size]) for i in range(0, len(items), batch_size)]
    bar = tqdm(total=len(items), desc=desc, disable=not progress, unit="sample")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(_encode_all, encode, batches[0]) if batches else None
        for i in range(len(batches)):
            ok, encoded, failed = fut.result()
            if i + 1 < len(batches):
                fut = pool.submit(_encode_all, encode, batches[i + 1])
            for item, err in failed:
                log.warning("skipping %s: %s", item[0] if isinstance(item, tuple) else getattr(item, "id", item), err)
            yield ok, encoded, failed
            bar.update(len(batches[i]))
    bar.close()


def error_records(failed) -> list[dict]:
    """Records for (key, request) items that could not be encoded: written, so a rerun does not retry them."""
    return [{**record_head(k, r), "error": err} for (k, r), err in failed]


def row_seed(sample_id: str) -> int:
    """Sampling stream of a sample: a function of its id only, so reruns and resumed runs agree."""
    return zlib.crc32(sample_id.encode())


def generate_dataset(
    model,
    tokenizer,
    requests: Sequence[Request],
    out_path,
    config: GenerationConfig,
    *,
    batch_size: int = 16,
    encoder: Encoder | None = None,
    mesh=None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
    stats: dict | None = None,
) -> dict:
    """Generate for every request of this host's shard not yet in its output (JSONL, one record per key).

    Record: {"id": key (see `sample_keys`), **request.meta, "prompt": last user message, "output": text,
    "finish_reason", "num_tokens"}; a request that cannot be encoded (missing / corrupt image, malformed turns)
    gets {"id", **meta, "error"}, which a rerun skips unless `retry_errors`. Sharding: host `shard_index` of
    `shard_count` (default: this jax process of all) takes every shard_count-th request and writes
    `shard_path(out_path, ...)`; when the shards are this job's processes, process 0 merges them into `out_path`
    (`shards.merge_shards`, coverage checked). mesh: this host's devices. Returns counts (`shard_work`) plus
    "out" (this host's file) and "merged" (`out_path`, or None until a caller merges separate jobs' shards).
    config.slots > 0: continuous batching over that many slots (`generate.continuous`) instead of batches of
    batch_size, each record written as soon as its sample finishes. stats: a dict filled with the engine's decode
    slot-step counts (`engine.slot_stats`).
    """
    encoder = encoder or Encoder(tokenizer, model.cfg)
    i, n = host_shard(shard_index, shard_count)
    check_local_mesh(mesh, n)
    path = shard_path(out_path, i, n)
    with ResumableJsonl(path, retry_errors=retry_errors) as out:
        keys, todo, counts = shard_work(requests, out, i, n)

        def write_failed(failed):
            out.write(error_records(failed))
            counts["failed"] += len(failed)

        def encode(kr):
            return encoder.prompt(kr[1])

        if config.slots:
            from vlmjax.generate.continuous import generate_requests

            batches = iter_batches(todo, config.slots, encode, desc="generate", progress=progress)
            for (k, r), g in generate_requests(model, batches, config, seed_of=lambda kr: row_seed(kr[0]),
                                               tokenizer=tokenizer, mesh=mesh, on_failed=write_failed, stats=stats):
                out.write([_output(k, r, g)])
                counts["written"] += 1
        batch_stats: dict = {}
        for batch, enc, failed in ([] if config.slots else
                                   iter_batches(todo, batch_size, encode, desc="generate", progress=progress)):
            write_failed(failed)
            if not batch:
                continue
            px, rows = collate_images([e.pixels for e in enc], slots=image_slots(batch_size, enc))
            gens = generate(model, [e.ids for e in enc], config, pixel_values=px, image_rows=rows,
                            image_pos=image_pos_of(enc), tokenizer=tokenizer,
                            row_seeds=[row_seed(k) for k, _ in batch], batch_size=batch_size, mesh=mesh,
                            stats=batch_stats)
            if stats is not None:
                total = {x: stats.get(x, 0) + batch_stats[x] for x in ("slot_steps", "finished_slot_steps")}
                stats.update(slot_stats(total["slot_steps"], total["finished_slot_steps"]))
            out.write(_output(k, r, g) for (k, r), g in zip(batch, gens))
            counts["written"] += len(batch)
    merged = merge_hosts(os.fspath(out_path), keys, i, n,
                         lambda p, ks: merge_shards([shard_path(p, j, n) for j in range(n)], p, ids=ks))
    return {**counts, "out": path, "merged": merged}


def _output(k: str, r: Request, g) -> dict:
    return {**record_head(k, r), "prompt": r.prompt_messages()[-1]["content"], "output": g.text,
            "finish_reason": g.finish_reason, "num_tokens": len(g.tokens)}

