#!/usr/bin/env bash
# Figure 2: CPU training time split (forward / backward / optimizer / swaps) of SGD (fp32, bf16), ML LinBreg with
# torch layers, SparseProp layers and the native kernels (fp32, bf16); ResNet18 on CIFAR-10, 10 epochs on the CPU.
# Needs the SparseProp package for its third run (README). Runs one at a time: keep the basic launcher.
#
#   bash scripts/figure2_cpu_timing.sh [OVERRIDES...]      # 6 runs; hours on a laptop CPU
#
# -> $REPORTS/figure2/: cpu_time_cifar10_resnet18.png (Figure 2), cpu_time.{md,csv}
source "$(dirname "$0")/_common.sh"
sweep "$EXP=cpu_timing" "$@"
report figure2 "$EXP=cpu_timing $*"
