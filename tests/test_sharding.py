"""DP / FSDP / TP on 8 forced CPU devices equal the single-device forward; params carry the expected specs.

Runs in a subprocess because XLA_FLAGS must be set before jax is first imported.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOL = 1e-5


@pytest.fixture(scope="module")
def result():
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"  # keeps conftest's flags
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    script = Path(__file__).with_name("sharded_forward.py")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_forward_and_param_specs(result):
    """One test (one subprocess, one xdist worker): every mesh's logits, then the parameter specs."""
    for mesh in ("dp", "fsdp", "tp", "fsdp_tp"):
        assert result[mesh]["max_err"] <= TOL, (mesh, result[mesh])
    # stacked layers lead with the (replicated) 'layers' axis; embed -> fsdp, heads/mlp/vocab -> tensor
    specs = {mesh: result[mesh]["specs"] for mesh in result}
    assert specs["dp"] == {"q_proj": [], "down_proj": [], "embed": [], "vit_fc1": []}
    assert specs["fsdp"]["q_proj"] == [None, "fsdp"]
    assert specs["tp"]["q_proj"] == [None, None, "tensor"]
    assert specs["fsdp_tp"] == {"q_proj": [None, "fsdp", "tensor"], "down_proj": [None, "tensor", "fsdp"],
                                "embed": ["tensor", "fsdp"], "vit_fc1": [None, "fsdp", "tensor"]}
    assert "data" in result["dp"]["logits_sharding"]
