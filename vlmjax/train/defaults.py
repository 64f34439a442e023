"""Defaults shared by every training config (configs/*.py call `base()` and override what their stage needs)."""

import dataclasses
import typing

from ml_collections import ConfigDict
from ml_collections.config_dict import placeholder

LLAMA_LINEAR = r"llm/layers/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)$"


def base() -> ConfigDict:
    """Sequences are tuples, so `--config.data.sources="({...},)"` and `--config.train.trainable="('lora_',)"` can
    override them from the command line (ml_collections parses tuples, not lists)."""
    c = ConfigDict()
    c.model = ConfigDict(dict(init="random", path="", llm="", vision="", projector="mlp2x_gelu", tokenizer="smollm2",
                              vlm=ConfigDict(), dtype="float32", param_dtype="float32", remat="none", seed=0,
                              vision_feature_layer=-2))
    c.model.frozen_param_dtype = ""  # e.g. "bfloat16": the untrained base in it, trained params in param_dtype
    c.model.load_params = ""  # safetensors of parameters by path (a run's trainable.safetensors) to start from
    c.lora = ConfigDict(dict(rank=0, alpha=16.0, dropout=0.0, targets=LLAMA_LINEAR))
    c.train = ConfigDict(dict(
        objective="sft", steps=100, grad_accum=1, seed=0, trainable=(".*",), save_every=50, keep_checkpoints=2,
        eval_every=0, eval_batches=1, nan_policy="stop", peak_flops_per_device=0.0,
        save_trainable=False))  # True: write the trained parameters (LoRA adapter, projector) to trainable.safetensors
    c.train.export_format = "auto"  # export_dir as: native | hf | auto (hf when HF can express the model)
    c.train.export_lora = "merge"  # merge | adapter (native only: the adapter stays its own tensors)
    c.train.epochs = placeholder(int)  # set: run to the end of the data (data.num_epochs passes); steps is a cap
    c.train.max_consecutive_skips = 10  # nan_policy=skip: stop after this many non-finite steps in a row
    c.train.save_first_step = False  # orbax's habit of saving step 1 of a fresh run (costly at 7B); off
    c.optim = ConfigDict(dict(lr=1e-4, schedule="cosine", warmup_frac=0.03, weight_decay=0.0, b1=0.9, b2=0.999,
                              eps=1e-8, clip_norm=1.0, end_factor=0.0, groups=()))
    c.optim.warmup_steps = placeholder(int)  # overrides warmup_frac when set
    c.loss = ConfigDict(dict(chunk_size=256, z_loss=0.0, reduction="token", max_segments=32,
                             remat_logits="auto", logits_budget_mb=1024))
    c.dpo = ConfigDict(dict(loss="dpo", beta=0.1, alpha=1.0 / 1024, label_smoothing=0.0, gamma=0.5, reference="lora_off"))
    c.data = ConfigDict(dict(sources=(), batch_size=4, seq_len=512, max_images=8, pack=True, num_workers=0,
                             image=_section("image"), text=_section("text"), bad_samples=_section("bad_samples")))
    c.data.num_epochs = placeholder(int)  # None: repeat the data forever
    c.eval_data = None
    c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    c.export_dir = ""
    return c


def _section(name: str) -> ConfigDict:
    """data.text / data.bad_samples: the dataclass defaults (so every field is settable from the command line);
    data.image: typed placeholders, None meaning "what the model implies" (`model_image_spec`)."""
    from vlmjax.data import BadSamplePolicy, TextSpec
    from vlmjax.data.image import ImageSpec

    cls = {"image": ImageSpec, "text": TextSpec, "bad_samples": BadSamplePolicy}[name]
    hints, out = typing.get_type_hints(cls), ConfigDict()
    for f in dataclasses.fields(cls):
        if f.name == "image_token_id":  # the model's
            continue
        if name == "image" or f.default is None:
            out[f.name] = placeholder(_base_type(hints[f.name]))
        else:
            out[f.name] = f.default
    return out


def _base_type(hint) -> type:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return type(args[0])
    if origin is tuple:
        return tuple
    if args:  # X | None
        return next(a for a in args if a is not type(None))
    return hint
