"""Writes an ensemble teacher folder: one teacher.keras that averages the probabilities of two or
more teachers (`shipped`, a weights file, a teacher network's teacher.keras), with `--tta flip` each
on the image and its mirror, scored on the validation images they all held out; a run's `teacher`
(e.g. configs/release-bn-kd2.toml, `--teacher OUT/teacher.keras`) then names its teacher.keras.

    python scripts/ensemble_teacher.py OUT MEMBER MEMBER... [--tta flip] [--data-dir ../shared/data]
        [--val-size N] [--seed N]
"""

import argparse

from allcnn.config import TTA_MODES
from allcnn.errors import AllcnnError
from allcnn.teacher import teacher_splits, write_ensemble_teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out", help="the teacher folder to write")
    parser.add_argument("members", nargs="+", help="the teachers to average: shipped, weights, teacher.keras")
    parser.add_argument("--tta", choices=TTA_MODES, default="none",
                        help="flip: each member's probabilities averaged over the image and its mirror")
    parser.add_argument("--data-dir", default="../shared/data", help="as allcnn train's")
    parser.add_argument("--val-size", type=int, default=0, help="as allcnn train's (0: CIFAR's 5,000)")
    parser.add_argument("--seed", type=int, default=0, help="as allcnn train's")
    args = parser.parse_args()
    try:
        _, _, val, held_out = teacher_splits(args.data_dir, args.val_size, args.seed)
        record = write_ensemble_teacher(args.members, args.out, val, held_out=held_out, tta=args.tta)
    except AllcnnError as e:  # a missing file, members that do not fit together: one line
        parser.exit(1, f"error: {e}\n")
    flipped = "" if record["val_accuracy_tta"] is None else f", {record['val_accuracy_tta']:.4f} with flips"
    print(f"teacher: {args.out}/teacher.keras, {record['network']}: val_accuracy {record['val_accuracy']:.4f}{flipped}")


if __name__ == "__main__":
    main()
