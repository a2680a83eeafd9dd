#!/usr/bin/env bash
# Table 2: mask initialization (uniform / ER / ERK) for RigL (95%) and ML LinBreg, ResNet18 on CIFAR-10.
#
#   bash scripts/table2.sh [OVERRIDES...]          # 18 runs, ~4 GPU-hours (H200)
#
# -> $REPORTS/table2/mask_init.{md,csv,tex} (Table 2), results.md (the same runs as a Table 1)
source "$(dirname "$0")/_common.sh"
sweep "$EXP=table2_mask_init" "$@"
report table2 "$EXP=table2_mask_init $*"
