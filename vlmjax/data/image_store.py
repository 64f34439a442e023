"""Where a record's image references point: a folder, tar shards, or inline bytes/arrays.

Records name images the way their dataset ships them (LLaVA: a path relative to an image folder; web data: members
of WebDataset-style tar shards; TFDS/HF: inline bytes or arrays). A store turns a reference into something
`image.decode_image` opens, and reports a missing image as a `BadSample` naming the reference.
"""

from __future__ import annotations

import glob
import os
import tarfile
import threading
from collections.abc import Sequence

import numpy as np
from PIL import Image

from vlmjax.data.errors import BAD_RECORD, MISSING_IMAGE, BadSample


class FolderStore:
    """Paths relative to `root`. With a root, a path that is absolute or climbs out of it ("../../x.png") is a bad
    sample: annotation files are untrusted input and must not read arbitrary files. The check is lexical, so
    symlinks inside the root (a common way to assemble image folders) are followed. Without a root (inline or
    absolute images), paths are taken as given."""

    def __init__(self, root: str | os.PathLike | None):
        self.root = None if root is None else os.fspath(root)

    def read(self, name: str):
        if self.root is None:
            path = name
        else:
            rel = os.path.normpath(name)
            if os.path.isabs(name) or rel == ".." or rel.startswith(".." + os.sep):
                raise BadSample(BAD_RECORD, f"image path {name!r} is outside the image root {self.root} "
                                            "(absolute or climbing out with '..')")
            path = os.path.join(self.root, rel)
        if not os.path.isfile(path):
            raise BadSample(MISSING_IMAGE, f"image file not found: {path}")
        return path

    def __repr__(self):
        return f"FolderStore({self.root!r})"


class TarStore:
    """Members of uncompressed tar shards, read by offset so lookups are random access.

    The member index is built lazily in each process (workers included) from the tar headers and is not pickled.
    Reads use `os.pread`, so the reader threads of a grain pipeline can share the file descriptors."""

    def __init__(self, shards: Sequence[str | os.PathLike]):
        self.shards = [os.fspath(s) for s in shards]
        if not self.shards:
            raise ValueError("TarStore needs at least one shard")
        self._index: dict[str, tuple[int, int, int]] | None = None
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def _build_index(self) -> dict[str, tuple[int, int, int]]:
        index = {}
        for i, shard in enumerate(self.shards):
            for member in _members(shard):
                if not member.isfile():
                    continue
                if member.name in index:
                    raise ValueError(f"image {member.name!r} is in both {self.shards[index[member.name][0]]} "
                                     f"and {shard}")
                index[member.name] = (i, member.offset_data, member.size)
        return index

    def index(self) -> dict[str, tuple[int, int, int]]:
        """name -> (shard, offset, size); built on first use (call it early to fail before a long run starts)."""
        if self._index is None:
            with self._lock:
                if self._index is None:
                    self._index = self._build_index()
        return self._index

    def read(self, name: str) -> bytes:
        try:
            shard, offset, size = self.index()[name]
        except KeyError:
            raise BadSample(MISSING_IMAGE, f"image {name!r} not in tar shards {self.shards[:3]}...") from None
        fd = self._fds.get(shard)
        if fd is None:
            with self._lock:
                if shard not in self._fds:
                    self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
                fd = self._fds[shard]
        return os.pread(fd, size, offset)

    def __getstate__(self):
        return {"shards": self.shards}

    def __setstate__(self, state):
        self.__init__(state["shards"])

    def __repr__(self):
        return f"TarStore({len(self.shards)} shards)"


_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}


def _members(shard: str):
    """The members of an uncompressed tar shard. A compressed one cannot be read by offset: say so, naming it
    (tarfile's own "invalid header" names neither the file nor the cause)."""
    with open(shard, "rb") as f:
        magic = f.read(6)
    kind = next((k for m, k in _COMPRESSED.items() if magic.startswith(m)), None)
    if kind is not None:
        raise tarfile.ReadError(f"tar shard {shard} is {kind}-compressed; image shards are read by offset and must "
                                "be plain (uncompressed) tar files: decompress it to a plain .tar")
    try:
        with tarfile.open(shard, mode="r:") as tar:
            yield from tar
    except tarfile.ReadError as e:
        raise tarfile.ReadError(f"tar shard {shard} cannot be read as an uncompressed tar: {e}") from None


def open_image_store(root) -> FolderStore | TarStore:
    """`root`: None (absolute paths only), a folder, a .tar file, a glob of .tar files, or a list of .tar files."""
    if root is None:
        return FolderStore(None)
    if isinstance(root, (list, tuple)):
        return TarStore(root)
    root = os.fspath(root)
    if root.endswith(".tar") or any(c in root for c in "*?["):
        shards = sorted(glob.glob(root))
        if not shards:
            raise FileNotFoundError(f"no tar shards match {root}")
        return TarStore(shards)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image root {root} is not a folder")
    return FolderStore(root)


def resolve_image(ref, store: FolderStore | TarStore):
    """A record's image reference -> bytes, a path, an array or a PIL image (what `decode_image` takes)."""
    if isinstance(ref, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
        if ref.get("bytes"):
            return ref["bytes"]
        ref = ref.get("path")
    if isinstance(ref, (bytes, bytearray, memoryview, np.ndarray, Image.Image)):
        return ref
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if isinstance(ref, str) and ref:
        return store.read(ref)
    raise BadSample(BAD_RECORD, f"unusable image reference {type(ref).__name__}: {str(ref)[:80]}")
