#!/usr/bin/env bash
# Reproduces the shipped weights from scratch: configs/RECIPE.toml (default release-v3,
# the shipped weights' recipe; release-v2 is the same over 200 epochs), one schedule from a
# random init, trained into RUN_DIR (run it again after any stop: it resumes from the last
# completed epoch), then scripts/ship_weights.py writes weights/allcnn-c.weights.h5 and its
# manifest entry, unless the run scores lower on validation than the weights shipped now.
#   scripts/train_release.sh [DATA_DIR] [RUN_DIR] [RECIPE]
set -euo pipefail
data=${1:-../shared/data}
recipe=${3:-release-v3}
run=${2:-$HOME/allcnn-runs/$recipe}
if [ -f "$run/config.toml" ]; then
    allcnn train --resume --out "$run" --data-dir "$data"
else
    allcnn train --config "$recipe" --out "$run" --data-dir "$data"
fi
python "$(dirname "$0")/ship_weights.py" "$run" --data-dir "$data"
