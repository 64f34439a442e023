"""Offline dataset builders: easy-VQA -> LLaVA/caption/DPO files, Debian openclipart -> caption pairs."""

import io
import json
import os
import subprocess
import sys

import pytest

from vlmjax.data import easy_vqa, openclipart
from vlmjax.data.formats import parse_caption, parse_llava, parse_preference


def test_attributes_from_questions():
    assert easy_vqa.infer_attributes([("what is the blue shape?", "rectangle")]) == {"shape": "rectangle",
                                                                                   "color": "blue"}
    # Negated question answered "no" -> the colour is present; "what color is the circle?" presupposes a circle.
    assert easy_vqa.infer_attributes([("is there not a red shape?", "no"), ("what color is the circle?", "red")]) \
        == {"shape": "circle", "color": "red"}
    # Two shapes excluded leaves the third; nothing said about colour.
    assert easy_vqa.infer_attributes([("is there a circle?", "no"),
                                      ("does the image not contain a triangle?", "yes")]) == {"shape": "rectangle",
                                                                                             "color": None}
    with pytest.raises(ValueError, match="contradictory"):
        easy_vqa.infer_attributes([("is there a red shape?", "yes"), ("is no red shape present?", "yes")])


def test_easy_vqa_build(tmp_path):
    stats = easy_vqa.build(str(tmp_path), ["train"], limit=5)
    assert stats["train"]["images"] == 5
    conversations = json.loads((tmp_path / "train.json").read_text())
    first = conversations[0]
    assert first["id"] == "train_0" and first["image"] == "train/0.png"
    assert (tmp_path / "images" / "train" / "0.png").is_file()
    # Image 0 is a blue rectangle (checked by eye); its first questions are "what is the blue shape?" -> rectangle.
    assert first["conversations"][:4] == [
        {"from": "human", "value": "<image>\nDescribe the image briefly."},
        {"from": "gpt", "value": "A blue rectangle."},
        {"from": "human", "value": "What is the blue shape?"}, {"from": "gpt", "value": "Rectangle"}]
    captions = [json.loads(x) for x in (tmp_path / "train_captions.jsonl").read_text().splitlines()]
    assert captions[0]["caption"] == "A blue rectangle."
    assert captions[1]["caption"] == "The image shows a blue triangle."
    pairs = [json.loads(x) for x in (tmp_path / "train_dpo.jsonl").read_text().splitlines()]
    assert pairs[0]["chosen"] == "Rectangle" and pairs[0]["rejected"] in ("Circle", "Triangle")
    for c, cap, p in zip(conversations, captions, pairs):  # every record parses in its format
        parse_llava(c), parse_caption(cap), parse_preference(p)
        assert p["chosen"] != p["rejected"]


def test_easy_vqa_cli(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vlmjax.data.easy_vqa", "--out", str(tmp_path), "--splits", "test",
                             "--limit", "3", "--per-question"], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout)["test"]["images"] == 3
    assert "easy-vqa test" in result.stderr and "3/3" in result.stderr  # a progress bar (on stderr)
    assert sorted(os.listdir(tmp_path / "images" / "test")) == ["0.png", "1.png", "2.png"]
    assert {"test_questions.jsonl", "test_partial_captions.jsonl"} <= set(os.listdir(tmp_path))
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path))


def test_easy_vqa_per_question_records(tmp_path):
    """One LLaVA record per question with its kind and the image's attributes; partial-attribute captions."""
    stats = easy_vqa.build(str(tmp_path), ["train"], limit=5, per_question=True)["train"]
    assert not (easy_vqa.build(str(tmp_path / "b"), ["train"], limit=1)["train"].get("partial_captions"))
    rows = [json.loads(x) for x in (tmp_path / "train_questions.jsonl").read_text().splitlines()]
    assert len(rows) == stats["questions"] and len({r["id"] for r in rows}) == len(rows)
    src = easy_vqa.easy_vqa_data_dir()
    questions = json.load(open(os.path.join(src, "train", "questions.json")))
    by_image = {}
    for q, a, image_id in questions:
        by_image.setdefault(int(image_id), []).append((q, a))
    kinds = {"circle": "shape", "rectangle": "shape", "triangle": "shape", "yes": "yes_no", "no": "yes_no"}
    for r in rows:
        n, j = int(r["id"].split("_")[1]), int(r["id"].split("_q")[1])
        q, a = by_image[n][j]
        assert r["image"] == f"train/{n}.png" and r["conversations"][1]["value"].lower() == a
        assert r["kind"] == kinds.get(a, "color")
        assert {k: r[k] for k in ("color", "shape")} == easy_vqa.infer_attributes(by_image[n])
        parse_llava(r)
    first = rows[0]  # image 0: a blue rectangle (checked by eye), "what is the blue shape?" -> rectangle
    assert first["conversations"][0]["value"] == "<image>\nWhat is the blue shape?"
    assert (first["kind"], first["color"], first["shape"]) == ("shape", "blue", "rectangle")
    caps = [json.loads(x) for x in (tmp_path / "train_partial_captions.jsonl").read_text().splitlines()]
    assert [(c["id"], c["caption"], c["mentions"]) for c in caps[:3]] == [
        ("train_0_color", "A blue shape.", ["color"]), ("train_0_shape", "A rectangle.", ["shape"]),
        ("train_0_color_shape", "A blue rectangle.", ["color", "shape"])]
    for c in caps:
        parse_caption(c)
        assert c["shape"] or c["color"]
        assert all(c[m] and c[m] in c["caption"] for m in c["mentions"])
        assert all(c[m] is None or c[m] not in c["caption"] for m in ("color", "shape") if m not in c["mentions"])
    assert stats["partial_captions"] == len(caps)
    assert easy_vqa.partial_captions({"shape": None, "color": "red"}) == [(["color"], "A red shape.")]


SVG = b"""<?xml version="1.0"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>red_bicycle</dc:title>
    <dc:description>A bike</dc:description>
    <dc:subject><rdf:Bag>
      <rdf:li>bike</rdf:li><rdf:li>red_bicycle</rdf:li><rdf:li>transport</rdf:li>
    </rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>Some Artist</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  <rect width="10" height="10"/>
</svg>"""


def test_svg_metadata_and_caption():
    meta = openclipart.svg_metadata(io.BytesIO(SVG))
    assert meta == {"title": "red_bicycle", "description": "A bike", "keywords": ["bike", "red_bicycle", "transport"]}
    assert openclipart.make_caption(meta["title"], meta["keywords"], "x") == \
        "Clip art of red bicycle, tagged bike, red_bicycle, transport."
    assert openclipart.make_caption("", [], "fallback_name") == "Clip art of fallback name."
    assert openclipart.svg_metadata(io.BytesIO(b"<svg><broken")) == {"title": "", "description": "", "keywords": []}


def test_openclipart_build_writes_descriptions(tmp_path):
    """A miniature of the Debian layout: png/ and svg/ trees, a symlinked duplicate, one drawing with a
    dc:description and one without."""
    from PIL import Image

    root = tmp_path / "openclipart"
    for sub in ("png/animals", "png/other", "svg/animals"):
        (root / sub).mkdir(parents=True)
    for name in ("bike", "plain"):
        Image.new("RGB", (4, 4)).save(root / "png" / "animals" / f"{name}.png")
    os.symlink(root / "png" / "animals" / "bike.png", root / "png" / "other" / "bike.png")
    (root / "svg" / "animals" / "bike.svg").write_bytes(SVG.replace(b"A bike", b"  A red\n bike  "))
    (root / "svg" / "animals" / "plain.svg").write_bytes(SVG.replace(b"<dc:description>A bike</dc:description>", b""))
    stats = openclipart.build(str(tmp_path / "out"), root=str(root))
    assert stats == {"images": 2, "with_metadata": 2, "duplicates": 1, "descriptions": 1}
    rows = [json.loads(x) for x in (tmp_path / "out" / "captions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["description"]) for r in rows] == [("animals/bike", "A red bike"), ("animals/plain", "")]
    desc = [json.loads(x) for x in (tmp_path / "out" / "descriptions.jsonl").read_text().splitlines()]
    assert desc == [{"id": "animals/bike", "image": "animals/bike.png", "caption": "A red bike",
                     "title": "red_bicycle"}]
    parse_caption(desc[0])
    assert sorted(os.listdir(tmp_path / "out")) == ["captions.jsonl", "descriptions.jsonl", "source.json"]


@pytest.mark.skipif(not os.path.isdir("/usr/share/openclipart/png"), reason="Debian openclipart-png not installed")
def test_openclipart_build(tmp_path):
    stats = openclipart.build(str(tmp_path), limit=20)
    rows = [json.loads(x) for x in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert stats["images"] == len(rows) == 20
    root = json.loads((tmp_path / "source.json").read_text())["image_root"]
    for row in rows:
        assert os.path.isfile(os.path.join(root, row["image"])) and row["caption"].startswith("Clip art of ")
        parse_caption(row)
    assert sum(bool(r["keywords"]) for r in rows) >= 10


def test_openclipart_build_on_a_small_tree_shows_progress(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "root" / "png" / "a").mkdir(parents=True)
    (tmp_path / "root" / "svg" / "a").mkdir(parents=True)
    for name in ("red_bicycle", "tree_2"):
        Image.new("RGB", (4, 4)).save(tmp_path / "root" / "png" / "a" / f"{name}.png")
    (tmp_path / "root" / "svg" / "a" / "red_bicycle.svg").write_bytes(SVG)
    stats = openclipart.build(str(tmp_path / "out"), root=str(tmp_path / "root"))
    assert stats == {"images": 2, "with_metadata": 1, "duplicates": 0, "descriptions": 1}
    assert "openclipart: 2image" in capsys.readouterr().err  # a progress bar (no total without --limit)
