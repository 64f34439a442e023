"""Finished slot-steps from output lengths (`generate/slot_waste.py`): hand-worked schedules, and the engines' own
on-device counts on a tiny random model (static batches and continuous slots, two refill thresholds)."""

import dataclasses

import numpy as np
import pytest

from test_generate import tiny_llm
from vlmjax.generate import GenerationConfig, SamplingConfig, generate
from vlmjax.generate.continuous import Prompt, generate_continuous
from vlmjax.generate.slot_waste import continuous_slot_stats, sampled_tokens, static_slot_stats


def test_static_hand_example():
    # batch [3, 5]: 4 decode steps, the 3-token row idles 2; batch [2, pad]: 1 step, the padding row idles 1
    assert static_slot_stats([3, 5, 2], 2) == {"slot_steps": 10, "finished_slot_steps": 3, "finished_fraction": 0.3}
    assert static_slot_stats([4], 1)["finished_slot_steps"] == 0
    assert static_slot_stats([1, 1], 2)["slot_steps"] == 0  # both done at the prefill: no decode step


def test_continuous_hand_example():
    # slots 2, refill after 1 free: [3, 5] admitted (first tokens from the prefill); decode step 2 ends the 3;
    # the 2 takes its slot and ends at step 3; step 4 runs the 5 alone: 1 idle slot-step of 8
    got = continuous_slot_stats([3, 5, 2], 2, refill_at=1)
    assert got == {"slot_steps": 8, "finished_slot_steps": 1, "finished_fraction": 0.125, "slots": 2,
                   "decode_steps": 4, "prefill_calls": 2}
    # one slot: never idle; a request done at its prefill needs no decode step
    assert continuous_slot_stats([3, 1, 2], 1)["finished_slot_steps"] == 0
    assert continuous_slot_stats([3, 1, 2], 1)["decode_steps"] == 3
    # refill only when 2 of 2 are free: the static schedule of batches of 2
    got = continuous_slot_stats([3, 5, 2, 4], 2, refill_at=2)
    assert (got["slot_steps"], got["finished_slot_steps"]) == (14, 4)
    assert static_slot_stats([3, 5, 2, 4], 2)["finished_slot_steps"] == 4


def test_sampled_tokens_and_bad_input():
    assert sampled_tokens(7, "eos") == 8 and sampled_tokens(16, "length") == 16
    with pytest.raises(ValueError, match="stop"):
        sampled_tokens(3, "stop")
    with pytest.raises(ValueError, match="requests \\[1\\]"):
        static_slot_stats([2, 0], 2)
    with pytest.raises(ValueError, match="slots must be >= 1"):
        continuous_slot_stats([2], 0)


def test_counts_equal_the_engines():
    model = tiny_llm()
    rng = np.random.default_rng(6)
    prompts = [rng.integers(1, 96, n).tolist() for n in [3, 8, 1, 5, 2, 6, 4, 7, 2, 3, 5, 1, 4]]
    cfg = GenerationConfig(max_new_tokens=12, pad_to=8, eos_token_ids=(-1,), seed=11,
                           sampling=SamplingConfig(temperature=1.3, top_k=40))
    free = generate(model, prompts, cfg, batch_size=4)
    eos = tuple(sorted({o.tokens[k] for o, k in zip(free, [0, 1, 4, 8])}))  # some rows end at their first token
    cfg = dataclasses.replace(cfg, eos_token_ids=eos)
    outs, static = [], {"slot_steps": 0, "finished_slot_steps": 0}
    for i in range(0, len(prompts), 4):
        st = {}
        seeds = range(i, min(i + 4, len(prompts)))
        outs += generate(model, prompts[i: i + 4], cfg, batch_size=4, row_seeds=seeds, stats=st)
        static = {k: static[k] + st[k] for k in static}
    sampled = [sampled_tokens(len(o.tokens), o.finish_reason) for o in outs]
    assert len(set(sampled)) >= 4 and 1 in sampled
    assert {k: static_slot_stats(sampled, 4)[k] for k in static} == static
    for slots, refill_at in ((4, 1), (4, 3)):  # refill_at is traced: one compile
        st = {}
        got = generate_continuous(model, [Prompt(p) for p in prompts], cfg, slots=slots, refill_at=refill_at, stats=st)
        assert [o.tokens for o in got] == [o.tokens for o in outs]
        want = continuous_slot_stats(sampled, slots, refill_at)
        assert {k: st[k] for k in want} == want, (slots, refill_at)
