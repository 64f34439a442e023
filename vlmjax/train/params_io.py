"""Trained parameters as one safetensors file keyed by parameter path (`llm/layers/mlp/up_proj/lora_a`, ...).

A LoRA stage writes its adapter (and whatever else it trained, e.g. the projector) here, and a later stage starts
from it with `model.load_params` (STIC's stage 2 continues the stage-1 adapter; any SFT can continue a run's
projector). Loading checks every key against the model: unknown paths and shape mismatches are errors naming the
tensor; model parameters the file lacks keep their values.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx

from vlmjax.train.optim import path_str


def save_params(state: nnx.State, path: str) -> str:
    """Write every leaf of `state` to `path` atomically. Multi-host: every process must call it (leaves are
    gathered across hosts); process 0 writes."""
    from safetensors.numpy import save_file

    def host(x):
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    tensors = {path_str(p): host(v.get_value() if hasattr(v, "get_value") else v.value)
               for p, v in nnx.to_flat_state(state)}
    if jax.process_index() != 0:
        return path
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"format": "vlmjax-params"})
    os.replace(tmp, path)
    return path


def load_params(model: nnx.Module, path: str) -> int:
    """Assign the file's tensors to the model's parameters of the same path; returns how many were set."""
    from safetensors.numpy import load_file

    tensors = load_file(path)
    flat = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    unknown = sorted(set(tensors) - set(flat))
    if unknown:
        raise KeyError(f"{path}: tensors {unknown[:5]}{'...' if len(unknown) > 5 else ''} match no parameter of the "
                       f"model (paths look like {sorted(flat)[:3]}); was LoRA configured as in the run that wrote it?")
    for name, arr in tensors.items():
        var = flat[name]
        if tuple(arr.shape) != tuple(var.value.shape):
            raise ValueError(f"{path}: tensor {name} has shape {arr.shape}, the model's parameter {var.value.shape}")
        var.value = jax.numpy.asarray(arr, var.value.dtype)
    return len(tensors)
