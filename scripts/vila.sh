#!/usr/bin/env bash
# VILA, all three stages (configs/vila/llama2_7b.py; shared/recipes/vila.md):
#   scripts/vila.sh WORKDIR LLM_DIR VISION_DIR DATA_ROOT [extra --config.* flags for every stage]
# DATA_ROOT holds prepared data (python -m vlmjax.recipes.vila.prepare mmc4|coyo|flan):
#   align/chat.json + align/images/  mmc4/docs.jsonl + mmc4/images/  coyo/pairs.jsonl + coyo/images/
#   llava/llava_v1_5_mix665k.json + llava/images/  flan/flan_1m.jsonl
# Each stage starts from the previous stage's WORKDIR/<stage>/export and is skipped once WORKDIR/<stage>/export.done
# exists (written after its run succeeds); an interrupted stage resumes from its orbax checkpoint on rerun.
# Sources are dict literals: ml_collections parses --config.data.sources with literal_eval (dict(...) stays a string).
# VILA_CONFIG=configs/vila/llama3_8b_siglip.py for VILA-1.5-8B; VILA_DRY_RUN=1 prints the commands instead.
set -euo pipefail
if [ $# -lt 4 ]; then sed -n 2,10p "$0"; exit 2; fi
W=$1 LLM=$2 VISION=$3 D=$4; shift 4
PY=${PYTHON:-python}
CFG=${VILA_CONFIG:-configs/vila/llama2_7b.py}

stage() {  # stage NAME [flags...]: run python -m vlmjax.train for one stage unless it is done
  local name=$1; shift
  local cmd=("$PY" -m vlmjax.train --config "$CFG:$name" --workdir "$W/$name" --config.export_dir="$W/$name/export" "$@")
  if [ -n "${VILA_DRY_RUN:-}" ]; then printf '%q ' "${cmd[@]}"; echo; return; fi
  if [ -e "$W/$name/export.done" ]; then echo "vila: $name done ($W/$name/export), skipped"; return; fi
  mkdir -p "$W/$name"
  "${cmd[@]}"
  touch "$W/$name/export.done"
}

stage align --config.model.llm="$LLM" --config.model.vision="$VISION" \
  --config.data.sources="({'format': 'caption', 'path': '$D/align/chat.json', 'image_root': '$D/align/images'},)" "$@"
stage pretrain --config.model.path="$W/align/export" \
  --config.data.sources="({'format': 'interleaved', 'path': '$D/mmc4/docs.jsonl', 'image_root': '$D/mmc4/images', 'format_options': {'max_images': 6}}, {'format': 'caption', 'path': '$D/coyo/pairs.jsonl', 'image_root': '$D/coyo/images'})" "$@"
stage sft --config.model.path="$W/pretrain/export" \
  --config.data.sources="({'format': 'llava', 'path': '$D/llava/llava_v1_5_mix665k.json', 'image_root': '$D/llava/images', 'weight': 0.4}, {'format': 'llava', 'path': '$D/flan/flan_1m.jsonl', 'weight': 0.6})" "$@"
[ -n "${VILA_DRY_RUN:-}" ] || echo "VILA model: $W/sft/export"
