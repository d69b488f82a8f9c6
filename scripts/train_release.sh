#!/usr/bin/env bash
# Reproduces the shipped weights: configs/RECIPE.toml (default release-bn, batch norm folded
# after training; release-v3 is the faithful 70-epoch recipe, release-v2 the same over 200),
# trained into RUN_DIR (run it again after any stop: it resumes from the last completed epoch),
# from INITIAL_WEIGHTS if given (a later stage: e.g. release-bn-stage2 from the first run's
# last.weights.h5), then scripts/ship_weights.py writes weights/allcnn-c.weights.h5 and its
# manifest entry, unless the run scores lower on validation than the weights shipped now.
# TEACHER, if given, is the run's `--teacher` (release-bn-kd: a teacher folder's teacher.keras,
# which scripts/train_teacher.py trains first if the folder has none yet).
#   scripts/train_release.sh [DATA_DIR] [RUN_DIR] [RECIPE] [INITIAL_WEIGHTS] [TEACHER]
set -euo pipefail
data=${1:-../shared/data}
recipe=${3:-release-bn}
run=${2:-$HOME/allcnn-runs/$recipe}
initial=${4:-}
teacher=${5:-}
if [[ "$teacher" == *.keras && ! -f "$teacher" ]]; then
    python "$(dirname "$0")/train_teacher.py" "$(dirname "$teacher")" --data-dir "$data"
fi
if [ -f "$run/config.toml" ]; then
    allcnn train --resume --out "$run" --data-dir "$data"
else
    allcnn train --config "$recipe" --out "$run" --data-dir "$data" ${initial:+--initial-weights "$initial"} \
        ${teacher:+--teacher "$teacher"}
fi
python "$(dirname "$0")/ship_weights.py" "$run" --data-dir "$data"
