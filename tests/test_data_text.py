"""Chat templates, image-token expansion, loss masks and truncation, with the real SmolLM2 tokenizer."""

import numpy as np
import pytest

from vlmjax.data.assets import smollm2_tokenizer
from vlmjax.data.errors import BAD_TURNS, IMAGE_COUNT, TOO_LONG, BadSample
from vlmjax.data.templates import BUILTIN_TEMPLATES, LLAVA_SYSTEM, HFTemplate
from vlmjax.data.text import TextProcessor, TextSpec, _bos_text, default_image_token_id

CONV = [{"role": "user", "content": "<image>\nQ"}, {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
SYS = [{"role": "system", "content": "S"}]


@pytest.fixture(scope="module")
def tok():
    return smollm2_tokenizer()


def render(name, messages):
    chunks = BUILTIN_TEMPLATES[name].render(messages, bos="<s>", eos="</s>")
    return "".join(t for t, _ in chunks), [t for t, trained in chunks if trained]


@pytest.mark.parametrize("name, messages, text, trained", [
    ("vicuna_v1", CONV, f"<s>{LLAVA_SYSTEM} USER: <image>\nQ ASSISTANT: A</s>USER: Q2 ASSISTANT: A2</s>",
     ["A</s>", "A2</s>"]),
    ("llama3", SYS + CONV,
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\n<image>\nQ<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>", ["A<|eot_id|>", "A2<|eot_id|>"]),
    ("chatml", CONV, "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
                     "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n",
     ["A<|im_end|>", "A2<|im_end|>"]),
    ("qwen", CONV[:2], "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                       "<|im_start|>user\n<image>\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n", ["A<|im_end|>"]),
    ("mistral_instruct", SYS + CONV, "<s>[INST] S\n\n<image>\nQ [/INST] A</s>[INST] Q2 [/INST] A2</s>",
     ["A</s>", "A2</s>"]),
    ("plain", [{"role": "user", "content": "<image>\nDescribe this."}, {"role": "assistant", "content": "A cat."}],
     "<s><image>A cat.</s>", ["A cat.</s>"]),
])
def test_builtin_templates(name, messages, text, trained):
    assert render(name, messages) == (text, trained)


def test_hf_template_matches_apply_chat_template(tok):
    chunks = HFTemplate(tok).render(CONV)
    assert "".join(t for t, _ in chunks) == tok.apply_chat_template(CONV, tokenize=False)
    assert [t for t, trained in chunks if trained] == ["A<|im_end|>", "A2<|im_end|>"]


def test_hf_template_fast_path_equals_exact_split_and_falls_back(tok):
    tpl = HFTemplate(tok)
    assert tpl.render(CONV) == tpl.split(CONV)  # cached role skeleton filled with contents == prefix rendering
    trimming = HFTemplate(tok, "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</s>{% endfor %}")
    padded = [{"role": "user", "content": " Q "}, {"role": "assistant", "content": "  A  "}]
    # No generation prompt in this template: the role header is found as the text before the reply.
    assert trimming.render(padded) == [("<user>Q</s>", False), ("<assistant>", False), ("A</s>", True)]


def test_hf_template_that_rewrites_history_is_rejected(tok):
    last_only = "{{ messages[-1]['content'] }}"
    with pytest.raises(BadSample) as e:
        HFTemplate(tok, last_only).render(CONV)
    assert e.value.reason == BAD_TURNS


def test_image_expansion_and_loss_mask(tok):
    proc = TextProcessor(tok, TextSpec(template="hf"), tokens_per_image=3, max_length=512)
    img = proc.image_token_id
    assert img == len(tok) == 49152 and _bos_text(tok) == ""
    messages = [{"role": "user", "content": "Look:<image>and<image>\nWhich?"},
                {"role": "assistant", "content": "Left."},
                {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Red."}]
    enc = proc.encode(messages, [1, 2])
    # Text around each placeholder tokenised on its own, image ids inserted verbatim: the placeholder never reaches
    # the tokenizer, so it cannot be split into "<", "image", ">".
    pieces = tok.apply_chat_template(messages, tokenize=False).split("<image>")
    text_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in pieces]
    expected = text_ids[0] + [img] * 3 + text_ids[1] + [img] * 6 + text_ids[2]
    assert enc.ids.dtype == np.int32 and enc.ids.tolist() == expected
    assert tok.decode(enc.ids[enc.trained]) == "Left.<|im_end|>Red.<|im_end|>"
    assert not enc.trained[enc.ids == img].any()
    everything = proc.encode(messages, [1, 2], loss_on="all")
    np.testing.assert_array_equal(everything.trained, everything.ids != img)
    last = proc.encode(messages, [1, 2], untrained_replies=1)
    assert tok.decode(last.ids[last.trained]) == "Red.<|im_end|>"


def test_image_count_checks(tok):
    proc = TextProcessor(tok, TextSpec(template="chatml"), tokens_per_image=2, max_length=64)
    with pytest.raises(BadSample) as e:
        proc.encode(CONV, [])
    assert e.value.reason == IMAGE_COUNT
    clash = TextProcessor(tok, TextSpec(template="chatml", image_token_id=tok.eos_token_id), 2, 64)
    with pytest.raises(BadSample, match="image_count"):  # text that produces the image id would be miscounted
        clash.encode(CONV, [1])


def test_default_image_token_id_prefers_vocab_entry(tok):
    class VocabWithImage:
        def get_vocab(self):
            return {"<image>": 7, "a": 0}

        def __len__(self):
            return 100

    assert default_image_token_id(VocabWithImage()) == 7
    assert default_image_token_id(tok) == len(tok)


def test_truncation_keeps_images_or_rejects(tok):
    caption = [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "one two three " * 20}]
    proc = TextProcessor(tok, TextSpec(template="plain"), tokens_per_image=4, max_length=14)
    enc = proc.encode(caption, [1])
    full = tok("one two three " * 20 + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert enc.ids.tolist() == [proc.image_token_id] * 4 + full[:10] and enc.num_images == 1
    late_image = [{"role": "user", "content": "word " * 40 + "<image>"}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(BadSample) as e:
        TextProcessor(tok, TextSpec(template="chatml"), 4, 30).encode(late_image, [1])
    assert e.value.reason == TOO_LONG and "image" in e.value.message
    with pytest.raises(BadSample, match="too_long"):
        TextProcessor(tok, TextSpec(template="plain", truncation="reject"), 4, 14).encode(caption, [1])


def test_document_truncation_drops_whole_trailing_images(tok):
    doc = [{"role": "assistant", "content": "<image>Alpha beta. <image>Gamma delta epsilon."}]
    proc = lambda n: TextProcessor(tok, TextSpec(template="plain"), tokens_per_image=4, max_length=n)
    first = tok("Alpha beta. ", add_special_tokens=False)["input_ids"]
    rest = tok("Gamma delta epsilon.<|im_end|>", add_special_tokens=False)["input_ids"]
    cut = 4 + len(first)  # where the second image starts
    full = proc(100).encode(doc, [1, 1], document=True)
    assert full.num_images == 2 and len(full.ids) == cut + 4 + len(rest)
    for limit in (cut + 2, cut + 4):  # splits the 2nd image / leaves it with no text after: both drop it
        enc = proc(limit).encode(doc, [1, 1], document=True)
        assert enc.num_images == 1 and enc.ids.tolist() == full.ids[:cut].tolist()
    enc = proc(cut + 5).encode(doc, [1, 1], document=True)
    assert enc.num_images == 2 and enc.ids.tolist() == full.ids[:cut + 5].tolist()


def test_environment_errors_in_chat_templates_propagate(tok):
    """A missing jinja2 (transformers raises ImportError from apply_chat_template) is the environment's fault: it must
    stop the run, not become a `bad_turns` verdict that the skip policy counts as bad data (issue 14.2)."""
    from vlmjax.data.errors import BadSamplePolicy
    from vlmjax.data.image import ImageSpec
    from vlmjax.data.transform import SampleTransform

    class NoJinja:
        chat_template = tok.chat_template

        def apply_chat_template(self, *a, **kw):
            raise ImportError("apply_chat_template requires jinja2 to be installed.")

    with pytest.raises(ImportError, match="jinja2"):
        HFTemplate(NoJinja()).render(CONV)
    with pytest.raises(ImportError, match="jinja2"):
        HFTemplate(NoJinja()).split(CONV)
    # ...also through the training transform under the skip policy (which turns BadSamples into skips)
    text = TextProcessor(tok, TextSpec(template="hf"), 4, 256)
    text.template = HFTemplate(NoJinja())
    transform = SampleTransform(fmt="llava", source_name="x.json", image_root=None, image_spec=ImageSpec(),
                                text=text, policy=BadSamplePolicy("skip"), max_images=4)
    record = {"id": "a", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    with pytest.raises(ImportError, match="jinja2"):
        transform((0, record))
    # a template that refuses a conversation is still a bad sample
    class Refuses(NoJinja):
        def apply_chat_template(self, *a, **kw):
            raise ValueError("Conversation roles must alternate")

    with pytest.raises(BadSample, match="bad_turns"):
        HFTemplate(Refuses()).split(CONV)
