"""KV-cache generation engine against the uncached full-recompute loop (`simple.greedy_generate`), sampling
semantics, stop strings and the resumable dataset runner, on tiny random models (fast)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vlmjax.generate import GenerationConfig, SamplingConfig, generate, unpad_left
from vlmjax.generate.sampling import argmax_first, inverse_cdf, row_keys, sample, top_p_keep
from vlmjax.generate.simple import greedy_generate
from vlmjax.models.config import LLMConfig, VisionConfig, VLMConfig
from vlmjax.models.llm import LLM
from vlmjax.models.vlm import VLM

SMOL_IMAGE_ID = 49152  # first id past the SmolLM2 vocabulary


def random_model(make, seed=0):
    """Build `make()` abstractly and fill it from numpy (eager nnx init compiles one XLA op per parameter shape:
    tens of seconds on a busy 2-core machine). Embeddings get std 0.6 so logits sit far apart and argmax never
    hinges on float rounding; norm scales ~1, other weights std 0.3."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, x):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if "scale" in name:
            return jnp.asarray(1.0 + 0.1 * rng.standard_normal(x.shape), x.dtype)
        std = 0.6 if "embed_tokens" in name else 0.3
        return jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def tiny_vlm(vocab=96, image_token_id=95, seed=0):
    llm = LLMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    bos_token_id=None, eos_token_id=None)
    vis = VisionConfig(kind="siglip", image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_layers=2,
                       num_heads=2, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    cfg = VLMConfig(llm=llm, vision=vis, vision_feature_select="full", image_token_id=image_token_id)
    return random_model(lambda: VLM(cfg, rngs=nnx.Rngs(0)), seed)


def tiny_llm(vocab=96, seed=0):
    cfg = LLMConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
    return random_model(lambda: LLM(cfg, rngs=nnx.Rngs(0)), seed)


def smol_vlm():
    """Tiny random VLM whose vocabulary covers the SmolLM2 tokenizer (+ an image id past it)."""
    return tiny_vlm(vocab=49216, image_token_id=SMOL_IMAGE_ID)


@pytest.fixture(scope="module")
def smol_tok():
    from vlmjax.data.assets import smollm2_tokenizer

    return smollm2_tokenizer()


def test_greedy_matches_uncached_reference_with_images():
    model = tiny_vlm()
    T, I = model.cfg.tokens_per_image, 95
    prompts = [[1, 2] + [I] * T + [3, 4, 5],  # one image
               [7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20],  # text only, longest
               [1] + [I] * T + [9] + [I] * T + [4]]  # two images
    px = np.random.default_rng(0).normal(size=(4, 16, 16, 3)).astype(np.float32)
    rows = np.array([0, 2, 2, -1], np.int32)  # 3 images + a padding slot
    per_row = {0: px[[0]], 2: px[[1, 2]]}
    refs = [greedy_generate(model, p, max_new_tokens=12, eos_token_ids=[I], pixel_values=per_row.get(i))
            for i, p in enumerate(prompts)]
    out = generate(model, prompts, GenerationConfig(max_new_tokens=12, eos_token_ids=(I,)), pixel_values=px,
                   image_rows=rows)
    assert [o.tokens for o in out] == refs
    assert [o.finish_reason for o in out] == ["eos" if len(r) < 12 else "length" for r in refs]
    # (the image id stays an EOS: the reference loop would splice features at a generated placeholder)
    eos = refs[0][len(refs[0]) // 2]  # a token row 0 emits: it must stop there, other rows only where they emit it
    refs_eos = [greedy_generate(model, p, max_new_tokens=12, eos_token_ids=[I, eos], pixel_values=per_row.get(i))
                for i, p in enumerate(prompts)]
    out = generate(model, prompts, GenerationConfig(max_new_tokens=12, eos_token_ids=(I, eos)), pixel_values=px,
                   image_rows=rows)
    assert [o.tokens for o in out] == refs_eos
    assert out[0].finish_reason == "eos" and out[0].tokens == refs[0][: refs[0].index(eos)]


def test_left_padded_batch_matches_single_prompt_runs():
    model = tiny_llm()
    rng = np.random.default_rng(1)
    lens = [3, 9, 1, 6]
    prompts = [rng.integers(1, 96, n).tolist() for n in lens]
    s = max(lens)
    ids = np.zeros((4, s), np.int32)
    mask = np.zeros((4, s), np.int32)
    for r, p in enumerate(prompts):  # HF-style left padding
        ids[r, s - len(p):], mask[r, s - len(p):] = p, 1
    assert unpad_left(ids, mask) == prompts
    out = generate(model, unpad_left(ids, mask), GenerationConfig(max_new_tokens=10, pad_to=8), batch_size=6)
    assert [o.tokens for o in out] == [greedy_generate(model, p, max_new_tokens=10) for p in prompts]


def test_min_new_tokens_blocks_eos_then_allows_it():
    model = tiny_llm()
    prompts = [[3, 4, 5], [9, 8, 7, 6]]
    free = generate(model, prompts, GenerationConfig(max_new_tokens=8))
    first = [o.tokens[0] for o in free]
    # make each row's greedy first token an EOS: unconstrained it stops at once; min_new_tokens=3 forbids that
    eos = tuple(sorted(set(first)))
    stopped = generate(model, prompts, GenerationConfig(max_new_tokens=8, eos_token_ids=eos))
    assert all(o.tokens == [] and o.finish_reason == "eos" for o in stopped)
    held = generate(model, prompts, GenerationConfig(max_new_tokens=8, eos_token_ids=eos, min_new_tokens=3))
    for o in held:
        assert len(o.tokens) >= 3 and not set(o.tokens[:3]) & set(eos)
        assert o.finish_reason == "eos" or len(o.tokens) == 8


def test_sampling_reproducible_topk1_greedy_and_batch_independent():
    model = tiny_llm()
    prompts = [[3, 4, 5], [9, 8, 7, 6, 5, 4], [11]]
    greedy = [o.tokens for o in generate(model, prompts, GenerationConfig(max_new_tokens=12))]
    hot = GenerationConfig(max_new_tokens=12, sampling=SamplingConfig(temperature=1.5), seed=7)
    a = [o.tokens for o in generate(model, prompts, hot, row_seeds=[10, 11, 12])]
    b = [o.tokens for o in generate(model, prompts, hot, row_seeds=[10, 11, 12])]
    assert a == b
    assert a != greedy  # temperature 1.5 over 96 tokens: 36 greedy-identical draws are essentially impossible
    other_seed = [o.tokens for o in generate(model, prompts, GenerationConfig(
        max_new_tokens=12, sampling=SamplingConfig(temperature=1.5), seed=8), row_seeds=[10, 11, 12])]
    assert other_seed != a
    # a row's stream depends on (seed, row seed) only: same sample alone or elsewhere in another batch
    alone = generate(model, [prompts[1]], hot, row_seeds=[11], batch_size=3)[0].tokens  # 2 padding rows
    moved = generate(model, [prompts[2], prompts[0], prompts[1]], hot, row_seeds=[12, 10, 11])
    assert alone == a[1] and [o.tokens for o in moved] == [a[2], a[0], a[1]]
    top1 = GenerationConfig(max_new_tokens=12, sampling=SamplingConfig(temperature=2.0, top_k=1, top_p=0.9), seed=3)
    assert [o.tokens for o in generate(model, prompts, top1)] == greedy


def test_top_k_top_p_filter_the_right_tokens():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.log(probs)[None].repeat(4000, 0), jnp.float32)
    keys = row_keys(jax.random.key(0), jnp.arange(4000))
    draws = np.asarray(sample(logits, SamplingConfig(temperature=1.0), keys, 0))
    freq = np.bincount(draws, minlength=4) / 4000
    np.testing.assert_allclose(freq, probs, atol=0.03)
    # top_p 0.6: {0.5, 0.3} covers it (0.5 alone does not) -> renormalised 5/8, 3/8
    draws = np.asarray(sample(logits, SamplingConfig(temperature=1.0, top_p=0.6), keys, 0))
    assert set(draws.tolist()) == {0, 1}
    np.testing.assert_allclose(np.mean(draws == 0), 5 / 8, atol=0.03)
    draws = np.asarray(sample(logits, SamplingConfig(temperature=1.0, top_k=3), keys, 1))
    assert set(draws.tolist()) == {0, 1, 2}
    np.testing.assert_allclose(np.bincount(draws, minlength=3)[:3] / 4000, probs[:3] / 0.95, atol=0.03)


def test_sampler_pieces_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(64, 300)).astype(np.float32)  # many ties: the first maximum wins
    np.testing.assert_array_equal(np.asarray(argmax_first(jnp.asarray(x))), np.argmax(x, axis=-1))
    # nucleus: numpy's sort-based definition (shortest best-first prefix with mass >= p, ties of its last kept)
    p = rng.dirichlet(np.full(700, 0.3), size=40).astype(np.float32)
    for top_p in (0.05, 0.5, 0.9, 0.99):
        keep = np.asarray(top_p_keep(jnp.asarray(p), top_p))
        for row, k in zip(p, keep):  # the definition, in fp64, up to fp32 rounding of the masses (1e-5)
            row = row.astype(np.float64)
            assert k.any() and row[k].min() >= row[~k].max(initial=0)  # a best-first set, ties kept
            smallest = row[k].min()
            assert row[k].sum() >= top_p - 1e-5 and row[row > smallest].sum() < top_p + 1e-5  # reaches p, shortest
    # inverse CDF on a grid of u: index i gets u-mass w_i / total (+- one grid point), zero weights never;
    # 1000 = 3 full blocks of 256 + a padded one
    w = rng.random(1000).astype(np.float32) * (rng.random(1000) > 0.3)
    grid = (np.arange(20000) + 0.5) / 20000
    picks = np.asarray(inverse_cdf(jnp.asarray(np.broadcast_to(w, (len(grid), 1000))), jnp.asarray(grid, jnp.float32)))
    counts = np.bincount(picks, minlength=1000)
    assert counts[w == 0].sum() == 0
    np.testing.assert_allclose(counts / len(grid), w / w.sum(), atol=1.5 / len(grid))


def test_stop_strings_cut_text_and_stop_the_row(smol_tok):
    model = smol_vlm()
    prompts = [smol_tok("Hello there, how are you?")["input_ids"], smol_tok("Name a colour.")["input_ids"]]
    cfg = GenerationConfig(max_new_tokens=24, sampling=SamplingConfig(temperature=1.0), seed=0)
    base = generate(model, prompts, cfg, tokenizer=smol_tok)
    text = base[0].text
    stop = next(text[i: i + 3] for i in range(len(text) // 2, len(text) - 3) if text.find(text[i: i + 3]) == i
                and text[i: i + 3].strip())
    out = generate(model, prompts, dataclasses.replace(cfg, stop_strings=(stop,), chunk_steps=4), tokenizer=smol_tok)
    assert out[0].finish_reason == "stop"
    assert out[0].text == text[: text.find(stop)]
    assert out[0].tokens == base[0].tokens[: len(out[0].tokens)] and len(out[0].tokens) < 24
    assert stop in smol_tok.decode(out[0].tokens) and stop not in smol_tok.decode(out[0].tokens[:-1])
    if stop not in base[1].text:
        assert out[1].tokens == base[1].tokens and out[1].finish_reason == "length"


def _write_dataset(root, n=6):
    from PIL import Image

    os.makedirs(root / "imgs" / "sub", exist_ok=True)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        rel = f"sub/{i}.png" if i % 2 else f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (20 + i, 24, 3), dtype=np.uint8)).save(root / "imgs" / rel)
        recs.append({"id": f"s{i}", "image": rel, "conversations": [
            {"from": "human", "value": f"<image>\nWhat is in picture {i}?"}, {"from": "gpt", "value": "Stuff."}]})
    recs.append({"id": "text_only", "conversations": [{"from": "human", "value": "Say something."}]})
    recs.append({"id": "broken", "image": "missing.png", "conversations": [{"from": "human", "value": "Hi?"}]})
    recs.append(dict(recs[0]))  # a repeated id: every sample is then keyed by its row
    (root / "data.json").write_text(json.dumps(recs))
    return root / "data.json", root / "imgs"


def test_dataset_generation_resumes_after_a_crash(tmp_path, smol_tok):
    from vlmjax.generate import generate_dataset, llava_requests
    from vlmjax.generate.jsonl import read_jsonl

    model = smol_vlm()
    data, imgs = _write_dataset(tmp_path)
    reqs = llava_requests(data, imgs)
    cfg = GenerationConfig(max_new_tokens=6, sampling=SamplingConfig(temperature=1.0), seed=1)
    full = tmp_path / "full.jsonl"
    stats = generate_dataset(model, smol_tok, reqs, full, cfg, batch_size=3, progress=False)
    assert {k: stats[k] for k in ("requests", "written", "failed", "skipped_done", "previous_errors")} == \
        {"requests": 9, "written": 8, "failed": 1, "skipped_done": 0, "previous_errors": 0}
    assert stats["out"] == stats["merged"] == str(full)
    ref = read_jsonl(full)
    assert sorted(ref) == sorted(f"row:{i}" for i in range(9))  # "s0" repeats: no sample is dropped
    assert [ref[f"row:{i}"]["sample_id"] for i in (0, 6, 7, 8)] == ["s0", "text_only", "broken", "s0"]
    assert "image file not found" in ref["row:7"]["error"] and "output" not in ref["row:7"]
    assert ref["row:3"]["image"] == "sub/3.png" and ref["row:3"]["prompt"] == "<image>\nWhat is in picture 3?"
    # crash: two complete batches minus one record, and a torn half line
    lines = full.read_text().splitlines(keepends=True)
    part = tmp_path / "part.jsonl"
    part.write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    stats = generate_dataset(model, smol_tok, reqs, part, cfg, batch_size=3, progress=False)
    assert (stats["written"], stats["failed"], stats["skipped_done"]) == (3, 1, 5)
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(ref)  # every key exactly once
    assert {r["id"]: r.get("output") for r in rows} == {k: v.get("output") for k, v in ref.items()}  # seed = f(key)
    # the failed sample is on disk as an error record: counted, not retried ...
    stats = generate_dataset(model, smol_tok, reqs, part, cfg, progress=False)
    assert (stats["written"], stats["failed"], stats["previous_errors"], stats["skipped_done"]) == (0, 0, 1, 8)
    # ... unless asked: then it is tried again and its old record replaced, not duplicated
    stats = generate_dataset(model, smol_tok, reqs, part, cfg, progress=False, retry_errors=True)
    assert (stats["written"], stats["failed"], stats["previous_errors"]) == (0, 1, 0)
    rows = [json.loads(line) for line in part.read_text().splitlines()]
    assert len(rows) == 9 and sum("error" in r for r in rows) == 1


def test_sample_keys_never_drop_a_repeated_id():
    from vlmjax.generate import Request, sample_keys

    reqs = [Request(i, []) for i in ("a", "b", "c")]
    assert sample_keys(reqs) == ["a", "b", "c"]
    reqs = [Request("x", [], meta={"source": "coco"}), Request("y", [], meta={"source": "coco"}),
            Request("x", [], meta={"source": "ocr"}), Request("x", [])]
    assert sample_keys(reqs) == ["coco:0", "coco:1", "ocr:0", "row:0"]


def test_generation_shards_merge_to_the_single_host_output(tmp_path, smol_tok):
    from vlmjax.generate import generate_dataset, llava_requests, merge_shards, sample_keys, shard_paths
    from vlmjax.generate.jsonl import read_jsonl
    from vlmjax.generate.shards import IncompleteShards

    model = smol_vlm()
    data, imgs = _write_dataset(tmp_path)
    reqs = llava_requests(data, imgs)
    cfg = GenerationConfig(max_new_tokens=6, sampling=SamplingConfig(temperature=1.0), seed=1)
    single = tmp_path / "single.jsonl"
    generate_dataset(model, smol_tok, reqs, single, cfg, batch_size=3, progress=False, shard_index=0, shard_count=1)
    out = tmp_path / "out.jsonl"
    paths = shard_paths(out, 2)
    st = generate_dataset(model, smol_tok, reqs, out, cfg, batch_size=3, progress=False, shard_index=1,
                          shard_count=2)
    assert st["out"] == paths[1] and st["merged"] is None and st["requests"] == 4  # separate jobs: caller merges
    with pytest.raises(IncompleteShards, match="does not exist"):
        merge_shards(paths, out, ids=sample_keys(reqs))
    generate_dataset(model, smol_tok, reqs, out, cfg, batch_size=3, progress=False, shard_index=0, shard_count=2)
    assert merge_shards(paths, out, ids=sample_keys(reqs)) == {"records": 9, "errors": 1, "out": str(out)}
    merged = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in merged] == sample_keys(reqs)  # input order
    assert {r["id"]: r for r in merged} == read_jsonl(single)  # the single-host records, outputs included
    # the merge refuses to lose or double a sample, and writes nothing then
    lines = open(paths[0]).read().splitlines(keepends=True)
    with open(paths[0], "w") as f:
        f.writelines(lines[1:])
    with pytest.raises(IncompleteShards, match="1 of 9 ids are missing.*'row:0'"):
        merge_shards(paths, tmp_path / "m.jsonl", ids=sample_keys(reqs))
    with open(paths[0], "a") as f:
        f.write(open(paths[1]).readline())
    with pytest.raises(ValueError, match="more than once across shards"):
        merge_shards(paths, tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()
    with pytest.raises(ValueError, match="not expected"):
        merge_shards(paths[1:], tmp_path / "m.jsonl", ids=["row:0"])


def test_cli_on_a_folder_of_images_from_an_hf_llava_folder(tmp_path, smol_tok):
    from vlmjax.convert import hf
    from vlmjax.generate.__main__ import main

    hf.save_vlm(smol_vlm(), tmp_path / "model", tokenizer=smol_tok)
    _, imgs = _write_dataset(tmp_path, n=3)
    out = tmp_path / "o.jsonl"
    args = ["--model", str(tmp_path / "model"), "--image-folder", str(imgs), "--prompt", "Describe the image.",
            "--out", str(out), "--max-new-tokens", "4", "--batch-size", "2"]
    assert main(args) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["0.png", "2.png", "sub/1.png"]
    assert all(r["finish_reason"] in ("eos", "length") and r["num_tokens"] <= 4 for r in rows)


SHARDED = textwrap.dedent("""
    import json, jax, numpy as np
    from flax import nnx
    from vlmjax import sharding as shd
    from vlmjax.generate import GenerationConfig, SamplingConfig, generate
    from vlmjax.models.config import LLMConfig
    from vlmjax.models.llm import LLM
    cfg = LLMConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
    prompts = [list(range(1, 2 + 3 * i)) for i in range(6)]
    gc = GenerationConfig(max_new_tokens=8, sampling=SamplingConfig(temperature=1.0, top_k=20), seed=5)
    with jax.default_device(jax.devices()[0]):
        ref = [o.tokens for o in generate(LLM(cfg, rngs=nnx.Rngs(0)), prompts, gc)]
    out = {}
    for name, axes in {"dp_tp": (2, 1, 2)}.items():
        mesh = shd.make_mesh(*axes)
        model = shd.shard_module(LLM(cfg, rngs=nnx.Rngs(0)), mesh)
        out[name] = [o.tokens for o in generate(model, prompts, gc, mesh=mesh)] == ref
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_generation_on_a_mesh_equals_single_device():
    xla_flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"  # keeps conftest's flags
    env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"dp_tp": True}


def test_split_layer_cache_follows_the_weights():
    """The unrolled decode's per-layer weight copies are reused for the same arrays and dropped with them."""
    import gc

    from flax import nnx

    from vlmjax.generate import engine
    from vlmjax.models.llm import LLM
    from vlmjax.models.config import LLMConfig

    model = LLM(LLMConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=2,
                          num_kv_heads=1), rngs=nnx.Rngs(0))
    a = engine._layer_states(model, False)
    assert engine._layer_states(model, False) is a and len(a) == 2
    np.testing.assert_array_equal(np.asarray(a[1][0]["mlp"]["up_proj"]["kernel"][...]),
                                  np.asarray(model.layers.mlp.up_proj.kernel[...])[1])
    model.layers.mlp.up_proj.kernel.value = model.layers.mlp.up_proj.kernel[...] + 1.0  # old array freed
    gc.collect()
    assert not engine._SPLIT
    b = engine._layer_states(model, False)
    assert b is not a
    np.testing.assert_array_equal(np.asarray(b[0][0]["mlp"]["up_proj"]["kernel"][...]),
                                  np.asarray(model.layers.mlp.up_proj.kernel[...])[0])
    fused = engine._layer_states(model, True)  # asking for the other form re-splits
    assert fused is not b and fused[0][1] is not None and b[0][1] is None


def test_fused_projections_generate_what_the_separate_ones_do():
    """q|k|v and gate|up as one matmul each (with Qwen2-style q/k/v biases): same logits, same greedy tokens.
    With LoRA adapters on those projections the split falls back to separate kernels."""
    from vlmjax.models.lora import add_lora

    cfg = LLMConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                    attention_bias=True)
    model = random_model(lambda: LLM(cfg, rngs=nnx.Rngs(0)), seed=3)
    prompts = [[5, 9, 17, 3, 44], [7, 2]]
    runs = {f: generate(model, prompts, GenerationConfig(max_new_tokens=12, fuse_projections=f)) for f in (False, True)}
    assert [g.tokens for g in runs[True]] == [g.tokens for g in runs[False]]
    plain, fused = model.split_layers(), model.split_layers(fuse=True)
    assert plain[0][1] is None and set(fused[0][1]) == {"qkv", "qkv_bias", "gate_up"}
    assert fused[0][1]["qkv"].shape == (32, (4 + 2 + 2) * 8) and fused[0][0]["mlp"]["up_proj"]["kernel"][...].size == 0
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 32)), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(5), (2, 5))
    outs = [model.hidden_states_cached(x, pos, model.init_cache(2, 8), jnp.zeros(2, jnp.int32), prefill=True,
                                       layer_states=ls)[0] for ls in (plain, fused)]
    np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), atol=1e-5, rtol=1e-5)
    add_lora(model, rank=2, alpha=4.0, targets="q_proj", seed=0)
    assert model.split_layers(fuse=True)[0][1] is None
