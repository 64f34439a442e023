"""An exported LLaVA folder is used by transformers as a user uses a LLaVA: AutoProcessor + generate.

On real easy-vqa images (one also cropped to a non-square shape, so the pad-to-square path runs), transformers'
processor must give our prompt ids exactly, our pixels to 1e-5 (both resample with PIL bicubic), and
`generate` our greedy tokens exactly (tiny random model, fp32).
"""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import hf_fixtures as F  # noqa: E402
from test_convert_cli import tiny_tokenizer  # noqa: E402

from vlmjax.convert.__main__ import main as convert_main  # noqa: E402

# A string-content template in the tiny tokenizer's own words (its vocabulary is w0..w124)
TEMPLATE = ("{% for m in messages %}{{ 'w1' if m['role'] == 'user' else 'w2' }} {{ m['content'] }} w3 {% endfor %}"
            "{% if add_generation_prompt %}w2{% endif %}")


def easy_vqa_images(tmp_path, n=3):
    from PIL import Image

    try:
        from vlmjax.data.assets import easy_vqa_data_dir

        folder = os.path.join(easy_vqa_data_dir(), "test", "images")
    except FileNotFoundError as e:
        pytest.skip(f"easy-vqa not installed ({e}): pip install --no-deps -r requirements-offline.txt")
    paths = [os.path.join(folder, f"{i}.png") for i in range(n)]
    wide = tmp_path / "wide.png"
    Image.open(paths[0]).crop((0, 10, 64, 50)).save(wide)  # 64x40: padded to a square with the mean colour
    return paths + [str(wide)]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("processor")
    F.make_causal_lm(tmp / "llm", "llama")
    tok = tiny_tokenizer(F.V)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp / "llm")
    torch.manual_seed(0)
    vis = transformers.AutoModel.from_config(F.vision_config("clip")).eval()
    F._randomize(vis)
    vis.save_pretrained(tmp / "vision")
    assert convert_main(["assemble", "--llm", str(tmp / "llm"), "--vision", str(tmp / "vision"),
                         "--out", str(tmp / "vlm")]) == 0
    return tmp


def test_autoprocessor_and_generate_reproduce_ours(export, tmp_path):
    from PIL import Image

    from vlmjax.generate.loading import load_model
    from vlmjax.generate.requests import Encoder, Request, default_eos_ids
    from vlmjax.generate.simple import greedy_generate

    folder = export / "vlm"
    assert (folder / "preprocessor_config.json").exists() and (folder / "processor_config.json").exists()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert isinstance(processor, transformers.LlavaProcessor)
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    model, cfg, tok = load_model(folder)
    encoder = Encoder(tok, cfg)
    eos = list(default_eos_ids(tok, cfg))
    agreed = []
    for i, path in enumerate(easy_vqa_images(tmp_path)):
        messages = [{"role": "user", "content": f"<image>\nw{5 + i} w9 w11"}]
        ours = encoder.prompt(Request(str(i), messages, [path]))
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=Image.open(path), text=text, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == ours.ids, path
        diff = np.abs(inputs["pixel_values"].numpy().transpose(0, 2, 3, 1) - ours.pixels).max()
        print(f"{os.path.basename(path)}: max |pixel diff| {diff:.2e}")
        assert diff <= 1e-5, path
        want = greedy_generate(model, ours.ids, max_new_tokens=8, eos_token_ids=eos, pixel_values=ours.pixels)
        with torch.no_grad():
            out = hf_model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
        got = out[0, inputs["input_ids"].shape[1]:].tolist()
        got = got[: next((j for j, t in enumerate(got) if t in eos), len(got))]
        assert got == want, path
        agreed.append(len(want))
    assert sum(agreed) >= 8  # the comparison saw real continuations, not empty ones


@pytest.mark.parametrize("mode,hf", [("pad_to_square_mean", dict(do_pad=True, do_center_crop=False)),
                                     ("resize", dict(do_pad=False, do_center_crop=False)),
                                     ("crop", dict(do_pad=False, do_center_crop=True))])
def test_image_processor_follows_the_image_spec(export, tmp_path, mode, hf):
    import dataclasses

    from PIL import Image

    from vlmjax.convert import hf as hfconv
    from vlmjax.data.image import model_image_spec, process_image

    model, cfg = hfconv.load_vlm(export / "vlm")
    spec = dataclasses.replace(model_image_spec(cfg), resize_mode=mode)
    hfconv.save_vlm(model, tmp_path / mode, image_spec=spec)
    assert not (tmp_path / mode / "processor_config.json").exists()  # no tokenizer: image processor only
    ip = transformers.AutoImageProcessor.from_pretrained(tmp_path / mode)
    assert {k: getattr(ip, k) for k in hf} == hf
    if mode != "crop":  # HF floors the long side of a shortest-edge resize where we round: pixels may differ
        path = easy_vqa_images(tmp_path, 1)[-1]
        got = ip(Image.open(path), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        np.testing.assert_allclose(got, process_image(path, spec), atol=1e-5)


def test_llava_next_export_processor_and_generate(tmp_path):
    """LLaVA-1.6: the anyres grid, the per-image token count and generation through transformers' processor."""
    from PIL import Image

    from vlmjax.convert import hf as hfconv
    from vlmjax.generate import GenerationConfig, generate
    from vlmjax.generate.requests import Encoder, Request

    F.make_llava_next(tmp_path / "src")
    model, cfg = hfconv.load_vlm(tmp_path / "src")
    tok = tiny_tokenizer(F.V - 1)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.chat_template = TEMPLATE
    hfconv.save_vlm(model, tmp_path / "out", tokenizer=tok)
    processor = transformers.AutoProcessor.from_pretrained(tmp_path / "out")
    assert isinstance(processor, transformers.LlavaNextProcessor)
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    encoder = Encoder(tok, cfg)
    base = Image.open(easy_vqa_images(tmp_path, 1)[0]).convert("RGB")
    for w, h in [(60, 25)]:  # a wide image: several grid tiles, rows unpadded
        img = base.resize((w, h), Image.BICUBIC)
        messages = [{"role": "user", "content": "<image>\nw7 w8"}]
        ours = encoder.prompt(Request(f"{w}x{h}", messages, [img]))
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=img, text=text, return_tensors="pt")
        assert inputs["input_ids"][0].tolist() == ours.ids, (w, h)
        k = len(ours.pixels)
        diff = np.abs(inputs["pixel_values"][0, :k].numpy().transpose(0, 2, 3, 1) - ours.pixels).max()
        print(f"llava_next {w}x{h}: {k} tiles, max |pixel diff| {diff:.2e}")
        assert diff <= 1e-5
        want = generate(model, [ours.ids], GenerationConfig(max_new_tokens=6, eos_token_ids=()),
                        pixel_values=ours.pixels, image_rows=np.zeros(k, np.int32), image_pos=[ours.image_pos])
        with torch.no_grad():
            out = hf_model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert out[0, inputs["input_ids"].shape[1]:].tolist() == want[0].tokens, (w, h)


def test_what_hf_cannot_express_is_reported_not_fatal(export, tmp_path, caplog):
    import dataclasses
    import logging

    from transformers import AutoTokenizer

    from vlmjax.convert import hf as hfconv
    from vlmjax.data.image import model_image_spec

    model, cfg = hfconv.load_vlm(export / "vlm")
    catty = dataclasses.replace(model_image_spec(cfg), tiling="catty")
    no_image_token = AutoTokenizer.from_pretrained(export / "llm")  # the LLM's own tokenizer: no <image>
    with caplog.at_level(logging.WARNING, logger="vlmjax.convert.processor"):
        hfconv.save_vlm(model, tmp_path / "catty", tokenizer=no_image_token, image_spec=catty)
        hfconv.save_vlm(model, tmp_path / "plain", tokenizer=no_image_token)
    assert "tiling 'catty' has no HF LLaVA image processor" in caplog.text
    assert "no single <image> token with the model's image token id" in caplog.text
    assert (tmp_path / "catty" / "model.safetensors").exists()
    assert not (tmp_path / "catty" / "preprocessor_config.json").exists()
    assert (tmp_path / "plain" / "preprocessor_config.json").exists()
    assert not (tmp_path / "plain" / "processor_config.json").exists()
