"""The POINTS soup miniature (vlmjax.recipes.points.soup_mini): question kinds, the ingredients' SFT data, the val
file's held-out images, and (slow) the whole --part soup --quick pipeline on the suite's tiny base."""

import json
from pathlib import Path

import pytest

from vlmjax.recipes.points import soup_mini as SM


def rec(n, extra=()):
    turns = [("Describe the image briefly.", "A red circle."), ("What is the color of the circle?", "Red"),
             ("What shape is in the image?", "Circle"), ("Is there a circle?", "Yes"),
             ("Is there not a blue shape?", "Yes"), *extra]
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": f"train_{n}", "image": f"train/{n}.png", "conversations": conv}


def test_question_kinds():
    assert SM.question_kind("What shape is in the image?", "Triangle") == "shape"
    assert SM.question_kind("What is the color of the circle?", "Teal") == "color"
    assert SM.question_kind("Is there not a triangle in the image?", "No") == "yes/no shape"
    assert SM.question_kind("Does the image contain a gray shape?", "Yes") == "yes/no colour"
    with pytest.raises(ValueError, match="names neither"):
        SM.question_kind("Is it there?", "Yes")


def answers(r):
    return sorted(t["value"] for t in r["conversations"][1::2])


def test_ingredient_data_keeps_base_plus_one_addition():
    recs = [rec(0), rec(1), rec(3300)]
    base = SM.conversations(recs, (), images=(0, 3000))
    assert [r["id"] for r in base] == ["train_0", "train_1"]  # val images never in SFT data
    assert answers(base[0]) == ["A red circle.", "Red"]
    shape = SM.conversations(recs, ("shape",), images=(0, 3000))
    assert answers(shape[0]) == ["A red circle.", "Circle", "Red"]
    yn = SM.conversations(recs, ("yes/no colour",), images=(0, 3000))
    humans = [t["value"] for t in yn[0]["conversations"][0::2]]
    assert "Is there not a blue shape?" in " ".join(humans) and "Is there a circle?" not in humans
    assert sum("<image>" in h for h in humans) == 1 and humans[0].startswith("<image>")
    full = SM.conversations(recs, SM.ADDITIONS, images=(0, 3000))
    assert len(full[0]["conversations"]) == 10
    assert full == SM.conversations(recs, SM.ADDITIONS, images=(0, 3000))  # seeded: the same order again
    with pytest.raises(ValueError, match="no train records"):
        SM.conversations(recs, (), images=(10, 20))


def test_val_questions_are_the_held_out_images_only(tmp_path):
    path = SM.val_questions([rec(0), rec(3300), rec(3499), rec(3500)], tmp_path / "v.json")
    rows = json.loads(path.read_text())
    assert {r[2] for r in rows} == {3300, 3499} and len(rows) == 8
    assert ["What shape is in the image?", "Circle", 3300] in rows and not any("Describe" in r[0] for r in rows)


def stage_config(export):
    return json.loads((Path(export).parent / "config.json").read_text())


@pytest.mark.slow
def test_quick_soup_pipeline_end_to_end(tiny_mini_base, tmp_path):
    out = SM.run_soup(tmp_path / "w", base=tiny_mini_base, quick=True, seeds=(0,), figures=False,
                      stage_over={"data.batch_size": 2}, filter_work=tmp_path / "none", steps=3, ingredient_steps=2,
                      lrs=(SM.INGR_LR, 2 * SM.INGR_LR))  # one extra lr run (CI time)
    assert "align export" in out["start_model"]
    names = [SM.BASE_ROW, "Base + shape", "Base + yes/no colour", "Base + yes/no shape", "Base + all additions",
             "uniform soup", "greedy soup"]
    for n in names:
        (row,) = out["per_seed"][n]
        assert 0 <= row["accuracy"] <= 1 and "shape" in row
    assert any(k.startswith("lr soup") for k in out["per_seed"])
    # two phases: Base SFT from the start model, then every fine-tune from the Base SFT export, ingredient steps/lr
    seed = tmp_path / "w" / "seed0_base3"
    base_sft = seed / "base" / "export"
    cfg = stage_config(base_sft)
    assert cfg["model"]["path"] == tiny_mini_base["align"] and cfg["train"]["steps"] == 3
    assert cfg["optim"]["lr"] == SM.BASE_LR
    ft = seed / f"ft2_lr{SM.INGR_LR:g}"
    runs = {"shape": SM.INGR_LR, "yn_colour": SM.INGR_LR, "yn_shape": SM.INGR_LR, "all": SM.INGR_LR,
            f"shape_lr{2 * SM.INGR_LR:g}": 2 * SM.INGR_LR}
    for name, lr in runs.items():
        cfg = stage_config(ft / name / "export")
        assert (cfg["model"]["path"], cfg["train"]["steps"], cfg["optim"]["lr"]) == (str(base_sft), 2, lr), name
    assert set(out["stages"][0]) == {"seed0_base3/base", *(f"seed0_base3/ft2_lr{SM.INGR_LR:g}/{n}" for n in runs)}
    g, line = out["seeds"][0]["greedy"], out["seeds"][0]["line"]
    singles = {t["ingredient"]: t["val"] for t in g["trials"] if t["stage"] == "ingredient"}
    assert len(singles) == 3 and g["soup_val"] >= max(singles.values())
    # the line's ends are the two ingredients themselves; the Base SFT model's val is beside it
    assert line["t"] == list(SM.LINE) and line["val"][0] == singles[line["a"]] and line["val"][-1] == singles[line["b"]]
    assert out["per_seed"]["Base SFT (the ingredients' start)"] == [{"val": line["base_sft_val"]}]
    assert "line t=0 (Base + shape)" in out["line_table"] and "line t=1 (Base + yes/no colour)" in out["line_table"]
    saved = json.loads((tmp_path / "w" / "results" / "soup.json").read_text())
    assert saved["meta"]["commit"] is not None and saved["config"]["val_images"] == [3300, 3500]
    assert saved["config"]["ingredient_steps"] == 2 and Path(g["members"][0]).exists()
    # a rerun resumes everything; another start model for the same seed folder is refused
    again = SM.run_soup(tmp_path / "w", base=tiny_mini_base, quick=True, seeds=(0,), figures=False,
                        stage_over={"data.batch_size": 2}, filter_work=tmp_path / "none", steps=3,
                        ingredient_steps=2, lrs=(SM.INGR_LR, 2 * SM.INGR_LR))
    assert again["per_seed"] == out["per_seed"]
    (seed / "start.json").write_text(json.dumps({"start": "elsewhere"}))
    with pytest.raises(ValueError, match="was trained from start model elsewhere"):
        SM.run_soup(tmp_path / "w", base=tiny_mini_base, quick=True, seeds=(0,), figures=False,
                    stage_over={"data.batch_size": 2}, filter_work=tmp_path / "none", steps=3, ingredient_steps=2)


def test_start_model_is_the_filter_arm_when_exported(tmp_path):
    """The filter part exports native folders (vlmjax_config.json): the soup must start from its lowest-PPL arm."""
    from vlmjax.recipes.points.soup_mini import start_model

    base = {"align": "align/export"}
    assert start_model(base, tmp_path)[0] == Path("align/export")  # no filter run: the base's align export
    arm = tmp_path / "arms" / "low20_seed0" / "pretrain" / "export"
    arm.mkdir(parents=True)
    (arm / "vlmjax_config.json").write_text("{}")
    path, why = start_model(base, tmp_path)
    assert path == arm and why.startswith("filter part's lowest-PPL 20% arm")
