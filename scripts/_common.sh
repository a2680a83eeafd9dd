# Shared by the reproduction scripts in scripts/ (sourced, not run).
#
# Environment:
#   OUTPUTS   root of all run directories (default: outputs). Runs are named by their config, so
#             a run shared by two figures (e.g. ML LinBreg λ=1, m=100) is trained once, and an
#             interrupted script picks up where it stopped when run again.
#   REPORTS   where the tables and plots go (default: $OUTPUTS/reports)
#   REPORT_ARGS  extra arguments of `mlbreg report` (e.g. "--dpi 100" or "--no-plots")
#   MLBREG    the mlbreg command (default: mlbreg)
# Arguments given to a script are passed to every `mlbreg train -m` it runs, e.g. a launcher:
#   hydra/launcher=joblib hydra.launcher.n_jobs=4
#   hydra/launcher=slurm hydra.launcher.partition=gpu
set -euo pipefail
MLBREG=${MLBREG:-mlbreg}
OUTPUTS=${OUTPUTS:-outputs}
REPORTS=${REPORTS:-$OUTPUTS/reports}
if ! command -v "$MLBREG" >/dev/null; then
    echo "$MLBREG: command not found; activate the environment mlbreg is installed in, or set MLBREG=/path/to/mlbreg" >&2
    exit 127
fi

# The override that loads a preset of conf/experiment/
EXP=+experiment

# sweep OVERRIDES...: run one sweep; a run that fails does not stop the script (the report lists it)
sweep() {
    echo "== $MLBREG train -m $*"
    "$MLBREG" train -m output_root="$OUTPUTS" "$@" || echo "!! some runs of this sweep failed; the report lists them"
}

# report NAME 'SWEEP OVERRIDES' ['SWEEP OVERRIDES' ...]: tables and plots of exactly these sweeps' runs
report() {
    local name=$1; shift
    local args=()
    for s in "$@"; do args+=(--sweep "$s"); done
    echo "== $MLBREG report $OUTPUTS ${args[*]} --out $REPORTS/$name ${REPORT_ARGS:-}"
    # shellcheck disable=SC2086  # REPORT_ARGS is a list of words
    "$MLBREG" report "$OUTPUTS" "${args[@]}" --out "$REPORTS/$name" ${REPORT_ARGS:-}
}
