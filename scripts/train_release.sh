#!/usr/bin/env bash
# Reproduces the shipped weights from scratch in two stages, resuming whichever stage
# was interrupted (run it again after any stop), then writes weights/allcnn-c.weights.h5
# and its manifest entry:
#   stage 1: configs/release-stage1.toml, 60 epochs from a random init, in RUN_DIR;
#   stage 2: configs/release.toml, 120 epochs from stage 1's last weights, in RUN_DIR-stage2.
#   scripts/train_release.sh [DATA_DIR] [RUN_DIR]
set -euo pipefail
data=${1:-../shared/data}
stage1=${2:-$HOME/allcnn-runs/release}
stage2=$stage1-stage2

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

run_stage release-stage1 "$stage1"
run_stage release "$stage2" --initial-weights "$stage1/last.weights.h5"
python "$(dirname "$0")/ship_weights.py" "$stage2" --data-dir "$data"
