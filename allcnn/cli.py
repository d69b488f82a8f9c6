"""The `allcnn` command line: a thin shell over the Python API.

Heavy imports (Keras, TensorFlow) happen inside the commands, after the
light checks of their flags and files (TOML recipes, weights files, class
names), so `allcnn --help` answers at once and a bad input is refused
before TensorFlow's seconds of start-up.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource

from allcnn.config import (DATASETS, DEVICES, DISTRIBUTE_MODES, EXPLAIN_METHODS, EXPORT_FORMATS, LR_SCALINGS, PRECISIONS,
                           SCHEDULES, SHIPPED, TTA_MODES, VARIANTS, ConfigError)
from allcnn.errors import AllcnnError
from allcnn.manifest import WeightsSpec, resolve_weights
from allcnn.resources import recipe_names

# TensorFlow's C++ start-up chatter is noise for a CLI user.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _import_keras_quietly() -> None:
    """Imports Keras (so TensorFlow) with stderr muted at the file-descriptor level.

    TensorFlow's C++ start-up lines are printed before any log level applies and
    would bury a command's one-line errors. Import errors still surface as
    exceptions, reported after stderr is back.
    """
    if "keras" in sys.modules:
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import keras  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def user_errors():
    """Turns what a user can cause (`AllcnnError`) into one line and a non-zero exit:
    2 for a bad flag or recipe, 1 otherwise. Anything else is a bug and keeps its
    traceback; `allcnn --debug` shows the traceback of user errors too."""
    try:
        yield
    except AllcnnError as e:
        if click.get_current_context().find_root().params.get("debug"):
            raise
        if isinstance(e, ConfigError):
            raise click.UsageError(str(e)) from None
        error = click.ClickException(str(e))
        error.exit_code = getattr(e, "exit_code", 1)  # 2 where nothing can be done with the data (DatasetError)
        raise error from None


data_dir_option = click.option(
    "--data-dir", type=click.Path(path_type=Path), envvar="ALLCNN_DATA_DIR",
    help="CIFAR-10 (or -100): a cifar-10-batches-py folder, its parent, or cifar-10-python.tar.gz; "
         "or your own images, one sub-folder per class (DIR/CLASS/IMAGE) "
         "[env ALLCNN_DATA_DIR; default: Keras' cache, downloading if needed].")
dataset_option = click.option(
    "--dataset", type=click.Choice(DATASETS), default=None,
    help="auto (default): an image folder when --data-dir holds class sub-folders, else cifar10.")
device_option = click.option("--device", type=click.Choice(DEVICES), default=None,
                             help="auto: a GPU when the backend sees one, else the CPU.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="allcnn")
@click.option("--debug", is_flag=True, help="Show the traceback of an error instead of one line.")
def main(debug: bool) -> None:
    """All-CNN-C (Springenberg et al., 2015) on CIFAR-10 with Keras 3."""


@main.command()
@click.option("--config", "config_path", default="paper", show_default=True,
              help=f"A TOML recipe: a path, or the name of one in configs/ ({', '.join(recipe_names())}).")
@click.option("--epochs", type=click.IntRange(min=1),
              help="Epochs of all layers, after the recipe's --head-epochs classifier-only ones (finetune: 10); "
                   "the run's first line states the plan.")
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Peak learning rate.")
@click.option("--schedule", type=click.Choice(SCHEDULES))
@click.option("--warmup-epochs", type=click.IntRange(min=0))
@click.option("--weight-decay", type=click.FloatRange(min=0),
              help="The paper's weight decay (0.001); the kernels get keras l2(weight_decay / 2).")
@click.option("--label-smoothing", type=click.FloatRange(0, 1, max_open=True))
@click.option("--augment/--no-augment", default=None, help="Random flips and translations.")
@click.option("--ema/--no-ema", "use_ema", default=None,
              help="Validate and checkpoint a moving average of the weights (SGD use_ema).")
@click.option("--ema-momentum", type=click.FloatRange(0, 1, max_open=True),
              help="Weight of the old average at each step (0.999: about the last 1,000 steps).")
@click.option("--variant", type=click.Choice(VARIANTS),
              help="The network (default paper: All-CNN-C, which all-cnn-c also names); the others of the paper's "
                   "Tables 1-2 and tutorial are in docs/models.md.")
@click.option("--precision", type=click.Choice(PRECISIONS),
              help="auto: bf16 only where the hardware has it natively.")
@click.option("--seed", type=int)
@click.option("--initial-weights", metavar="PATH|shipped",
              help="Start from these weights (shipped: ours, CIFAR-10) instead of a random init: all layers for "
                   "the same classes, else all but the classifier (transfer learning).")
@click.option("--teacher", metavar="PATH|shipped",
              help="Distillation: train on these weights' predictions (flip-averaged), or a teacher network's "
                   "(its .keras file, scripts/train_teacher.py), instead of the labels.")
@click.option("--freeze-base/--no-freeze-base", default=None,
              help="Train only the classifier (the last 1x1 conv); the base keeps its initial weights.")
@click.option("--head-epochs", type=click.IntRange(min=0),
              help="Epochs of the classifier alone (at --head-lr) before the --epochs of all layers "
                   "(finetune: 10; 0: none).")
@click.option("--head-lr", type=click.FloatRange(min=0, min_open=True), help="The lr of the --head-epochs.")
@click.option("--val-size", type=click.IntRange(min=0),
              help="Training images held out for validation (default 0: the dataset's, 5000 of CIFAR, "
                   "10% of an image folder with at least one image a class); overrides the recipe's --val-split.")
@click.option("--val-split", type=click.FloatRange(0, 1, max_open=True),
              help="Hold out this fraction of the training images instead (finetune: 0.2).")
@click.option("--image-size", type=click.IntRange(min=16),
              help="Network input size for an image folder, images resized to it (default 32, as CIFAR).")
@dataset_option
@data_dir_option
@click.option("--test-dir", type=click.Path(path_type=Path, file_okay=False),
              help="An image folder's test images, with the same class sub-folders as --data-dir.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("runs/allcnn"),
              show_default=True, help="Run folder.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last completed epoch.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run in --out.")
@device_option
@click.option("--distribute", type=click.Choice(DISTRIBUTE_MODES),
              help="Data parallelism (default auto: over all local GPUs when there are several, or all processes' "
                   "devices in a multi-process JAX run). mirrored: TensorFlow; data-parallel: JAX.")
@click.option("--lr-scaling", type=click.Choice(LR_SCALINGS),
              help="linear (default): the lr is multiplied by the replica count, as the global batch is.")
@click.option("--data-workers", type=click.IntRange(min=1),
              help="Threads that prepare the next batches during a step (default 1; 8 feed a GPU). Same batches.")
@click.option("--steps-per-execution", type=click.IntRange(min=1),
              help="Steps per call of the compiled step (default 1; e.g. 16 on a GPU). Same weights.")
@click.option("--coordinator-address", envvar=["KERAS_DISTRIBUTION_JOB_ADDRESSES", "JAX_COORDINATOR_ADDRESS"],
              help="host:port of process 0, for a multi-process JAX run [env KERAS_DISTRIBUTION_JOB_ADDRESSES].")
@click.option("--num-processes", type=click.IntRange(min=1),
              envvar=["KERAS_DISTRIBUTION_NUM_PROCESSES", "JAX_NUM_PROCESSES"],
              help="Processes in a multi-process JAX run [env KERAS_DISTRIBUTION_NUM_PROCESSES].")
@click.option("--process-id", type=click.IntRange(min=0), envvar=["KERAS_DISTRIBUTION_PROCESS_ID", "JAX_PROCESS_ID"],
              help="This process's index, 0 writes the run folder [env KERAS_DISTRIBUTION_PROCESS_ID].")
@click.option("--test", is_flag=True, help="Evaluate the best weights on the test set at the end.")
def train(config_path, data_dir, test_dir, out, resume, overwrite, test, coordinator_address, num_processes,
          process_id, **flags) -> None:
    """Train All-CNN-C (or another network: --variant) into a run folder (resumable).

    \b
    Example:
      allcnn train --config paper --data-dir ../shared/data --out runs/paper
      allcnn train --resume --out runs/paper --data-dir ../shared/data
      allcnn train --config finetune --data-dir my_photos --out runs/mine
      allcnn train --config paper-cifar100 --data-dir cifar-100-python --out runs/c100
    """
    from allcnn.config import load_config

    with user_errors():
        if resume and overwrite:  # before joining a cluster, which may wait for the other processes
            raise ConfigError(f"--resume continues the run in {out}; drop --overwrite")
        for key in ("initial_weights", "teacher"):  # absolute: the run's config.toml works anywhere
            if flags[key] not in (None, "", SHIPPED):
                flags[key] = str(Path(flags[key]).resolve())
        # The recipe is read with tomllib alone: a broken one is refused before TensorFlow starts.
        config = None if resume else load_config(config_path, **flags)
        _import_keras_quietly()
        if coordinator_address or (num_processes or 1) > 1:
            from allcnn.distribute import join_cluster

            join_cluster(coordinator_address, num_processes, process_id)
        from allcnn import training
        from allcnn.distribute import WorkerLost

        try:
            if resume:  # --config counts only when given: its default is no claim about the run
                explicit = click.get_current_context().get_parameter_source("config_path") is not ParameterSource.DEFAULT
                summary = training.resume(out, data_dir=data_dir, test_dir=test_dir, test=test,
                                          recipe=config_path if explicit else None, **flags)
            else:
                summary = training.train(config, out, data_dir=data_dir, test_dir=test_dir, overwrite=overwrite,
                                         test=test)
        except KeyboardInterrupt:
            raise click.ClickException(f"interrupted; continue with: allcnn train --resume --out {out}") from None
        except WorkerLost as e:
            # JAX's own shutdown would wait for the lost process, then abort with a
            # stack dump; the message above is what the user needs.
            _echo_error(str(e))
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(1)
    if "process_id" in summary:
        click.echo(f"done: process {summary['process_id']} finished {summary['epochs']} epochs; process 0 wrote "
                   f"the run folder")
        return
    line = f"done: {summary['epochs']} epochs, best val_accuracy {summary['best_val_accuracy']:.4f}"
    if summary.get("skipped_files"):
        line += f", {summary['skipped_files']} files skipped (not usable images, listed above)"
    if "test_accuracy" in summary:
        line += f", test accuracy {summary['test_accuracy']:.4f}"
    click.echo(f"{line}; run folder {out}")


@main.command()
@click.option("--precision", type=click.Choice(["auto", "float32", "mixed_bfloat16", "all"]), default="auto",
              show_default=True, help="all: float32 and, where the hardware has it natively, mixed_bfloat16.")
@click.option("--batch-size", "batch_sizes", type=click.IntRange(min=1), multiple=True, default=[128],
              show_default=True, help="Repeat to compare batch sizes.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Batches per timed repetition.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed repetitions after one warm-up.")
@click.option("--intra-threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="TensorFlow intra-op threads (0: its default, all cores).")
@click.option("--inter-threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="TensorFlow inter-op threads (0: its default).")
@click.option("--feed", type=click.Choice(["tensors", "pipeline"]), default="tensors", show_default=True,
              help="Training input: one in-memory batch (the train step alone) or allcnn train's augmenting pipeline.")
@click.option("--deterministic/--no-deterministic", default=True, show_default=True,
              help="TensorFlow op determinism on the CPU, as allcnn train uses.")
@click.option("--variant", type=click.Choice(VARIANTS), default="paper", show_default=True,
              help="The network measured (see allcnn train --help).")
@device_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
def benchmark(precision, batch_sizes, steps, repeats, intra_threads, inter_threads, feed, deterministic, variant,
              device, as_json) -> None:
    """Measure training and inference speed here, against this machine's matmul ceiling.

    \b
    Example:
      allcnn benchmark --precision all --batch-size 64 --batch-size 128
      allcnn benchmark --variant model-c
    """
    import json

    with user_errors():
        _import_keras_quietly()
        from allcnn.benchmark import format_table, run_benchmark

        result = run_benchmark(precision, tuple(batch_sizes), steps=steps, repeats=repeats, intra_threads=intra_threads,
                               inter_threads=inter_threads, feed=feed, device=device or "auto",
                               deterministic=deterministic, variant=variant)
    click.echo(json.dumps(result) if as_json else format_table(result))


network_options = [
    click.option("--weights", type=click.Path(path_type=Path, dir_okay=False),
                 help="Keras 3 .weights.h5 (a run's best.weights.h5), .keras, or Keras 2 .hdf5 "
                      "[default: the shipped weights in weights/manifest.json].",),
    click.option("--variant", type=click.Choice(VARIANTS),
                 help="Model variant, when no config.toml lies beside --weights (see allcnn train --help)."),
    click.option("--preprocessing-json", type=click.Path(path_type=Path, dir_okay=False),
                 help="The run's preprocessing.json, when none lies beside --weights."),
    device_option,
]


def inference_options(precision: str, precision_help: str) -> list:
    """The options of the commands that classify in batches (evaluate, predict)."""
    return [
        click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--precision", type=click.Choice(PRECISIONS), default=precision, show_default=True,
                     help=precision_help),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
        click.option("--tta", type=click.Choice(TTA_MODES), default="none", show_default=True,
                     help="Test-time augmentation: flip averages each image with its mirror."),
    ]


def _parse_indices(ctx, param, value: str | None) -> slice | None:
    """`A:B` as a Python slice of the split (either end may be left out)."""
    if value is None:
        return None
    try:
        first, stop = (int(part) if part.strip() else None for part in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not A:B, e.g. 0:1000") from None
    return slice(first, stop)


def _with_options(*option_lists: list):
    def decorate(command):
        for option in reversed([option for options in option_lists for option in options]):
            command = option(command)
        return command

    return decorate


def _resolve(weights, variant, preprocessing_json) -> WeightsSpec:
    """The weights and what goes with them, read with h5py and json only: a bad file
    is refused before TensorFlow starts."""
    return resolve_weights(weights, variant=variant, preprocessing_json=preprocessing_json)


def _load(spec: WeightsSpec, precision: str, device: str | None):
    """The classifier for resolved weights (this is where Keras and TensorFlow start)."""
    _import_keras_quietly()
    from allcnn.model import load_classifier

    return load_classifier(spec, precision=precision, device=device or "auto")


def _echo_error(message: str) -> None:
    """One line on stderr, in click's style for errors (`Error: ...`)."""
    click.echo(f"Error: {message}", err=True)


@main.command()
@_with_options(network_options, inference_options(
    "float32", "float32 reproduces the manifest's figures exactly; auto: bf16 where the hardware has it natively."))
@data_dir_option
@dataset_option
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="val: the run's held-out training images. For an image folder, test is all of its images.")
@click.option("--indices", metavar="A:B", callback=_parse_indices,
              help="Only images A..B-1 of the split, e.g. 0:1000 (the exact test images of ../shared/data).")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False), help="Write a confusion-matrix PNG.")
@click.option("--plot-samples", type=click.IntRange(1, 64), metavar="N",  # 64: plots.GRID_LIMIT
              help="Write a PNG grid of the split's first N images (at most 64) with predicted and true class, "
                   "misclassified in red.")
@click.option("--samples-out", type=click.Path(path_type=Path, dir_okay=False), default=Path("samples.png"),
              show_default=True, help="Where --plot-samples writes its grid.")
def evaluate(weights, variant, preprocessing_json, device, batch_size, precision, as_json, tta, data_dir, dataset,
             split, indices, plot, plot_samples, samples_out):
    """Loss, top-1, top-5 and per-class accuracy of weights on their dataset (CIFAR-10, -100, an image folder).

    \b
    Example:
      allcnn evaluate --data-dir ../shared/data
      allcnn evaluate --data-dir ../shared/data --indices 0:1000 --tta flip
      allcnn evaluate --data-dir ../shared/data --plot confusion.png --plot-samples 32 --samples-out samples.png
      allcnn evaluate --weights runs/mine/best.weights.h5 --data-dir my_test_photos
    """
    import json

    with user_errors():
        spec = _resolve(weights, variant, preprocessing_json)
        if not as_json:  # what is being measured, before the seconds it takes
            click.echo(f"weights: {spec.path} ({spec.variant}, {precision})")
        classifier = _load(spec, precision, device)
        from allcnn.evaluation import evaluate as run_evaluation

        result = run_evaluation(classifier, data_dir=data_dir, split=split, batch_size=batch_size,
                                dataset=dataset or "auto", indices=indices, tta=tta, progress=True,
                                samples_plot=samples_out if plot_samples else None, samples=plot_samples or 0)
        subset = f"{split} {result['indices']}" if indices else split
        if plot:
            from allcnn.plots import plot_confusion

            plot_confusion(result["confusion"], list(result["per_class"]), plot,
                           f"{Path(result['weights']).name} on {subset}: top-1 {result['top1']:.2%}")
    if as_json:
        click.echo(json.dumps(result))
        return
    tta_note = ", tta flip" if tta != "none" else ""
    click.echo(f"{subset}: {result['images']} images{tta_note} in {result['seconds']:.2f} s "
               f"({result['images_per_second']:.0f} images/s, {result['precision']}, {result['device']})")
    top5 = f"   top-5 {result['top5']:.2%}" if "top5" in result else ""
    click.echo(f"loss {result['loss']:.4f}   top-1 {result['top1']:.2%}{top5}")
    click.echo(f"{'class':<12}accuracy")
    for name, accuracy in result["per_class"].items():
        click.echo(f"{name:<12}{'n/a' if accuracy is None else format(accuracy, '.2%'):>8}")
    if plot:
        click.echo(f"confusion matrix: {plot}")
    if plot_samples:
        click.echo(f"samples: {samples_out}")


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@_with_options(network_options, inference_options(
    "auto", "auto: bf16 where the hardware has it natively, else float32 (float32 reproduces evaluate's figures)."))
@click.option("--top-k", type=click.IntRange(min=1), default=3, show_default=True,
              help="Classes per image (at most the weights' number of classes).")
@click.option("--plot", type=click.Path(path_type=Path, dir_okay=False),
              help="Write a PNG grid of the images with their top class and probability (the first 64).")
def predict(inputs, weights, variant, preprocessing_json, device, batch_size, precision, as_json, tta, top_k, plot):
    """Classify images (files, folders or globs; any format Pillow reads).

    Bad files get one line on stderr; the others are still classified and
    the exit status is 1.

    \b
    Example:
      allcnn predict cat.jpg photos/ --top-k 3
      allcnn predict 'shots/*.png' --plot grid.png
    """
    import json

    from allcnn.prediction import check_top_k, plot_predictions, predict as run_prediction

    failed, classified = [], []
    with user_errors():
        spec = _resolve(weights, variant, preprocessing_json)
        check_top_k(top_k, spec.class_names)
        classifier = _load(spec, precision, device)
        for result in run_prediction(inputs, classifier, top_k=top_k, batch_size=batch_size, tta=tta, progress=True):
            if "error" in result:
                failed.append(result["error"])
                _echo_error(result["error"])
            elif as_json:
                click.echo(json.dumps(result))
            else:
                top = "  ".join(f"{t['class']} {t['probability']:.1%}" for t in result["top"])
                click.echo(f"{result['path']}  {top}")
            if plot and "error" not in result:
                classified.append(result)
        if plot and classified:
            plot_predictions(classified, plot)
    if plot and classified and not as_json:
        click.echo(f"grid: {plot}")
    if failed:
        raise SystemExit(1)


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@_with_options(network_options)
@click.option("--class", "class_name", default="top", show_default=True, metavar="NAME|top",
              help="The class to explain, one of the weights' (CIFAR-10: airplane ... truck); "
                   "top: each image's predicted class.")
@click.option("--method", type=click.Choice(EXPLAIN_METHODS), default="guided", show_default=True,
              help="guided: the paper's guided backpropagation; deconvnet: the deconvnet's reconstruction "
                   "(the paper's Figure 3); saliency: |gradient|; gradcam: Grad-CAM.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=Path("explanations"),
              show_default=True, help="Folder for the PNGs: one per image, and grid.METHOD.png for several.")
def explain(inputs, weights, variant, preprocessing_json, device, class_name, method, out):
    """Show what the network looks at: a map of each image's class-score gradient.

    Per image a PNG with the input, its predicted class and the map, named
    after the image; a grid of them all for several. Bad files get one line
    on stderr; the others are still explained and the exit status is 1.

    \b
    Example:
      allcnn explain cat.jpg photos/ --out maps
      allcnn explain cat.jpg --method gradcam --class dog
    """
    from allcnn.explain import check_request, explain as run_explain, save_explanations
    from allcnn.images import ImageError

    explained, failed = [], []
    with user_errors():
        spec = _resolve(weights, variant, preprocessing_json)
        check_request(method, class_name, spec.class_names)
        classifier = _load(spec, "float32", device)  # gradients in bf16 would be too coarse
        for result in run_explain(inputs, classifier, method=method, class_name=class_name, progress=True):
            if isinstance(result, ImageError):
                failed.append(str(result))
                _echo_error(str(result))
            else:
                explained.append(result)
        written = save_explanations(explained, out)
    for e, path in zip(explained, written):
        click.echo(f"{e.path}  {e.predicted} {e.probability:.1%}  {method} of {e.explained}: {path}")
    if len(written) > len(explained):
        click.echo(f"grid: {written[-1]}")
    if failed:
        raise SystemExit(1)


@main.command()
@_with_options(network_options)
@click.option("--format", "format_", type=click.Choice(EXPORT_FORMATS), required=True,
              help="onnx (.onnx, onnxruntime), tflite (.tflite, LiteRT) or saved_model (a folder, TensorFlow).")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The file (a folder for saved_model); PATH.json beside it describes it.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out.")
def export(weights, variant, preprocessing_json, device, format_, out, overwrite):
    """Export the network with its preprocessing, to run without allcnn.

    The exported model takes float32 RGB pixels 0..255, NHWC, 32x32 (or the size it was trained at), and returns
    the class probabilities (10 for CIFAR-10). Before it is written, it is run with its own
    runtime and compared with Keras on a few images; a mismatch is an error.
    Converters: pip install 'allcnn[export]'.

    \b
    Example:
      allcnn export --format onnx --out allcnn.onnx
      allcnn export --weights runs/paper/best.weights.h5 --format tflite --out allcnn.tflite
    """
    from allcnn.export import check_target, export as run_export, spec_path

    with user_errors():
        spec = _resolve(weights, variant, preprocessing_json)
        check_target(format_, out, overwrite)
        exported = run_export(_load(spec, "float32", device), format=format_, out=out, overwrite=overwrite)
    check = exported["check"]
    click.echo(f"exported {exported['source_weights']['path']} as {format_}: {out} (description: {spec_path(out)})")
    click.echo(f"checked with {check['runtime']} on {check['images']} images: probabilities within "
               f"{check['max_abs_difference']:.2g} of Keras' (tolerance {check['tolerance']:g})")
