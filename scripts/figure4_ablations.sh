#!/usr/bin/env bash
# Figure 4: (a) λ ablation (ML LinBreg and LinBreg) and (b) m ablation (ML LinBreg, λ = 1), ResNet18
# on CIFAR-10, 3 seeds.
#
#   bash scripts/figure4_ablations.sh [OVERRIDES...]       # 51 runs (36 + 18, 3 shared), ~11 GPU-hours (H200)
#
# -> $REPORTS/figure4_lambda/ablation_lambda_cifar10_resnet18.png (Figure 4a),
#    $REPORTS/figure4_m/ablation_m_cifar10_resnet18.png (Figure 4b), results.md in each
source "$(dirname "$0")/_common.sh"
sweep "$EXP=ablation_lambda" "$@"
sweep "$EXP=ablation_m" "$@"
report figure4_lambda "$EXP=ablation_lambda $*"
report figure4_m "$EXP=ablation_m $*"
