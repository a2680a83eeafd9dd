#!/usr/bin/env bash
# One pass of the GPU checks and benchmarks, for a machine with a CUDA GPU:
#   1. the CUDA tests (the compiled update against the eager one, no sync inside a step),
#   2. every method trains a few epochs on CUDA (and bf16 + channels_last, both loaders),
#   3. scripts/bench_optim.py and scripts/bench_epoch.py (compiled and eager update).
# Results go to $OUT (default gpu_results/); each part has its own time limit, so one
# slow part cannot eat the others. Usage:  OUT=gpu_results bash scripts/gpu_check.sh
# Run it from the repository root (part 1 runs tests/). PYTHON: the interpreter with mlbreg (default python3);
# RUNS: where the trainings of part 2 go (default /tmp/mlbreg_gpu_runs; each pass trains them afresh).
# Without a CUDA GPU that torch can use, it stops at once (exit 1): every part measures the GPU.
set -u
OUT=${OUT:-gpu_results}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
runs=${RUNS:-/tmp/mlbreg_gpu_runs}   # run directories (checkpoints) stay off $OUT

# every part measures the GPU: without one that torch can use, stop before anything runs or is written
if ! $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else
             f'gpu_check.sh: torch {torch.__version__} (CUDA build: {torch.version.cuda}) sees no CUDA GPU')"; then
    echo "gpu_check.sh: needs a CUDA GPU that $PY's torch can use; nothing ran" >&2
    exit 1
fi
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

echo "== 1. tests on CUDA"
if $PY -c "import pytest" 2>/dev/null; then
    timeout 240 $PY -m pytest -q -p no:cacheprovider tests/test_optim.py tests/test_train.py -k "compiled or cuda" 2>&1 \
        | tail -5 | tee "$OUT/tests_cuda.txt"
else
    echo "pytest is not installed: skipped" | tee "$OUT/tests_cuda.txt"
fi

echo "== 2. every method on CUDA"
train() {
    # resume=false: a run left by an earlier pass is trained again, not skipped as finished
    timeout 90 $PY -m mlbreg train device=cuda progress=false resume=false output_root="$runs" "$@" \
        > "$OUT/last_run.log" 2>&1
    echo "rc=$? $*" | tee -a "$OUT/methods_cuda.txt"
}
train method=mllinbreg epochs=20
train method=mllinbreg epochs=20 compile_optimizer=false
train method=linbreg lam=0.1 epochs=20
train method=sgd epochs=20
train method=rigl sparsity=0.9 init=erk epochs=20 method.delta_t=10
train method=prune_finetune sparsity=0.9 epochs=20 method.finetune_epochs=5
train method=mllinbreg model=convnet regularizer=group lam=0.003 init.density=0.1 epochs=10
train method=mllinbreg model=convnet precision=bf16 channels_last=true epochs=10 m=5
train method=mllinbreg model=convnet dataset.loader=torchvision dataset.num_workers=2 epochs=3
for f in $(find "$runs" -name metrics.csv | sort); do
    # epoch, test accuracy, sparsity of the last row
    echo "$f: $(tail -1 "$f" | cut -d, -f1,7,8)" | tee -a "$OUT/methods_cuda.txt"
done

echo "== 3. benchmarks"
timeout 200 $PY scripts/bench_optim.py --repeats 50 2>&1 | tee "$OUT/bench_optim.txt"
timeout 150 $PY scripts/bench_epoch.py --train-size 10240 --epochs 2 2>&1 | tee "$OUT/bench_epoch.txt"
timeout 150 $PY scripts/bench_epoch.py --train-size 10240 --epochs 2 compile_optimizer=false 2>&1 \
    | tee "$OUT/bench_epoch_eager.txt"
timeout 150 $PY scripts/bench_epoch.py --train-size 10240 --epochs 2 precision=bf16 channels_last=true 2>&1 \
    | tee "$OUT/bench_epoch_bf16.txt"
