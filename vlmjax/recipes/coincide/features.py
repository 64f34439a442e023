"""COINCIDE step 1: capture rows -> one unit-norm vector per sample, streamed to an fp16 memmap.

Per layer l (v = image mean, t = after-image text mean of the attention output, from `scoring.capture_dataset`
with parts=("attn",), span="after_image"):  f_l = [l2n(tanh(v)), l2n(tanh(t))] / sqrt(2L); f = concat_l f_l,
so |f| = 1 and dim = 2 L D. A text-only sample has v = 0: its image halves stay 0 and its text halves are scaled
by sqrt(2) so the row norm is still 1 (counted in meta.json as `text_only`); a zero text half (no text after the
image) is an error, never a NaN row. The reference zeroes NaN rows instead (reference bugs, coincide.md).

Output folder: features.npy (N, 2LD) float16 (np.load(..., mmap_mode="r")), ids.json, meta.json
{"model", "layers", "span", "parts", "hidden", "dim", "rows", "text_only", "capture_errors"}; written under temp
names and renamed, so a folder with meta.json is complete.
"""

from __future__ import annotations

import json
import os

import numpy as np

from vlmjax.scoring import open_shards

EXPECT_KEYS = ("model", "layers", "span", "parts")
SPAN, PARTS = "after_image", ["attn"]


def _l2n(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(n > 0, n, 1.0), n[..., 0]


def sample_vectors(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(B, 1, L, 2, D) capture rows -> ((B, 2LD) fp32 unit vectors, (B,) bool text-only). Raises on a row whose
    text half is zero at some layer (its index in the batch is in the message)."""
    x = np.asarray(rows, np.float32)
    if x.ndim != 5 or x.shape[1] != 1 or x.shape[3] != 2:
        raise ValueError(f"capture rows {x.shape}: expected (B, 1 part, L, 2 groups, D)")
    b, _, n_layers, _, d = x.shape
    u, norms = _l2n(np.tanh(x[:, 0]))  # (B, L, 2, D), (B, L, 2)
    bad = np.flatnonzero((norms[:, :, 1] == 0).any(1))
    if bad.size:
        raise ValueError(f"rows {bad.tolist()}: zero text mean (no text after the image)")
    no_image = (norms[:, :, 0] == 0).all(1)
    partial = (norms[:, :, 0] == 0).any(1) & ~no_image
    if partial.any():
        raise ValueError(f"rows {np.flatnonzero(partial).tolist()}: zero image mean at some layers only")
    u[no_image, :, 1] *= np.sqrt(2.0)
    return (u / np.sqrt(2 * n_layers)).reshape(b, 2 * n_layers * d), no_image


def check_meta(capture_dir, index_meta: dict, expect: dict | None) -> None:
    """The capture must be attention outputs over the after-image span; with `expect` its model/layers/span/parts
    must equal the expected ones (an error names both)."""
    got = {k: index_meta.get(k) for k in EXPECT_KEYS}
    want = {"span": SPAN, "parts": PARTS, **{k: v for k, v in (expect or {}).items() if k in EXPECT_KEYS}}
    if "layers" in want:
        want["layers"] = [int(i) for i in want["layers"]]
    if "parts" in want:
        want["parts"] = list(want["parts"])
    diff = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    if diff:
        raise ValueError(f"{capture_dir}: captured with " + ", ".join(f"{k}={g!r}" for k, (g, _) in diff.items())
                         + "; expected " + ", ".join(f"{k}={w!r}" for k, (_, w) in diff.items()))


def capture(model, tokenizer, requests, capture_dir, *, layers, model_name: str, dtype: str = "float16",
            **kw) -> dict:
    """`scoring.capture_dataset` with COINCIDE's settings (attention outputs, after-image text span, fp16 rows),
    plus capture_dir/reference.json naming the reference model, so features from another model are caught."""
    from vlmjax.scoring import capture_dataset

    os.makedirs(capture_dir, exist_ok=True)
    ref = os.path.join(capture_dir, "reference.json")
    if os.path.exists(ref):
        with open(ref) as f:
            old = json.load(f)["model"]
        if old != model_name:
            raise ValueError(f"{capture_dir} holds features of {old!r}, not {model_name!r}: use another folder")
    else:
        _write_json(ref, {"model": model_name})
    return capture_dataset(model, tokenizer, requests, capture_dir, layers=layers, parts=tuple(PARTS), span=SPAN,
                           dtype=dtype, **kw)


def build_features(capture_dir, out_dir, *, expect: dict | None = None, model: str | None = None) -> dict:
    """Stream `capture_dir` (a `capture_dataset` folder) shard by shard into `out_dir` (module docstring).
    expect: {"model", "layers", "span", "parts"} the capture must match; model: the reference model's name, also
    used when the capture folder has no reference.json (written by `capture`)."""
    view = open_shards(capture_dir)
    meta = dict(view.index["meta"])
    ref = os.path.join(capture_dir, "reference.json")
    if os.path.exists(ref):
        with open(ref) as f:
            meta["model"] = json.load(f)["model"]
    if model is not None:
        meta.setdefault("model", model)
    check_meta(capture_dir, meta, expect)
    n_parts, n_layers, n_groups, d = view.row_shape
    dim = 2 * n_layers * d
    os.makedirs(out_dir, exist_ok=True)
    final = os.path.join(out_dir, "features.npy")
    tmp = final + ".tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(view), dim))
    start, text_only = 0, 0
    for ids, rows in view.iter_shards():
        for b in range(0, len(ids), 4096):
            chunk = rows[b: b + 4096]
            try:
                vec, no_img = sample_vectors(chunk)
            except ValueError as e:
                raise ValueError(f"{capture_dir}: {_name_rows(str(e), ids[b:b + 4096])}") from e
            out[start: start + len(vec)] = vec.astype(np.float16)
            text_only += int(no_img.sum())
            start += len(vec)
    out.flush()
    del out
    os.replace(tmp, final)
    info = {"model": meta.get("model"), "layers": meta.get("layers"), "span": meta.get("span"),
            "parts": meta.get("parts"), "hidden": d, "dim": dim, "rows": len(view), "text_only": text_only,
            "capture_errors": len(view.errors)}
    _write_json(os.path.join(out_dir, "ids.json"), view.ids)
    _write_json(os.path.join(out_dir, "meta.json"), info)
    return info


def _name_rows(msg: str, ids) -> str:
    """Replace the batch positions in a `sample_vectors` error by the sample ids."""
    import re

    m = re.match(r"rows \[([0-9, ]*)\]: (.*)", msg)
    if not m:
        return msg
    pos = [int(x) for x in m.group(1).split(",")]
    return f"samples {[ids[p] for p in pos][:5]}: {m.group(2)}"


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def load_features(feat_dir, *, expect: dict | None = None) -> tuple[list[str], np.ndarray, dict]:
    """(ids, (N, 2LD) fp16 memmap, meta) of a `build_features` folder, meta checked against `expect` and the
    file's dim against 2 L D (the reference's users hit "all centroids identical" on mis-shaped features)."""
    meta_path = os.path.join(feat_dir, "meta.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path} not found: run the features step first")
    with open(meta_path) as f:
        meta = json.load(f)
    check_meta(feat_dir, meta, expect)
    with open(os.path.join(feat_dir, "ids.json")) as f:
        ids = json.load(f)
    x = np.load(os.path.join(feat_dir, "features.npy"), mmap_mode="r")
    want = (len(ids), 2 * len(meta["layers"]) * meta["hidden"])
    if x.shape != want:
        raise ValueError(f"{feat_dir}/features.npy is {x.shape}, expected {want} (N, 2 x layers x hidden)")
    return ids, x, meta
