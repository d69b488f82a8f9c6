#!/usr/bin/env bash
# Reproduces the shipped weights from scratch in stages, resuming whichever stage was
# interrupted (run it again after any stop), then writes weights/allcnn-c.weights.h5
# and its manifest entry (scripts/ship_weights.py: the stage, up to LAST_STAGE, with the
# best validation epoch):
#   stage 1: configs/release-stage1.toml, 60 epochs from a random init, in RUN_DIR;
#   stage 2: configs/release.toml, 120 epochs from stage 1's last weights, in RUN_DIR-stage2;
#   stage 3 (only with LAST_STAGE 3; it did not beat stage 2, so it is not shipped):
#     configs/release-stage3.toml, 100 epochs from stage 2's last weights, in RUN_DIR-stage3.
#   scripts/train_release.sh [DATA_DIR] [RUN_DIR] [LAST_STAGE (1-3, default 2)]
set -euo pipefail
data=${1:-../shared/data}
run=${2:-$HOME/allcnn-runs/release}
last_stage=${3:-2}
recipes=(release-stage1 release release-stage3)
if ! [[ $last_stage =~ ^[1-3]$ ]]; then
    echo "error: LAST_STAGE must be 1, 2 or 3, got '$last_stage'" >&2
    exit 2
fi

# Trains config $1 into folder $2 (extra flags after), or resumes it if it was started.
run_stage() {
    local config=$1 out=$2
    shift 2
    if [ -f "$out/config.toml" ]; then
        allcnn train --resume --out "$out" --data-dir "$data"
    else
        allcnn train --config "$config" --out "$out" --data-dir "$data" "$@"
    fi
}

out=$run
run_stage "${recipes[0]}" "$out"
for ((stage = 2; stage <= last_stage; stage++)); do
    previous=$out
    out=$run-stage$stage
    run_stage "${recipes[stage - 1]}" "$out" --initial-weights "$previous/last.weights.h5"
done
python "$(dirname "$0")/ship_weights.py" "$out" --data-dir "$data"
