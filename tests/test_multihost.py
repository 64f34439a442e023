"""Two CPU processes under jax.distributed (coordinator on 127.0.0.1) train the same steps as one process.

Both hosts read the same data shard (data.shard_index=0, shard_count=1), so the global batch is the
single-process batch twice: with a per-token mean loss, losses and gradients equal the single-process run.
This exercises distributed init, per-host -> global batch assembly (rows and image stacks with offset
image_rows), and cross-process collectives.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from train_utils import write_config_file, write_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _config_file(tmp_path, data):
    extra = "    c.data.shard_index = 0\n    c.data.shard_count = 1\n    c.train.steps = 3\n    c.train.save_every = 100\n"
    return write_config_file(tmp_path / "cfg.py", data, extra)


def _summary(out: str) -> dict:
    return json.loads(out.split("SUMMARY ", 1)[1].splitlines()[0])


def test_two_processes_match_one(tmp_path):
    data = write_dataset(tmp_path / "data")
    cfg = _config_file(tmp_path, data)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "vlmjax.train", f"--config={cfg}"]
    single = subprocess.run(base + [f"--workdir={tmp_path / 'single'}"], env=env, capture_output=True, text=True,
                            timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen(base + [f"--workdir={tmp_path / 'multi'}", f"--coordinator=127.0.0.1:{port}",
                                      "--num_processes=2", f"--process_id={i}"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    one = [h["loss"] for h in _summary(single.stdout)["history"]]
    two = [h["loss"] for h in _summary(outs[0][0])["history"]]
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5 * max(map(abs, one)), (one, two)
