"""Random-access record sources for grain: JSON/JSONL files, TFDS array_record datasets, in-memory lists.

grain shuffles and shards by index, so every source is a sequence with `__len__`/`__getitem__`. Large annotation
files are not pickled into worker processes: JSON lists are reloaded by each process on first access, JSONL files
are read line by line through a byte-offset index. A line that is not valid JSON becomes an `InvalidRecord`, which
the sample transform turns into a `bad_record` BadSample, instead of failing the whole source.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading

import numpy as np


@dataclasses.dataclass(frozen=True)
class InvalidRecord:
    message: str


class JsonRecords:
    """A .json file holding a list of records, or a .jsonl file with one record per line (blank lines ignored)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.jsonl = self.path.endswith(".jsonl")
        self._lock = threading.Lock()
        self._records: list | None = None
        self._offsets: np.ndarray | None = None
        self._fd: int | None = None
        self._len = len(self._load())

    def _load(self):
        if self._records is None and self._offsets is None:
            with self._lock:
                if self.jsonl and self._offsets is None:
                    offsets, pos = [], 0
                    with open(self.path, "rb") as f:
                        for line in f:
                            if line.strip():
                                offsets.append((pos, len(line)))
                            pos += len(line)
                    self._offsets = np.asarray(offsets, np.int64).reshape(-1, 2)
                elif not self.jsonl and self._records is None:
                    try:
                        with open(self.path, encoding="utf-8") as f:
                            records = json.load(f)
                    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: one bad byte spoils the list
                        raise ValueError(f"{self.path} is not a valid JSON file ({type(e).__name__}: {e}); "
                                         "a .json source is one list, so no record of it can be read") from None
                    if not isinstance(records, list):
                        raise ValueError(f"{self.path}: expected a JSON list of records")
                    self._records = records
        return self._offsets if self.jsonl else self._records

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int):
        data = self._load()
        if not self.jsonl:
            return data[index]
        offset, length = data[index]
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        line = os.pread(self._fd, int(length), int(offset))
        try:
            return json.loads(line)
        except ValueError as e:
            return InvalidRecord(f"record {index} (byte {offset}) of {self.path} is not valid JSON: {e}")

    def __getstate__(self):  # reload in the worker rather than pickle a large file's contents
        return {"path": self.path, "_len": self._len}

    def __setstate__(self, state):
        self.path, self._len = state["path"], state["_len"]
        self.jsonl = self.path.endswith(".jsonl")
        self._lock = threading.Lock()
        self._records = self._offsets = self._fd = None

    def __repr__(self):
        return f"JsonRecords({self.path!r}, {self._len} records)"


def tfds_records(name: str, split: str = "train", data_dir: str | None = None, **kwargs):
    """`tfds.data_source` (array_record, no TensorFlow needed to read). Needs the `data` extra."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError("TFDS sources need `pip install 'vlmjax[data]'` (tensorflow-datasets, array-record)") from e
    return tfds.data_source(name, split=split, data_dir=data_dir, **kwargs)
