"""Import from and export to HF folders (config.json + safetensors shards), streaming tensor by tensor.

Import fills one host buffer per parameter (per-layer tensors are written into their slot of the stacked
buffer), places it on device (sharded when a mesh is given) and drops it: host memory peaks at about one
parameter, never two copies of the model. Export converts and writes one tensor at a time into shards.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vlmjax import sharding as shd
from vlmjax.convert import hf_config
from vlmjax.convert.mapping import LEGACY_RENAMES, LLAVA_PREFIXES, Rule, causal_lm_rules, vlm_rules
from vlmjax.models.config import LLMConfig, VLMConfig
from vlmjax.models.llm import LLM
from vlmjax.models.vlm import VLM

log = logging.getLogger(__name__)

# Tensors (normalised names, matched from the start) that checkpoints carry but no LLaVA forward uses; anything
# else unclaimed is an error.
IGNORED = (
    r".*rotary_emb\.inv_freq$",
    r".*embeddings\.position_ids$",
)
# Float dtypes a checkpoint may store; an integer (quantised) or other tensor would be cast into nonsense.
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def siglip_head(prefix: str) -> str:
    """SigLIP's attention-pool head (`vision_use_head=True`, as released) under a tower at `prefix` once names are
    normalised (transformers 4 `...vision_model.head.*`, 5 `...head.*`): LLaVA takes hidden states, never the head."""
    return re.escape(prefix) + r"head\."


class MissingTensor(KeyError):
    pass


class TensorSource(Protocol):
    def keys(self) -> Iterable[str]: ...
    def get(self, name: str) -> np.ndarray: ...


class SafetensorsSource:
    """Lazy reader over one folder's safetensors files (sharded or not), with legacy-name normalisation."""

    def __init__(self, folder: str | os.PathLike, renames=LEGACY_RENAMES):
        from safetensors import safe_open

        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.folder}")
        self._where: dict[str, tuple[object, str]] = {}
        for f in files:
            handle = safe_open(str(f), framework="flax")  # numpy cannot read bf16; flax can
            for raw in handle.keys():
                self._where[_rename(raw, renames)] = (handle, raw)

    def keys(self):
        return self._where.keys()

    def get(self, name: str) -> np.ndarray:
        try:
            handle, raw = self._where[name]
        except KeyError:
            raise MissingTensor(f"tensor {name!r} not found in {self.folder}") from None
        return np.asarray(handle.get_tensor(raw))

    def spec(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(dtype name, shape) of a tensor from the file header, without reading it."""
        handle, raw = self._where[name]
        sl = handle.get_slice(raw)
        return _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype()), tuple(sl.get_shape())


_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _rename(name: str, renames) -> str:
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def read_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not an HF model folder")
    return json.loads(path.read_text())


def _path_get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def load_params(
    model_abstract: nnx.Module,
    rules: list[Rule],
    source: TensorSource,
    *,
    mesh=None,
    sharding_rules=shd.DEFAULT_RULES,
    strict_unused: bool = True,
    skip: tuple[tuple[str, ...], ...] = (),
    ignored: tuple[str, ...] = IGNORED,
    where: str = "checkpoint",
) -> nnx.Module:
    """Fill an abstract (nnx.eval_shape) module from `source` by `rules`. `skip` lists our params to keep as
    initialised (e.g. a fresh projector) — they must then already be concrete in `model_abstract`. Every tensor
    must have exactly the HF shape the config implies and a float dtype; `ignored` (regexes) may go unused."""
    graphdef, state = nnx.split(model_abstract)
    specs = shd.param_specs(state, sharding_rules, mesh) if mesh is not None else None
    used: set[str] = set()
    covered: set[tuple[str, ...]] = set()
    for rule in _progress(rules, f"load {Path(where).name or where}", "param"):
        var = _path_get(state, rule.path)
        shape, dtype = tuple(var.shape), var.dtype
        buf = np.empty(shape, dtype=dtype)
        names = [rule.hf.format(i=i) for i in range(shape[0])] if rule.stacked else [rule.hf]
        expected = rule.layout.hf_shape(shape[1:] if rule.stacked else shape)
        for i, name in enumerate(names):
            w = source.get(name)
            used.add(name)
            if w.dtype.name not in FLOAT_DTYPES:
                raise ValueError(f"{where}: tensor {name!r} has dtype {w.dtype.name}; expected a float dtype "
                                 f"{FLOAT_DTYPES} (quantised/integer tensors are not cast)")
            if tuple(w.shape) != tuple(expected):
                raise ValueError(f"{where}: tensor {name!r} has shape {tuple(w.shape)}, expected {tuple(expected)} "
                                 "for this config")
            target = buf[i] if rule.stacked else buf
            target[...] = rule.layout.to_ours(w).astype(dtype)
        if mesh is None:
            arr = jnp.asarray(buf)
        else:
            sh = jax.sharding.NamedSharding(mesh, _path_get(specs, rule.path))
            arr = jax.make_array_from_callback(shape, sh, lambda idx, b=buf: b[idx])
        var.set_value(arr) if hasattr(var, "set_value") else setattr(var, "value", arr)
        covered.add(rule.path)
        del buf
    # every parameter must be loaded (or explicitly kept), every tensor consumed (or known to be unused)
    for path, var in nnx.to_flat_state(state):
        if path not in covered and not any(path[: len(s)] == s for s in skip):
            raise MissingTensor(f"{where}: no tensor maps to parameter {'.'.join(map(str, path))}")
    if strict_unused:
        extra = sorted(k for k in source.keys() if k not in used and not any(re.match(p, k) for p in ignored))
        if extra:
            raise ValueError(f"{where}: {len(extra)} tensors not used by the model, e.g. {extra[:5]}")
    return nnx.merge(graphdef, state)


def load_vlm(folder, *, dtype: str = "float32", param_dtype: str = "float32", mesh=None, sharding_rules=shd.DEFAULT_RULES):
    """HF LlavaForConditionalGeneration folder -> (VLM, VLMConfig)."""
    from vlmjax.models.config import with_dtypes

    cfg = with_dtypes(hf_config.vlm_config_from_hf(read_config(folder)), dtype, param_dtype)
    abstract = nnx.eval_shape(lambda: VLM(cfg, rngs=nnx.Rngs(0)))
    ignored = IGNORED + ((siglip_head(LLAVA_PREFIXES["vision"]),) if cfg.vision.kind == "siglip" else ())
    model = load_params(abstract, vlm_rules(cfg), SafetensorsSource(folder), mesh=mesh, sharding_rules=sharding_rules,
                        ignored=ignored, where=str(folder))
    return model, cfg


def load_causal_lm(folder, *, dtype: str = "float32", param_dtype: str = "float32", mesh=None, sharding_rules=shd.DEFAULT_RULES):
    """HF *ForCausalLM folder (Llama/Mistral/Qwen2) -> (LLM, LLMConfig)."""
    import dataclasses

    cfg = hf_config.llm_config_from_hf(read_config(folder))
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype)
    abstract = nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0)))
    source = SafetensorsSource(folder, renames=())
    model = load_params(abstract, causal_lm_rules(cfg), source, mesh=mesh, sharding_rules=sharding_rules, where=str(folder))
    return model, cfg


def load_vision_tower(folder, *, dtype: str = "float32", param_dtype: str = "float32", mesh=None, sharding_rules=shd.DEFAULT_RULES):
    """HF CLIPVisionModel / SiglipVisionModel (or full CLIP/SigLIP) folder -> (VisionTower, VisionConfig)."""
    import dataclasses

    from vlmjax.convert.mapping import vision_rules
    from vlmjax.models.vit import VisionTower

    cfg = hf_config.vision_config_from_hf(read_config(folder))
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=param_dtype)
    abstract = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)))
    # transformers 5 writes a vision model's tensors without the "vision_model." prefix older files have
    source = SafetensorsSource(folder, renames=(("vision_model.", ""),))
    # a dual encoder also carries the text tower: only the vision half is ours to check
    strict = not any(k.startswith("text_model.") for k in source.keys())
    ignored = IGNORED + ((siglip_head(""),) if cfg.kind == "siglip" else ())
    model = load_params(abstract, vision_rules(cfg, (), ""), source, mesh=mesh, sharding_rules=sharding_rules,
                        strict_unused=strict, ignored=ignored, where=str(folder))
    return model, cfg


def iter_hf_tensors(model: nnx.Module, rules: list[Rule], dtype=None):
    """Yield (hf_name, np.ndarray) one tensor at a time, in HF layout."""
    state = nnx.state(model)
    for rule in rules:
        arr = np.asarray(jax.device_get(_path_get(state, rule.path)[...]))
        if dtype is not None:
            arr = arr.astype(dtype)
        if rule.stacked:
            for i in range(arr.shape[0]):
                yield rule.hf.format(i=i), rule.layout.to_hf(arr[i])
        else:
            yield rule.hf, rule.layout.to_hf(arr)


def write_safetensors(tensors, out_dir: Path, max_shard_bytes: int = 2 << 30) -> None:
    """Write (name, array) pairs into shards of at most `max_shard_bytes`, plus the HF index when sharded."""
    from safetensors.numpy import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size, total = 0, 0
    files: list[str] = []
    weight_map: dict[str, str] = {}

    def flush(final: bool):
        nonlocal size
        if shards[-1]:
            name = f"model-{len(files) + 1:05d}.safetensors.tmp"
            save_file(shards[-1], str(out_dir / name), metadata={"format": "pt"})
            files.append(name)
            for k in shards[-1]:
                weight_map[k] = name
        shards[-1] = {}
        size = 0

    for name, arr in tensors:
        if size and size + arr.nbytes > max_shard_bytes:
            flush(False)
        shards[-1][name] = np.ascontiguousarray(arr)
        size += arr.nbytes
        total += arr.nbytes
    flush(True)
    n = len(files)
    final_names = {f: ("model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors") for i, f in enumerate(files)}
    mode = _file_mode()
    for f, final in final_names.items():
        os.chmod(out_dir / f, mode)  # safetensors creates its files 0600; the folder is meant to be shared
        os.replace(out_dir / f, out_dir / final)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: final_names[v] for k, v in weight_map.items()}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _file_mode() -> int:
    """0666 under the process umask, the mode `open()` gives the folder's other files (0644 with umask 022)."""
    try:  # Linux: read it without the set-and-restore race os.umask has against other threads creating files
        status = Path("/proc/self/status").read_text()
        umask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration):
        umask = os.umask(0)
        os.umask(umask)
    return 0o666 & ~umask


def _progress(items, desc: str, unit: str):
    """A tqdm bar on a terminal (silent in logs and tests), as the trainer's."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, disable=None, dynamic_ncols=True)


def save_vlm(model: VLM, out_dir, *, tokenizer=None, dtype=None, max_shard_bytes: int = 2 << 30,
             image_spec=None) -> Path:
    """Export to a folder that transformers' AutoModelForImageTextToText loads (LlavaForConditionalGeneration) and
    AutoProcessor preprocesses for, as `image_spec` (default: `data.image.model_image_spec(cfg)`) says."""
    out_dir = Path(out_dir)
    hf_cfg = hf_config.vlm_config_to_hf(model.cfg)
    rules = vlm_rules(model.cfg)
    write_safetensors(iter_hf_tensors(model, _progress(rules, f"export {out_dir.name}", "param"), dtype), out_dir,
                      max_shard_bytes)
    hf_cfg.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    from vlmjax.convert.processor import save_processor

    save_processor(out_dir, model.cfg, tokenizer, image_spec)
    return out_dir


def save_causal_lm(model: LLM, out_dir, *, tokenizer=None, dtype=None, max_shard_bytes: int = 2 << 30) -> Path:
    out_dir = Path(out_dir)
    hf_cfg = hf_config.llm_config_to_hf(model.cfg)
    rules = _progress(causal_lm_rules(model.cfg), f"export {out_dir.name}", "param")
    write_safetensors(iter_hf_tensors(model, rules, dtype), out_dir, max_shard_bytes)
    hf_cfg.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir
