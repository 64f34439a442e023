"""The native model folder: any model vlmjax can build, saved and reloaded bit-exactly.

    vlmjax_config.json            {"format": "vlmjax-native", "version": 1, "kind": "vlm", "config": VLMConfig,
                                   "lora": null | {"rank", "alpha", "dropout", "paths"}}
    model.safetensors             tensors keyed by parameter path ("llm/layers/mlp/up_proj/kernel"), in our layout
    (model-0000i-of-0000n.safetensors + model.safetensors.index.json when sharded)
    tokenizer files               (tokenizer.save_pretrained)

HF LLaVA folders only express the mlp2x_gelu projector and the preprocessing HF import implies; this folder holds
every projector, tiling and resize mode (the full `VLMConfig`), and optionally a LoRA adapter unmerged. Writing
streams one parameter at a time into shards (never two copies of the model on the host) into a temporary folder
that replaces the target only when complete; reading fills one buffer per parameter, as HF import does.
`load_folder` reads native and HF folders alike (told apart by which config file exists).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax import sharding as shd
from vlmjax.models.config import VLMConfig, layout_preprocessing, with_dtypes

CONFIG_FILE = "vlmjax_config.json"
FORMAT, VERSION = "vlmjax-native", 1
# Execution knobs are the loader's choice, not the checkpoint's: saved at their defaults.
_KNOBS = dict(remat="none", attention_impl="auto")


def is_native(folder) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def folder_kind(folder) -> str:
    """'native' (vlmjax_config.json) or 'hf' (config.json); anything else is an error naming the folder."""
    folder = Path(folder)
    if is_native(folder):
        return "native"
    if (folder / "config.json").is_file():
        return "hf"
    raise FileNotFoundError(f"{folder}: neither a vlmjax native model folder ({CONFIG_FILE}) nor an HF folder "
                            "(config.json)")


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


def read_native_config(folder) -> tuple[VLMConfig, dict | None]:
    """(VLMConfig, LoRA record or None) of a native folder; unknown formats and fields are errors naming the file."""
    f = Path(folder) / CONFIG_FILE
    d = json.loads(f.read_text())
    if d.get("format") != FORMAT or d.get("version") != VERSION:
        raise ValueError(f"{f}: format {d.get('format')!r} version {d.get('version')!r}, expected {FORMAT!r} {VERSION}")
    if d.get("kind") != "vlm":
        raise ValueError(f"{f}: kind {d.get('kind')!r} is not supported (only 'vlm')")
    try:
        cfg = VLMConfig.from_dict(d["config"])
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{f}: invalid model config: {e}") from None
    return cfg, d.get("lora")


def _lora_record(model) -> dict | None:
    from vlmjax.models.layers import Linear

    paths, rec = [], None
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and node.lora_a is not None:
            rank = int(node.lora_a.shape[-1])
            rec = dict(rank=rank, alpha=float(node.lora_scale * rank), dropout=float(node.lora_dropout))
            paths.append(path_str(path))
    return None if rec is None else {**rec, "paths": sorted(paths)}


def _host(x) -> np.ndarray:
    """A parameter on this host; multi-host arrays are gathered (every process must call)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def iter_params(model, dtype=None):
    """(parameter path, np.ndarray) one parameter at a time (LoRA adapters included)."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        arr = _host(var.get_value() if hasattr(var, "get_value") else var.value)
        yield path_str(path), (arr if dtype is None or not np.issubdtype(arr.dtype, np.floating) else arr.astype(dtype))


def config_record(cfg: VLMConfig, lora: dict | None = None) -> dict:
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, **_KNOBS),
                              vision=dataclasses.replace(cfg.vision, **_KNOBS))
    return {"format": FORMAT, "version": VERSION, "kind": "vlm", "config": dataclasses.asdict(cfg), "lora": lora}


def write_folder(out_dir, record: dict, tensors, tokenizer=None, *, max_shard_bytes: int = 2 << 30) -> Path:
    """Write a native folder atomically: everything goes to a sibling temp folder that replaces `out_dir` at the
    end (an existing export is swapped out only then). Only process 0 writes; `tensors` is still consumed on every
    process (multi-host gathers need every process)."""
    from vlmjax.convert.hf import write_safetensors

    out_dir = Path(out_dir)
    if jax.process_index() != 0:
        for _ in tensors:
            pass
        return out_dir
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_safetensors(tensors, tmp, max_shard_bytes)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2))  # last: its presence marks a complete folder
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(out_dir.name + f".old-{os.getpid()}")
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def save_native(model, out_dir, *, tokenizer=None, lora: str = "merge", dtype=None,
                max_shard_bytes: int = 2 << 30) -> Path:
    """Write `model` (a VLM) as a native folder. lora='merge' folds adapters into a copy's kernels; 'adapter'
    keeps them as their own tensors (reloaded as adapters). Multi-host: every process calls; process 0 writes."""
    if lora not in ("merge", "adapter"):
        raise ValueError(f"lora={lora!r}: use 'merge' or 'adapter'")
    rec = _lora_record(model)
    if rec is not None and lora == "merge":
        import copy

        from vlmjax.models.lora import merge_lora

        model = copy.deepcopy(model)
        merge_lora(model)
        rec = None
    return write_folder(out_dir, config_record(model.cfg, rec), iter_params(model, dtype), tokenizer,
                        max_shard_bytes=max_shard_bytes)


def abstract_model(cfg: VLMConfig, lora: dict | None):
    """The module a native folder fills (shapes only): the VLM, with its recorded adapters attached."""
    from vlmjax.models.vlm import VLM

    def build():
        m = VLM(cfg, rngs=nnx.Rngs(0))
        if lora:
            from vlmjax.models.lora import add_lora

            pattern = "^(" + "|".join(re.escape(p) for p in lora["paths"]) + ")$"
            add_lora(m, rank=lora["rank"], alpha=lora["alpha"], dropout=lora["dropout"], targets=pattern)
        return m

    return nnx.eval_shape(build)


def load_native(folder, *, dtype: str = "float32", param_dtype: str = "float32", mesh=None,
                sharding_rules=shd.DEFAULT_RULES):
    """Native folder -> (VLM, VLMConfig). Every parameter must be in the folder with its shape, and every tensor
    must be a parameter (errors name the tensor). With `mesh`, each parameter is placed straight into its shards."""
    from vlmjax.convert.hf import MissingTensor, SafetensorsSource

    folder = Path(folder)
    cfg, lora = read_native_config(folder)
    cfg = with_dtypes(cfg, dtype, param_dtype)
    graphdef, state = nnx.split(abstract_model(cfg, lora))
    specs = shd.param_specs(state, sharding_rules, mesh) if mesh is not None else None
    source = SafetensorsSource(folder, renames=())
    flat = nnx.to_flat_state(state)
    names = {path_str(p) for p, _ in flat}
    extra = sorted(set(source.keys()) - names)
    if extra:
        raise ValueError(f"{folder}: {len(extra)} tensors are no parameter of the model its config describes, "
                         f"e.g. {extra[:5]}")
    for path, var in flat:
        name = path_str(path)
        if name not in source.keys():
            raise MissingTensor(f"{folder}: no tensor for parameter {name}")
        arr = source.get(name)
        if tuple(arr.shape) != tuple(var.shape):
            raise ValueError(f"{folder}: tensor {name} has shape {tuple(arr.shape)}, the model's parameter "
                             f"{tuple(var.shape)}")
        arr = arr.astype(var.dtype, copy=False)
        if mesh is None:
            value = jnp.asarray(arr)
        else:
            sh = jax.sharding.NamedSharding(mesh, _get(specs, path))
            value = jax.make_array_from_callback(arr.shape, sh, lambda idx, b=arr: b[idx])
        var.set_value(value) if hasattr(var, "set_value") else setattr(var, "value", value)
        del arr
    return nnx.merge(graphdef, state), cfg


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def load_tokenizer(folder):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{folder}: no usable tokenizer files ({e})") from None


def load_folder(folder, *, kind: str | None = None, dtype: str = "float32", param_dtype: str = "float32", mesh=None):
    """A VLM folder, native or HF -> (model, VLMConfig, tokenizer). `kind` ('native' | 'hf') insists on one."""
    found = folder_kind(folder)
    if kind is not None and found != kind:
        raise ValueError(f"{folder} is a {found} folder, but {kind} was asked for (model.init='checkpoint' reads both)")
    if found == "native":
        model, cfg = load_native(folder, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    else:
        from vlmjax.convert.hf import load_vlm

        model, cfg = load_vlm(folder, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    return model, cfg, load_tokenizer(folder)


def hf_unsupported_reason(cfg: VLMConfig) -> str | None:
    """Why an HF LLaVA folder cannot express this model (None: it can). Beyond what the HF config can hold, the
    preprocessing must be the one HF import gives the family back, or a round trip would change how images are
    prepared."""
    from vlmjax.convert import hf_config

    try:
        hf_config.vlm_config_to_hf(cfg)
    except hf_config.UnsupportedModel as e:
        return str(e)
    implied = layout_preprocessing(cfg.image_layout)
    for name, value in implied.items():
        if getattr(cfg, name) != value:
            return (f"{name}={getattr(cfg, name)!r}: HF import of a {cfg.image_layout} model assumes {value!r}, so an "
                    "HF folder cannot carry it")
    if cfg.image_resample != "bicubic":
        return f"image_resample={cfg.image_resample!r}: HF import assumes 'bicubic'"
    mean_std = hf_config.vision_config_from_hf(hf_config.vision_config_to_hf(cfg.vision).to_dict())
    if (tuple(cfg.vision.image_mean), tuple(cfg.vision.image_std)) != (mean_std.image_mean, mean_std.image_std):
        return (f"image mean/std {cfg.vision.image_mean}/{cfg.vision.image_std}: HF import of a {cfg.vision.kind} "
                f"tower assumes {mean_std.image_mean}/{mean_std.image_std}")
    return None
