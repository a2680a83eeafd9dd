#!/usr/bin/env bash
# The paper's comparison at laptop scale: scikit-learn's 8x8 digits (bundled, offline), the MLP
# 64-256-128-10, 200 epochs, lr 0.1 cosine, m = 100, 3 seeds; every method (SGD, Prune+Fine-Tuning,
# GMP, Static, SET, RigL, LinBreg, ML LinBreg), the λ and m ablations and the mask initializations,
# through the same presets and launcher as the paper's runs. 108 runs.
#
#   bash scripts/reproduce_digits.sh [OVERRIDES...]        # JOBS=4 for 4 parallel runs
#
# -> $REPORTS/digits_{methods,lambda,m,mask_init}/ (tables: results.md, mask_init.md; plots: *.png)
#    With DOCS=docs/digits, the tables and seven plots are also copied there (the README's small-scale
#    results): REPORT_ARGS="--dpi 100" DOCS=docs/digits bash scripts/reproduce_digits.sh
source "$(dirname "$0")/_common.sh"
JOBS=${JOBS:-2}
small=(dataset=digits model=mlp progress=false num_threads=1 checkpoint_every=0
       hydra/launcher=joblib hydra.launcher.n_jobs="$JOBS")
seeds=seed=0,1,2
lams=lam=0.003,0.01,0.03,0.1,0.3       # digits' λ: the CIFAR-10 grid (0.1 ... 4) prunes an 8x8 MLP to nothing

# Table 1 / Figure 1: the baselines at three sparsities, and LinBreg / ML LinBreg over λ (= Figure 4a);
# the fixed-mask and dynamic-mask baselines (static, SET, RigL) on ERK masks, GMP layer-wise uniform
baselines=("method=sgd $seeds"
           "method=prune_finetune sparsity=0.9,0.95,0.98 method.finetune_epochs=0.1 $seeds"
           "method=gmp sparsity=0.9,0.95,0.98 $seeds"
           "method=static init=erk sparsity=0.9,0.95,0.98 $seeds"
           "method=set init=erk sparsity=0.9,0.95,0.98 $seeds"
           "method=rigl init=erk sparsity=0.9,0.95,0.98 $seeds")
for b in "${baselines[@]}"; do sweep ${small[@]} $b "$@"; done
sweep "$EXP=ablation_lambda" "${small[@]}" "$lams" "$@"
# Figure 4b: m ablation at digits' λ = 0.03 (one epoch = 12 steps)
sweep "$EXP=ablation_m" "${small[@]}" lam=0.03 m=1,5,10,25,50,100,200 "$@"
# Table 2: mask initialization, RigL at 95% and ML LinBreg at λ = 0.03
sweep "$EXP=table2_mask_init" "${small[@]}" lam=0.03 "$@"

# seven sparse methods: a mask picture of each (the report draws 4 configurations by default)
REPORT_ARGS="--masks 7 ${REPORT_ARGS:-}" \
    report digits_methods "${baselines[@]/%/ ${small[*]} $*}" "$EXP=ablation_lambda ${small[*]} $lams $*"
report digits_lambda "$EXP=ablation_lambda ${small[*]} $lams $*"
report digits_m "$EXP=ablation_m ${small[*]} lam=0.03 m=1,5,10,25,50,100,200 $*"
report digits_mask_init "$EXP=table2_mask_init ${small[*]} lam=0.03 $*"

if [[ -n ${DOCS:-} ]]; then
    mkdir -p "$DOCS"
    cp "$REPORTS/digits_methods/results.md" "$DOCS/methods.md"
    cp "$REPORTS/digits_lambda/results.md" "$DOCS/ablation_lambda.md"
    cp "$REPORTS/digits_m/results.md" "$DOCS/ablation_m.md"
    cp "$REPORTS/digits_mask_init/mask_init.md" "$DOCS/mask_init.md"
    cp "$REPORTS/digits_methods/accuracy_vs_sparsity_digits_mlp.png" "$REPORTS/digits_methods/training_curves_digits_mlp.png" \
       "$REPORTS/digits_lambda/ablation_lambda_digits_mlp.png" "$REPORTS/digits_m/ablation_m_digits_mlp.png" \
       "$REPORTS/digits_methods/layer_density_digits_mlp.png" "$REPORTS/digits_lambda/layer_density_epochs_digits_mlp.png" \
       "$DOCS/"
    cp "$REPORTS/digits_methods/layers.md" "$DOCS/layers.md"
    # one mask picture: ML LinBreg's drawn run (the name carries the run's slug)
    cp "$(ls "$REPORTS"/digits_methods/masks_digits_mlp_mllinbreg_*.png | head -1)" "$DOCS/masks_digits_mlp_mllinbreg.png"
    echo "copied the tables and plots to $DOCS/"
fi
