#!/usr/bin/env bash
# Reproduces the shipped weights from scratch: trains configs/release.toml, resuming
# the run if it was interrupted (run it again after any stop), then writes
# weights/allcnn-c.weights.h5 and its manifest entry.
#   scripts/train_release.sh [DATA_DIR] [RUN_DIR]
set -euo pipefail
data=${1:-../shared/data}
run=${2:-$HOME/allcnn-runs/release}
if [ -f "$run/config.toml" ]; then
    allcnn train --resume --out "$run" --data-dir "$data"
else
    allcnn train --config release --out "$run" --data-dir "$data"
fi
python "$(dirname "$0")/ship_weights.py" "$run" --data-dir "$data"
