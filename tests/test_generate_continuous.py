"""Continuous batching against the static-batch engine (token for token), inference weight formats (int8 vs a
numpy reference, agreement with fp32) and the engine-owned weights, on tiny random models (fast)."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from test_generate import _write_dataset, random_model, smol_tok, smol_vlm, tiny_llm, tiny_vlm  # noqa: F401
from vlmjax.generate import GenerationConfig, SamplingConfig, generate
from vlmjax.generate.continuous import Prompt, generate_continuous
from vlmjax.models.config import LLMConfig
from vlmjax.models.llm import LLM


def _static(model, prompts, cfg, slots, **kw):
    """The static engine over consecutive batches of `slots` rows (what a dataset run does), stats summed."""
    out, total = [], {"slot_steps": 0, "finished_slot_steps": 0}
    for i in range(0, len(prompts), slots):
        st = {}
        sub = {k: v[i: i + slots] for k, v in kw.items()}
        out += generate(model, prompts[i: i + slots], cfg, batch_size=slots, stats=st, **sub)
        total = {k: total[k] + st[k] for k in total}
    return out, total


def test_greedy_equals_static_with_images_eos_limits_and_cache_growth():
    model = tiny_vlm()
    T, I = model.cfg.tokens_per_image, 95
    rng = np.random.default_rng(3)
    lens = [2, 7, 1, 4, 9, 3, 5, 2, 6]
    prompts = [rng.integers(1, 90, n).tolist() for n in lens]
    pixels = [None] * len(prompts)
    for r, k in ((0, 1), (3, 2), (5, 1), (7, 1)):  # rows with one or two images
        prompts[r] = prompts[r][:1] + [I] * T * k + prompts[r][1:]
        pixels[r] = rng.normal(size=(k, 16, 16, 3)).astype(np.float32)
    prompts.append(rng.integers(1, 90, 30).tolist())  # admitted last: does not fit the first cache, which grows
    pixels.append(None)
    # the whole list in one static batch (the static engine is batch-independent: test_generate.py)
    rows = np.concatenate([[r] * len(px) for r, px in enumerate(pixels) if px is not None]).astype(np.int32)
    kw = dict(pixel_values=np.concatenate([px for px in pixels if px is not None]), image_rows=rows)
    cfg = GenerationConfig(max_new_tokens=10, pad_to=16, cache_bucket=32, eos_token_ids=(-1,))
    free = generate(model, prompts, cfg, **kw)  # no EOS (same shapes as the run below: one compile)
    eos = tuple(sorted({o.tokens[k] for o, k in zip(free, [2, 5, 0, 7, 3])} - {I}))  # rows end at varied lengths
    cfg = dataclasses.replace(cfg, eos_token_ids=(I,) + eos)
    static = generate(model, prompts, cfg, **kw)
    st = {}
    out = generate_continuous(model, [Prompt(p, px) for p, px in zip(prompts, pixels)], cfg, slots=3, refill_at=1,
                              stats=st)
    assert [o.tokens for o in out] == [o.tokens for o in static]
    assert [o.finish_reason for o in out] == [o.finish_reason for o in static]
    assert {o.finish_reason for o in out} == {"eos", "length"} and len({len(o.tokens) for o in out}) >= 4
    assert st["slot_steps"] == 3 * st["decode_steps"] and st["prefill_calls"] > 3
    assert st["cache_len"] == 64  # started at 32 (prompt bucket 16 + 10 new), grown for the 30-token prompt


def test_seeded_sampling_equals_static_and_fewer_finished_slot_steps():
    model = tiny_llm()
    rng = np.random.default_rng(6)  # draws whose EOS picks below give varied lengths (2-12)
    prompts = [rng.integers(1, 96, n).tolist() for n in [3, 8, 1, 5, 2, 6, 4, 7, 2, 3, 5, 1]]
    seeds = [int(s) for s in rng.integers(0, 2**31, len(prompts))]
    cfg = GenerationConfig(max_new_tokens=12, pad_to=8, eos_token_ids=(-1,), min_new_tokens=1, seed=11,
                           sampling=SamplingConfig(temperature=1.3, top_k=40))
    free = _static(model, prompts, cfg, 4, row_seeds=seeds)[0]  # no EOS (same shapes as below: one compile)
    eos = tuple(sorted({o.tokens[k] for o, k in zip(free, [1, 4, 8])}))
    cfg = dataclasses.replace(cfg, eos_token_ids=eos)
    static, before = _static(model, prompts, cfg, 4, row_seeds=seeds)
    after = {}
    out = generate_continuous(model, [Prompt(p, seed=s) for p, s in zip(prompts, seeds)], cfg, slots=4,
                              refill_at=1, stats=after)
    assert [o.tokens for o in out] == [o.tokens for o in static]
    assert [o.finish_reason for o in out] == [o.finish_reason for o in static]
    assert len({len(o.tokens) for o in out}) >= 3  # varied lengths: the static batches idle, refilled slots do not
    print("finished slot-step fraction: static", before, "continuous", after)
    assert after["finished_slot_steps"] < before["finished_slot_steps"]
    assert after["finished_fraction"] < before["finished_slot_steps"] / before["slot_steps"]


def test_dataset_with_slots_writes_what_static_batches_write(tmp_path, smol_tok):  # noqa: F811
    from vlmjax.generate import generate_dataset, llava_requests
    from vlmjax.generate.jsonl import read_jsonl

    model = smol_vlm()
    data, imgs = _write_dataset(tmp_path)
    reqs = llava_requests(data, imgs)
    cfg = GenerationConfig(max_new_tokens=6, sampling=SamplingConfig(temperature=1.0), seed=1)
    before, after = {}, {}
    stats = generate_dataset(model, smol_tok, reqs, tmp_path / "static.jsonl", cfg, batch_size=3, progress=False,
                             stats=before)
    cont = tmp_path / "cont.jsonl"
    counts = generate_dataset(model, smol_tok, reqs, cont, dataclasses.replace(cfg, slots=2), progress=False,
                              stats=after)
    paths = ("out", "merged")
    assert {k: v for k, v in counts.items() if k not in paths} == {k: v for k, v in stats.items() if k not in paths}
    # 3 static batches of 3 rows (the last padded): 5 decode steps each
    assert before == {"slot_steps": 45, "finished_slot_steps": before["finished_slot_steps"],
                      "finished_fraction": before["finished_slot_steps"] / 45}
    assert after["slots"] == 2 and after["slot_steps"] == 2 * after["decode_steps"]
    ref, got = read_jsonl(tmp_path / "static.jsonl"), read_jsonl(cont)
    broken = next(r for r in got.values() if r.get("sample_id") == "broken")  # ids repeat: keyed by row
    assert got == ref and "error" in broken
    assert len(cont.read_text().splitlines()) == len(ref)  # every id once
    assert generate_dataset(model, smol_tok, reqs, cont, dataclasses.replace(cfg, slots=2),
                            progress=False)["written"] == 0


def test_int8_kernels_match_a_numpy_reference():
    from vlmjax.generate.quant import convert_layer_states, dequantize, int8_reference, kernel_inputs, weight_bytes

    model = tiny_llm()
    n_in = kernel_inputs(model.layers)
    assert n_in[("self_attn", "o_proj")] == 2 and n_in[("mlp", "up_proj")] == 1
    for fuse in (False, True):
        split = model.split_layers(fuse=fuse)
        q = convert_layer_states(split, "int8", n_in)
        deq = dequantize(q)
        stacked = nnx.state(model.layers)
        for name, n in n_in.items():
            got = np.asarray(deq[1][0][name[0]][name[1]]["kernel"][...])
            if got.size == 0:  # fused away: checked through the fused kernel below
                continue
            want = int8_reference(np.asarray(stacked[name[0]][name[1]]["kernel"][...])[1], n)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        if fuse:
            w = np.asarray(split[2][1]["gate_up"])
            np.testing.assert_allclose(np.asarray(deq[2][1]["gate_up"]), int8_reference(w, 1), rtol=1e-6, atol=1e-7)
            assert q[2][1]["gate_up"].q.dtype == jnp.int8 and q[2][1]["gate_up"].scale.shape == (1, w.shape[1])
        # about a quarter of the bytes (scales: one float per output channel)
        assert weight_bytes(q) < 0.3 * weight_bytes(split)


@pytest.mark.parametrize("fmt,logit_tol", [("bfloat16", 0.05), ("int8", 0.08)])
def test_weight_formats_agree_with_float32(fmt, logit_tol):
    """Teacher-forced over fp32's greedy continuations: logits within `logit_tol` of fp32 (max abs error over
    every valid position and the vocabulary, relative to the largest |logit|) and the same argmax at >= 90% of
    the continuation positions. Generating with the format keeps every row's first token."""
    from vlmjax.generate import engine

    model = tiny_llm(seed=4)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 96, n).tolist() for n in [5, 9, 3, 7, 12, 4]]
    ref = generate(model, prompts, GenerationConfig(max_new_tokens=12))
    seqs = [p + r.tokens for p, r in zip(prompts, ref)]
    t = max(map(len, seqs))
    ids = np.zeros((len(seqs), t), np.int32)
    cont = np.zeros((len(seqs), t), bool)  # positions whose next-token prediction is a generated token
    for i, (p, q) in enumerate(zip(prompts, seqs)):
        ids[i, : len(q)] = q
        cont[i, len(p) - 1: len(q) - 1] = True
    x = model.embed(jnp.asarray(ids))
    pos = jnp.broadcast_to(jnp.arange(t), x.shape[:2])

    @jax.jit
    def forward(layer_states):
        h, _ = model.hidden_states_cached(x, pos, model.init_cache(len(seqs), t), jnp.zeros(len(seqs), jnp.int32),
                                          prefill=True, layer_states=engine.dequantized(layer_states))
        return model.logits(h)

    logits = {f: np.asarray(forward(engine._layer_states(model, True, f)))[cont] for f in ("float32", fmt)}
    span = np.abs(logits["float32"]).max()
    err = np.abs(logits[fmt] - logits["float32"]).max()
    assert 0 < err < logit_tol * span, (err, span)
    agree = np.mean(logits[fmt].argmax(-1) == logits["float32"].argmax(-1))
    assert agree >= 0.9, agree
    got = generate(model, prompts, GenerationConfig(max_new_tokens=12, weights=fmt))
    assert [o.tokens[0] for o in got] == [o.tokens[0] for o in ref]


def test_own_weights_drops_the_stacked_copy_and_generates_the_same():
    from vlmjax.generate import engine
    from vlmjax.generate.quant import weight_bytes

    cfg = LLMConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    attention_bias=True)  # q/k/v biases: the fused bias path too
    model = random_model(lambda: LLM(cfg, rngs=nnx.Rngs(0)), seed=2)
    prompts = [[4, 5, 6], [9, 1]]
    gc = GenerationConfig(max_new_tokens=8, weights="int8")
    ref = [o.tokens for o in generate(model, prompts, gc)]
    stacked_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.layers)))
    engine.own_weights(model, gc)
    assert sum(x.nbytes for x in jax.tree.leaves(nnx.state(model.layers))) == 0 and stacked_bytes > 0
    held = weight_bytes(engine._OWNED[model][1])  # built one stacked weight at a time (quant.split_in_place)
    assert held < 0.4 * stacked_bytes  # int8 kernels + fp32 norms: the only copy
    assert [o.tokens for o in generate(model, prompts, gc)] == ref
    assert [o.tokens for o in generate_continuous(model, [Prompt(p) for p in prompts], gc, slots=2)] == ref
    with pytest.raises(ValueError, match="handed to the engine"):
        generate(model, prompts, GenerationConfig(max_new_tokens=8))
    with pytest.raises(ValueError, match="weights='int4'"):
        GenerationConfig(weights="int4")
    assert json.dumps(engine.slot_stats(10, 4))  # plain numbers
