#!/usr/bin/env bash
# Every table and figure of the paper, one script after the other (330 runs, ~486 GPU-hours on one H200, most
# of it TinyImageNet; README "Reproducing the paper"). Arguments go to every sweep, e.g. a Slurm launcher:
#   bash scripts/reproduce_paper.sh hydra/launcher=slurm hydra.launcher.partition=gpu
# Runs already finished are kept, so the script can be stopped and started again.
# SCRIPTS="table2 figure2_cpu_timing" runs only these (names of the scripts below, without .sh), in that order.
here="$(dirname "$0")"
set -euo pipefail
all=(table1 table2 figure4_ablations figure6_sparsity_range figure3_tinyimagenet figure7_tinyimagenet_ablations
     figure2_cpu_timing)
read -ra scripts <<< "${SCRIPTS:-${all[*]}}"
for script in "${scripts[@]}"; do
    if [[ " ${all[*]} " != *" $script "* ]]; then
        echo "reproduce_paper.sh: SCRIPTS: unknown script '$script'; valid: ${all[*]}" >&2
        exit 2
    fi
done
for script in "${scripts[@]}"; do
    bash "$here/$script.sh" "$@"
done
