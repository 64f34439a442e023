"""Run the model over a list of requests in batches: resume, host-side prefetch, progress, JSONL output.

Generation, scoring and feature capture all walk a dataset the same way: skip ids already written, encode the
next batch (tokenise + decode/resize images) in a background thread while the device works on the current one,
and write each finished batch before starting the next, so a crash loses at most the batch in flight.
"""

from __future__ import annotations

import concurrent.futures
import logging
import zlib
from typing import Callable, Iterator, Sequence

from vlmjax.generate.engine import GenerationConfig, generate, slot_stats
from vlmjax.generate.jsonl import ResumableJsonl
from vlmjax.generate.requests import Encoder, Request, collate_images, image_pos_of, image_slots

log = logging.getLogger(__name__)


def pending(requests: Sequence[Request], done: set[str]) -> list[Request]:
    """Requests whose id is not written yet; duplicate ids in the input are kept once (with a warning)."""
    seen, out, dups = set(done), [], 0
    for r in requests:
        if r.id in seen:
            dups += r.id not in done
            continue
        seen.add(r.id)
        out.append(r)
    if dups:
        log.warning("%d requests repeat an earlier id and are skipped", dups)
    return out


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
                log.warning("skipping %s: %s", getattr(item, "id", item), err)
            yield ok, encoded, failed
            bar.update(len(batches[i]))
    bar.close()


def error_records(failed) -> list[dict]:
    """Output records for requests that could not be encoded: written, so a rerun does not retry them forever."""
    return [{"id": r.id, **r.meta, "error": err} for r, err in failed]


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
    progress: bool = True,
    stats: dict | None = None,
) -> dict:
    """Generate for every request not yet in `out_path` (JSONL, one record per id); returns counts.

    Record: {"id", **request.meta, "prompt": last user message, "output": text, "finish_reason", "num_tokens"};
    a request that cannot be encoded (missing / corrupt image, malformed turns) gets {"id", **meta, "error"}.
    config.slots > 0: continuous batching over that many slots (`generate.continuous`) instead of batches of
    batch_size. stats: a dict filled with the engine's decode slot-step counts (`engine.slot_stats`).
    """
    encoder = encoder or Encoder(tokenizer, model.cfg)
    with ResumableJsonl(out_path) as out:
        todo = pending(requests, out.done)
        skipped = len(requests) - len(todo)
        if config.slots:  # continuous batching: each record is written as soon as its sample finishes
            from vlmjax.generate.continuous import generate_requests

            batches = iter_batches(todo, config.slots, encoder.prompt, desc="generate", progress=progress)
            for r, g in generate_requests(model, batches, config, seed_of=row_seed, tokenizer=tokenizer, mesh=mesh,
                                          on_failed=lambda failed: out.write(error_records(failed)), stats=stats):
                out.write([_output(r, g)])
            return {"written": len(todo), "skipped_done": skipped}
        batch_stats: dict = {}
        for batch, enc, failed in iter_batches(todo, batch_size, encoder.prompt, desc="generate", progress=progress):
            out.write(error_records(failed))
            if not batch:
                continue
            px, rows = collate_images([e.pixels for e in enc], slots=image_slots(batch_size, enc))
            gens = generate(model, [e.ids for e in enc], config, pixel_values=px, image_rows=rows,
                            image_pos=image_pos_of(enc),
                            tokenizer=tokenizer, row_seeds=[row_seed(r.id) for r in batch], batch_size=batch_size,
                            mesh=mesh, stats=batch_stats)
            if stats is not None:
                total = {k: stats.get(k, 0) + batch_stats[k] for k in ("slot_steps", "finished_slot_steps")}
                stats.update(slot_stats(total["slot_steps"], total["finished_slot_steps"]))
            out.write(_output(r, g) for r, g in zip(batch, gens))
    return {"written": len(todo), "skipped_done": skipped}


def _output(r: Request, g) -> dict:
    return {"id": r.id, **r.meta, "prompt": r.prompt_messages()[-1]["content"], "output": g.text,
            "finish_reason": g.finish_reason, "num_tokens": len(g.tokens)}

