"""Every shipped config loads, and its trainable / LoRA / group regexes match parameters of a model of that family."""

from pathlib import Path

import pytest
from flax import nnx

from vlmjax.models import LLMConfig, VisionConfig, VLMConfig, VLM
from vlmjax.models.lora import add_lora
from vlmjax.train.config_io import load_config, load_module
from vlmjax.train.optim import make_optimizer, split_trainable

ROOT = Path(__file__).resolve().parents[1] / "configs"


def _module(path):
    return load_module(str(path))


# (file, stage argument): a config with STAGES takes one of them after the colon (configs/stic/mini.py:sft)
CONFIGS = [(p, stage) for p in sorted(ROOT.rglob("*.py")) for stage in getattr(_module(p), "STAGES", (None,))]


@pytest.mark.parametrize("path,stage", CONFIGS,
                         ids=[f"{p.relative_to(ROOT)}{':' + s if s else ''}" for p, s in CONFIGS])
def test_config_regexes_select_parameters(path, stage):
    c = load_config(f"{path}:{stage}" if stage else path)  # the CLI's loader: filled defaults, validated
    cfg = VLMConfig(llm=LLMConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                  num_kv_heads=2),
                    vision=VisionConfig(image_size=28, patch_size=7, hidden_size=16, intermediate_size=32,
                                        num_layers=2, num_heads=2), image_token_id=63)
    model = VLM(cfg, rngs=nnx.Rngs(0))
    if c.lora.rank:
        assert len(add_lora(model, rank=4, alpha=8.0, targets=c.lora.targets)) == 7  # q k v o gate up down
    _, trainable, rest = split_trainable(model, tuple(c.train.trainable))
    make_optimizer(c.optim, trainable, c.train.steps)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)]
    for group in c.optim.groups:
        assert any(__import__("re").search(group["pattern"], p) for p in paths), group
    assert c.train.objective in ("sft", "dpo")
