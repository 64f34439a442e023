#!/usr/bin/env bash
# STIC, all stages, on a LLaVA-1.5 checkpoint (configs/stic/llava15_7b.py; shared/recipes/stic.md):
#   scripts/stic.sh MODEL_DIR UNLABELED_IMAGES SFT_JSON SFT_IMAGES WORKDIR [extra --config.* flags for both stages]
# MODEL_DIR: HF LLaVA folder; UNLABELED_IMAGES: folder of images (paper: 6k COCO train2014); SFT_JSON: instruction
# subset in LLaVA JSON (paper: 5k of llava_v1_5_mix665k) with images under SFT_IMAGES. Every step resumes on rerun.
# LLaVA-1.6-Mistral-7B: STIC_CONFIG=configs/stic/llava16_mistral7b.py STIC_TEMPLATE=mistral_instruct scripts/stic.sh ...
# STIC_GEN_ARGS: extra flags for both generation steps (e.g. "--limit 100 --max-new-tokens 256").
set -euo pipefail
if [ $# -lt 5 ]; then sed -n 2,8p "$0"; exit 2; fi
MODEL=$1 IMAGES=$2 SFT_JSON=$3 SFT_IMAGES=$4 W=$5; shift 5
PY=${PYTHON:-python}
CFG=${STIC_CONFIG:-configs/stic/llava15_7b.py}
TEMPLATE=${STIC_TEMPLATE:-vicuna_v1}
read -r -a GEN <<< "${STIC_GEN_ARGS:-}"
mkdir -p "$W"

# 1a: preference pairs from the unlabeled images (chosen: detailed prompt; rejected: hallucination prompt or corrupted image)
$PY -m vlmjax.recipes.stic.make_preferences --model "$MODEL" --images "$IMAGES" --out "$W/pairs.jsonl" --template "$TEMPLATE" \
  ${GEN[@]+"${GEN[@]}"}
# 1b: DPO + alpha x NLL, LoRA + projector, reference = adapter off
$PY -m vlmjax.train --config "$CFG:stage1" --workdir "$W/stage1" --config.model.path="$MODEL" \
  --config.data.sources="(dict(format='preference', path='$W/pairs.jsonl', image_root='$IMAGES'),)" \
  --config.export_dir="$W/stage1/export" "$@"
# 2a: the stage-1 model describes each instruction sample's image; descriptions go into the first user turn
$PY -m vlmjax.recipes.stic.make_infused_sft --model "$W/stage1/export" --data "$SFT_JSON" --image-folder "$SFT_IMAGES" \
  --out "$W/infused.json" --template "$TEMPLATE" ${GEN[@]+"${GEN[@]}"}
# 2b: SFT continuing the stage-1 adapter
$PY -m vlmjax.train --config "$CFG:stage2" --workdir "$W/stage2" --config.model.path="$MODEL" \
  --config.model.load_params="$W/stage1/trainable.safetensors" \
  --config.data.sources="(dict(format='llava', path='$W/infused.json', image_root='$SFT_IMAGES'),)" \
  --config.export_dir="$W/stage2/export" "$@"
echo "STIC model: $W/stage2/export (LoRA merged, HF LLaVA folder)"
