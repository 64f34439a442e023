"""Append-only JSONL output keyed by sample id, resumable after a crash.

Long generation / scoring runs (hundreds of thousands of samples) must survive preemption: each batch is
appended, flushed and fsynced, so a crash loses at most the batch in flight. On reopening, a torn last line (a
crash mid-write) is cut off, and the ids already present are skipped by the caller. Records with an "error"
field (a sample that could not be encoded) count as done, so a rerun does not retry them forever;
`retry_errors=True` removes them from the file (atomically) so that the run tries those samples again.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable

log = logging.getLogger(__name__)


class ResumableJsonl:
    def __init__(self, path, key: str = "id", *, retry_errors: bool = False):
        self.path, self.key = str(path), key
        self.done: set[str] = set()
        self.errors: set[str] = set()  # ids whose record on disk is an error record
        if os.path.exists(self.path):
            self._recover()
            if retry_errors and self.errors:
                self._drop_errors()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def _recover(self) -> None:
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            log.warning("%s: dropping a torn last line (%d bytes) from an interrupted run", self.path, len(data) - end)
            with open(self.path, "r+b") as f:
                f.truncate(end)
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                k = str(rec[self.key])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}:{n}: not a JSON record with {self.key!r}: {e}") from None
            self.done.add(k)
            (self.errors.add if "error" in rec else self.errors.discard)(k)

    def _drop_errors(self) -> None:
        with open(self.path, encoding="utf-8") as f:
            keep = [line for line in f if line.strip() and "error" not in json.loads(line)]
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self.done -= self.errors
        self.errors = set()

    def write(self, records: Iterable[dict]) -> None:
        lines = []
        for r in records:
            lines.append(json.dumps(r, ensure_ascii=False) + "\n")
            self.done.add(str(r[self.key]))
            if "error" in r:
                self.errors.add(str(r[self.key]))
        if lines:
            self._f.write("".join(lines))
            self._f.flush()
            os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_jsonl(path, key: str | None = "id") -> list[dict] | dict[str, dict]:
    """All records (a dict by `key` when given; later duplicates win)."""
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows if key is None else {str(r[key]): r for r in rows}


def write_jsonl_atomic(path, rows: Iterable[dict]) -> int:
    """Write `rows` (any iterable: streamed, never held whole) as JSONL to a temp file, fsync, then rename over
    `path`: readers see the old file or the whole new one, never a part. Returns the number of rows."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, n = f"{path}.tmp{os.getpid()}", 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)  # the rows raised: no half file left behind
    return n


def write_json_atomic(path, obj, *, indent: int | None = 1, allow_nan: bool = True) -> None:
    """`obj` as one JSON file, written to a temp file and renamed over `path` (a manifest, a summary);
    allow_nan=False refuses NaN/inf (ValueError) instead of writing non-standard JSON."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, allow_nan=allow_nan)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
