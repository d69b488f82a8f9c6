#!/usr/bin/env bash
# Reproduces the shipped weights from scratch: configs/release-v2.toml, one schedule from a
# random init, trained into RUN_DIR (run it again after any stop: it resumes from the last
# completed epoch), then scripts/ship_weights.py writes weights/allcnn-c.weights.h5 and its
# manifest entry, unless the run scores lower on validation than the weights shipped now.
#   scripts/train_release.sh [DATA_DIR] [RUN_DIR]
set -euo pipefail
data=${1:-../shared/data}
run=${2:-$HOME/allcnn-runs/release-v2}
if [ -f "$run/config.toml" ]; then
    allcnn train --resume --out "$run" --data-dir "$data"
else
    allcnn train --config release-v2 --out "$run" --data-dir "$data"
fi
python "$(dirname "$0")/ship_weights.py" "$run" --data-dir "$data"
