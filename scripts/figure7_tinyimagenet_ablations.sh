#!/usr/bin/env bash
# Figure 7: the Figure 4 ablations (λ and m) at scale: WideResNet28-10 on TinyImageNet, same
# hyperparameters as on CIFAR-10. Data: data/tiny-imagenet-200 (dataset.root=...).
#
#   bash scripts/figure7_tinyimagenet_ablations.sh [OVERRIDES...]   # 51 runs, ~295 GPU-hours (H200)
#
# -> $REPORTS/figure7_lambda/ablation_lambda_tinyimagenet_wrn28_10.png,
#    $REPORTS/figure7_m/ablation_m_tinyimagenet_wrn28_10.png
source "$(dirname "$0")/_common.sh"
scale=(dataset=tinyimagenet model=wrn28_10)
sweep "$EXP=ablation_lambda" "${scale[@]}" "$@"
sweep "$EXP=ablation_m" "${scale[@]}" "$@"
report figure7_lambda "$EXP=ablation_lambda ${scale[*]} $*"
report figure7_m "$EXP=ablation_m ${scale[*]} $*"
