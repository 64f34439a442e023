"""Training on 8 forced CPU devices (data=2, fsdp=2, tensor=2) gives the losses of a 1-device run.

The sharded run is a subprocess (XLA_FLAGS must be set before jax is imported); the 1-device reference runs in
this process. The loop blocks on every step's metrics, which also keeps forced-CPU collectives from overlapping
(they can deadlock otherwise).
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
    from vlmjax.train.config_io import load_config
    from vlmjax.train.loop import train

    data = write_dataset(tmp_path / "data")
    extra = "    c.data.batch_size = 4\n    c.train.steps = 3\n    c.train.save_every = 100\n"
    cfg = write_config_file(tmp_path / "cfg.py", data, extra)
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"  # keeps conftest's flags
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), XLA_FLAGS=xla_flags)
    cmd = [sys.executable, "-m", "vlmjax.train", f"--config={cfg}", f"--workdir={tmp_path / 'sharded'}",
           "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    one = [h["loss"] for h in train(load_config(str(cfg), ["mesh.data=1"]), str(tmp_path / "single"))["history"]]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    eight = [h["loss"] for h in json.loads(proc.stdout.split("SUMMARY ", 1)[1].splitlines()[0])["history"]]
    assert len(one) == len(eight) == 3
    assert max(abs(a - b) for a, b in zip(one, eight)) <= 1e-5 * max(map(abs, one)), (one, eight)
