"""Real-scale knobs: a frozen base in bf16 with fp32 trainable params (model.frozen_param_dtype), and the LoRA rank
axis sharded under pure FSDP (so LoRA B matrices and their Adam moments are not replicated)."""

import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from train_utils import tiny_config, write_dataset
from vlmjax import sharding as shd
from vlmjax.train.loop import train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


def _projector(model):
    return {p: np.asarray(v[...], np.float32) for p, v in nnx.to_flat_state(nnx.state(model.projector, nnx.Param))}


def test_frozen_base_bf16_trains_fp32_adapters_at_tiny_lr(data, tmp_path):
    """STIC's LoRA lr 1e-7: an Adam update of ~1e-7 on weights of ~0.1 is below bf16's resolution (2^-8 relative),
    so with model.param_dtype=bfloat16 the trained weights never move (that run is not repeated here: it would
    show 0 change); with frozen_param_dtype=bfloat16 they are fp32 and do, while the base is held in bf16."""
    from vlmjax.train.setup import build_model

    over = {"train.steps": 2, "train.save_every": 100, "optim.lr": 1e-7, "optim.schedule": "constant",
            "optim.warmup_steps": 0, "lora.rank": 4, "lora.alpha": 8.0, "train.trainable": ("lora_", "^projector/")}
    cfg = tiny_config(data, **over, **{"model.frozen_param_dtype": "bfloat16"})
    s = train(cfg, str(tmp_path / "frozen"))
    assert np.isfinite([h["loss"] for h in s["history"]]).all()
    for path, v in nnx.to_flat_state(nnx.state(s["model"], nnx.Param)):
        name = "/".join(map(str, path))
        trained = "lora_" in name or name.startswith("projector/")
        assert v[...].dtype == (jnp.float32 if trained else jnp.bfloat16), name
    before, after = _projector(build_model(cfg.model)[0]), _projector(s["model"])  # same seed: same init (bf16)
    for p, w in before.items():
        step = np.abs(after[p] - w)
        assert 0.5e-7 < step.max() <= 2.5e-7, (p, step.max())  # two Adam steps of <= lr each
        bf16 = (w + (after[p] - w)).astype(jnp.bfloat16).astype(np.float32)
        assert np.array_equal(bf16[np.abs(w) > 1e-3], w[np.abs(w) > 1e-3])  # what a bf16 weight would keep
    assert np.abs(np.asarray(s["model"].llm.layers.self_attn.q_proj.lora_b[...], np.float32)).max() > 0


def test_lora_rank_axis_shards_under_pure_fsdp():
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 1})
    spec = lambda names, shape: shd.logical_to_spec(names, shd.DEFAULT_RULES, mesh, shape)  # noqa: E731
    # B of q_proj (layers, rank, heads, head_dim) and of o_proj (layers, rank, embed): rank over fsdp
    assert tuple(spec(("layers", "lora_rank", "heads", "head_dim"), (2, 128, 32, 128))) == (None, "fsdp", None, None)
    assert tuple(spec(("layers", "lora_rank", "embed"), (2, 128, 4096))) == (None, "fsdp", None)
    # A keeps its embed sharding (fsdp is used once per array)
    assert tuple(spec(("layers", "embed", "lora_rank"), (2, 4096, 128))) == (None, "fsdp", None)
    # a rank fsdp does not divide stays replicated
    assert tuple(spec(("layers", "lora_rank", "embed"), (2, 6, 4098))) == (None, None, None)
