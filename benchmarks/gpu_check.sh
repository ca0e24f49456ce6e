#!/usr/bin/env bash
# The GPU path, checked and measured in one short run on a machine with a CUDA GPU (the `device` tool's lent
# machine, or your own):
#   1. end to end: train DeepFM in bf16 on the GPU, compress (AFM, 5x) with the recovery fine-tune and the
#      "base + same fine-tune" control, test; then export the compressed checkpoint (TorchScript + ONNX, each
#      checked against PyTorch by the exporter);
#   2. benchmarks/bench_train.py --device cuda: the project's training and inference against a plain PyTorch loop
#      that holds its data on the GPU (the fastest a loop can feed itself), in one run, as ratios;
#      2b (STEPS="... bigbatch"): the same at batch BIG_BATCH (16384);
#   3. (rowsum) the row-gradient sum of one batch, CSR product vs index_add_.
#
#   bash benchmarks/gpu_check.sh                      # writes under $OUT (or outputs/gpu_check)
#   ROWS=1000000 REPEATS=2 DEVICE=cpu bash benchmarks/gpu_check.sh   # the same steps on CPU (to try the script)
#
# Python packages the machine lacks can come as wheels in .whl/ (installed to /tmp/site, nothing else touched). The
# lent H200 image has torch, Lightning, torchmetrics, pandas, pyarrow and onnxruntime but not Hydra; build once here:
#   echo /.whl/ >> .git/info/exclude
#   pip wheel --no-deps -w .whl hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3
# and carry .whl with the run. Steps 1 and 2 took 4.6 min there on 2026-12-04 (1M rows, one repeat, 4 variants);
# step 2 alone with three variants (VARIANTS=...) 3.2 min, step 2b ~1 min, step 3 seconds.
# git there may not know the commit of the copied tree: name it, e.g. LOWRANK_CTR_COMMIT=4d87cf4 bash ...
# Each step has its own time limit and log; a failed step does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/outputs/gpu_check}
DEVICE=${DEVICE:-cuda}
ROWS=${ROWS:-1000000}
REPEATS=${REPEATS:-1}
THREADS=${THREADS:-$(nproc)}
EPOCHS=${EPOCHS:-2}      # a GPU epoch of 1M rows is ~2 s: two dilute the first steps' warm-up (cuBLAS, allocator)
E2E_ROWS=${E2E_ROWS:-300000}
STEPS=${STEPS:-"e2e bench rowsum"}  # a subset runs only those; "bigbatch" adds step 2b
BIG_BATCH=${BIG_BATCH:-16384}
VARIANTS=${VARIANTS:-"32:adam,bf16-mixed:adam,bf16-mixed:rowwise_adam,32:adam:data.in_memory=device,bf16-mixed:rowwise_adam:data.in_memory=device"}
WORK=${WORK:-/tmp/lowrank_ctr_gpu_check}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
    nproc
    $PY -c "import torch, lightning, hydra, omegaconf; print('torch', torch.__version__, 'lightning', lightning.__version__,
'hydra', hydra.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/machine.txt"

if [ "$DEVICE" = cuda ]; then TRAINER=(trainer=gpu); else TRAINER=(trainer=cpu); fi
summarise() {  # summarise RESULT.json: bench_train.py's columns (and step breakdown), one line each
$PY - "$1" <<'EOF' || true
import json, sys
r = json.load(open(sys.argv[1]))
print(r["workload"])
for row in r["rows"]:
    print(f"{row['name']:<70} train {row['train_samples_per_s']:>12,.0f}/s ({row['train_over_plain']:.2f}x)  "
          f"infer {row['infer_samples_per_s']:>12,.0f}/s ({row['infer_over_plain']:.2f}x)  auc {row['test_auc']:.4f}")
for name, b in r.get("breakdown", {}).items():
    print(name, f"step {b['step_s'] * 1e3:.2f} ms", {k: round(v, 3) for k, v in b["shares"].items()})
EOF
}
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has e2e; then
echo "== 1. end to end: train (bf16) + AFM 5x + fine-tune + control, export"
run_dir=$WORK/e2e
rm -rf "$run_dir" "$WORK/serve"
timeout 240 $PY -m lowrank_ctr.train "${TRAINER[@]}" trainer.precision=bf16-mixed trainer.max_epochs=3 \
    data.rows="$E2E_ROWS" data.out_dir="$WORK/data/e2e" compression=afm compression.control=true \
    logger=csv progress_bar=false threads="$THREADS" hydra.run.dir="$run_dir" 2>&1 | tee "$OUT/e2e.log" | tail -40
cp "$run_dir/results.json" "$OUT/e2e_results.json" 2>/dev/null || echo "no results.json from the end-to-end run"
for fmt in torchscript onnx; do
    timeout 120 $PY -m lowrank_ctr.export ckpt_path="$run_dir/checkpoints/compressed.ckpt" format=$fmt \
        out="$WORK/serve/$fmt" 2>&1 | tail -5 | tee -a "$OUT/export.log"
done
fi

if has bench; then
echo "== 2. bench_train.py --device $DEVICE"
timeout 420 $PY benchmarks/bench_train.py --device "$DEVICE" --rows "$ROWS" --repeats "$REPEATS" --threads "$THREADS" \
    --epochs "$EPOCHS" --variants "$VARIANTS" \
    --breakdown --breakdown-steps 20 --workdir "$WORK/bench" --out "$OUT/bench_train_$DEVICE.json" \
    > "$OUT/bench_train.log" 2>&1
tail -5 "$OUT/bench_train.log"
summarise "$OUT/bench_train_$DEVICE.json"
fi

if has bigbatch; then
echo "== 2b. the same at batch $BIG_BATCH (a GPU step at 4096 is host-bound: does a larger batch fill the device?)"
timeout 300 $PY benchmarks/bench_train.py --device "$DEVICE" --rows "$ROWS" --repeats "$REPEATS" --threads "$THREADS" \
    --epochs "$EPOCHS" --batch-size "$BIG_BATCH" --no-fused \
    --variants "32:adam:data.in_memory=device,bf16-mixed:rowwise_adam:data.in_memory=device" \
    --workdir "$WORK/bench" --out "$OUT/bench_train_${DEVICE}_batch$BIG_BATCH.json" > "$OUT/bench_train_big.log" 2>&1
tail -3 "$OUT/bench_train_big.log"
summarise "$OUT/bench_train_${DEVICE}_batch$BIG_BATCH.json"
fi

if has rowsum; then
echo "== 3. the row-gradient sum of a batch (models/layers.sum_rows): csr vs index_add on $DEVICE"
$PY - "$DEVICE" 2>&1 <<'EOF' | tee "$OUT/rowsum.txt"
import sys, time, torch
from lowrank_ctr.models.layers import sum_rows
device = torch.device(sys.argv[1])
g = torch.Generator().manual_seed(0)
# one DeepFM batch of the benchmark: 4096 rows x 39 fields, Zipf-like ids over 3.7M rows, dim 16
ids = (torch.rand(4096 * 39, generator=g) ** 3 * 3_700_000).long().to(device)
grad = torch.randn(ids.numel(), 16, generator=g).to(device)
ref_rows, ref = sum_rows(ids.cpu(), grad.cpu(), "csr")
for method in ("csr", "index_add"):
    rows, summed = sum_rows(ids, grad, method)
    err = (summed.cpu() - ref).abs().max().item()
    for _ in range(5):
        sum_rows(ids, grad, method)
    if device.type == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        sum_rows(ids, grad, method)
    if device.type == "cuda": torch.cuda.synchronize()
    print(f"{method:<10} {(time.perf_counter() - t0) / 50 * 1e3:.3f} ms per batch, {rows.numel()} rows, "
          f"max abs diff vs CPU csr {err:.2e}")
EOF
fi
date -u
