#!/usr/bin/env bash
# Figure 6: accuracy over the whole range of sparsity, per architecture (CIFAR-10): the Table 1 runs,
# the λ sweep of LinBreg and ML LinBreg, and SGD pruned to 50-98% and fine-tuned.
#
#   bash scripts/figure6_sparsity_range.sh [OVERRIDES...]  # 210 runs (many shared with table1.sh, figure4), ~85 GPU-h (H200)
#   ARCHS=resnet18 bash scripts/figure6_sparsity_range.sh  # one architecture
#
# -> $REPORTS/figure6/accuracy_vs_sparsity_cifar10_<arch>.png (Figure 6), results.md
source "$(dirname "$0")/_common.sh"
sweeps=()
for arch in ${ARCHS:-resnet18 vgg16 wrn28_10}; do
    prune=("$EXP=table1_$arch" "+experiment/row=prune_finetune_sp90" "sparsity=0.5,0.7,0.8,0.9,0.95,0.98")
    sweep "$EXP=table1_$arch" "$@"
    sweep "$EXP=ablation_lambda" "model=$arch" "$@"
    sweep "${prune[@]}" "$@"
    sweeps+=("$EXP=table1_$arch $*" "$EXP=ablation_lambda model=$arch $*" "${prune[*]} $*")
done
report figure6 "${sweeps[@]}"
