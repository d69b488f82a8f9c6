#!/usr/bin/env bash
# Readies, in .gpu/ (git-ignored), what a borrowed GPU machine needs and cannot fetch,
# for scripts/gpu_train.sh: the machine has JAX but neither Keras nor CIFAR-10, and a
# device call carries 64 MiB with the repo, so it goes in two parts, one per call:
#   .gpu/part1: Keras' wheels (this venv's versions) and data_batch_1..3
#   .gpu/part2: data_batch_4..5 and test_batch (which `allcnn train` loads with the rest;
#     the shipped weights are evaluated here, by scripts/ship_weights.py)
# as lossless WebP (scripts/pack_cifar.py), ~15 MB per batch.
#   scripts/gpu_bundle.sh [DATA_DIR]
set -euo pipefail
data=${1:-../shared/data}
[ -d "$data/cifar-10-batches-py" ] && data=$data/cifar-10-batches-py
[ -f "$data/data_batch_1" ] || { echo "error: no CIFAR-10 python batches in $data" >&2; exit 2; }
bundle=$(cd "$(dirname "$0")/.." && pwd)/.gpu
python=${PYTHON:-python}
rm -rf "$bundle"
"$python" "$(dirname "$0")/pack_cifar.py" pack "$data" "$bundle/part1/data" data_batch_1 data_batch_2 data_batch_3
"$python" "$(dirname "$0")/pack_cifar.py" pack "$data" "$bundle/part2/data" data_batch_4 data_batch_5 test_batch
# Keras and the two of its dependencies the GPU image lacks, for its Python 3.12 on x86-64.
versions=$("$python" -c "from importlib.metadata import version as v; print(*(f'{p}=={v(p)}' for p in ('keras', 'namex', 'optree')))")
# shellcheck disable=SC2086  # one word per requirement
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$bundle/part1/wheels" $versions
du -sh "$bundle"/part*
