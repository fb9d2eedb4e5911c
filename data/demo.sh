#!/usr/bin/env bash
# The whole story on 2 CPU cores: synthetic shapes data, a tokenizer, stage 1 (projector), stage 2
# (projector + LLM + ViT, tiny models from scratch), held-out accuracy, the held-out questions as a circular
# MMBench file scored as VLMEvalKit scores it, and one chat answer.
# Usage: bash data/demo.sh [PYTHON]   (make demo passes the project's venv python)
set -euo pipefail
PY=${1:-python3}
cd "$(dirname "$0")/.."
DATA=data/shapes
OUT=${DEMO_OUT:-out/demo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
start=$(date +%s)

rm -rf "$OUT"
$PY data/make_shapes.py --out "$DATA" --n-train 3000 --n-test 200 --seed 0
$PY -m llava_min.tokenizer train --data "$DATA/pretrain.json" "$DATA/finetune.json" --vocab-size 512 --out "$DATA/tok.model"

COMMON=(--image-folder "$DATA" --num-workers 1 --seed 0 --save-every 1000 --dist-timeout 300)
# Stage 1 as in LLaVA: only the projector learns, on captions (the tiny LLM and ViT start random here).
$PY train.py --data "$DATA/pretrain.json" --tokenizer "$DATA/tok.model" --llm-config tiny --vit-config tiny \
    --image-size 56 --max-length 128 --batch-size 32 --max-steps 100 --lr 1e-3 --out "$OUT/stage1" "${COMMON[@]}"
# Stage 2: everything learns (--train all), since nothing here was pretrained.
$PY finetune.py --init-from "$OUT/stage1" --data "$DATA/finetune.json" \
    --batch-size 32 --max-steps 600 --lr 1e-3 --train all --out "$OUT/stage2" "${COMMON[@]}"

$PY -m llava_min.eval --model "$OUT/stage2" --data "$DATA/test.json" --image-folder "$DATA" | tee "$OUT/eval.json"
# The same held-out images as multiple choice, in VLMEvalKit's MMBench layout with circular copies: the table
# VLMEvalKit would print (a question counts only if every rotation of its options is answered right).
$PY -m llava_min.eval --model "$OUT/stage2" --data "$DATA/MMBench_shapes.tsv" --num-workers 1 \
    | tee "$OUT/mmbench.txt"
img=$($PY -c "import json; print(json.load(open('$DATA/test.json'))[0]['image'])")
echo "chat: $DATA/$img -> $($PY -m llava_min.chat --model "$OUT/stage2" --image "$DATA/$img" 'What shape is this?')"
echo "demo took $(( $(date +%s) - start )) s; loss curves: $OUT/stage1/loss.png $OUT/stage2/loss.png"
