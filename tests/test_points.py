"""POINTS recipe core: PPL filtering (score vs an independent forward + numpy, select's cut/ties/report, header and
bad-input checks, 2 host shards == 1) and the configs. CATTY's points rule is in test_data_image.py."""

import json
import math
import os
import shlex

import numpy as np
import pytest

from vlmjax.data.pipeline import SourceSpec
from vlmjax.recipes.points import filter as PF

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pool(tmp_path, n=6):
    from PIL import Image

    os.makedirs(tmp_path / "imgs", exist_ok=True)
    rng = np.random.default_rng(0)
    recs = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
        recs.append({"id": f"p{i}", "image": f"{i}.png", "caption": f"A teal triangle {i}.", "src": "clean"})
    recs.append({"id": "empty", "image": "0.png", "caption": "  "})
    recs.append({"id": "gone", "image": "missing.png", "caption": "A red circle."})
    with open(tmp_path / "caps.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    return recs, SourceSpec(format="caption", path=str(tmp_path / "caps.jsonl"), image_root=str(tmp_path / "imgs"))


@pytest.fixture(scope="module")
def scorer():
    from test_generate import smol_vlm

    from vlmjax.data.assets import smollm2_tokenizer

    return smollm2_tokenizer(), smol_vlm()


def _write_ppl(path, rows, head=None):
    with open(path, "w") as f:
        f.write(json.dumps(PF.header("s", "chatml") if head is None else head) + "\n")
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_select_cut_ties_and_report_on_hand_made_ppl(tmp_path):
    # 11 pairs: 9 scored (one NaN), ppl with a tie at the cut; 2 errors
    ppl = {"a": 5.0, "b": 2.0, "c": 2.0, "d": 9.0, "e": 1.5, "f": 30.0, "g": 2.0, "h": 7.0, "i": float("nan")}
    rows = [{"id": k, "perplexity": v} for k, v in ppl.items()]
    rows += [{"id": "x", "error": "BadSample: [missing_image] no file (sample 'x' in caps)"},
             {"id": "y", "error": "BadSample: [empty_conversation] empty caption (sample 'y' in caps)"}]
    recs = {r["id"]: r for r in rows}
    kept, rep = PF.select_ppl(recs, 0.2)
    # scored = 8 finite; floor(0.2 * 8) = 1 -> e
    assert [r["id"] for r in kept] == ["e"] and rep["kept"] == 1 and rep["scored"] == 8 and rep["cut"] == 1.5
    assert rep["non_finite_ppl"] == 1 and rep["failed"] == {"empty_conversation": 1, "missing_image": 1}
    kept, rep = PF.select_ppl(recs, 0.5)  # floor(4.0) = 4: e, then the 2.0 tie broken by id: b, c, g
    assert [r["id"] for r in kept] == ["e", "b", "c", "g"] and rep["cut"] == 2.0
    kept, _ = PF.select_ppl(recs, 0.3)  # floor(2.4) = 2: e, b (c and g lose the tie by id)
    assert [r["id"] for r in kept] == ["e", "b"]
    finite = np.array(sorted(v for v in ppl.values() if not math.isnan(v)))
    assert rep["quantiles"]["p50"] == pytest.approx(np.quantile(finite, 0.5))
    assert rep["quantiles"]["p0"] == 1.5 and rep["quantiles"]["p100"] == 30.0
    hist = rep["histogram"]
    assert len(hist) == 12 and sum(int(h.split()[-1]) for h in hist) == 8 and hist[0].split()[0] == "1.500"
    with pytest.raises(ValueError, match="fraction"):
        PF.select_ppl(recs, 0.0)


def test_select_refuses_mixed_headers_duplicates_and_uncovered_pools(tmp_path):
    _, spec = _pool(tmp_path, n=2)
    ids = ["p0", "p1", "empty", "gone"]
    _write_ppl(tmp_path / "m-00000-of-00002.jsonl", [{"id": "p0", "perplexity": 2.0}])
    _write_ppl(tmp_path / "m-00001-of-00002.jsonl", [{"id": "p1", "perplexity": 2.0}], PF.header("other", "chatml"))
    with pytest.raises(ValueError, match="m-00001-of-00002.jsonl: header .* differs"):
        PF.select(tmp_path / "m.jsonl", spec, tmp_path / "out")
    _write_ppl(tmp_path / "d.jsonl", [{"id": "p0", "perplexity": 2.0}, {"id": "p0", "perplexity": 3.0}])
    with pytest.raises(ValueError, match="d.jsonl:3: id 'p0' already in .*d.jsonl:2"):
        PF.select(tmp_path / "d.jsonl", spec, tmp_path / "out")
    _write_ppl(tmp_path / "u.jsonl", [{"id": i, "perplexity": 2.0} for i in ids[:3]])
    with pytest.raises(ValueError, match="1 pairs unscored \\(first \\['gone'\\]\\)"):
        PF.select(tmp_path / "u.jsonl", spec, tmp_path / "out")
    (tmp_path / "n.jsonl").write_text(json.dumps({"id": "p0", "perplexity": 1.0}) + "\n")
    with pytest.raises(ValueError, match="n.jsonl: no POINTS ppl header"):
        PF.select(tmp_path / "n.jsonl", spec, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="none.jsonl: neither the file nor host shards"):
        PF.select(tmp_path / "none.jsonl", spec, tmp_path / "out")
    _write_ppl(tmp_path / "ok.jsonl", [{"id": i, "perplexity": 2.0} for i in ids])
    with pytest.raises(ValueError, match="scored with scorer='s', expected 'tiny'"):
        PF.select(tmp_path / "ok.jsonl", spec, tmp_path / "out", expect={"scorer": "tiny"})
    assert not os.path.exists(tmp_path / "out")


README_COMMANDS = [
    "python -m vlmjax.recipes.points filter score --model scorer --data caps.jsonl --images imgs "
    "--out runs/points/ppl.jsonl --batch-size 4",
    "python -m vlmjax.recipes.points filter select --ppl runs/points/ppl.jsonl --data caps.jsonl --images imgs "
    "--out runs/points/filter --fraction 0.5 --scorer scorer",
]


def _readme_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## POINTS (vlmjax/recipes/points)")[1].split("\n## ")[0].split("\n### ")[0]
    joined = section.replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines()
            if line.strip().startswith("python -m vlmjax.recipes.points filter")]  # soup: test_points_soup.py


def test_score_ppl_is_exp_mean_nll_and_readme_commands(tmp_path, monkeypatch, scorer):
    """The README's commands, verbatim, on a tiny random scorer saved as an HF LLaVA folder; its PPL checked
    against transformers+torch on the saved folder + numpy; resume, header refusal, 2 host shards == 1 run."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    from vlmjax.convert import hf as hfconv
    from vlmjax.generate import Encoder
    from vlmjax.recipes.points.__main__ import main

    assert _readme_commands() == README_COMMANDS
    tok, model = scorer
    monkeypatch.chdir(tmp_path)
    _, spec = _pool(tmp_path)
    hfconv.save_vlm(model, "scorer", tokenizer=tok)
    st = main(shlex.split(README_COMMANDS[0])[3:] + ["--no-progress"])
    assert (st["written"], st["failed"], st["pool"]) == (6, 2, 8)
    lines = open("runs/points/ppl.jsonl").read().splitlines()
    head = json.loads(lines[0])["header"]
    assert head["scorer"] == "scorer" and head["prompt"] == "please generate a caption for this image."
    assert head["template"].startswith("hf:")  # the SmolLM2 tokenizer's chat template, by hash
    got = {r["id"]: r for r in map(json.loads, lines[1:])}
    assert "[empty_conversation]" in got["empty"]["error"] and "[missing_image]" in got["gone"]["error"]
    enc = Encoder(tok, model.cfg)
    e = enc.scored(next(r for r in PF.caption_requests(spec) if r.id == "p3"))
    ids = np.asarray(e.ids)
    text = tok.decode(ids[~np.asarray(e.target)])
    assert "please generate a caption for this image." in text and "<|im_start|>assistant" in text
    # the scored span is the caption + end-of-turn, tokenised on its own
    assert ids[e.target].tolist() == tok.encode("A teal triangle 3.<|im_end|>", add_special_tokens=False)
    hf = transformers.LlavaForConditionalGeneration.from_pretrained("scorer").eval()  # what we saved, in torch
    with torch.no_grad():
        logits = hf(input_ids=torch.from_numpy(ids[None]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                    pixel_values=torch.from_numpy(np.asarray(e.pixels).transpose(0, 3, 1, 2))).logits
    logits = logits[0].double().numpy()
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    pos = np.flatnonzero(e.target)
    nll = -logp[pos - 1, ids[pos]]
    assert got["p3"]["num_tokens"] == len(pos)
    np.testing.assert_allclose(got["p3"]["perplexity"], np.exp(nll.mean()), rtol=2e-4)
    # resumable: a rerun writes nothing; another scorer / prompt on the same file is refused
    assert main(shlex.split(README_COMMANDS[0])[3:] + ["--no-progress"])["written"] == 0
    ppl = "runs/points/ppl.jsonl"
    with pytest.raises(ValueError, match="another setup.*'scorer': \\('scorer', 'other'\\)"):
        PF.score(model, tok, spec, ppl, scorer="other", progress=False)
    with pytest.raises(ValueError, match="another setup.*prompt"):
        PF.score(model, tok, spec, ppl, scorer="scorer", prompt="Describe.", progress=False)
    with pytest.raises(ValueError, match="another setup.*'template': \\('hf:[0-9a-f]+', 'chatml'\\)"):
        PF.score(model, tok, spec, ppl, scorer="scorer", template="chatml", progress=False)
    rep = main(shlex.split(README_COMMANDS[1])[3:])
    assert rep["kept"] == 3 and rep["scored"] == 6 and rep["failed"] == {"empty_conversation": 1, "missing_image": 1}
    report = json.load(open("runs/points/filter/filter_report.json"))
    kept = [json.loads(x) for x in open("runs/points/filter/kept.jsonl")]
    assert [r["ppl"] for r in kept] == sorted(r["perplexity"] for r in got.values() if "error" not in r)[:3]
    assert kept[-1]["ppl"] == report["cut"] and kept[0]["src"] == "clean" and report["header"] == head
    with pytest.raises(ValueError, match="scored with scorer='scorer', expected 'other'"):
        main(shlex.split(README_COMMANDS[1])[3:] + ["--scorer", "other"])
    # two host shards (every 2nd pair each) hold the same scores; select merges them
    for i in range(2):  # same CLI, same folder: the compiled scorer is reused
        main(shlex.split(README_COMMANDS[0].replace("runs/points/ppl.jsonl", "two.jsonl"))[3:]
             + ["--no-progress", "--shard-index", str(i), "--shard-count", "2"])
    assert sorted(os.listdir(".")).count("two-00001-of-00002.jsonl") == 1
    PF.select("two.jsonl", spec, "sel2", fraction=0.5)
    kept2 = [json.loads(x) for x in open("sel2/kept.jsonl")]
    assert [r["id"] for r in kept2] == [r["id"] for r in kept]
    np.testing.assert_allclose([r["ppl"] for r in kept2], [r["ppl"] for r in kept], rtol=1e-5)


def test_points_config_loads_with_catty_points_tiling():
    from vlmjax.data.image import ImageSpec
    from vlmjax.models import VisionConfig, VLMConfig
    from vlmjax.train.config_io import load_module

    m = load_module(os.path.join(ROOT, "configs/points/yi9b.py"))
    pre, sft = m.get_config("pretrain"), m.get_config("sft")
    assert pre.model.projector == "pixel_shuffle_mlp" and pre.model.init == "assemble"
    assert sft.model.path == pre.export_dir and sft.train.trainable == ("^projector/", "^llm/")
    img = ImageSpec(**pre.data.image.to_dict())
    assert img.catty_rule == "points" and img.max_tiles == 8 and img.max_tiles_per_image == 9
    cfg = VLMConfig(vision=VisionConfig(), projector="pixel_shuffle_mlp")  # CLIP-L/14-336
    assert cfg.tokens_per_image == 144  # 24x24 patches -> 12x12 after the 0.25 pixel shuffle
    assert pre.data.max_images % img.max_tiles_per_image == 0
    with pytest.raises(ValueError, match="stages are"):
        m.get_config("dpo")
