"""Training on 8 forced CPU devices (data=2, fsdp=2, tensor=2) gives the losses of a 1-device run.

Subprocesses: XLA_FLAGS must be set before jax is imported. The loop blocks on every step's metrics, which
also keeps forced-CPU collectives from overlapping (they can deadlock otherwise).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train_utils import write_config_file, write_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_sharded_training_equals_single_device(tmp_path):
    data = write_dataset(tmp_path / "data")
    extra = "    c.data.batch_size = 4\n    c.train.steps = 3\n    c.train.save_every = 100\n"
    cfg = write_config_file(tmp_path / "cfg.py", data, extra)
    runs = {}
    for name, devices, mesh in (("single", 1, (1, 1, 1)), ("sharded", 8, (2, 2, 2))):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        cmd = [sys.executable, "-m", "vlmjax.train", f"--config={cfg}", f"--workdir={tmp_path / name}",
               f"--config.mesh.data={mesh[0]}", f"--config.mesh.fsdp={mesh[1]}", f"--config.mesh.tensor={mesh[2]}"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = [h["loss"] for h in json.loads(proc.stdout.split("SUMMARY ", 1)[1].splitlines()[0])["history"]]
    one, eight = runs["single"], runs["sharded"]
    assert len(one) == len(eight) == 3
    assert max(abs(a - b) for a, b in zip(one, eight)) <= 1e-5 * max(map(abs, one)), runs
