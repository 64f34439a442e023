"""Fixed-shape per-sample arrays streamed to disk in shards, resumable (feature capture over 100k+ samples).

Layout of `out_dir`:
    index.json          {"row_shape", "dtype", "meta", "shards": [{"file": "shard_00000.npy", "ids": [...]}, ...]}
    shard_00000.npy     (n, *row_shape) rows in the order of that shard's ids
    open.bin, open.ids  the shard being filled: raw rows + one JSON id per line, appended and fsynced per batch

A crash loses at most the batch in flight: on reopening, the open shard is cut to the rows that have both their
bytes and their id on disk. A full shard becomes an .npy (written to a temp name, then renamed), then enters the
index (also temp + rename), and only then are the open files removed; a crash between those steps is detected by
the open shard's ids already being in the index.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


def _atomic_write(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class ShardWriter:
    def __init__(self, out_dir, row_shape: Sequence[int], dtype="float32", *, shard_size: int = 4096,
                 meta: dict | None = None):
        self.dir, self.shard_size = str(out_dir), int(shard_size)
        self.row_shape, self.dtype = tuple(int(x) for x in row_shape), np.dtype(dtype)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        os.makedirs(self.dir, exist_ok=True)
        self.index_path = os.path.join(self.dir, "index.json")
        self.bin_path, self.ids_path = os.path.join(self.dir, "open.bin"), os.path.join(self.dir, "open.ids")
        if os.path.exists(self.index_path):
            with open(self.index_path) as f:
                self.index = json.load(f)
            if tuple(self.index["row_shape"]) != self.row_shape or self.index["dtype"] != self.dtype.name:
                raise ValueError(f"{self.dir} holds rows {self.index['row_shape']} {self.index['dtype']}, "
                                 f"not {list(self.row_shape)} {self.dtype.name}: use another output folder")
        else:
            self.index = {"row_shape": list(self.row_shape), "dtype": self.dtype.name, "meta": meta or {},
                          "shards": []}
            self._save_index()
        self.done: set[str] = {i for s in self.index["shards"] for i in s["ids"]}
        self.open_ids = self._recover_open()
        self.done.update(self.open_ids)
        self._bin, self._ids = open(self.bin_path, "ab"), open(self.ids_path, "a")

    def _save_index(self) -> None:
        _atomic_write(self.index_path, lambda f: f.write(json.dumps(self.index).encode()))

    def _recover_open(self) -> list[str]:
        if not os.path.exists(self.ids_path) or not os.path.exists(self.bin_path):
            for p in (self.ids_path, self.bin_path):
                if os.path.exists(p):
                    os.remove(p)
            return []
        ids = []
        with open(self.ids_path) as f:
            for line in f:
                if not line.endswith("\n"):
                    break
                ids.append(json.loads(line))
        if ids and ids[0] in self.done:  # crashed after the shard entered the index
            os.remove(self.ids_path)
            os.remove(self.bin_path)
            return []
        n = min(len(ids), os.path.getsize(self.bin_path) // self.row_bytes)
        ids = ids[:n]
        with open(self.bin_path, "r+b") as f:
            f.truncate(n * self.row_bytes)
        with open(self.ids_path, "w") as f:
            f.writelines(json.dumps(i) + "\n" for i in ids)
        return ids

    def add(self, ids: Sequence[str], rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape != (len(ids),) + self.row_shape:
            raise ValueError(f"rows {rows.shape} != ({len(ids)}, *{self.row_shape})")
        self._bin.write(rows.tobytes())
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._ids.write("".join(json.dumps(str(i)) + "\n" for i in ids))
        self._ids.flush()
        os.fsync(self._ids.fileno())
        self.open_ids += [str(i) for i in ids]
        self.done.update(str(i) for i in ids)
        if len(self.open_ids) >= self.shard_size:
            self._seal()

    def _seal(self) -> None:
        if not self.open_ids:
            return
        self._bin.close()
        self._ids.close()
        rows = np.fromfile(self.bin_path, dtype=self.dtype).reshape((len(self.open_ids),) + self.row_shape)
        name = f"shard_{len(self.index['shards']):05d}.npy"
        _atomic_write(os.path.join(self.dir, name), lambda f: np.save(f, rows))
        self.index["shards"].append({"file": name, "ids": self.open_ids})
        self._save_index()
        os.remove(self.bin_path)
        os.remove(self.ids_path)
        self.open_ids = []
        self._bin, self._ids = open(self.bin_path, "ab"), open(self.ids_path, "a")

    def close(self) -> None:
        """Seal the partial shard (so the folder is complete) and close the files."""
        self._seal()
        self._bin.close()
        self._ids.close()
        for p in (self.bin_path, self.ids_path):
            if os.path.exists(p) and os.path.getsize(p) == 0:
                os.remove(p)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        else:  # keep the open shard for the next run to resume from
            self._bin.close()
            self._ids.close()


def load_shards(out_dir, mmap: bool = True) -> tuple[list[str], np.ndarray, dict]:
    """(ids, rows (N, *row_shape), index) of every sealed shard, concatenated in shard order."""
    with open(os.path.join(out_dir, "index.json")) as f:
        index = json.load(f)
    ids = [i for s in index["shards"] for i in s["ids"]]
    arrays = [np.load(os.path.join(out_dir, s["file"]), mmap_mode="r" if mmap else None) for s in index["shards"]]
    rows = np.concatenate(arrays) if arrays else np.zeros((0, *index["row_shape"]), index["dtype"])
    return ids, rows, index
