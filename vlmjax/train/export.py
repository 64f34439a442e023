"""What `train` writes at the end of a stage (`export_dir`), decided before step 1.

train.export_format: native | hf | auto (HF when an HF LLaVA folder can express the model, else native).
train.export_lora:   merge (adapters folded into the kernels) | adapter (kept as their own tensors; native only).
A 300-step align that could not be exported used to find out after its last step; `export_plan` runs before the
first one and names what HF cannot hold.
"""

from __future__ import annotations

import copy

import jax

FORMATS, LORA_MODES = ("auto", "native", "hf"), ("merge", "adapter")


def export_plan(config, cfg) -> str | None:
    """The format this run will export in ('native' | 'hf'), or None without export_dir; raises now if the config
    asks for what cannot be written."""
    if not config.get("export_dir"):
        return None
    from vlmjax.convert.hf_config import UnsupportedModel
    from vlmjax.convert.native import hf_unsupported_reason

    tc = config.train
    fmt, lora = tc.get("export_format", "auto"), tc.get("export_lora", "merge")
    if fmt not in FORMATS:
        raise ValueError(f"train.export_format={fmt!r}: use one of {FORMATS}")
    if lora not in LORA_MODES:
        raise ValueError(f"train.export_lora={lora!r}: use one of {LORA_MODES}")
    if lora == "adapter":
        if fmt == "hf":
            raise UnsupportedModel("train.export_lora='adapter' keeps the LoRA adapter, which an HF LLaVA folder cannot "
                                   "hold: use train.export_format='native' (or 'auto'), or export_lora='merge'")
        return "native"
    reason = hf_unsupported_reason(cfg)
    if fmt == "hf" and reason:
        raise UnsupportedModel(f"train.export_format='hf', but an HF LLaVA folder cannot express this model: {reason}. "
                               "Use train.export_format='native' (or 'auto').")
    if fmt == "auto":
        return "native" if reason else "hf"
    return fmt


def export(model, out_dir: str, tokenizer=None, *, fmt: str = "hf", lora: str = "merge") -> str:
    """Write `model` to `out_dir` as a native or HF folder (LoRA merged into a copy, or kept: native only).
    Multi-host: every process calls (parameters are gathered); process 0 writes."""
    if fmt == "native":
        from vlmjax.convert.native import save_native

        save_native(model, out_dir, tokenizer=tokenizer, lora=lora)
        return out_dir
    from vlmjax.convert.hf import save_vlm
    from vlmjax.models.lora import lora_rank, merge_lora

    model = copy.deepcopy(model) if lora_rank(model) is not None else model
    merge_lora(model)
    if jax.process_index() == 0:
        save_vlm(model, out_dir, tokenizer=tokenizer)
    return out_dir
