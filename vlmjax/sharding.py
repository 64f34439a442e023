"""Logical axis names -> mesh axes.

Models name every parameter axis ('embed', 'mlp', 'heads', 'vocab', 'layers', ...) and key activations
('batch', 'length', ...). A rules table maps each logical name to a mesh axis (or a tuple of them, or None).
Data parallel, FSDP and tensor parallel are therefore configuration, e.g.:

    DP:      batch -> ('data',)                 everything else replicated
    FSDP:    batch -> ('data', 'fsdp'),  embed -> 'fsdp'
    TP:      heads/kv_heads/mlp/vocab -> 'tensor'

A dimension that the mapped mesh axes do not divide is left replicated (logged), so one rules table works for
every model size. The mesh is a plain `jax.sharding.Mesh` built from a config (`make_mesh`); multi-host runs use
the same code after `jax.distributed.initialize()`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

# One table covers DP, FSDP and TP: an axis of size 1 in the mesh makes its rules no-ops.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("norm", None),
    ("patch", None),
    ("lora_rank", "fsdp"),  # LoRA B (rank x out) has no embed dim: without this, pure FSDP replicates it + moments
)

_CTX: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("vlmjax_mesh", default=None)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh; -1 takes the remaining devices. Axes are Auto (GSPMD propagation)."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} devices not divisible by fsdp*tensor={known}")
        sizes[sizes.index(-1)] = n // known
    if int(np.prod(sizes)) != n:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, have {n}")
    types = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=types, devices=devices)


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh, shape: Sequence[int] | None = None) -> P:
    table: Mapping[str, object] = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table")
        axes = table[name]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if shape is not None and axes:
            size = int(np.prod([mesh.shape[a] for a in axes]))
            if shape[i] % size:
                log.info("dim %d (%s=%d) not divisible by mesh axes %s; replicated", i, name, shape[i], axes)
                axes = ()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def param_specs(state, rules: Rules, mesh: Mesh):
    """PartitionSpecs for an nnx.State (or Module) from each Variable's logical names."""

    def spec(v):
        names = v.get_metadata().get("out_sharding")
        if names is None:
            return P()
        return logical_to_spec(names, rules, mesh, v.shape)

    return jax.tree.map(spec, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_module(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place a module's variables on the mesh according to their logical names (in place)."""
    graphdef, state = nnx.split(model)
    specs = param_specs(state, rules, mesh)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
    state = jax.device_put(state, shardings)
    nnx.update(model, state)
    return model


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[Mesh]:
    """Activate a mesh + rules for activation constraints inside traced model code."""
    token = _CTX.set((mesh, tuple(rules)))
    try:
        yield mesh
    finally:
        _CTX.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    ctx = _CTX.get()
    if ctx is None:
        return x
    mesh, rules = ctx
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules, mesh, x.shape)))


def batch_sharding(mesh: Mesh, shape: Sequence[int], rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding for a batch array: leading axis over the batch mesh axes (replicated if they do not divide it)."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (len(shape) - 1), rules, mesh, shape))


def stack_batches(batches: list[dict]) -> dict:
    """k host batches -> one dict of (k, ...) arrays (the micro-batches a gradient-accumulation step scans)."""
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def place_batch(batch: dict, mesh: Mesh, rules: Sequence[tuple[str, object]] = DEFAULT_RULES, *,
                stacked: bool = True) -> dict:
    """This host's batch (or k stacked micro-batches) -> global arrays, rows laid out by the logical `batch` axis
    under `rules` (the training config's sharding_rules).

    Multi-host: each host holds its own rows and its own image stack; the global batch is the hosts' rows in
    process order, so each host's `image_rows` are offset by the rows before it (the model's splice does not
    care where padding slots sit)."""
    lead = (None,) if stacked else ()
    nproc, out = jax.process_count(), {}
    rows_local = batch["input_ids"].shape[len(lead)]
    for k, v in batch.items():
        if k == "image_rows" and nproc > 1:
            v = np.where(v >= 0, v + jax.process_index() * rows_local, v)
        names = lead + ("batch",) + (None,) * (v.ndim - len(lead) - 1)
        global_shape = list(v.shape)
        global_shape[len(lead)] *= nproc
        spec = logical_to_spec(names, rules, mesh, global_shape)
        if nproc > 1 and spec[len(lead)] is None:
            raise ValueError(f"batch key {k!r}: dim {v.shape[len(lead)]} per host cannot be split over the batch mesh "
                             "axes; make batch_size and max_images multiples of the local device count")
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), v, tuple(global_shape))
    return out
