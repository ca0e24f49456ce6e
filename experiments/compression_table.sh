#!/usr/bin/env bash
# Method x rank x model table (small mode, ~45 min on 2 CPU cores):
#   base DeepFM and DCNv2 on the synthetic default and on MovieLens-100K; then AFM and SVD at matched whole-model
#   size budgets (target_ratio 3 and 5) and at fixed ranks (embedding 4, MLP 25%); TT at TT-ranks 2 and 4; int8.
#   Every compressed model is fine-tuned one epoch next to the "base + same fine-tune" control; then the report.
# Full data: DATASETS="criteo" EXTRA="data.train_path=/data/criteo/train.txt trainer=gpu" bash experiments/compression_table.sh
# Re-running continues a crashed table: finished runs are skipped (results.json + config hash).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/compression_table}
DATASETS=${DATASETS:-"synthetic movielens100k"}
MODELS=${MODELS:-"deepfm dcnv2"}
RATIOS=${RATIOS:-"3,5"}
SEEDS=${SEEDS:-"42"}
EXTRA=${EXTRA:-}
COMMON="progress_bar=false logger=csv compression.control=true compression.finetune_lr=0.0001 $EXTRA"
LOWRANK="compression=afm,svd compression.targets=[embedding,mlp,other]"

for data in $DATASETS; do
  for model in $MODELS; do
    for seed in $SEEDS; do
      base="$OUT/base/$data/$model/seed$seed"
      if [ ! -f "$base/results.json" ]; then
        lowrank-ctr-train data="$data" model="$model" seed="$seed" bench=false progress_bar=false logger=csv $EXTRA \
          hydra.run.dir="$base"
      fi
      ckpt="$base/checkpoints/best.ckpt"
      sweep="$OUT/compress/$data/$model/seed$seed"
      lowrank-ctr-compress -m ckpt_path="$ckpt" seed="$seed" $LOWRANK compression.target_ratio="$RATIOS" \
        $COMMON hydra.sweep.dir="$sweep/budget"
      lowrank-ctr-compress -m ckpt_path="$ckpt" seed="$seed" $LOWRANK compression.embedding_rank=4 \
        compression.mlp_rank=0.25 compression.other_rank=0.25 $COMMON hydra.sweep.dir="$sweep/fixed"
      lowrank-ctr-compress -m ckpt_path="$ckpt" seed="$seed" compression=tt compression.embedding_rank=2,4 \
        $COMMON hydra.sweep.dir="$sweep/tt"
      lowrank-ctr-compress -m ckpt_path="$ckpt" seed="$seed" compression=int8 $COMMON hydra.sweep.dir="$sweep/int8"
    done
  done
done
lowrank-ctr-report "$OUT/compress" --out "$OUT/report"
