"""Ahead-of-time memory check of the real train step: lower and compile it on abstract, sharded inputs.

Why: whether a 7B step fits a GPU can be answered without the GPU and without the weights. The model is built
with `nnx.eval_shape` (no parameter is materialised), every parameter gets the sharding `shard_module` would
give it, the optimizer state and batch get the shardings the loop gives them, and the step is jitted exactly as
`vlmjax.train.loop.train` jits it (trainable params and optimizer state donated, their output shardings pinned).
`compiled.memory_analysis()` then reports XLA's per-device buffer assignment for that program.

Per-device peak estimate = arguments + outputs - aliased + temps:
  arguments  every input buffer (params shard, optimizer-state shard, batch shard), live for the whole step;
  outputs    every output buffer; donated inputs whose buffers are reused for outputs appear in both, and
  aliased    is their size, so it is subtracted once;
  temps      XLA's single preallocated scratch block for all intermediates (activations kept for the backward
             pass, gradients, collectives' buffers), sized by its heap simulation.
Generated code and host memory are not device memory and are left out. The numbers are per device because an
SPMD executable is one per-partition program.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vlmjax import sharding as shd
from vlmjax.models.config import VLMConfig
from vlmjax.train import optim as opt_lib
from vlmjax.train.setup import apply_param_dtypes
from vlmjax.train.step import jit_train_step



def abstract_model(vcfg: VLMConfig, lora=None, seed: int = 0) -> nnx.Module:
    """The VLM (with LoRA adapters when lora.rank) as shapes only: nothing is allocated."""
    from vlmjax.models.lora import add_lora
    from vlmjax.models.vlm import VLM

    def build():
        model = VLM(vcfg, rngs=nnx.Rngs(seed))
        if lora is not None and lora.rank:
            add_lora(model, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, targets=lora.targets, seed=seed)
        return model

    return nnx.eval_shape(build)


def _with_shardings(state, mesh, rules):
    """State of abstract Variables -> the same with NamedShardings from their logical names (as shard_module)."""
    specs = shd.param_specs(state, rules, mesh)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731

    def put(v, spec):
        return v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, spec)))

    return jax.tree.map(put, state, specs, is_leaf=is_var)


def abstract_batches(config, vcfg: VLMConfig, mesh) -> dict:
    """k = train.grad_accum stacked micro-batches with the batch contract's shapes (vlmjax.data.batch_shapes),
    rows sharded over the batch mesh axes exactly as loop._place does (single host)."""
    from vlmjax.data import batch_shapes
    from vlmjax.train.setup import data_config

    dc = data_config(config.data, vcfg, None, mode=config.train.objective, seed=config.train.seed)
    k = config.train.grad_accum
    out = {}
    for name, (shape, dtype) in batch_shapes(dc).items():
        shape = (k,) + tuple(shape)
        spec = shd.logical_to_spec((None, "batch") + (None,) * (len(shape) - 2), shd.DEFAULT_RULES, mesh, shape)
        out[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
    return out


def shard_bytes(tree) -> int:
    """Per-device bytes of a tree of sharded abstract arrays (the largest shard, i.e. device 0's for even splits)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def aot_memory(config, vcfg: VLMConfig, mesh, *, rules=shd.DEFAULT_RULES) -> dict:
    """Lower + compile the train step that `config` (a training ConfigDict: lora, train, optim, dpo, loss, data)
    describes, for model `vcfg` on `mesh`, and return per-device byte counts (see the module docstring).

    vcfg must already carry the execution knobs (dtype, param_dtype, llm remat) the run would use (`with_execution`;
    param_dtype = `setup.build_param_dtype(config.model)`).
    """
    tc = config.train
    model = abstract_model(vcfg, config.lora if config.lora.rank else None, seed=tc.seed)
    apply_param_dtypes(model, config.model, tuple(tc.trainable))  # as the loop does (model.frozen_param_dtype)
    graphdef, trainable, rest = opt_lib.split_trainable(model, tuple(tc.trainable))
    trainable = _with_shardings(trainable, mesh, rules)
    rest = _with_shardings(rest, mesh, rules)
    ref_params = None
    if tc.objective == "dpo" and config.dpo.reference == "frozen_copy":
        ref_params = trainable
    tx, _ = opt_lib.make_optimizer(config.optim, trainable, tc.steps)
    opt_state = jax.tree.map(lambda s, o: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=o),
                             jax.eval_shape(tx.init, trainable), opt_lib.state_shardings(tx, trainable, mesh))
    batches = abstract_batches(config, vcfg, mesh)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P()))
    step_fn = jit_train_step(graphdef, tx, config, trainable, opt_state)
    t0 = time.perf_counter()
    with shd.use_mesh(mesh, rules):
        lowered = step_fn.lower(trainable, rest, opt_state, batches, key, ref_params)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    ma = compiled.memory_analysis()
    arg, out, tmp, alias = (int(getattr(ma, f"{n}_size_in_bytes")) for n in ("argument", "output", "temp", "alias"))
    return dict(
        devices=int(mesh.devices.size), mesh={a: int(s) for a, s in mesh.shape.items()},
        argument=arg, output=out, temp=tmp, alias=alias, peak=arg + out - alias + tmp,
        code=int(ma.generated_code_size_in_bytes),
        trainable_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable)),
        frozen_params=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(rest)),
        # analytic per-device shards of the inputs, to cross-check the compiler's argument bytes
        trainable_bytes=shard_bytes(trainable), frozen_bytes=shard_bytes(rest), opt_bytes=shard_bytes(opt_state),
        batch_bytes=shard_bytes(batches), lower_s=t1 - t0, compile_s=t2 - t1,
        rows_per_micro=int(batches["input_ids"].shape[1]), grad_accum=int(tc.grad_accum),
    )


def with_execution(vcfg: VLMConfig, *, dtype: str, param_dtype: str, remat: str, attention_impl: str = "auto"):
    """The knobs build_model applies for an hf/checkpoint init: dtypes everywhere, remat on the LLM only."""
    from vlmjax.models.config import with_dtypes

    cfg = with_dtypes(vcfg, dtype, param_dtype)
    llm = dataclasses.replace(cfg.llm, remat=remat, attention_impl=attention_impl)
    vision = dataclasses.replace(cfg.vision, attention_impl=attention_impl)
    return dataclasses.replace(cfg, llm=llm, vision=vision)
