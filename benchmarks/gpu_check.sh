#!/usr/bin/env bash
# What CPU tests cannot show, in one short run on a GPU machine (< 5 min): one training step of
# DDP under NCCL on every GPU, FSDP (launch/accelerate/fsdp_8.yaml on every GPU) with a resume,
# and bf16 autocast on one GPU. Prints PASS/FAIL per check; exits 1 if any failed.
#   bash benchmarks/gpu_check.sh [out_dir]       (default: a fresh temp dir)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
ACCELERATE=${ACCELERATE:-.venv/bin/accelerate}
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [[ "$NGPU" -lt 1 ]]; then
    echo "FAIL no GPU visible to torch"; exit 1
fi
echo "GPUs: $NGPU; logs in $OUT"

"$PY" - "$OUT/shards" <<'PYEOF' || { echo "FAIL writing synthetic shards"; exit 1; }
import sys
from pathlib import Path

from data_pipelines.synthetic import CLASSNAMES, generate_samples
from data_pipelines.write import write_shards

write_shards(generate_samples(2000, seed=0, image_size=32), Path(sys.argv[1]),
             samples_per_shard=250, overwrite=True, classnames=CLASSNAMES)
PYEOF

COMMON=(--config launch/configs/demo.yaml "data.train_shards=$OUT/shards" data.batch_size=16
        data.workers=1 optim.warmup_steps=1 train.log_every=1 train.checkpoint_every=0)
FAILED=0

# check NAME STEP_DIR -- COMMAND...: PASS when the command exits 0 and wrote STEP_DIR
check() {
    local name=$1 expect=$2; shift 3
    if timeout 150 "$@" >"$OUT/$name.log" 2>&1 && [[ -d "$expect" ]]; then
        echo "PASS $name"
    else
        echo "FAIL $name (exit $?; log: $OUT/$name.log)"; tail -n 15 "$OUT/$name.log"
        FAILED=1
    fi
}

check ddp_nccl "$OUT/ddp/checkpoints/step_00000001" -- \
    "$ACCELERATE" launch --config_file launch/accelerate/gpu_8_ddp.yaml --num_processes "$NGPU" \
    --mixed_precision no launch/pretrain.py "${COMMON[@]}" train.steps=1 "train.out_dir=$OUT/ddp"

check fsdp "$OUT/fsdp/checkpoints/step_00000001" -- \
    "$ACCELERATE" launch --config_file launch/accelerate/fsdp_8.yaml --num_processes "$NGPU" \
    launch/pretrain.py "${COMMON[@]}" train.steps=1 "train.out_dir=$OUT/fsdp"

check fsdp_resume "$OUT/fsdp/checkpoints/step_00000002" -- \
    "$ACCELERATE" launch --config_file launch/accelerate/fsdp_8.yaml --num_processes "$NGPU" \
    launch/pretrain.py "${COMMON[@]}" train.steps=2 train.resume=latest "train.out_dir=$OUT/fsdp"

check bf16 "$OUT/bf16/checkpoints/step_00000001" -- \
    "$ACCELERATE" launch --config_file launch/accelerate/gpu_1.yaml \
    launch/pretrain.py "${COMMON[@]}" train.steps=1 "train.out_dir=$OUT/bf16"

exit "$FAILED"
