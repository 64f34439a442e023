"""Argument checking shared by the generate and eval CLIs: a nonsense value is one clear line, not a traceback.

argparse turns an `argparse.ArgumentTypeError` raised by a `type=` function into `prog: error: argument --x: ...`
(exit 2); checks that need more than one argument (a mesh against the devices, a folder that must exist) call
`parser.error` with the same effect.
"""

from __future__ import annotations

import argparse
import os


def _checked(cast, ok, expected: str, must: str):
    """An argparse `type=`: `cast(text)` that must satisfy `ok`; the error quotes the cast value for ints and the
    text as given for floats (as each parser always has)."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):  # `not v >= 0` also rejects nan
            raise argparse.ArgumentTypeError(f"must be {must}, got {value if cast is int else text}")
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer", ">= 1")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0", ">= 0")
non_negative_float = _checked(float, lambda v: v >= 0, "a number >= 0", ">= 0")
probability = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]", "in (0, 1]")


def mesh_sizes(text: str) -> tuple[int, int, int]:
    """"data[,fsdp[,tensor]]" -> sizes (missing axes 1; -1 = the remaining devices)."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected data,fsdp,tensor sizes such as -1,1,1, got {text!r}") from None
    if not 1 <= len(sizes) <= 3 or any(s == 0 or s < -1 for s in sizes):
        raise argparse.ArgumentTypeError(f"expected 1 to 3 sizes >= 1 (or -1 for the rest), got {text!r}")
    return tuple(sizes + [1] * (3 - len(sizes)))


def make_mesh_or_exit(parser: argparse.ArgumentParser, sizes):
    """The mesh for `sizes`, or a parser error when the devices cannot form it (e.g. 3 on 2 devices)."""
    if sizes is None:
        return None
    from vlmjax import sharding

    try:
        return sharding.make_mesh(*sizes)
    except ValueError as e:
        parser.error(f"--mesh {','.join(map(str, sizes))}: {e}")


def require_paths(parser: argparse.ArgumentParser, **paths) -> None:
    """Each `flag=(path, kind)` with kind "dir", "file" or "exists" must exist as that, else one parser error."""
    for flag, (path, kind) in paths.items():
        if path is None:
            continue
        ok = {"dir": os.path.isdir, "file": os.path.isfile, "exists": os.path.exists}[kind](path)
        if not ok:
            what = {"dir": "folder", "file": "file", "exists": "path"}[kind]
            parser.error(f"--{flag.replace('_', '-')} {path}: no such {what}")
