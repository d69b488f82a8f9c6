"""Trains a distillation teacher (`allcnn.airbench`) into a teacher folder, holding out the same
validation images as `allcnn train` with the same `--val-size` and `--seed`; a run's `teacher`
(e.g. configs/release-bn-kd.toml, `--teacher OUT/teacher.keras`) then names its teacher.keras.

    python scripts/train_teacher.py OUT [--data-dir ../shared/data] [--epochs N] [--translate PIXELS] [--cutout PIXELS] [--seed N]

(`--help` gives the defaults: `allcnn.airbench.train_teacher`'s.)
"""

import argparse
import inspect
import sys

from allcnn.airbench import train_teacher
from allcnn.errors import AllcnnError
from allcnn.teacher import teacher_splits


def main() -> int:
    defaults = {name: p.default for name, p in inspect.signature(train_teacher).parameters.items()}
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("out", help="the teacher folder to write")
    parser.add_argument("--data-dir", default="../shared/data", help="as allcnn train's")
    parser.add_argument("--epochs", type=int, default=defaults["epochs"],
                        help="airbench94's lr triangle, stretched over them")
    parser.add_argument("--translate", type=int, default=defaults["translate"], help="pixels, as a recipe's translate")
    parser.add_argument("--cutout", type=int, default=defaults["cutout"], help="pixels, as a recipe's cutout (0: none)")
    parser.add_argument("--val-size", type=int, default=0, help="as allcnn train's (0: CIFAR's 5,000)")
    parser.add_argument("--seed", type=int, default=defaults["seed"], help="as allcnn train's")
    args = parser.parse_args()
    try:
        dataset, train, val, held_out = teacher_splits(args.data_dir, args.val_size, args.seed)
        record = train_teacher(train, val, dataset.class_names, args.out, held_out=held_out,
                               epochs=args.epochs, translate=args.translate, cutout=args.cutout, seed=args.seed)
    except AllcnnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"teacher: {args.out}/teacher.keras, val_accuracy {record['val_accuracy']:.4f} after "
          f"{record['epochs']} epochs, {record['train_seconds'] / 3600:.2f} h")
    return 0


if __name__ == "__main__":
    sys.exit(main())
