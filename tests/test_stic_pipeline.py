"""The whole STIC miniature (make demo's pipeline) end to end in a few steps per stage: data, tokenizer, base
training (the suite's shared tiny mini base, conftest), evaluations, pairs, DPO, infused SFT continuing the adapter,
export."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_quick_pipeline_runs_every_stage(tmp_path, tiny_mini_base):
    pytest.importorskip("torch")
    from vlmjax.recipes.stic.miniature import run

    r = run(tmp_path / "stic", quick=True, base=tiny_mini_base)
    # the shared base's conv stem has no HF form: the final model is a native folder, no transformers reload
    assert r["hf_reload_max_abs_logit_diff"] is None
    assert r["base_model"] == tiny_mini_base["model"]
    for key in ("base", "base_dar", "stage1", "stic", "stic_dar"):
        assert 0.0 <= r[key]["accuracy"] <= 1.0 and r[key]["n"] == 16
    assert "describe_both" in r["base"] and "describe_both" not in r["base_dar"]
    # the base gate is printed and recorded; a few steps of training cannot pass it
    assert r["base_gate"]["passed"] is False and "FAILED" in r["base_gate"]["lines"][0]
    stic = tmp_path / "stic" / "stic_generated"
    pairs = [json.loads(line) for line in (stic / "pairs.jsonl").read_text().splitlines()]
    assert r["pairs"]["pairs"] == len(pairs) and r["pairs"]["images"] == 12
    assert all(p["prompt"].startswith("<image>\n") and "rejected_kind" in p for p in pairs)
    kinds = r["pairs_by_kind"]
    assert set(kinds) <= {"all", "hallucination_prompt", "corruption/lowres:4", "corruption/blur:8"}
    by_kind = {k: v for k, v in kinds.items() if k != "all"}
    assert sum(k["n"] for k in by_kind.values()) == kinds["all"]["n"] <= len(pairs)
    assert all(0 <= k["identical"] <= 1 and 0 <= k["real_negative"] <= 1 for k in kinds.values())
    assert (stic / "stage1" / "trainable.safetensors").exists()
    s2 = json.loads((stic / "stage2" / "config.json").read_text())
    assert s2["model"]["load_params"].endswith("stage1/trainable.safetensors")
    infused = json.loads((stic / "infused.json").read_text())
    assert all("Image description:\n" in rec["conversations"][0]["value"] for rec in infused)
    # a rerun finds every step done and changes nothing
    again = run(tmp_path / "stic", quick=True, base=tiny_mini_base)
    assert {k: again[k] for k in ("base", "stic")} == {k: r[k] for k in ("base", "stic")}
    # the seeded report over the finished run (nothing retrained): table, real negatives, figures, results JSON
    from PIL import Image

    from vlmjax.recipes.stic.miniature import run_seeds

    rep = run_seeds(tmp_path / "stic", seeds=(0,), ablation=False, quick=True, base=tiny_mini_base)
    assert rep["rows"]["STIC (stage 1 + 2)"]["accuracy"]["mean"] == r["stic"]["accuracy"]
    assert rep["real_negative_fraction"]["generated"]["mean"] == kinds["all"]["real_negative"]
    assert "| STIC (stage 1 + 2) | 1 |" in rep["table"] and rep["gate"] == r["base_gate"]
    for path in rep["figures"].values():
        assert Image.open(path).size[0] > 0
    saved = json.loads((tmp_path / "stic" / "results" / "miniature.json").read_text())
    assert saved["seeds"] == [0] and saved["meta"]["wall_s"] >= 0 and "commit" in saved["meta"]
