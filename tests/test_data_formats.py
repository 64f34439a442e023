"""Record parsers: LLaVA conversations, caption pairs, MMC4 documents, preference pairs (flat and TRL)."""

import pytest

from vlmjax.data.errors import BAD_RECORD, BAD_TURNS, EMPTY_CONVERSATION, IMAGE_COUNT, UNKNOWN_ROLE, BadSample
from vlmjax.data.formats import parse_caption, parse_interleaved, parse_llava, parse_preference


def reason(fn, record, **kw):
    with pytest.raises(BadSample) as e:
        fn(record, **kw)
    return e.value.reason


def test_llava_single_multi_and_text_only():
    ex = parse_llava({"id": 7, "image": "a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."}]})
    assert ex.sample_id == "7" and ex.images == ["a.jpg"]
    assert ex.messages == [{"role": "user", "content": "<image>\nWhat is it?"},
                           {"role": "assistant", "content": "A cat."}]
    ex = parse_llava({"id": "m", "images": ["a.jpg", "b.jpg"], "conversations": [
        {"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image> vs <image>?"},
        {"from": "gpt", "value": "Same."}, {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]})
    assert ex.images == ["a.jpg", "b.jpg"] and [m["role"] for m in ex.messages] == [
        "system", "user", "assistant", "user", "assistant"]
    ex = parse_llava({"id": "t", "conversations": [{"from": "human", "value": "Hi"},
                                                   {"from": "gpt", "value": "Hello"}]})
    assert ex.images == [] and ex.template is None


def test_llava_image_without_placeholder_is_prepended():
    ex = parse_llava({"image": "a.jpg", "conversations": [
        {"from": "human", "value": "Describe."}, {"from": "gpt", "value": "A dog."}]})
    assert ex.messages[0]["content"] == "<image>\nDescribe." and ex.sample_id is None


def test_llava_typed_content_and_json_string():
    ex = parse_llava({"images": ["a"], "conversations": '[{"role": "user", "content": [{"type": "image"}, '
                                                        '{"type": "text", "text": "Hi"}]}, '
                                                        '{"role": "assistant", "content": "Yo"}]'})
    assert ex.messages[0]["content"] == "<image>Hi"


@pytest.mark.parametrize("record, expected", [
    ({"id": 1, "conversations": []}, EMPTY_CONVERSATION),
    ({"id": 1}, EMPTY_CONVERSATION),
    ({"conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": " "}]}, EMPTY_CONVERSATION),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, UNKNOWN_ROLE),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]}, BAD_TURNS),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"},
                        {"from": "human", "value": "q2"}]}, BAD_TURNS),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"},
                        {"from": "gpt", "value": "a"}]}, BAD_TURNS),
    ({"image": "a", "conversations": [{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"}]},
     IMAGE_COUNT),
    ({"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}, IMAGE_COUNT),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, BAD_RECORD),
])
def test_llava_bad_records(record, expected):
    assert reason(parse_llava, record) == expected


def test_caption():
    ex = parse_caption({"key": b"k1", "jpg": b"\x89PNG...", "txt": b"  A red bus.  "})
    assert ex.sample_id == "k1" and ex.images == [b"\x89PNG..."] and ex.template == "plain"
    assert ex.messages == [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A red bus."}]
    assert reason(parse_caption, {"image": "a.jpg", "caption": ""}) == EMPTY_CONVERSATION
    assert reason(parse_caption, {"caption": "x"}) == BAD_RECORD


def test_interleaved_placement_limit_and_trailing_image():
    record = {"id": "doc", "text_list": ["First.", "Second.", "Third."], "image_info": [
        {"image_name": "b.jpg", "matched_text_index": 1, "matched_sim": 0.30},
        {"image_name": "a.jpg", "matched_text_index": 0, "matched_sim": 0.20},
        {"image_name": "t.jpg", "matched_text_index": 3, "matched_sim": 0.40},  # after the last sentence: dropped
    ]}
    ex = parse_interleaved(record)
    assert ex.images == ["a.jpg", "b.jpg"]
    assert ex.messages == [{"role": "assistant", "content": "<image>First. <image>Second. Third."}]
    assert ex.loss_on == "all" and ex.template == "plain" and ex.document
    ex = parse_interleaved(record, max_images=1)
    assert ex.images == ["a.jpg"] and ex.messages[0]["content"] == "<image>First. Second. Third."
    ex = parse_interleaved(record, min_similarity=0.25)
    assert ex.images == ["b.jpg"] and ex.messages[0]["content"] == "First. <image>Second. Third."
    # An image matched to a sentence followed only by empty text is trailing too.
    ex = parse_interleaved({"text_list": ["Only.", ""], "image_info": [{"image": b"x", "matched_text_index": 1}]})
    assert ex.images == [] and ex.messages[0]["content"] == "Only."
    assert reason(parse_interleaved, {"text_list": ["", " "], "image_info": []}) == EMPTY_CONVERSATION
    assert reason(parse_interleaved, {"text_list": ["a"], "image_info": [{"image_name": "x"}]}) == BAD_RECORD


def test_preference_flat():
    ex = parse_preference({"id": "p", "image": "a.jpg", "prompt": "What colour?", "chosen": "Red.",
                           "rejected": "Blue.", "score": 0.9})
    assert ex.messages == [{"role": "user", "content": "<image>\nWhat colour?"}]
    assert ex.chosen == [{"role": "assistant", "content": "Red."}]
    assert ex.rejected == [{"role": "assistant", "content": "Blue."}]
    assert ex.images == ["a.jpg"] and ex.meta == {"score": 0.9}
    assert reason(parse_preference, {"prompt": "q", "chosen": "a"}) == EMPTY_CONVERSATION
    assert reason(parse_preference, {"prompt": "q", "chosen": "<image>", "rejected": "b"}) == IMAGE_COUNT


def test_preference_trl_conversational_explicit_and_implicit_prompt():
    prompt = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    ex = parse_preference({"images": ["i.png"], "prompt": prompt,
                           "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}],
                           "rejected": [{"role": "assistant", "content": "A dog."}]})
    assert ex.messages == [{"role": "user", "content": "<image>Describe."}]
    assert ex.chosen[0]["content"] == "A cat." and ex.rejected[0]["content"] == "A dog."
    ex = parse_preference({"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                           "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go"}]})
    assert ex.messages == [{"role": "user", "content": "Hi"}]
    assert ex.chosen == [{"role": "assistant", "content": "Hello"}]
    assert ex.rejected == [{"role": "assistant", "content": "Go"}]


def test_caption_followed_by_chat_turns():
    """VILA^2 specialist records: the caption in `plain`, then QA turns in the chat template, one BOS."""
    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.data.formats import parse_caption, parse_caption_qa
    from vlmjax.data.templates import LLAVA_SYSTEM, get_template
    from vlmjax.data.text import TextProcessor, TextSpec

    rec = {"id": "s1", "image": "a.jpg", "caption": "A red bus.",
           "conversations": [{"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Red."},
                             {"from": "human", "value": "Is it moving?"}, {"from": "gpt", "value": "No."}]}
    ex = parse_caption_qa(rec, chat_template="vicuna_v1")
    assert ex.template == "plain+vicuna_v1" and ex.images == ["a.jpg"] and ex.messages[:2] == [
        {"role": "user", "content": "<image>"}, {"role": "assistant", "content": "A red bus."}]
    chunks = get_template(ex.template, None).render(ex.messages, bos="<s>", eos="</s>")
    assert "".join(t for t, _ in chunks) == (f"<s><image>A red bus.</s>{LLAVA_SYSTEM} USER: What colour is it? "
                                             "ASSISTANT: Red.</s>USER: Is it moving? ASSISTANT: No.</s>")
    assert [t for t, trained in chunks if trained] == ["A red bus.</s>", "Red.</s>", "No.</s>"]
    # the tokenizer's own chat template (ChatML) for the turns; the caption and replies are the trained tokens
    tok = smollm2_tokenizer()
    proc = TextProcessor(tok, TextSpec(), tokens_per_image=2, max_length=256)
    enc = proc.encode(parse_caption_qa(rec).messages, [1], template="plain+auto")
    qa = tok.apply_chat_template(ex.messages[2:], tokenize=False)
    want = [proc.image_token_id] * 2 + tok("A red bus.<|im_end|>", add_special_tokens=False)["input_ids"]
    assert enc.ids.tolist() == want + tok(qa, add_special_tokens=False)["input_ids"]
    assert tok.decode(enc.ids[enc.trained]) == "A red bus.<|im_end|>Red.<|im_end|>No.<|im_end|>"
    # bad records name their problem
    no_key = {k: v for k, v in rec.items() if k != "conversations"}  # a caption record read as caption_qa
    assert reason(parse_caption_qa, no_key) == EMPTY_CONVERSATION
    assert reason(parse_caption_qa, {**rec, "conversations": None}) == EMPTY_CONVERSATION
    # an explicit [] (a VILA^2 image no specialist answered) is the caption alone, as the caption format has it
    assert parse_caption_qa({**rec, "conversations": []}) == parse_caption(no_key)
    assert reason(parse_caption_qa, {**rec, "conversations": rec["conversations"][:3]}) == BAD_TURNS
    assert reason(parse_caption_qa, {**rec, "conversations": [{"from": "human", "value": "<image>Q"},
                                                              {"from": "gpt", "value": "A"}]}) == IMAGE_COUNT
    assert reason(parse_caption_qa, {**rec, "caption": ""}) == EMPTY_CONVERSATION
    assert reason(parse_caption_qa, {**rec, "conversations": [{"from": "system", "value": "S"}] +
                                     rec["conversations"][:2]}) == BAD_RECORD


def test_caption_qa_source_through_the_pipeline(tmp_path):
    """A caption_qa source trains the caption and the replies: the batch's loss mask covers exactly those tokens."""
    from vlmjax.data import easy_vqa
    from vlmjax.data.assets import smollm2_tokenizer
    from vlmjax.data.image import ImageSpec
    from vlmjax.data.pipeline import DataConfig, SourceSpec, make_iterator

    easy_vqa.build(str(tmp_path), ["train"], limit=2)
    recs = [{"id": f"r{i}", "image": f"train/{i}.png", "caption": f"Shape number {i}.",
             "conversations": [{"from": "human", "value": "Which?"}, {"from": "gpt", "value": f"Answer {i}"}]}
            for i in range(2)]
    tok = smollm2_tokenizer()
    cfg = DataConfig(sources=(SourceSpec(format="caption_qa", records=recs, image_root=str(tmp_path / "images"),
                                         format_options={"chat_template": "chatml"}),),
                     batch_size=2, seq_len=128, max_images=2, pack=False, num_epochs=1, shuffle=False,
                     image=ImageSpec(image_size=32, tokens_per_image=4), shard_index=0, shard_count=1)
    with make_iterator(cfg, tok) as it:
        batch = next(it)
    for row in range(2):
        trained = batch["targets"][row][batch["loss_mask"][row] > 0]
        i = int(tok.decode(trained).split("Shape number ")[1][0])
        assert tok.decode(trained) == f"Shape number {i}.<|im_end|>Answer {i}<|im_end|>"
        text = tok.decode(batch["input_ids"][row][batch["segment_ids"][row] > 0][4:])  # after the image tokens
        assert text == (f"Shape number {i}.<|im_end|><|im_start|>user\nWhich?<|im_end|>\n<|im_start|>assistant\n"
                        f"Answer {i}<|im_end|>\n")
