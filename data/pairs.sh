#!/usr/bin/env bash
# Two images per sample, end to end on 2 CPU cores: make_pairs.py's data (questions whose answer needs both
# images), a tokenizer, stage 1 (projector, one-image captions), stage 2 (everything, pairs and one-image
# questions mixed), and the accuracy on held-out pairs beside the chance level.
# Usage: bash data/pairs.sh [PYTHON]   (make pairs passes the project's venv python)
set -euo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
DATA=data/pairs
OUT=${PAIRS_OUT:-out/pairs}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)

rm -rf "$OUT"
$PY data/make_pairs.py --out "$DATA" --n-images 1500 --n-train 3000 --n-test 200 --seed 0 --image-size 28
$PY -m llava_min.tokenizer train --data "$DATA/pretrain.json" "$DATA/finetune.json" --vocab-size 512 --out "$DATA/tok.model"

COMMON=(--image-folder "$DATA" --num-workers 1 --seed 0 --save-every 1000 --dist-timeout 300)
$PY train.py --data "$DATA/pretrain.json" --tokenizer "$DATA/tok.model" --llm-config tiny --vit-config tiny \
    --image-size 28 --max-length 96 --batch-size 32 --max-steps 100 --lr 1e-3 --out "$OUT/stage1" "${COMMON[@]}"
$PY finetune.py --init-from "$OUT/stage1" --data "$DATA/finetune.json" \
    --batch-size 32 --max-steps ${PAIRS_STEPS:-400} --lr 1e-3 --train all --out "$OUT/stage2" "${COMMON[@]}"

$PY data/eval_pairs.py --model "$OUT/stage2" --data "$DATA/test.json" --image-folder "$DATA" | tee "$OUT/eval.json"
echo "pairs took $(( $(date +%s) - start )) s"
