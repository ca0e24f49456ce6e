#!/usr/bin/env bash
# The compression table (issue 10): every embedding-compression family at whole-model size budgets, 3 seeds, against
# the "base + same fine-tune" control, on the synthetic default (DeepFM, DCNv2), MovieLens-100K and the Criteo and
# Avazu samples. Then one report (mean +- std over seeds, Pareto plot of AUC delta vs the control over size ratio).
#
# Per (data, model, seed): one base model (the default base recipe), then, each compressing that checkpoint, with the
# default fine-tune recipe and the control:
#   afm       the default recipe (int8 codes, loss-aware budget) at target_ratio 3, 5, 10, 20
#   afm_distill  the same compression with a longer recovery: 3 fine-tune epochs of pure distillation from the base
#             (compression.distill=1.0) at 1e-4 (the control gets the same recipe); RATIOS as afm
#   svd       the paper's baseline in the same framework (float32 codes, variance budget) at 3, 5, 10, 20
#   tt        tensor-train embeddings, TT-SVD of the trained tables, TT-ranks 2 and 8 (MLP left dense; TT_RANKS)
#   tt_scratch  the same trained from scratch for the base's epochs (TT-Rec protocol)
#   qr        quotient-remainder embeddings from the trained tables, 5 and 20 collisions (MLP left dense;
#             QR_COLLISIONS)
#   qr_scratch  the same trained from scratch
#   int8      row-wise int8 embeddings + int8 Linear weights
#   tt_afm    TT embeddings (TT-rank 8) + AFM on the Linear layers and first-order tables (conf/compression/
#             tt_afm.yaml: compression.mlp_method=afm, int8, loss budget) at whole-model target_ratio 3, 5, 10, 20
#   qr_afm    QR embeddings (20 collisions) + AFM the same way (qr_afm.yaml), the same budgets
#   tt_afm_scratch / qr_afm_scratch  the same, the TT / QR embeddings trained from scratch for the base's epochs
#             (TT-Rec protocol) before AFM compresses the Linears of that trained model; then the usual fine-tune
#             (one scratch training per seed and structure, shared by the ratios and with tt_scratch /
#             qr_scratch at the same TT-rank / collisions: compression.scratch_cache)
# and, on the first seed only, what did not make the default (ablations): afm with float32 codes / the variance
# budget / sequential calibration + least-squares correction / folding, at 5 and 10.
#
# Time on 2 CPU cores: see the README. Re-running continues a crashed table (finished runs are skipped).
# Smaller: SEEDS="1" DATASETS="movielens100k:deepfm" bash experiments/compression_table.sh
# Full data: DATASETS="criteo:deepfm" EXTRA="data.train_path=/data/criteo/train.txt trainer=gpu" ...
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/compression_table}
DATASETS=${DATASETS:-"synthetic:deepfm synthetic:dcnv2 movielens100k:deepfm criteo_sample:deepfm avazu_sample:deepfm"}
SEEDS=${SEEDS:-"1 2 3"}
RATIOS=${RATIOS:-"3,5,10,20"}
FAMILIES=${FAMILIES:-"afm afm_distill svd tt tt_scratch qr qr_scratch int8 tt_afm qr_afm tt_afm_scratch qr_afm_scratch"}  # a subset runs only those
ABLATIONS=${ABLATIONS:-1}                                          # 0: skip the first-seed ablations
SYNTHETIC_ROWS=${SYNTHETIC_ROWS:-}                                 # e.g. 200000: a smaller synthetic dataset
EXTRA=${EXTRA:-}
TT_RANKS=${TT_RANKS:-2,8}            # the TT-ranks of the tt / tt_scratch families
QR_COLLISIONS=${QR_COLLISIONS:-5,20}  # the collisions of the qr / qr_scratch families
RUN_TAG=${RUN_TAG:-}   # appended to each family's sweep folder: another RATIOS later (e.g. RUN_TAG=_3) gets new folders
# an earlier report's results.csv whose runs are gone (e.g. experiments/results/compression_table/results.csv): its
# rows join report_all, a run found again replaces its row
MERGE=${MERGE:-}
# one control per base (the same recipe for every method): compression.control_cache
# the table was measured with dense Adam (the default before rowwise_adam): bases and fine-tunes keep it
COMMON="progress_bar=false logger=csv optimizer=adam compression.control=true compression.control_cache=$OUT/control_cache $EXTRA"
ALL="compression.targets=[embedding,mlp,other]"
BUDGET="compression.embedding_rank=null compression.mlp_rank=null compression.other_rank=null"

compress() {  # compress <checkpoint> <seed> <sweep dir> <overrides...>
  local ckpt=$1 seed=$2 dir=$3
  shift 3
  if [[ "$dir" != */ablations/* && " $FAMILIES " != *" $(basename "$dir") "* ]]; then return 0; fi
  lowrank-ctr-compress -m ckpt_path="$ckpt" seed="$seed" $COMMON "$@" hydra.sweep.dir="$dir$RUN_TAG" || true
}

first_seed=${SEEDS%% *}
for pair in $DATASETS; do
  data=${pair%%:*}
  model=${pair##*:}
  for seed in $SEEDS; do
    base="$OUT/base/$data/$model/seed$seed"
    rows=""
    if [ "$data" = synthetic ] && [ -n "$SYNTHETIC_ROWS" ]; then rows="data.rows=$SYNTHETIC_ROWS"; fi
    if [ ! -f "$base/results.json" ]; then
      lowrank-ctr-train data="$data" model="$model" seed="$seed" bench=false progress_bar=false logger=csv optimizer=adam $EXTRA \
        $rows hydra.run.dir="$base"
    fi
    ckpt=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['checkpoint'])" "$base/results.json")
    runs="$OUT/runs/$data/$model/seed$seed"
    compress "$ckpt" "$seed" "$runs/afm" compression=afm $ALL $BUDGET compression.target_ratio="$RATIOS"
    compress "$ckpt" "$seed" "$runs/afm_distill" compression=afm $ALL $BUDGET compression.target_ratio="$RATIOS" \
      compression.distill=1.0 compression.finetune_lr=1e-4 compression.finetune_epochs=3
    compress "$ckpt" "$seed" "$runs/svd" compression=svd $ALL $BUDGET compression.target_ratio="$RATIOS"
    compress "$ckpt" "$seed" "$runs/tt" compression=tt compression.embedding_rank=2,8
    compress "$ckpt" "$seed" "$runs/tt_scratch" compression=tt compression.embedding_rank="$TT_RANKS" \
      compression.from_scratch=true compression.scratch_cache="$OUT/scratch_cache"
    compress "$ckpt" "$seed" "$runs/qr" compression=qr compression.collisions="$QR_COLLISIONS"
    compress "$ckpt" "$seed" "$runs/qr_scratch" compression=qr compression.collisions="$QR_COLLISIONS" \
      compression.from_scratch=true compression.scratch_cache="$OUT/scratch_cache"
    compress "$ckpt" "$seed" "$runs/int8" compression=int8
    compress "$ckpt" "$seed" "$runs/tt_afm" compression=tt_afm compression.target_ratio="$RATIOS"
    compress "$ckpt" "$seed" "$runs/qr_afm" compression=qr_afm compression.target_ratio="$RATIOS"
    compress "$ckpt" "$seed" "$runs/tt_afm_scratch" compression=tt_afm compression.from_scratch=true \
      compression.target_ratio="$RATIOS" compression.scratch_cache="$OUT/scratch_cache"
    compress "$ckpt" "$seed" "$runs/qr_afm_scratch" compression=qr_afm compression.from_scratch=true \
      compression.target_ratio="$RATIOS" compression.scratch_cache="$OUT/scratch_cache"
    if [ "$seed" = "$first_seed" ] && [ "$ABLATIONS" = 1 ]; then
      abl="$OUT/ablations/$data/$model/seed$seed"
      compress "$ckpt" "$seed" "$abl/float32_codes" compression=afm $ALL $BUDGET compression.target_ratio=5,10 \
        compression.code_dtype=float32
      compress "$ckpt" "$seed" "$abl/variance_budget" compression=afm $ALL $BUDGET compression.target_ratio=5,10 \
        compression.allocator=variance
      compress "$ckpt" "$seed" "$abl/paper_afm" compression=afm $ALL $BUDGET compression.target_ratio=5,10 \
        compression.code_dtype=float32 compression.allocator=variance
      compress "$ckpt" "$seed" "$abl/lstsq" compression=afm $ALL $BUDGET compression.target_ratio=5,10 \
        compression.calibration=sequential compression.correction=lstsq
      compress "$ckpt" "$seed" "$abl/fold" compression=afm $ALL $BUDGET compression.target_ratio=5,10 \
        compression.fold=true
    fi
  done
done
lowrank-ctr-report "$OUT/runs" --out "$OUT/report"
ablations=()
if [ -d "$OUT/ablations" ]; then ablations=("$OUT/ablations"); fi
lowrank-ctr-report "$OUT/runs" ${ablations[@]+"${ablations[@]}"} ${MERGE:+--merge "$MERGE"} --out "$OUT/report_all"
