"""Two CPU processes under jax.distributed (coordinator on 127.0.0.1, 2 CPU devices each) train the same steps
as one process, then run the generate / score / capture runners over their shares of the samples like one process.

One pair of processes for both checks: starting jax.distributed and compiling dominate the time. Training goes
through the CLI (`vlmjax.train.__main__.run` with --coordinator/--num_processes/--process_id). Both hosts read the
same data shard (data.shard_index=0, shard_count=1), so the global batch is the single-process batch twice: with a
per-token mean loss, losses and gradients equal the single-process run. This exercises distributed init, per-host
-> global batch assembly (rows and image stacks with offset image_rows) over a 4-device data mesh, and
cross-process collectives. The runners then use each host's own 2-device mesh; process 0 merges the shards.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train_utils import write_config_file, write_dataset

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SCRIPT = """
import json, sys
import jax
from vlmjax.train.__main__ import run
coordinator, pid, tests, cfg, workdir, data, imgs, out = sys.argv[1:9]
run([f"--config={cfg}", f"--workdir={workdir}", f"--coordinator={coordinator}", "--num_processes=2",
     f"--process_id={pid}"])  # prints SUMMARY on process 0
sys.path.insert(0, tests)
from test_multihost import runners
from vlmjax import sharding as shd
mesh = shd.make_mesh(devices=jax.local_devices())  # this host's 2 devices: hosts run their shards independently
print("STATS " + json.dumps(runners(data, imgs, out, mesh)))
"""


def runners(data, imgs, out, mesh):
    """generate_dataset, score_dataset and capture_dataset over the same requests -> their stats."""
    from test_generate import smol_vlm
    from vlmjax import sharding as shd
    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.generate import GenerationConfig, generate_dataset, llava_requests
    from vlmjax.scoring import capture_dataset, score_dataset

    tok, model = smollm2_tokenizer(), smol_vlm()
    if mesh is not None:
        model = shd.shard_module(model, mesh)
    reqs = llava_requests(data, imgs)
    kw = dict(batch_size=2, mesh=mesh, progress=False)
    return [generate_dataset(model, tok, reqs, f"{out}/gen.jsonl", GenerationConfig(max_new_tokens=4), **kw),
            score_dataset(model, tok, reqs, f"{out}/scores.jsonl", **kw),
            capture_dataset(model, tok, reqs, f"{out}/feats", layers=(1,), parts=("attn", "resid"), **kw)]


def test_two_processes_train_generate_score_capture_like_one(tmp_path):
    from test_scoring import _captions
    from vlmjax.generate.jsonl import read_jsonl
    from vlmjax.scoring import open_shards
    from vlmjax.train.config_io import load_config
    from vlmjax.train.loop import train

    data = write_dataset(tmp_path / "data")
    extra = "    c.data.shard_index = 0\n    c.data.shard_count = 1\n    c.train.steps = 3\n    c.train.save_every = 100\n"
    cfg = write_config_file(tmp_path / "cfg.py", data, extra)
    reqs = _captions(tmp_path, n=5)
    caps, imgs = str(tmp_path / "caps.json"), str(tmp_path / "imgs")
    # the single-process reference, in this process (one device, no mesh)
    one_losses = [h["loss"] for h in train(load_config(str(cfg)), str(tmp_path / "single"))["history"]]
    one = tmp_path / "one"
    runners(caps, imgs, one, None)

    script = tmp_path / "multihost.py"
    script.write_text(SCRIPT)
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"  # keeps conftest's flags
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=str(REPO),
               XLA_FLAGS=xla_flags)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two"
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i), str(REPO / "tests"), str(cfg),
                               str(tmp_path / "multi"), caps, imgs, str(two)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]

    two_losses = [h["loss"] for h in json.loads(outs[0][0].split("SUMMARY ", 1)[1].splitlines()[0])["history"]]
    assert len(one_losses) == len(two_losses) == 3
    assert max(abs(a - b) for a, b in zip(one_losses, two_losses)) <= 1e-5 * max(map(abs, one_losses)), \
        (one_losses, two_losses)

    stats = [json.loads(o.split("STATS ", 1)[1].splitlines()[0]) for o, _ in outs]
    assert [[s["requests"] for s in st] for st in stats] == [[3, 3, 3], [2, 2, 2]]  # each its own share
    assert all(s["merged"] for st in stats for s in st)
    g1, g2 = read_jsonl(one / "gen.jsonl"), read_jsonl(two / "gen.jsonl")
    assert list(g2) == [r.id for r in reqs] and g1 == g2  # same greedy tokens, same records
    s1, s2 = read_jsonl(one / "scores.jsonl"), read_jsonl(two / "scores.jsonl")
    assert sorted(s1) == sorted(s2)
    for k in s1:
        np.testing.assert_allclose(s2[k]["sum_logprob"], s1[k]["sum_logprob"], rtol=1e-5)
    f1, f2 = open_shards(one / "feats"), open_shards(two / "feats")
    np.testing.assert_allclose(f2.take(f1.ids), np.asarray(f1), atol=1e-5)
