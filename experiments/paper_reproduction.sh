#!/usr/bin/env bash
# The paper's main comparison (Yu et al., KDD 2024): for each dataset and model, the base model with the paper's
# sizes, then SVD and AFM at the paper's ranks (embedding rank 2 of 16 / 8 of 50, MLP rank ~16% of the width, first
# MLP layer kept dense), TT embeddings and int8, each with the "base + same fine-tune" control; then one report.
#
# Full data (paths to the Kaggle files; GPU recommended):
#   CRITEO=/data/criteo/train.txt AVAZU=/data/avazu/train.csv EXTRA="trainer=gpu" bash experiments/paper_reproduction.sh
# Small mode (runs here in minutes; the Criteo sample with the Criteo settings):
#   SMALL=1 bash experiments/paper_reproduction.sh
# Re-running continues where a crashed run stopped (finished runs are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/paper}
MODELS=${MODELS:-"deepfm dcn dcnv2 autoint fibinet"}
EXTRA=${EXTRA:-}
COMMON="progress_bar=false logger=csv compression.control=true $EXTRA"

datasets=()
if [ -n "${SMALL:-}" ]; then
  datasets+=("criteo:data=criteo_sample")  # Criteo format and settings on the 8,000-row sample
  OUT=${OUT}_small
else
  [ -n "${CRITEO:-}" ] && datasets+=("criteo:data.train_path=$CRITEO")
  [ -n "${AVAZU:-}" ] && datasets+=("avazu:data.train_path=$AVAZU")
fi
if [ ${#datasets[@]} -eq 0 ]; then
  echo "give CRITEO=/path/to/train.txt and/or AVAZU=/path/to/train.csv, or SMALL=1" >&2
  exit 2
fi

for entry in "${datasets[@]}"; do
  data=${entry%%:*}
  data_args=${entry#*:}
  for model in $MODELS; do
    base="$OUT/base/$data/$model"
    if [ ! -f "$base/results.json" ]; then
      lowrank-ctr-train experiment="${data}_${model}" $data_args compression=none bench=false progress_bar=false \
        logger=csv $EXTRA hydra.run.dir="$base"
    fi
    ckpt="$base/checkpoints/best.ckpt"  # the compress runs read the data config from the checkpoint
    # The paper's ranks (as in conf/experiment/<data>_<model>.yaml); SVD and AFM share them, TT and int8 are baselines.
    if [ "$data" = criteo ]; then ranks="compression.embedding_rank=2 compression.mlp_rank=64";
    else ranks="compression.embedding_rank=8 compression.mlp_rank=320"; fi
    lowrank-ctr-compress -m ckpt_path="$ckpt" compression=afm,svd $ranks "compression.exclude=[mlp.net.0]" \
      compression.target_ratio=null compression.code_dtype=float32 compression.allocator=variance \
      compression.finetune_lr=0.0001 $COMMON hydra.sweep.dir="$OUT/compress/$data/$model/lowrank"
    lowrank-ctr-compress -m ckpt_path="$ckpt" compression=tt compression.embedding_rank=4 \
      compression.finetune_lr=0.0001 $COMMON hydra.sweep.dir="$OUT/compress/$data/$model/tt"
    lowrank-ctr-compress -m ckpt_path="$ckpt" compression=int8 $COMMON hydra.sweep.dir="$OUT/compress/$data/$model/int8"
  done
done
lowrank-ctr-report "$OUT/compress" --out "$OUT/report"
