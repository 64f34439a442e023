"""Fixed-shape per-sample arrays streamed to disk in shards, resumable (feature capture over 100k+ samples).

Layout of `out_dir`:
    index.json          {"row_shape", "dtype", "meta", "shards": [{"file": "shard_00000.npy", "ids": [...]}, ...]}
    shard_00000.npy     (n, *row_shape) rows in the order of that shard's ids (bfloat16 rows are stored as their
                        uint16 bit patterns, which .npy can name; `index.json` has the real dtype)
    open.bin, open.ids  the shard being filled: raw rows + one JSON id per line, appended and fsynced per batch
    errors.jsonl        {"id", "error"} for samples that could not be encoded (written by `capture_dataset`)

A crash loses at most the batch in flight: on reopening, the open shard is cut to the rows that have both their
bytes and their id on disk. A full shard becomes an .npy (written to a temp name, then renamed), then enters the
index (also temp + rename), and only then are the open files removed; a crash between those steps is detected by
the open shard's ids already being in the index.

Reading never needs the whole array in RAM (fp32 COINCIDE features at 665k samples are 54 GB): `open_shards` maps
each .npy and reads only the rows asked for; `merge_feature_shards` joins per-host folders into one index without
copying rows.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Sequence

import numpy as np

from vlmjax.generate.shards import IncompleteShards, check_coverage

DTYPES = ("float32", "float16", "bfloat16")


def row_dtype(name: str) -> np.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: use one of {DTYPES}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _stored(dtype: np.dtype) -> np.dtype:
    """The dtype on disk: bfloat16 as uint16 (np.save would write it as an unreadable void type)."""
    return np.dtype(np.uint16) if dtype.name == "bfloat16" else dtype


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
        self.row_shape = tuple(int(x) for x in row_shape)
        self.dtype = row_dtype(dtype if isinstance(dtype, str) else np.dtype(dtype).name)
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
        rows = np.ascontiguousarray(np.asarray(rows, np.float32).astype(self.dtype))
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
        rows = np.fromfile(self.bin_path, dtype=_stored(self.dtype)).reshape((len(self.open_ids),) + self.row_shape)
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


class FeatureShards:
    """Read-only view of a shard folder as one (N, *row_shape) array: `ids`, `index`, `errors` ({id: error}),
    `iter_shards()` and indexing (int, slice, index array, or a tuple led by one of those) read rows from
    memory-mapped shards, so only what is asked for is loaded; `take(ids)` by id; `np.asarray(view)` loads all."""

    def __init__(self, out_dir):
        self.dir = str(out_dir)
        path = os.path.join(self.dir, "index.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found: not a feature shard folder")
        with open(path) as f:
            self.index = json.load(f)
        self.row_shape, self.dtype = tuple(self.index["row_shape"]), row_dtype(self.index["dtype"])
        self.ids = [i for s in self.index["shards"] for i in s["ids"]]
        self._starts = np.cumsum([0] + [len(s["ids"]) for s in self.index["shards"]])
        self._maps: dict[int, np.ndarray] = {}
        self.errors = {}
        err_path = os.path.join(self.dir, "errors.jsonl")
        if os.path.exists(err_path):
            with open(err_path, encoding="utf-8") as f:
                self.errors = {r["id"]: r["error"] for r in map(json.loads, filter(str.strip, f))}

    @property
    def shape(self) -> tuple:
        return (len(self.ids),) + self.row_shape

    def __len__(self) -> int:
        return len(self.ids)

    def shard(self, k: int) -> np.ndarray:
        """Shard k's rows, memory-mapped (read on access)."""
        if k not in self._maps:
            s = self.index["shards"][k]
            a = np.load(os.path.join(self.dir, s["file"]), mmap_mode="r")
            if a.shape != (len(s["ids"]),) + self.row_shape:
                raise ValueError(f"{self.dir}/{s['file']}: rows {a.shape}, index says "
                                 f"{len(s['ids'])} x {self.row_shape}")
            self._maps[k] = a.view(self.dtype) if a.dtype != self.dtype else a
        return self._maps[k]

    def iter_shards(self) -> Iterator[tuple[list[str], np.ndarray]]:
        """(ids, memory-mapped rows) per shard, in index order."""
        for k, s in enumerate(self.index["shards"]):
            yield s["ids"], self.shard(k)

    def _rows(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx),) + self.row_shape, self.dtype)
        k = np.searchsorted(self._starts, idx, side="right") - 1
        for shard in np.unique(k):
            sel = k == shard
            out[sel] = self.shard(int(shard))[idx[sel] - self._starts[shard]]
        return out

    def __getitem__(self, key):
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        if isinstance(key, (int, np.integer)):
            return self._rows(np.arange(len(self))[[key]])[0][rest]
        idx = np.arange(len(self))[key]  # slices, index arrays, boolean masks
        return self._rows(np.atleast_1d(idx))[(slice(None),) + rest]

    def take(self, ids: Sequence[str]) -> np.ndarray:
        """Rows of these ids, in this order (KeyError naming the first id that has no row)."""
        pos = {i: n for n, i in enumerate(self.ids)}
        missing = [i for i in ids if i not in pos]
        if missing:
            raise KeyError(f"{self.dir}: no row for {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                                       if len(missing) > 1 else ""))
        return self._rows(np.asarray([pos[i] for i in ids], np.int64))

    def __array__(self, dtype=None, copy=None):
        rows = self._rows(np.arange(len(self)))
        return rows if dtype is None else rows.astype(dtype)


def open_shards(out_dir) -> FeatureShards:
    return FeatureShards(out_dir)


def load_shards(out_dir, mmap: bool = True) -> tuple[list[str], np.ndarray | FeatureShards, dict]:
    """(ids, rows (N, *row_shape), index) of every sealed shard in shard order. mmap=True: rows is a
    `FeatureShards` view (reads rows on access: a paper-scale folder opens on a small host); False: one array."""
    view = FeatureShards(out_dir)
    return view.ids, (view if mmap else np.asarray(view)), view.index


def merge_feature_shards(dirs: Sequence, out_dir, *, ids: Sequence[str] | None = None) -> dict:
    """Join per-host shard folders into `out_dir/index.json` (+ errors.jsonl) without copying rows: the merged
    index points at the hosts' .npy files. Checks that every folder is sealed and agrees on row shape, dtype and
    meta, that no id has two rows or errors, and (with `ids`) that every id has a row or an error record
    (`IncompleteShards` lists the missing ones). Returns {"rows", "errors", "out"}."""
    out_dir = os.fspath(out_dir)
    shards, found, errors, first = [], [], [], None
    for d in map(os.fspath, dirs):
        if not os.path.exists(os.path.join(d, "index.json")):
            raise IncompleteShards(f"{d}: no index.json (has its host run?)")
        if os.path.exists(os.path.join(d, "open.ids")) and os.path.getsize(os.path.join(d, "open.ids")):
            raise IncompleteShards(f"{d}: its open shard is not sealed (the host is running or crashed: rerun it)")
        view = FeatureShards(d)
        head = {k: view.index[k] for k in ("row_shape", "dtype", "meta")}
        if first is None:
            first = (d, head)
        elif head != first[1]:
            raise ValueError(f"{d} holds {head}, but {first[0]} holds {first[1]}")
        for s in view.index["shards"]:
            rel = os.path.relpath(os.path.join(d, s["file"]), out_dir)
            shards.append({"file": rel, "ids": s["ids"]})
            found += [(i, os.path.join(d, s["file"])) for i in s["ids"]]
        found += [(i, os.path.join(d, "errors.jsonl")) for i in view.errors]
        errors += [{"id": i, "error": e} for i, e in view.errors.items()]
    if first is None:
        raise ValueError("no shard folders to merge")
    check_coverage(found, ids)
    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, "index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            old = {s["file"] for s in json.load(f)["shards"]}
        lost = old - {s["file"] for s in shards}
        if lost:
            raise ValueError(f"{index_path} already indexes other shards ({sorted(lost)[:3]}): merge elsewhere")
    _atomic_write(os.path.join(out_dir, "errors.jsonl"),
                  lambda f: f.write("".join(json.dumps(e) + "\n" for e in errors).encode()))
    _atomic_write(index_path, lambda f: f.write(json.dumps({**first[1], "shards": shards}).encode()))
    return {"rows": sum(len(s["ids"]) for s in shards), "errors": len(errors), "out": out_dir}
