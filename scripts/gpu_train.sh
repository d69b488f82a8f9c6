#!/usr/bin/env bash
# Trains a release recipe on a borrowed GPU machine (JAX, no TensorFlow) from the parts of
# .gpu/ that scripts/gpu_bundle.sh makes here, one part per call of the device tool (each
# call carries 64 MiB with the repo):
#   carry [".gpu/part1"]: bash scripts/gpu_train.sh setup
#   carry [".gpu/part2"]: bash scripts/gpu_train.sh train release-gpu 570
# The machine keeps what a call installed and unpacked for the 30 s it stays warm, so each
# call must follow the last at once. Every mode first installs Keras (part 1's wheels) if
# it is missing, unpacks the data parts carried, and a run carried as .gpu/run (run.tar.gz and
# backup.tar.gz from an earlier call's $OUT: carry it alone, with `unpack`, between the two).
#   setup: then names the GPU that JAX sees.
#   unpack: nothing more.
#   benchmark: then measures the train step (`allcnn benchmark`, to $OUT/benchmark.txt);
#     the run's own epochs (history.csv, summary.json) give its real images/s anyway.
#   train RECIPE SECONDS: trains RECIPE (or resumes the run there) for at most SECONDS,
#     then kills it (kill -9 leaves the run folder resumable), and puts in $OUT: run.tar.gz
#     (the run folder but its backup: enough to ship), backup.tar.gz (to resume), train.log.
#     Gzipped: each weights file holds the optimizer state too (16.5 MB), and a file
#     comes back only under 16 MiB.
set -euo pipefail
bundle=${ALLCNN_GPU_BUNDLE:-.gpu}
work=${ALLCNN_GPU_WORK:-/tmp/allcnn-gpu}
python=${PYTHON:-python3}
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 PYTHONPATH="$work/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
data=$work/data/cifar-10-batches-py
run=$work/run

prepare() {
    if ! "$python" -c "import keras" 2>/dev/null && compgen -G "$bundle/part1/wheels/*.whl" >/dev/null; then
        "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
            "$bundle"/part1/wheels/*.whl
    fi
    for part in "$bundle"/part*/data; do  # each part once
        done_mark=$work/unpacked-$(basename "$(dirname "$part")")
        if [ -d "$part" ] && [ ! -f "$done_mark" ]; then
            "$python" scripts/pack_cifar.py unpack "$part" "$data"
            touch "$done_mark"
        fi
    done
    if [ -f "$bundle/run/run.tar.gz" ] && [ ! -f "$run/config.toml" ]; then
        mkdir -p "$run"
        tar -xzf "$bundle/run/run.tar.gz" -C "$run"
        tar -xzf "$bundle/run/backup.tar.gz" -C "$run"
    fi
}

missing() {  # what `train` needs and this machine lacks, in words
    "$python" -c "import keras" 2>/dev/null || echo "Keras"
    for name in data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch batches.meta; do
        [ -f "$data/$name" ] || echo "$name"
    done
}

case ${1:-} in
setup)
    prepare
    "$python" -c "import jax; print('JAX', jax.__version__, jax.devices())"
    ;;
unpack)
    prepare
    ;;
benchmark)
    prepare
    "$python" -m allcnn benchmark --device gpu --batch-size 128 --steps 20 --repeats 3 | tee "$OUT/benchmark.txt"
    ;;
train)
    recipe=${2:?usage: gpu_train.sh train RECIPE SECONDS}
    seconds=${3:?usage: gpu_train.sh train RECIPE SECONDS}
    prepare
    lacking=$(missing | paste -sd ' ')
    if [ -n "$lacking" ]; then
        echo "error: this machine lacks $lacking: run 'gpu_train.sh setup' with .gpu/part1 first, then this call with .gpu/part2 within the 30 s the machine stays warm" >&2
        exit 2
    fi
    if [ -f "$run/config.toml" ]; then how=(--resume); else how=(--config "$recipe"); fi
    set +e
    timeout -s KILL "$seconds" "$python" -m allcnn train "${how[@]}" --out "$run" --data-dir "$data" 2>&1 |
        tee "$OUT/train.log"
    status=${PIPESTATUS[0]}
    set -e
    if [ -d "$run/backup" ]; then  # an epoch completed (a run refused at its start has none)
        tar -czf "$OUT/run.tar.gz" -C "$run" --exclude=./backup --exclude=./last.weights.h5 --exclude=./logs .
        tar -czf "$OUT/backup.tar.gz" -C "$run" ./backup
    fi
    if [ "$status" = 137 ]; then
        echo "stopped after $seconds s: carry run.tar.gz and backup.tar.gz as .gpu/run to resume"
    elif [ "$status" != 0 ]; then
        exit "$status"
    fi
    ;;
*)
    echo "usage: gpu_train.sh setup | unpack | benchmark | train RECIPE SECONDS" >&2
    exit 2
    ;;
esac
