"""The AOT memory path of bench/memory.py (lower + compile the real train steps on abstract, sharded inputs)
keeps working, and its numbers mean what the bench says they mean. Same code, scaled-down LLaVA (`--model tiny`).

Runs bench/memory.py in a subprocess: it forces 8 CPU devices through XLA_FLAGS, which must be set before jax
is imported. It only compiles (nothing executes), so the forced devices' collectives cannot deadlock.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNS = ("dpo_lora@fsdp8", "sft_lora@fsdp1", "sft_full@fsdp1", "sft_full@fsdp8", "dpo_lora_frozen_bf16@fsdp1")
# --config: a recipe config's own step (VILA-1.5-8B SFT: its model is the one its align stage assembles)
CONFIG = "configs/vila/llama3_8b_siglip.py:sft"
CONFIG_RUN = "vila/llama3_8b_siglip:sft@fsdp8"
KEY_BYTES = 8  # the step's RNG key argument (threefry: 2 x uint32), not in the analytic sums


@pytest.fixture(scope="module")
def results():
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"  # keeps conftest's flags
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags)
    cmd = [sys.executable, str(REPO / "bench" / "memory.py"), "--model", "tiny", "--seq", "32", "--json", "--runs", *RUNS,
           "--config", CONFIG]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("CASE ")]
    assert len([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]) == len(RUNS) + 1, proc.stdout
    return {f"{r['case']}@{r['mesh']}": r for r in cases}


def test_compiles_with_sane_memory_numbers(results):
    """Every objective compiles; the compiler's per-device argument bytes are the analytic shard sizes; donated
    trainable params + optimizer state are exactly the aliased bytes; peak = args + outputs - alias + temps."""
    assert sorted(results) == sorted(RUNS + (CONFIG_RUN,))
    for name, r in results.items():
        for k in ("argument", "output", "temp", "alias", "peak"):
            assert r[k] > 0, (name, k, r)
        assert r["peak"] == r["argument"] + r["output"] - r["alias"] + r["temp"]
        analytic = r["trainable_bytes"] + r["frozen_bytes"] + r["opt_bytes"] + r["batch_bytes"] + KEY_BYTES
        # jit drops unused inputs: the tower's post-layernorm (LLaVA stops at layer -2), < 0.5% of the bytes here
        assert 0.995 * analytic <= r["argument"] <= analytic, (name, r["argument"], analytic)
        assert r["alias"] == r["trainable_bytes"] + r["opt_bytes"], (name, r)
        if "lora" in name:  # the base model is frozen: it is an argument, but neither donated nor optimised
            assert r["frozen_params"] > r["trainable_params"] > 0, (name, r)


def test_full_finetune_holds_more_than_lora(results):
    """On one device (at 7B scale full fine-tuning holds 1.7x LoRA's argument bytes at FSDP 8 too)."""
    lora, full = results["sft_lora@fsdp1"], results["sft_full@fsdp1"]
    assert full["trainable_params"] > 3 * lora["trainable_params"]
    assert full["opt_bytes"] > 3 * lora["opt_bytes"]
    assert full["argument"] > lora["argument"]
    assert full["alias"] > lora["alias"]


def test_fsdp_shards_params_and_optimizer_state(results):
    """1 -> 8 FSDP devices divides the per-device parameter + AdamW bytes by ~8: every weight matrix of the tiny
    model has an 'embed' dim divisible by 8; only norm scales and biases (~1% of the bytes) stay replicated, so
    the factor is 8 / (1 + 7 x replicated share) >= 7. The optimizer state must shard exactly like the params
    (a replicated Adam state would leave this factor at ~3)."""
    one, eight = results["sft_full@fsdp1"], results["sft_full@fsdp8"]
    assert one["devices"] == 1 and eight["devices"] == 8
    state = lambda r: r["trainable_bytes"] + r["frozen_bytes"] + r["opt_bytes"]  # noqa: E731
    assert 7.0 <= state(one) / state(eight) <= 8.0, (state(one), state(eight))
    assert 7.0 <= one["opt_bytes"] / eight["opt_bytes"] <= 8.0, (one["opt_bytes"], eight["opt_bytes"])
    # the compiler's argument bytes (state + the same global batch, split 8 ways) shrink alike
    assert 7.0 <= one["argument"] / eight["argument"] <= 8.0, (one["argument"], eight["argument"])
    assert eight["temp"] < one["temp"]


def test_lora_and_its_moments_shard_under_pure_fsdp(results):
    """The rule lora_rank -> fsdp shards the LoRA B matrices (rank x out, no 'embed' dim) and their Adam moments:
    per device, the trainable bytes are ~1/8 of the fp32 total (only biases replicated). Without the rule every B
    (about half of the LoRA bytes here) and its moments stay whole on every device."""
    r = results["dpo_lora@fsdp8"]
    full = 4 * r["trainable_params"]
    assert full / 8 <= r["trainable_bytes"] <= 1.25 * full / 8, (r["trainable_bytes"], full)
    assert r["opt_bytes"] <= 2 * 1.25 * full / 8 + 64, (r["opt_bytes"], full)


def test_frozen_base_bf16_with_fp32_trainable_and_moments(results):
    """model.frozen_param_dtype=bfloat16: the frozen base is 2 bytes a parameter, the trained ones (LoRA,
    projector) 4, and their two AdamW moments 4 each."""
    r = results["dpo_lora_frozen_bf16@fsdp1"]
    assert r["frozen_bytes"] == 2 * r["frozen_params"] and r["trainable_bytes"] == 4 * r["trainable_params"]
    assert 8 * r["trainable_params"] <= r["opt_bytes"] <= 8 * r["trainable_params"] + 64, r


def test_config_path_compiles_the_configs_own_step(results):
    """--config takes the model, batch and trainable set from the recipe config, through config_io: VILA-1.5's SFT
    stage trains the LLM + projector (SigLIP frozen) of the model its align stage assembled (Llama-3 + SigLIP +
    downsample2x2_mlp, here at toy sizes): 16 rows x grad_accum 8 over 8 devices, `<image>` appended after the
    tokenizer's 256 ids (vocabulary grown to 320), a 5x5 SigLIP grid pooled 2x2 with padding to 3x3 tokens."""
    r = results[CONFIG_RUN]
    assert "Meta-Llama-3-8B-Instruct" in r["model"] and "downsample2x2_mlp (built by :align)" in r["model"], r["model"]
    assert (r["rows_per_micro"], r["rows_per_device"], r["grad_accum"]) == (16, 2, 8)
    assert (r["seq_len"], r["max_images"], r["tokens_per_image"], r["vocab_size"]) == (32, 32, 9, 320)
    assert r["trainable"] == ["^projector/", "^llm/"] and r["lora_rank"] == 0
    assert r["trainable_params"] > r["frozen_params"] > 0  # the tower is the frozen part
    # full fine-tune, fp32, FSDP 8: params and both AdamW moments ~1/8 per device (norm scales, biases replicated)
    full = 4 * r["trainable_params"]
    assert full / 8 <= r["trainable_bytes"] <= 1.25 * full / 8, (r["trainable_bytes"], full)
    assert 2 * r["trainable_bytes"] <= r["opt_bytes"] <= 2 * r["trainable_bytes"] + 64, r
