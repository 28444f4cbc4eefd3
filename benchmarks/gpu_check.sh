#!/usr/bin/env bash
# What CPU tests cannot show, in one short run on a GPU machine (< 5 min): one training step of
# DDP under NCCL on every GPU; FSDP2 (launch/accelerate/fsdp_8.yaml on every GPU) with an eval
# (every rank runs the sharded forward), a resume, and GradCache micro-batches; bf16 autocast on
# one GPU. Prints PASS/FAIL per check; exits 1 if any failed.
#   bash benchmarks/gpu_check.sh [out_dir]       (default: a fresh temp dir)
# PY names the interpreter (default .venv/bin/python; a machine's own: PY=python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
LAUNCH=("$PY" -m accelerate.commands.launch)
OUT=${1:-$(mktemp -d)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

NGPU=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
if [[ "$NGPU" -lt 1 ]]; then
    echo "FAIL no GPU visible to torch"; exit 1
fi
echo "GPUs: $NGPU; logs in $OUT"

"$PY" - "$OUT" <<'PYEOF' || { echo "FAIL writing synthetic shards"; exit 1; }
import sys
from pathlib import Path

from data_pipelines.synthetic import CLASSNAMES, generate_samples
from data_pipelines.write import write_shards

out = Path(sys.argv[1])
for name, count, seed in (("shards", 2000, 0), ("heldout", 200, 1)):
    write_shards(generate_samples(count, seed=seed, image_size=32), out / name,
                 samples_per_shard=250, overwrite=True, classnames=CLASSNAMES)
PYEOF
CLASSNAMES=$("$PY" -c 'import json; from data_pipelines.synthetic import CLASSNAMES; print(json.dumps(CLASSNAMES))')

COMMON=(--config launch/configs/demo.yaml "data.train_shards=$OUT/shards" data.batch_size=16
        data.workers=1 optim.warmup_steps=1 train.log_every=1 train.checkpoint_every=0)
EVAL=("eval.zeroshot_shards=$OUT/heldout" "eval.classnames=$CLASSNAMES")
FAILED=0

# check NAME PATH -- COMMAND...: PASS when the command exits 0 and wrote PATH
check() {
    local name=$1 expect=$2; shift 3
    if timeout 150 "$@" >"$OUT/$name.log" 2>&1 && [[ -e "$expect" ]]; then
        echo "PASS $name"
    else
        echo "FAIL $name (exit $?; log: $OUT/$name.log)"; tail -n 15 "$OUT/$name.log"
        FAILED=1
    fi
}

check ddp_nccl "$OUT/ddp/checkpoints/step_00000001" -- \
    "${LAUNCH[@]}" --config_file launch/accelerate/gpu_8_ddp.yaml --num_processes "$NGPU" \
    --mixed_precision no launch/pretrain.py "${COMMON[@]}" train.steps=1 "train.out_dir=$OUT/ddp"

check fsdp "$OUT/fsdp/results/heldout_zeroshot_classification.json" -- \
    "${LAUNCH[@]}" --config_file launch/accelerate/fsdp_8.yaml --num_processes "$NGPU" \
    launch/pretrain.py "${COMMON[@]}" "${EVAL[@]}" train.steps=1 "train.out_dir=$OUT/fsdp"

check fsdp_resume "$OUT/fsdp/checkpoints/step_00000002" -- \
    "${LAUNCH[@]}" --config_file launch/accelerate/fsdp_8.yaml --num_processes "$NGPU" \
    launch/pretrain.py "${COMMON[@]}" train.steps=2 train.resume=latest "train.out_dir=$OUT/fsdp"

check fsdp_accum "$OUT/fsdp_accum/checkpoints/step_00000001" -- \
    "${LAUNCH[@]}" --config_file launch/accelerate/fsdp_8.yaml --num_processes "$NGPU" \
    launch/pretrain.py "${COMMON[@]}" train.steps=1 train.accum_steps=2 \
    "train.out_dir=$OUT/fsdp_accum"

check export_fsdp "$OUT/fsdp_export/open_clip_model.safetensors" -- \
    "$PY" -m launch.cli export "$OUT/fsdp" "$OUT/fsdp_export"

check bf16 "$OUT/bf16/checkpoints/step_00000001" -- \
    "${LAUNCH[@]}" --config_file launch/accelerate/gpu_1.yaml \
    launch/pretrain.py "${COMMON[@]}" train.steps=1 "train.out_dir=$OUT/bf16"

# what each run really was (a config that silently fell back to DDP or fp32 would show here)
for run in ddp fsdp fsdp_accum bf16; do
    "$PY" -c 'import json, sys; p = json.load(open(sys.argv[1])); print(sys.argv[2], p.get("distributed_type"), p.get("mixed_precision"), p.get("world_size"))' \
        "$OUT/$run/provenance.json" "$run" 2>/dev/null || echo "$run: no provenance.json"
done
exit "$FAILED"
