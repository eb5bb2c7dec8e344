#!/usr/bin/env bash
# One prepared GPU check, run once on a lent CUDA machine (see docs/benchmarks.md for the figures it gave):
#   1. bench_tis.py --device cuda: TIS images/s and the ratio to the forward+backward lower bound, paper width
#   2. bench_loading.py --device cuda: files vs compact layout until the batch is ready on the GPU
#   3. CUDA training on a small synthetic world: 32-true and bf16-mixed; stopped + resumed == uninterrupted?
#   4. TIS on CUDA vs CPU from the same checkpoint: max |diff| and top-20 position overlap
# Usage: bash bench/gpu_check.sh [OUT_DIR]   (logs and CSVs go to OUT_DIR, default /tmp/gpu_check)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
W=$(mktemp -d)
VQ=VQGAN_explanation
step() { echo; echo "=== $*"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
    | tee -a "$OUT/device.txt"

# DRY=1: a CPU rehearsal of sections 3-4 on a tiny world (sections 1-2 skipped); QUICK=1: sections 3-4 only
DRY=${DRY:-0}
if [ "$DRY" = 0 ] && [ "${QUICK:-0}" = 0 ]; then
step "1. TIS lower bound (width 512, 25 images, 20 draws)"
$PY bench/bench_tis.py --device cuda --images 25 --nsamples 20 --nets 1 3 4 --repeats 3 --skip_parsing --compute_tis --tis_batches 4 2>&1 | tee "$OUT/bench_tis.txt"

step "2. loading (compact vs files, ready on cuda)"
$PY bench/bench_loading.py --device cuda --images 4000 2>&1 | tee "$OUT/bench_loading.txt"
fi

step "3. CUDA training: 32-true uninterrupted vs stopped at epoch 2 + resumed; bf16-mixed"
GEN=(--source synthetic --num_classes 10 --train_per_class 100 --val_per_class 20 --test_per_class 20 --layout compact)
TR=(--model 1 --width 64 --batch_size 64 --seed 0 --gpu 0)
TD=cuda
if [ "$DRY" != 0 ]; then
  GEN=(--source synthetic --num_classes 3 --train_per_class 10 --val_per_class 3 --test_per_class 4 --layout compact)
  TR=(--model 1 --width 8 --batch_size 8 --seed 0); TD=cpu
fi
$PY $VQ/generate_dataset.py "${GEN[@]}" --root "$W/a" >/dev/null
cp -r "$W/a" "$W/b"; cp -r "$W/a" "$W/c"
t0=$(date +%s.%N)
$PY $VQ/train.py "${TR[@]}" --epochs 4 --root "$W/a"
t1=$(date +%s.%N)
$PY $VQ/train.py "${TR[@]}" --epochs 2 --root "$W/b"
$PY $VQ/train.py "${TR[@]}" --epochs 4 --resume auto --root "$W/b"
$PY $VQ/train.py "${TR[@]}" --epochs 4 --precision bf16-mixed --root "$W/c"
$PY - "$W" <<'EOF' 2>&1 | tee "$OUT/training.txt"
import sys, torch
w = sys.argv[1]
load = lambda r: torch.load(f"{w}/{r}/checkpoints/ClassificationNet1/model.pth", map_location="cpu")
a, b = load("a"), load("b")
diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())
print(f"32-true on CUDA, 4 epochs: uninterrupted vs stopped at 2 + resumed: max |weight diff| = {diff:.3g}",
      "(bit-exact)" if diff == 0 else "(not bit-exact: cuDNN kernels are not deterministic)")
for r in "abc":
    log = open(sorted(__import__('glob').glob(f"{w}/{r}/logs/training_log_*.txt"))[-1]).read().strip().splitlines()
    print(r, log[-1])
EOF
echo "32-true, 4 epochs, 1000 images, width 64: $($PY -c "print(round($t1 - $t0, 1))") s (process start included)" | tee -a "$OUT/training.txt"

step "4. TIS on CUDA vs CPU, same checkpoint and the same noise (--noise_scope authors: drawn on the CPU)"
# (the default per-sample noise is drawn on the compute device, so CUDA and CPU runs use other draws)
for d in $TD cpu; do
  $PY $VQ/TIS_computation.py --model 1 --data_type test --batch_size 25 --noise_scope authors --device $d --root "$W/a" \
      --results_dir "$W/a/results_$d" >/dev/null || echo "TIS on $d failed"
done
$PY - "$W" "$TD" <<'EOF' 2>&1 | tee "$OUT/tis_cuda_vs_cpu.txt"
import sys, glob, os
import numpy as np
from cortex.attribution.store import read_tis_file
w = sys.argv[1]
dmax, overlap, n = 0.0, [], 0
td = sys.argv[2]
for f in sorted(glob.glob(f"{w}/a/results_{td}/TIS/Net1/TIS_value_test/label_*.csv")):
    g = f.replace(f"results_{td}", "results_cpu")
    (na, _, A), (nb, _, B) = read_tis_file(f), read_tis_file(g)
    order = {x: i for i, x in enumerate(nb)}
    for i, fa in enumerate(na):
        sa, sb = A[i], B[order[fa]]
        dmax = max(dmax, float(np.abs(sa - sb).max() / (np.abs(sb).max() + 1e-12)))
        overlap.append(len(set(np.argsort(sa)[-20:]) & set(np.argsort(sb)[-20:])) / 20)
        n += 1
print(f"TIS test split, {n} images: max relative |cuda - cpu| = {dmax:.3g}; mean top-20 overlap = {np.mean(overlap):.4f}")
EOF
rm -rf "$W"
echo; echo "=== summary"; cat "$OUT"/training.txt "$OUT"/tis_cuda_vs_cpu.txt
