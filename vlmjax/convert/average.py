"""Weight averaging ("model soups", POINTS): the fp32 average of N native or HF folders, tensor by tensor.

    python -m vlmjax.convert average A B C --out SOUP [--weights 0.5 0.25 0.25]

The folders must hold the same model: the same parameter paths, shapes and dtypes, the same model config
(architecture and image preprocessing; execution knobs aside) and the same tokenizer; any difference is an error
naming the tensor, the field or the folder. Reading streams one parameter at a time from every folder into one fp32
accumulator, so host memory peaks at about one parameter per folder plus the shard being written, never N models.
The soup is written as a native folder (the first folder's config and tokenizer). Weights are normalised to sum 1.
Greedy soup selection (which folders to average) is the recipe's business (POINTS), not this module's.
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


def average_folders(folders: Sequence, out_dir, *, weights: Sequence[float] | None = None,
                    max_shard_bytes: int = 2 << 30) -> Path:
    """Average native or HF VLM folders into a native folder at `out_dir`; returns it."""
    if len(folders) < 2:
        raise ValueError(f"averaging needs at least two folders, got {len(folders)}")
    w = np.ones(len(folders)) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (len(folders),):
        raise ValueError(f"{len(w)} weights for {len(folders)} folders")
    if not np.isfinite(w).all() or w.sum() == 0:
        raise ValueError(f"weights {w.tolist()} must be finite and not sum to 0")
    w = w / w.sum()
    sources = [ParamSource(f) for f in folders]
    check_same_model(sources)
    from vlmjax.convert.native import load_tokenizer

    first = sources[0]
    stored = {np.dtype(first.get(first.paths[0]).dtype).name}  # record the dtype the tensors are stored in
    cfg = first.cfg
    if stored <= {"float32", "bfloat16", "float16"}:
        from vlmjax.models.config import with_dtypes

        cfg = with_dtypes(cfg, cfg.dtype, stored.pop())
    record = config_record(cfg, None)
    return write_folder(out_dir, record, averaged_tensors(sources, w), load_tokenizer(first.folder),
                        max_shard_bytes=max_shard_bytes)
