"""`allcnn explain`: what the network looks at, as maps over the input image.

Four methods, all from the gradient of one class's pre-softmax score (the
global average pooling output, before the final softmax) with dropout off,
in float32. Three of them differ only in how the backward pass goes through
each ReLU (Springenberg et al., 2015, section 3.4 and Figure 3), where the
plain gradient passes the incoming gradient R where the ReLU's input was positive:

- `guided`: guided backpropagation, the paper's own visualization: R passes
  where both the ReLU's input and R are positive.
- `deconvnet`: the "deconvnet" of Zeiler and Fergus (2014): R passes where R
  is positive, whatever the ReLU's input (the forward pass leaves no mask).
- `saliency`: the plain gradient (Simonyan et al., 2014): its absolute value,
  the maximum over the colour channels.
- `gradcam`: Grad-CAM (Selvaraju et al., 2017) on the feature map that enters the
  classifier, the last conv (6x6 in `paper`): that map's channels
  weighted by their spatially averaged gradient, summed, ReLU'd, and resized
  to the input size bilinearly.

The ReLU layers are swapped for ReLUs with their own backward pass, built with
`keras.ops.custom_gradient`, so they run under TensorFlow and JAX alike. Every
other layer keeps its gradient: a max-pooling's passes R to the input that was
the maximum (the deconvnet's "switches"), in all three.

The preprocessing (per-channel standardization, or ZCA) is applied in numpy
before the network, so the gradients are taken with respect to the network's
input: the preprocessed image, not the raw pixels. For standardization they
differ from the pixel gradient only by a positive factor per channel, so the
maps look alike; we show the input gradient as it is.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from allcnn.config import EXPLAIN_METHODS as METHODS, ConfigError
from allcnn.errors import AllcnnError
from allcnn.images import ImageError, expand_inputs, load_batches
from allcnn.inference import Classifier, Progress, check_float32
from allcnn.plots import GRID_LIMIT, Panel, plot_panels

TOP = "top"
# A guided or deconvnet map is drawn with this percentile of |gradient| at full scale, so that a few
# extreme pixels do not leave the rest of the map flat grey.
_DISPLAY_PERCENTILE = 99.5

Layers = list[Callable]


class ExplainError(AllcnnError, RuntimeError):
    """The explanation cannot be computed here (an unsupported backend)."""


def _relu_passing(where: Callable) -> Callable:
    """A ReLU whose backward pass lets the incoming gradient through `where(inputs, gradient)`."""
    from keras import ops

    def relu(x):
        @ops.custom_gradient
        def forward(x):
            def backward(*args, upstream=None):
                upstream = args[0] if upstream is None else upstream  # TF and JAX pass it positionally
                return upstream * ops.cast(where(x, upstream), upstream.dtype)

            return ops.relu(x), backward

        return forward(x)

    return relu


guided_relu = _relu_passing(lambda x, gradient: (x > 0) & (gradient > 0))
deconvnet_relu = _relu_passing(lambda x, gradient: gradient > 0)


def _network_layers(model) -> list:
    """The layers from the input to the pre-softmax score: no Dropout (dropout off), no final softmax.

    The model must be a `build_model` network, whose convs are linear and followed by
    separate ReLU layers: a layer with an activation of its own would hide a ReLU from
    guided backpropagation and the deconvnet, so it is refused.
    """
    import keras

    kept = [layer for layer in model.layers[:-1] if not isinstance(layer, keras.layers.Dropout)]
    for layer in kept:
        if getattr(layer, "activation", keras.activations.linear) is not keras.activations.linear:
            raise ExplainError(f"layer {layer.name!r} of {model.name} has its own activation; explain needs the "
                               "activations as separate layers, as build_model makes them")
    return kept


def score_layers(model, *, relu: Callable | None = None) -> Layers:
    """The model's layers up to the pre-softmax score, as callables in inference mode;
    with `relu` (`guided_relu`, `deconvnet_relu`), every ReLU layer becomes it."""
    import keras

    return [relu if relu and isinstance(layer, keras.layers.ReLU)
            else (lambda x, layer=layer: layer(x, training=False)) for layer in _network_layers(model)]


def gradcam_split(model) -> int:
    """Index in `score_layers(model)` where Grad-CAM's feature map comes out: the input of the last conv."""
    import keras

    return max(i for i, layer in enumerate(_network_layers(model)) if isinstance(layer, keras.layers.Conv2D))


def run_layers(layers: Layers, x):
    for layer in layers:
        x = layer(x)
    return x


def input_gradient(score: Callable, x: np.ndarray) -> np.ndarray:
    """d sum(score(x)) / dx as float32 numpy; `score` maps a batch to one score per image.

    Images of a batch do not interact (no dropout, batch norm in inference mode),
    so the gradient of the sum is each image's own gradient.
    """
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            total = tf.reduce_sum(score(x))
        return tape.gradient(total, x).numpy()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda v: score(v).sum())(jax.numpy.asarray(x, np.float32)))
    raise ExplainError(f"explain supports the tensorflow and jax backends, not {backend}; set KERAS_BACKEND")


def class_scores(classes: np.ndarray) -> Callable:
    """A function from logits (N, classes) to each image's score for its own class."""
    from keras import ops

    picked = np.asarray(classes, dtype=np.int32)[:, None]
    return lambda logits: ops.take_along_axis(logits, picked, axis=1)[:, 0]


def backpropagate(model, x: np.ndarray, classes: np.ndarray, relu: Callable | None = None) -> np.ndarray:
    """Each image's class score taken back to the input, (N, H, W, C): the plain gradient, or
    with `relu` the backward pass it gives the ReLUs."""
    layers, pick = score_layers(model, relu=relu), class_scores(classes)
    return input_gradient(lambda v: pick(run_layers(layers, v)), x)


def guided_gradient(model, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Guided backpropagation of each image's class score to the input, (N, H, W, C)."""
    return backpropagate(model, x, classes, guided_relu)


def deconvnet(model, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The deconvnet's reconstruction of each image's class score at the input, (N, H, W, C)."""
    return backpropagate(model, x, classes, deconvnet_relu)


def saliency(model, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """|plain gradient| of each image's class score, maximum over channels, (N, H, W)."""
    return np.abs(backpropagate(model, x, classes)).max(axis=-1)


def gradcam(model, x: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Grad-CAM of each image's class, resized to the input size and scaled to [0, 1], (N, H, W)."""
    from keras import ops

    layers, pick = score_layers(model), class_scores(classes)
    split = gradcam_split(model)
    features = ops.convert_to_numpy(run_layers(layers[:split], ops.convert_to_tensor(x)))
    weights = input_gradient(lambda a: pick(run_layers(layers[split:], a)), features).mean(axis=(1, 2))
    cam = np.maximum(np.einsum("nhwc,nc->nhw", features, weights), 0)
    resized = ops.convert_to_numpy(ops.image.resize(cam[..., None], x.shape[1:3], interpolation="bilinear"))[..., 0]
    return _unit_scale(np.maximum(resized, 0))


_MAPS = {"guided": guided_gradient, "deconvnet": deconvnet, "saliency": saliency, "gradcam": gradcam}


def _unit_scale(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its own maximum (an all-zero map stays zero)."""
    peak = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, *[1] * (maps.ndim - 1))
    return (maps / np.where(peak > 0, peak, 1)).astype(np.float32)


def to_display(explanation: np.ndarray) -> np.ndarray:
    """An explanation as an image in [0, 1]: a gradient (H, W, 3) centred on grey
    (zero gradient) with the 99.5th percentile of |gradient| at full scale, so a few
    extreme pixels do not leave the rest black; a (H, W) map scaled to its maximum."""
    if explanation.ndim == 2:
        return _unit_scale(explanation[None])[0]
    scale = np.percentile(np.abs(explanation), _DISPLAY_PERCENTILE)
    return np.clip(0.5 + 0.5 * explanation / (scale if scale > 0 else 1), 0, 1).astype(np.float32)


@dataclass
class Explanation:
    """One image explained: `map` is (H, W, 3) for `guided` and `deconvnet` (as computed), (H, W) |gradient| for
    `saliency`, and (H, W) in [0, 1] for `gradcam`."""

    path: str
    image: np.ndarray
    method: str
    explained: str
    predicted: str
    probability: float
    map: np.ndarray


def check_request(method: str, class_name: str, names: tuple[str, ...]) -> None:
    """Refuses an unknown method or class (one of `names`, or `top`) before any work."""
    if method not in METHODS:
        raise ConfigError(f"method {method!r} is not one of {', '.join(METHODS)}")
    if class_name != TOP and class_name not in names:
        close = difflib.get_close_matches(class_name, names, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"class {class_name!r} is not one of the weights' classes; {hint}"
                          f"pass {TOP} or one of {', '.join(names)}")


def explain_arrays(classifier: Classifier, images: np.ndarray, *, method: str = "guided",
                   class_name: str = TOP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maps for uint8 images (N, H, W, 3): `(maps, explained class indices, probabilities)`.

    `class_name` is one of the classifier's classes, or `"top"` for each image's predicted class.
    `probabilities` are the softmax outputs (N, classes) of the classifier.
    """
    check_request(method, class_name, classifier.class_names)
    probabilities = classifier.probabilities(images)
    classes = (probabilities.argmax(axis=1) if class_name == TOP
               else np.full(len(images), classifier.class_names.index(class_name)))
    maps = _MAPS[method](classifier.model, classifier.preprocessing(images), classes)
    return maps.astype(np.float32), classes, probabilities


def explain(
    inputs: Iterable[str | os.PathLike],
    classifier: Classifier,
    *,
    method: str = "guided",
    class_name: str = TOP,
    batch_size: int = 32,
    progress: bool = False,
) -> Iterator[Explanation | ImageError]:
    """Yields, in input order, an `Explanation` per image, or the `ImageError` of a bad file.

    Inputs are files, folders or globs as for `predict`. `classifier` must be float32
    (`load_classifier(..., precision="float32")`): gradients in bf16 would be too coarse.
    `progress` shows a progress bar on stderr, when that is a terminal, for 100 images or more.
    """
    check_float32(classifier, "explain")
    names = classifier.class_names
    check_request(method, class_name, names)  # before any image: a bad flag is reported even if none loads
    files = list(expand_inputs(inputs))
    bar = Progress(len(files), progress)
    for batch in load_batches(files, batch_size, classifier.image_size):
        good = [(path, image) for path, image in batch if not isinstance(image, ImageError)]
        results = {}
        if good:
            pixels = np.stack([image for _, image in good])
            maps, classes, probabilities = explain_arrays(classifier, pixels, method=method, class_name=class_name)
            for (path, image), m, c, p in zip(good, maps, classes, probabilities):
                top = int(p.argmax())
                results[path] = Explanation(str(path), image, method, names[c], names[top],
                                            float(p[top]), m)
        bar.add(len(batch))
        for path, image in batch:
            yield image if isinstance(image, ImageError) else results[path]


# Colorbar labels: both maps are divided by their own maximum (`gradcam`, `to_display`), so 1 is
# the image's peak, not an absolute value. A guided or deconvnet map is RGB: no single scale, no bar.
_SCALES = {"gradcam": "relevance (÷ its max)", "saliency": "|gradient| (÷ its max)"}


def panels(explanation: Explanation) -> list:
    """The input (captioned with the predicted class) and its map (with the class explained);
    Grad-CAM's coarse map is drawn over the input, the others beside it."""
    e = explanation
    shown = e.image if e.method == "gradcam" else to_display(e.map)
    return [Panel(e.image, f"{Path(e.path).name}\n{e.predicted} {e.probability:.0%}"),
            Panel(shown, f"{e.method}: {e.explained}", overlay=e.map if e.method == "gradcam" else None,
                  scale=_SCALES.get(e.method))]


def save_explanations(explanations: list[Explanation], out: str | os.PathLike) -> list[Path]:
    """Writes `<image name>.<method>.png` per explanation into `out` and, for several,
    `grid.<method>.png` with them all (the first `GRID_LIMIT`); returns the paths written.
    Two inputs with the same name get `-2`, `-3`... so none overwrites another."""
    out = Path(out)
    written = [out / f"{name}.{e.method}.png" for e, name in zip(explanations, _unique_stems(explanations))]
    for e, path in zip(explanations, written):
        plot_panels(panels(e), path, columns=2)
    if len(explanations) > 1:
        shown = explanations[:GRID_LIMIT]
        written.append(out / f"grid.{shown[0].method}.png")
        title = f"{shown[0].method}: the first {len(shown)} of {len(explanations)} images" \
            if len(shown) < len(explanations) else shown[0].method
        plot_panels([p for e in shown for p in panels(e)], written[-1], columns=2 * min(len(shown), 4), title=title)
    return written


def _unique_stems(explanations: list[Explanation]) -> list[str]:
    """The inputs' file names without suffix, a repeated one numbered `-2`, `-3`...
    (`grid` is taken: the grid's own name)."""
    names = ["grid"]
    for e in explanations:
        stem = candidate = Path(e.path).stem
        n = 1
        while candidate in names:
            n += 1
            candidate = f"{stem}-{n}"
        names.append(candidate)
    return names[1:]
