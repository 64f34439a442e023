"""VILA recipe: raw MMC4 / COYO / FLAN -> our formats (prepare), the interleaved format's VILA semantics through
tokenising and packing, the three-stage configs and scripts/vila.sh."""

import copy
import json
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmjax.data.formats import parse_interleaved, parse_llava, parse_caption
from vlmjax.recipes.vila import prepare

ROOT = Path(__file__).resolve().parents[1]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture
def mmc4(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (8, 8), (200, 10, 10)).save(images / name)
    (images / "broken.png").write_bytes(b"not a png")
    docs = [
        {"url": "u0", "text_list": ["Intro with <image> tag.", "Second.", "Third."], "image_info": [
            {"image_name": "b.png", "matched_text_index": 2, "matched_sim": 0.31},
            {"image_name": "a.png", "matched_text_index": 0, "matched_sim": 0.27},
            {"image_name": "c.png", "matched_text_index": 9, "matched_sim": 0.40}]},  # out of range: dropped
        {"url": "u1", "text_list": ["All images fail."], "image_info": [
            {"image_name": "missing.png", "matched_text_index": 0, "matched_sim": 0.3},
            {"image_name": "broken.png", "matched_text_index": 0, "matched_sim": 0.3}]},
        {"url": "u2", "text_list": ["", " "], "image_info": [{"image_name": "a.png", "matched_text_index": 0}]},
    ]
    return write_jsonl(tmp_path / "docs.jsonl", docs), str(images)


def test_prepare_mmc4_keeps_matched_sim_escapes_and_reports(mmc4, tmp_path):
    src, images = mmc4
    out = str(tmp_path / "out" / "mmc4.jsonl")
    report = prepare.main(["mmc4", "--in", src, "--out", out, "--images", images])
    docs = read_jsonl(out)
    assert [d["id"] for d in docs] == ["u0"]
    assert docs[0]["text_list"][0] == "Intro with <IMAGE> tag."
    assert docs[0]["image_info"] == [{"image_name": "b.png", "matched_text_index": 2, "matched_sim": 0.31},
                                     {"image_name": "a.png", "matched_text_index": 0, "matched_sim": 0.27}]
    assert report["records_in"] == 3 and report["records_out"] == 1
    assert report["counts"] == {"escaped_image_tag": 1, "matched_text_index_out_of_range": 1, "image_missing": 1,
                                "image_unreadable": 1, "doc_all_images_failed": 1, "no_text": 1}
    assert report["first_example"]["doc_all_images_failed"] == f"{src}:2"
    assert json.loads(Path(out + ".report.json").read_text()) == report
    ex = parse_interleaved(docs[0])  # the trainer reads it: images in document order, the escape is text
    assert ex.images == ["a.png", "b.png"]
    assert ex.messages[0]["content"] == "<image>Intro with <IMAGE> tag. Second. <image>Third."


def test_prepare_coyo_keeps_top_clip_scores_in_input_order(tmp_path):
    recs = [{"id": i, "url": f"u{i}", "text": f"cap {i}", "key": f"{i:05d}", "clip_similarity_vitl14": s}
            for i, s in enumerate([0.2, 0.5, 0.3, 0.5, 0.1])]
    recs[3]["text"] = "cap <image> 3"
    recs += [{"id": 5, "text": "no score", "key": "x"}, {"id": 6, "text": " ", "key": "y", "clip_similarity_vitl14": 1},
             {"id": 7, "text": "nan", "key": "z", "clip_similarity_vitl14": float("nan")},
             {"id": 8, "text": "low <image>", "key": "w", "clip_similarity_vitl14": 0.0}]  # escaped only if kept
    src, out = write_jsonl(tmp_path / "coyo.jsonl", recs), str(tmp_path / "pairs.jsonl")
    report = prepare.main(["coyo", "--in", src, "--out", out, "--top", "3"])
    pairs = read_jsonl(out)
    assert [p["id"] for p in pairs] == ["1", "2", "3"]  # top 3 by score (ties: both 0.5 kept), input order
    assert pairs[0] == {"id": "1", "image": "00001.jpg", "caption": "cap 1", "url": "u1"}  # img2dataset KEY.jpg
    assert pairs[2]["caption"] == "cap <IMAGE> 3"
    assert report["records_in"] == 9 and report["records_out"] == 3
    assert report["counts"] == {"below_top_clip_score": 3, "no_clip_score": 2, "empty_caption": 1,
                                "escaped_image_tag": 1}
    assert parse_caption(pairs[0]).images == ["00001.jpg"]
    prepare.main(["coyo", "--in", src, "--out", out, "--top", "1"])
    assert [p["id"] for p in read_jsonl(out)] == ["1"]  # a tie at the cut (#1, #3 at 0.5) goes to the earlier
    report = prepare.main(["coyo", "--in", src, "--out", out, "--top", "1", "--score-key", "id"])
    assert [p["id"] for p in read_jsonl(out)] == ["8"]  # ranked by the given key
    assert prepare.main(["coyo", "--in", src, "--out", out])["records_out"] == 6  # no --top: every usable pair


def test_prepare_flan_text_only_llava(tmp_path):
    recs = [{"inputs": "Q: what is <image>?", "targets": "A tag."}, {"inputs": "x", "targets": ""}]
    src, out = write_jsonl(tmp_path / "flan.jsonl", recs), str(tmp_path / "flan_out.jsonl")
    report = prepare.main(["flan", "--in", src, "--out", out])
    (rec,) = read_jsonl(out)
    assert rec["conversations"] == [{"from": "human", "value": "Q: what is <IMAGE>?"},
                                    {"from": "gpt", "value": "A tag."}]
    assert report["counts"] == {"escaped_image_tag": 1, "empty_inputs_or_targets": 1}
    ex = parse_llava(rec)
    assert ex.images == [] and ex.messages[1]["content"] == "A tag."


def test_prepare_names_the_bad_line(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"inputs": "a", "targets": "b"}\n{oops\n')
    with pytest.raises(ValueError, match=re.escape(f"{src}:2")):
        prepare.main(["flan", "--in", str(src), "--out", str(tmp_path / "o.jsonl")])
    assert not (tmp_path / "o.jsonl").exists()


def test_interleaved_escapes_raw_image_tags_and_never_mutates_the_record():
    """VILA's LazyMMC4Dataset edits the cached record in place (placeholders pile up on re-reads and its escape
    turns them into literal text); a raw "<image>" in web text must not pose as a placeholder."""
    record = {"id": "d", "text_list": ["See <image> here.", "Then this."], "image_info": [
        {"image_name": "y.jpg", "matched_text_index": 1}, {"image_name": "x.jpg", "matched_text_index": 0}]}
    before = copy.deepcopy(record)
    first, second = parse_interleaved(record), parse_interleaved(record)
    assert record == before
    assert first.messages == second.messages == [{"role": "assistant",
                                                  "content": "<image>See <IMAGE> here. <image>Then this."}]
    assert first.images == ["x.jpg", "y.jpg"] and first.meta["escaped_image_tags"] == 1


def test_interleaved_docs_tokenise_and_pack_as_vila_means():
    """Loss on all text (image tokens never targets), a trailing image dropped, and packing two documents never
    trains the first one's last token to predict the second one's first (VILA's repack_multimodal_data bug)."""
    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.data.packing import BatchBuilder, BatchShape, Unit
    from vlmjax.data.text import TextProcessor, TextSpec, default_image_token_id

    tok = smollm2_tokenizer()
    img = default_image_token_id(tok)
    proc = TextProcessor(tok, TextSpec(template="plain"), tokens_per_image=2, max_length=64)
    docs = [{"text_list": ["Red square.", "Blue circle."], "image_info": [
                {"image_name": "b", "matched_text_index": 1}, {"image_name": "t", "matched_text_index": 2}]},
            {"text_list": ["Green."], "image_info": [{"image_name": "g", "matched_text_index": 0}]}]
    units = []
    for doc in docs:
        ex = parse_interleaved(doc)
        enc = proc.encode(ex.messages, [1] * len(ex.images), template=ex.template, loss_on=ex.loss_on,
                          document=True)
        assert enc.num_images == 1  # doc 0's trailing image "t" is gone
        text = ~np.isin(enc.ids, [img])
        # every text token after the first is a target, including the one right after the image tokens
        assert enc.trained[1:][text[1:]].all() and not enc.trained[~text].any()
        units.append(Unit(((enc.ids, enc.trained),), np.zeros((1, 2, 2, 3), np.uint8)))
    b = BatchBuilder(BatchShape(rows=1, seq_len=64, max_images=2, image_size=2, image_token_id=img))
    assert b.add(units[0]) and b.add(units[1])
    out = b.finalize()
    n0 = len(units[0].seqs[0][0])
    assert out["segment_ids"][0, n0 - 1] == 1 and out["segment_ids"][0, n0] == 2
    assert out["loss_mask"][0, n0 - 1] == 0 and out["positions"][0, n0] == 0
    assert out["loss_mask"][0, n0 - 2] == 1  # the doc's own last prediction (its EOS) is trained


def _config(path, stage):
    from vlmjax.train.config_io import load_module

    return load_module(str(path)).get_config(stage)


@pytest.mark.parametrize("name", ["llama2_7b.py", "llama3_8b_siglip.py"])
def test_vila_stage_configs_hand_off_through_exports(name):
    path = ROOT / "configs" / "vila" / name
    align, pretrain, sft = (_config(path, s) for s in ("align", "pretrain", "sft"))
    assert align.model.init == "assemble" and align.train.trainable == ("^projector/",)
    assert pretrain.model.path == align.export_dir == "runs/vila/align/export"
    assert sft.model.path == pretrain.export_dir == "runs/vila/pretrain/export"
    assert pretrain.train.trainable == sft.train.trainable == ("^projector/", "^llm/")
    for c, lr, glob, seq in ((align, 1e-3, 256, 2048), (pretrain, 5e-5, 1024, 4096), (sft, 2e-5, 128, 4096)):
        assert (c.optim.lr, c.data.batch_size * c.train.grad_accum, c.data.seq_len) == (lr, glob, seq)
        assert (c.optim.schedule, c.optim.warmup_frac, c.optim.weight_decay) == ("cosine", 0.03, 0.0)
    assert (align.train.steps, pretrain.train.steps, sft.train.steps) == (2326, 48829, 13011)
    assert pretrain.data.sources[0]["format_options"]["max_images"] == 6
    assert align.model.projector == ("linear" if name == "llama2_7b.py" else "downsample2x2_mlp")
    with pytest.raises(ValueError, match="stages are"):
        _config(path, "stage2")


@pytest.mark.parametrize("config", ["", "configs/vila/llama3_8b_siglip.py"])
def test_vila_sh_dry_run_commands_parse_as_trainer_flags(config, tmp_path):
    """The script's exact command lines, each parsed by the trainer's own flags (keys and types checked)."""
    from absl import flags
    from ml_collections import config_flags

    env = {"PATH": "/usr/bin:/bin", "VILA_DRY_RUN": "1", "VILA_CONFIG": config} if config else \
        {"PATH": "/usr/bin:/bin", "VILA_DRY_RUN": "1"}
    cmd = "scripts/vila.sh W /ckpt/llm /ckpt/vision DATA --config.train.save_every=500"
    out = subprocess.run(shlex.split(cmd), cwd=ROOT, env=env, capture_output=True, text=True, check=True).stdout
    lines = [shlex.split(line) for line in out.strip().splitlines()]
    assert [line[4].split(":")[1] for line in lines] == ["align", "pretrain", "sft"]
    for line in lines:
        assert line[:3] == ["python", "-m", "vlmjax.train"]
        fv, argv = flags.FlagValues(), [""] + line[3:]
        cfg = config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
        flags.DEFINE_string("workdir", None, "", flag_values=fv)
        fv(argv)
        c = cfg.value
        stage = c.export_dir.split("/")[1]
        assert c.export_dir == f"W/{stage}/export" and fv.workdir == f"W/{stage}" and c.train.save_every == 500
        from vlmjax.data import SourceSpec
        specs = [SourceSpec(**s) for s in c.data.to_dict()["sources"]]  # dicts, not strings; known fields
        assert all(s.path.startswith("DATA/") for s in specs)
        if stage == "align":
            assert (c.model.llm, c.model.vision) == ("/ckpt/llm", "/ckpt/vision")
        else:
            assert c.model.path == f"W/{'align' if stage == 'pretrain' else 'pretrain'}/export"
        if stage == "pretrain":
            assert [s["format"] for s in c.data.sources] == ["interleaved", "caption"]


def test_readme_vila_commands_run_verbatim(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## VILA (vlmjax/recipes/vila"):]
    section = section[:section.index("\n## ", 5)]
    cmds = [line.strip() for line in section.splitlines() if line.startswith("    ") and
            ("vlmjax.recipes.vila.prepare" in line or "scripts/vila.sh" in line)]
    assert len(cmds) == 4
    raw, images = tmp_path / "raw", tmp_path / "data" / "mmc4" / "images"
    raw.mkdir()
    images.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "a.png")
    info = [{"image_name": "a.png", "matched_text_index": 1, "matched_sim": 0.3}]
    write_jsonl(raw / "mmc4.jsonl", [{"url": "u", "text_list": ["Hi.", "There."], "image_info": info}])
    write_jsonl(raw / "coyo.jsonl", [{"id": i, "text": f"c{i}", "key": str(i), "clip_similarity_vitl14": i / 10}
                                     for i in range(4)])
    write_jsonl(raw / "flan.jsonl", [{"inputs": "1+1?", "targets": "2"}])
    monkeypatch.chdir(tmp_path)
    for cmd in cmds[:3]:
        argv = shlex.split(cmd)
        assert argv[:3] == ["python", "-m", "vlmjax.recipes.vila.prepare"]
        prepare.main(argv[3:])
    assert len(read_jsonl("data/mmc4/docs.jsonl")) == 1 and len(read_jsonl("data/flan/flan_1m.jsonl")) == 1
    assert [p["id"] for p in read_jsonl("data/coyo/pairs.jsonl")] == ["2", "3"]
    out = subprocess.run(["bash", "-c", cmds[3]], cwd=ROOT, capture_output=True,
                         text=True, check=True, env={"PATH": "/usr/bin:/bin"}).stdout
    assert out.count("python -m vlmjax.train") == 3 and "runs/vila/sft/export" in out
