#!/usr/bin/env bash
# Figure 2: CPU training time split (forward / backward / optimizer / swaps) of SGD, ML LinBreg with
# torch layers and ML LinBreg with SparseProp layers; ResNet18 on CIFAR-10, 10 epochs on the CPU.
# Needs the SparseProp package for its third run (README). Runs one at a time: keep the basic launcher.
#
#   bash scripts/figure2_cpu_timing.sh [OVERRIDES...]      # 3 runs; hours on a laptop CPU
#
# -> $REPORTS/figure2/: cpu_time_cifar10_resnet18.png (Figure 2), cpu_time.{md,csv}
source "$(dirname "$0")/_common.sh"
sweep "$EXP=cpu_timing" "$@"
report figure2 "$EXP=cpu_timing $*"
