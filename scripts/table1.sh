#!/usr/bin/env bash
# Table 1 and Figure 1: CIFAR-10, ResNet18 / VGG16 / WideResNet28-10, 200 epochs, 3 seeds; the same
# runs give the ResNet18 training curves (Figure 5) and the training FLOPs relative to SGD (Appendix C).
#
#   bash scripts/table1.sh [OVERRIDES...]          # 78 runs, ~30 GPU-hours (H200, README "Reproducing the paper")
#   ARCHS=resnet18 bash scripts/table1.sh          # one architecture (30 runs)
#
# -> $REPORTS/table1/: results.{md,csv,tex} (Table 1), accuracy_vs_sparsity_cifar10_<arch>.png (Figure 1),
#    training_curves_cifar10_resnet18.png (Figure 5), train_flops_cifar10_<arch>.png (Appendix C)
source "$(dirname "$0")/_common.sh"
sweeps=()
for arch in ${ARCHS:-resnet18 vgg16 wrn28_10}; do
    sweep "$EXP=table1_$arch" "$@"
    sweeps+=("$EXP=table1_$arch $*")
done
report table1 "${sweeps[@]}"
