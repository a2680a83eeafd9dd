#!/usr/bin/env bash
# Figure 3: TinyImageNet, WideResNet28-10 and ResNet18: SGD, pruned + fine-tuned SGD (90/95/98%),
# LinBreg and ML LinBreg (λ = 0.5, 1, 2), 3 seeds. Data: data/tiny-imagenet-200 (dataset.root=...).
#
#   bash scripts/figure3_tinyimagenet.sh [OVERRIDES...]    # 60 runs, ~204 GPU-hours (H200)
#
# -> $REPORTS/figure3/: accuracy_vs_sparsity_tinyimagenet_{wrn28_10,resnet18}.png, results.md
source "$(dirname "$0")/_common.sh"
sweep "$EXP=tinyimagenet" "$@"
report figure3 "$EXP=tinyimagenet $*"
