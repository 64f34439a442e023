"""The share of the pretraining pairs that VILA^2 recaptions (the paper's 5% subset), as a selection rule.

A record is in the subset when a SHA-256 of (salt, its id) falls below `fraction` of the hash range: a pure function
of the id, so the subset is the same whatever the file's order, sharding or host, a record keeps its side when the
file grows, and a larger fraction's subset contains a smaller one's. `split` writes the subset and the rest as two
files of the same format (the rest keeps its captions in every round; configs/vila2/llama2_7b.py trains both).
"""

from __future__ import annotations

import hashlib

from vlmjax.data import formats

SALT = "vila2/subset"


def in_subset(key: str, fraction: float, salt: str = SALT) -> bool:
    """Is the record with id `key` in the `fraction` subset (0 <= fraction <= 1)?"""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"subset fraction must be in [0, 1], got {fraction}")
    digest = hashlib.sha256(f"{salt}/{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") < fraction * 2**64


def split(spec, fraction: float, subset_path, rest_path, *, salt: str = SALT) -> dict:
    """Write the records of `spec` (a `SourceSpec` of caption pairs, any layout the trainer reads) whose id is in the
    subset to `subset_path`, the others to `rest_path` (JSONL, atomically, records unchanged, in file order).
    A record without an id is an error naming its index and file (the rule needs one). -> counts."""
    from vlmjax.generate.jsonl import write_jsonl_atomic

    records, name = spec.open()
    sides = []
    for index in range(len(records)):
        record = records[index]
        if not isinstance(record, dict):
            raise ValueError(f"{name}: record #{index} does not parse: {getattr(record, 'message', record)!r}")
        key = formats.record_id(record)
        if not key:
            raise ValueError(f"{name}: record #{index} has no id, which the subset rule hashes")
        sides.append(in_subset(key, fraction, salt))
    n_sub = write_jsonl_atomic(subset_path, (records[i] for i, s in enumerate(sides) if s))
    n_rest = write_jsonl_atomic(rest_path, (records[i] for i, s in enumerate(sides) if not s))
    return {"records": len(sides), "subset": n_sub, "rest": n_rest, "fraction": fraction, "salt": salt,
            "data": name, "subset_path": str(subset_path), "rest_path": str(rest_path)}
