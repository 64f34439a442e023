"""Weight averaging ("model soups", POINTS): the fp32 average of N native or HF folders, tensor by tensor.

    python -m vlmjax.convert average A B C --out SOUP [--weights 0.5 0.25 0.25]

The folders must hold the same model: the same parameter paths, shapes and dtypes, the same model config
(architecture and image preprocessing; execution knobs aside) and the same tokenizer; any difference is an error
naming the tensor, the field or the folder. Reading streams one parameter at a time from every folder into one fp32
accumulator, so host memory peaks at about one parameter per folder plus the shard being written, never N models
(safetensors' save_file serialises a shard to bytes, so a shard is briefly held twice: bench/points.py measured
~1.9 models of anonymous memory for a one-shard SmolLM2-size soup; smaller max_shard_bytes lowers it).
The soup is written as a native folder (the first folder's config and tokenizer). Weights are normalised to sum 1.
`average_into` streams the same average into a model already in memory (candidate soups evaluated without an
export). Greedy soup selection (which folders to average) is the recipe's business (POINTS), not this module's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from vlmjax.convert.native import config_record, folder_kind, path_str, read_native_config, write_folder


class Mismatch(ValueError):
    pass


class ParamSource:
    """One folder's parameters by our parameter path, in our layout, read one at a time."""

    def __init__(self, folder):
        from vlmjax.convert.hf import SafetensorsSource

        self.folder = Path(folder)
        self.kind = folder_kind(folder)
        if self.kind == "native":
            self.cfg, lora = read_native_config(folder)
            if lora:
                raise Mismatch(f"{folder} holds an unmerged LoRA adapter; averaging needs whole weights: export it "
                               "with train.export_lora='merge'")
            self._src = SafetensorsSource(folder, renames=())
            self.paths = sorted(self._src.keys())
            self._rules = None
        else:
            from vlmjax.convert import hf
            from vlmjax.convert.hf_config import vlm_config_from_hf
            from vlmjax.convert.mapping import vlm_rules

            self.cfg = vlm_config_from_hf(hf.read_config(folder))
            self._src = SafetensorsSource(folder)
            self._rules = {path_str(r.path): r for r in vlm_rules(self.cfg)}
            self.paths = sorted(self._rules)

    def spec(self, path: str) -> tuple[str, tuple[int, ...]] | None:
        """(dtype name, shape) from the file header for a native folder; None for HF (layouts differ from ours)."""
        return self._src.spec(path) if self._rules is None else None

    def get(self, path: str) -> np.ndarray:
        if self._rules is None:
            return self._src.get(path)
        rule = self._rules[path]
        if not rule.stacked:
            return rule.layout.to_ours(self._src.get(rule.hf))
        layers = self.cfg.llm.num_layers if path.startswith("llm/") else self.cfg.vision.num_layers
        return np.stack([rule.layout.to_ours(self._src.get(rule.hf.format(i=i))) for i in range(layers)])


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "rope_scaling":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _canonical(cfg):
    """The tower and LLM configs as HF would give them back: an HF folder fills defaults a native config leaves
    implicit (head_dim None vs 8), which are the same model. Preprocessing (mean/std) stays as recorded."""
    import dataclasses

    from vlmjax.convert import hf_config

    try:
        llm = hf_config.llm_config_from_hf(hf_config.llm_config_to_hf(cfg.llm).to_dict())
        vision = hf_config.vision_config_from_hf(hf_config.vision_config_to_hf(cfg.vision).to_dict())
    except hf_config.UnsupportedModel:
        return cfg
    vision = dataclasses.replace(vision, image_mean=cfg.vision.image_mean, image_std=cfg.vision.image_std)
    return dataclasses.replace(cfg, llm=llm, vision=vision)


def _model_fields(cfg) -> dict:
    """The config as a flat dict without the execution knobs (dtypes, remat, attention impl)."""
    knobs = {"dtype", "param_dtype", "remat", "attention_impl"}
    return {k: v for k, v in _flat(config_record(_canonical(cfg))["config"]).items()
            if k.rsplit(".", 1)[-1] not in knobs}


def _tokenizer_signature(folder) -> tuple:
    from vlmjax.convert.native import load_tokenizer

    tok = load_tokenizer(folder)
    return (tuple(sorted(tok.get_vocab().items())), tuple(sorted(tok.special_tokens_map.items(), key=str)),
            getattr(tok, "chat_template", None))


def check_same_model(sources: Sequence[ParamSource], check_tokenizer: bool = True) -> None:
    first = sources[0]
    ref_fields = _model_fields(first.cfg)
    ref_tok = _tokenizer_signature(first.folder) if check_tokenizer else None
    for s in sources[1:]:
        fields = _model_fields(s.cfg)
        for k in sorted(set(ref_fields) | set(fields)):
            if ref_fields.get(k) != fields.get(k):
                raise Mismatch(f"model config field {k}: {first.folder} has {ref_fields.get(k)!r}, "
                               f"{s.folder} has {fields.get(k)!r}")
        if set(s.paths) != set(first.paths):
            only_a, only_b = sorted(set(first.paths) - set(s.paths)), sorted(set(s.paths) - set(first.paths))
            raise Mismatch(f"tensor {(only_a or only_b)[0]} is in {first.folder if only_a else s.folder} only "
                           f"({len(only_a)} vs {len(only_b)} tensors differ)")
        for path in first.paths:  # from the headers (native folders): caught before any tensor is read
            a, b = first.spec(path), s.spec(path)
            if a is not None and b is not None and a != b:
                raise Mismatch(f"tensor {path}: {first.folder} has {a[0]}{list(a[1])}, {s.folder} has "
                               f"{b[0]}{list(b[1])}")
        if check_tokenizer and _tokenizer_signature(s.folder) != ref_tok:
            raise Mismatch(f"tokenizer of {s.folder} differs from {first.folder}'s (vocabulary, special tokens or "
                           "chat template)")


def averaged_tensors(sources: Sequence[ParamSource], weights: np.ndarray):
    """(path, weighted fp32 mean cast back to the tensors' dtype), one parameter at a time."""
    for path in sources[0].paths:
        acc, dtype, shape = None, None, None
        for s, w in zip(sources, weights):
            t = s.get(path)
            if acc is None:
                dtype, shape = t.dtype, t.shape
                acc = np.zeros(shape, np.float32)
            elif t.shape != shape or t.dtype != dtype:
                raise Mismatch(f"tensor {path}: {sources[0].folder} has {dtype}{list(shape)}, "
                               f"{s.folder} has {t.dtype}{list(t.shape)}")
            acc += np.float32(w) * t.astype(np.float32, copy=False)
            del t
        yield path, acc.astype(dtype, copy=False)


def open_sources(folders: Sequence, *, check_tokenizer: bool = True) -> list[ParamSource]:
    """One ParamSource per folder, checked to hold the same model (errors name the field, tensor or folder)."""
    sources = [ParamSource(f) for f in folders]
    check_same_model(sources, check_tokenizer)
    return sources


def normalised_weights(n: int, weights: Sequence[float] | None = None) -> np.ndarray:
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ValueError(f"{len(w)} weights for {n} folders")
    if not np.isfinite(w).all() or w.sum() == 0:
        raise ValueError(f"weights {w.tolist()} must be finite and not sum to 0")
    return w / w.sum()


def average_into(model, sources: Sequence[ParamSource], weights: Sequence[float] | None = None):
    """Set every parameter of the in-memory `model` to the sources' average (one source: its weights), streamed one
    parameter at a time, so a candidate soup is evaluated without an export and without a second model in memory.
    Each value is the one `average_folders` would write (cast to the stored dtype), then to the parameter's dtype.
    The model must have exactly the sources' parameters, with their shapes (errors name the tensor)."""
    import jax
    from flax import nnx

    flat = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    first = sources[0]
    if set(flat) != set(first.paths):
        only_m, only_s = sorted(set(flat) - set(first.paths)), sorted(set(first.paths) - set(flat))
        name = (only_m or only_s)[0]
        raise Mismatch(f"tensor {name} is in the {'model' if only_m else first.folder} only "
                       f"({len(only_m)} model-only, {len(only_s)} folder-only tensors)")
    for path, arr in averaged_tensors(sources, normalised_weights(len(sources), weights)):
        var = flat[path]
        if tuple(arr.shape) != tuple(var.shape):
            raise Mismatch(f"tensor {path}: {first.folder} has shape {list(arr.shape)}, the model {list(var.shape)}")
        arr = arr.astype(var.dtype, copy=False)
        old = var.get_value() if hasattr(var, "get_value") else var.value
        # placed like the value it replaces (a sharded model stays sharded; each process fills its own shards)
        value = jax.make_array_from_callback(arr.shape, old.sharding, lambda idx, b=arr: b[idx])
        del old
        var.set_value(value) if hasattr(var, "set_value") else setattr(var, "value", value)
        del arr
    return model


def average_folders(folders: Sequence, out_dir, *, weights: Sequence[float] | None = None,
                    max_shard_bytes: int = 2 << 30) -> Path:
    """Average native or HF VLM folders into a native folder at `out_dir`; returns it."""
    if len(folders) < 2:
        raise ValueError(f"averaging needs at least two folders, got {len(folders)}")
    w = normalised_weights(len(folders), weights)
    return write_average(open_sources(folders), out_dir, weights=w, max_shard_bytes=max_shard_bytes)


def write_average(sources: Sequence[ParamSource], out_dir, *, weights: Sequence[float] | None = None,
                  max_shard_bytes: int = 2 << 30) -> Path:
    """The average of checked sources (`open_sources`; one source: its weights) as a native folder, streamed."""
    from vlmjax.convert.native import load_tokenizer

    w = normalised_weights(len(sources), weights)
    first = sources[0]
    stored = {np.dtype(first.get(first.paths[0]).dtype).name}  # record the dtype the tensors are stored in
    cfg = first.cfg
    if stored <= {"float32", "bfloat16", "float16"}:
        from vlmjax.models.config import with_dtypes

        cfg = with_dtypes(cfg, cfg.dtype, stored.pop())
    record = config_record(cfg, None)
    return write_folder(out_dir, record, averaged_tensors(sources, w), load_tokenizer(first.folder),
                        max_shard_bytes=max_shard_bytes)
