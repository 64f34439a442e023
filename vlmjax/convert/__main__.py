"""python -m vlmjax.convert {assemble,gguf-to-hf,verify,to-hf,average} ...

  assemble    LLM (HF folder or .gguf) + vision tower (HF folder) + fresh projector -> HF LLaVA folder
  gguf-to-hf  a Llama-family GGUF file -> HF *ForCausalLM folder (dequantised)
  verify      load an HF LLaVA or causal-LM folder with vlmjax and transformers; print the max logit difference
  to-hf       a vlmjax native folder -> HF LLaVA folder, where HF can express the model (else an error saying why)
  average     the fp32 average of N native or HF folders (same model and tokenizer) -> native folder
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _verify(folder: Path, atol: float) -> float:
    import torch
    import transformers

    from vlmjax.convert import hf

    cfg_json = hf.read_config(folder)
    rng = np.random.default_rng(0)
    if cfg_json.get("model_type") == "llava":
        model, cfg = hf.load_vlm(folder)
        t = cfg.tokens_per_image
        ids = np.concatenate([[1], np.full(t, cfg.image_token_id), rng.integers(2, 100, 16)])[None].astype(np.int64)
        px = rng.normal(size=(1, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
        ref_model = transformers.AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = ref_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px)).logits.numpy()
        ours = np.asarray(model(ids.astype(np.int32), px.transpose(0, 2, 3, 1), np.zeros(1, np.int32)))
    else:
        model, cfg = hf.load_causal_lm(folder)
        ids = rng.integers(0, min(cfg.vocab_size, 1000), (1, 32))
        ref_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = ref_model(input_ids=torch.tensor(ids)).logits.numpy()
        ours = np.asarray(model(ids.astype(np.int32)))
    err = float(np.abs(ref - ours).max())
    print(json.dumps({"folder": str(folder), "max_abs_logit_diff": err, "ok": err <= atol}))
    return err


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vlmjax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{assemble,gguf-to-hf,verify,to-hf,average}")
    a = sub.add_parser("assemble", help="LLM + vision tower + fresh projector -> HF LLaVA folder",
                       description="Assemble a new LLaVA (the VILA stage-1 start): a pretrained LLM, a pretrained "
                       "vision tower and a freshly initialised projector, written as an HF LLaVA folder with the "
                       "tokenizer (plus an <image> token) and the processor configs.")
    a.add_argument("--llm", required=True, help="HF *ForCausalLM folder (Llama/Mistral/Qwen2) or a .gguf file")
    a.add_argument("--vision", required=True,
                   help="HF CLIPVisionModel/SiglipVisionModel folder, or a full CLIP/SigLIP folder (vision half used)")
    a.add_argument("--projector", default="mlp2x_gelu",
                   help="projector kind (default: %(default)s, the only one an HF LLaVA folder can hold)")
    a.add_argument("--vision-feature-layer", type=int, default=-2,
                   help="tower layer whose hidden states feed the projector (default: %(default)s, as LLaVA)")
    a.add_argument("--seed", type=int, default=0, help="seed of the projector's initialisation (default: %(default)s)")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written tensors (default: %(default)s)")
    a.add_argument("--out", required=True, type=Path, help="output folder (created)")
    g = sub.add_parser("gguf-to-hf", help="GGUF (Llama family) -> HF causal-LM folder",
                       description="Dequantise a Llama/Qwen2 GGUF file (llama.cpp) into an HF *ForCausalLM folder "
                       "with its embedded tokenizer.")
    g.add_argument("gguf", type=Path, help="the .gguf file")
    g.add_argument("--out", required=True, type=Path, help="output folder (created)")
    v = sub.add_parser("verify", help="vlmjax vs transformers logits on a folder",
                       description="Load an HF LLaVA or causal-LM folder with vlmjax and with transformers (fp32), "
                       "run both on the same random input and print the max |logit difference| as JSON; exit 1 "
                       "above --atol.")
    v.add_argument("folder", type=Path, help="HF LLaVA or *ForCausalLM folder")
    v.add_argument("--atol", type=float, default=1e-3,
                   help="largest max |logit difference| that passes (default: %(default)s)")
    t = sub.add_parser("to-hf", help="vlmjax native folder -> HF LLaVA folder (LoRA merged)",
                       description="Write a native folder as an HF LLaVA folder, where HF can express the model "
                       "(projector mlp2x_gelu and HF's preprocessing); otherwise exit 2 naming what cannot be.")
    t.add_argument("native", type=Path, help="native folder (vlmjax_config.json + safetensors)")
    t.add_argument("--out", required=True, type=Path, help="output folder (created)")
    t.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="dtype of the written tensors (default: as stored)")
    av = sub.add_parser("average", help="weight average of N native or HF folders -> native folder",
                        description="Streaming fp32 weighted mean, tensor by tensor (peak memory about one model); "
                        "paths, shapes, dtypes, model config and tokenizer must agree (the error names what differs).")
    av.add_argument("folders", type=Path, nargs="+", help="native or HF folders of one architecture")
    av.add_argument("--out", required=True, type=Path, help="output native folder (created)")
    av.add_argument("--weights", type=float, nargs="+", default=None,
                    help="one weight per folder (normalised to sum 1; default: uniform)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    from vlmjax.convert import hf

    if args.cmd == "assemble":
        from vlmjax.convert.assemble import assemble_vlm
        from vlmjax.models.config import to_dtype

        model, cfg, tok = assemble_vlm(args.llm, args.vision, projector=args.projector,
                                       vision_feature_layer=args.vision_feature_layer, seed=args.seed)
        hf.save_vlm(model, args.out, tokenizer=tok, dtype=np.dtype(to_dtype(args.dtype)))
        print(f"wrote {args.out} (image token {cfg.image_token_id}, {cfg.tokens_per_image} tokens per image)")
    elif args.cmd == "gguf-to-hf":
        from vlmjax.convert.gguf import load_gguf, load_gguf_tokenizer

        model, _ = load_gguf(args.gguf)
        hf.save_causal_lm(model, args.out, tokenizer=load_gguf_tokenizer(args.gguf))
        print(f"wrote {args.out}")
    elif args.cmd == "to-hf":
        from vlmjax.convert.hf_config import UnsupportedModel

        try:
            native_to_hf(args.native, args.out, dtype=args.dtype)
        except UnsupportedModel as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    elif args.cmd == "average":
        from vlmjax.convert.average import average_folders

        average_folders(args.folders, args.out, weights=args.weights)
        print(f"wrote {args.out} (average of {len(args.folders)} folders)")
    else:
        return 0 if _verify(args.folder, args.atol) <= args.atol else 1
    return 0


def native_to_hf(native: Path, out: Path, dtype: str | None = None) -> Path:
    """Native folder -> HF LLaVA folder; UnsupportedModel (checked before any weight is read) names what HF lacks."""
    from vlmjax.convert import hf
    from vlmjax.convert.hf_config import UnsupportedModel
    from vlmjax.convert.native import hf_unsupported_reason, load_native, load_tokenizer, read_native_config
    from vlmjax.models.config import to_dtype
    from vlmjax.models.lora import merge_lora

    stored = read_native_config(native)[0]
    reason = hf_unsupported_reason(stored)
    if reason:
        raise UnsupportedModel(f"{native} cannot be written as an HF LLaVA folder: {reason}")
    model, cfg = load_native(native, dtype=stored.dtype, param_dtype=stored.param_dtype)
    merge_lora(model)
    return hf.save_vlm(model, out, tokenizer=load_tokenizer(native),
                       dtype=None if dtype is None else np.dtype(to_dtype(dtype)))


if __name__ == "__main__":
    sys.exit(main())
