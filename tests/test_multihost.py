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


RUNNERS = """
import json, sys
import jax
coordinator, nproc, pid, tests, data, imgs, out, use_mesh = sys.argv[1:9]
if int(nproc) > 1:
    jax.distributed.initialize(coordinator, int(nproc), int(pid))
sys.path.insert(0, tests)
import numpy as np
from test_generate import smol_vlm
from vlmjax import sharding as shd
from vlmjax.data.assets import smollm2_tokenizer
from vlmjax.generate import GenerationConfig, generate_dataset, llava_requests
from vlmjax.scoring import capture_dataset, score_dataset
tok, model = smollm2_tokenizer(), smol_vlm()
mesh = None
if use_mesh == "1":  # this host's 2 devices: hosts run their shards independently
    mesh = shd.make_mesh(devices=jax.local_devices())
    model = shd.shard_module(model, mesh)
reqs = llava_requests(data, imgs)
kw = dict(batch_size=2, mesh=mesh, progress=False)
stats = [generate_dataset(model, tok, reqs, f"{out}/gen.jsonl", GenerationConfig(max_new_tokens=4), **kw),
         score_dataset(model, tok, reqs, f"{out}/scores.jsonl", **kw),
         capture_dataset(model, tok, reqs, f"{out}/feats", layers=(1,), parts=("attn", "resid"), **kw)]
print("STATS " + json.dumps(stats))
"""


def test_two_processes_run_generate_score_capture_like_one(tmp_path):
    """Each of 2 jax.distributed processes (2 CPU devices each, a local mesh) runs its share of the samples;
    process 0 merges: generations, scores and features equal a single process without a mesh."""
    import numpy as np

    sys.path.insert(0, str(REPO / "tests"))
    from test_scoring import _captions

    from vlmjax.generate.jsonl import read_jsonl
    from vlmjax.scoring import open_shards

    reqs = _captions(tmp_path, n=5)
    script = tmp_path / "runners.py"
    script.write_text(RUNNERS)
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo", PYTHONPATH=str(REPO),
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    args = [str(REPO / "tests"), str(tmp_path / "caps.json"), str(tmp_path / "imgs")]
    single = subprocess.run([sys.executable, str(script), "-", "1", "0", *args, str(tmp_path / "one"), "0"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", "2", str(i), *args,
                               str(tmp_path / "two"), "1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    stats = [json.loads(o.split("STATS ", 1)[1].splitlines()[0]) for o, _ in outs]
    assert [[s["requests"] for s in st] for st in stats] == [[3, 3, 3], [2, 2, 2]]  # each its own share
    assert all(s["merged"] for st in stats for s in st)
    one, two = tmp_path / "one", tmp_path / "two"
    g1, g2 = read_jsonl(one / "gen.jsonl"), read_jsonl(two / "gen.jsonl")
    assert list(g2) == [r.id for r in reqs] and g1 == g2  # same greedy tokens, same records
    s1, s2 = read_jsonl(one / "scores.jsonl"), read_jsonl(two / "scores.jsonl")
    assert sorted(s1) == sorted(s2)
    for k in s1:
        np.testing.assert_allclose(s2[k]["sum_logprob"], s1[k]["sum_logprob"], rtol=1e-5)
    f1, f2 = open_shards(one / "feats"), open_shards(two / "feats")
    np.testing.assert_allclose(f2.take(f1.ids), np.asarray(f1), atol=1e-5)
