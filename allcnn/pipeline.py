"""The training input pipeline: shuffled, augmented batches as a PyDataset.

Everything random is keyed by (seed, epoch, batch index) with numpy's
stateless-by-construction generators, so batch `i` of epoch `e` is the same
whichever process or worker builds it: a resumed run sees exactly the data an
uninterrupted one would. Pure numpy, so it runs under every Keras backend (the
GPU machines have JAX but no TensorFlow).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import keras
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from allcnn.preprocessing import Preprocessing


def augment(images: np.ndarray, rng: np.random.Generator, flip: bool, translate: int,
            cutout: int = 0) -> np.ndarray:
    """Random horizontal flips, translations up to `translate` pixels and cutout.

    Translations pad with zeros (the training mean after standardization) and
    crop back to the original size, as in the paper's "translations". Cutout
    (DeVries & Taylor, 2017) then zeroes a `cutout` x `cutout` square centred on
    a random pixel, clipped at the border, so it may cover less than the square.
    """
    n, h, w, _ = images.shape
    if flip:
        flips = rng.random(n) < 0.5
        images = np.where(flips[:, None, None, None], images[:, :, ::-1], images)
    if translate:
        padded = np.pad(images, ((0, 0), (translate, translate), (translate, translate), (0, 0)))
        dy, dx = rng.integers(0, 2 * translate + 1, size=(2, n))
        rows = (dy[:, None] + np.arange(h))[:, :, None]
        cols = (dx[:, None] + np.arange(w))[:, None, :]
        images = padded[np.arange(n)[:, None, None], rows, cols]
    if cutout:
        top, left = (rng.integers(0, (h, w), size=(n, 2)) - cutout // 2).T
        inside_rows = (np.arange(h) >= top[:, None]) & (np.arange(h) < top[:, None] + cutout)
        inside_cols = (np.arange(w) >= left[:, None]) & (np.arange(w) < left[:, None] + cutout)
        images = np.where((inside_rows[:, :, None] & inside_cols[:, None, :])[..., None], 0, images)
    return images


_GREY = (128, 128, 128)  # what the geometric operations uncover, as in the TrivialAugment authors' code


def _affine(image: Image.Image, matrix: tuple) -> Image.Image:
    return image.transform(image.size, Image.AFFINE, matrix, fillcolor=_GREY)


def _enhance(enhancer: type) -> Callable[[Image.Image, float], Image.Image]:
    return lambda image, m: enhancer(image).enhance(1 + 0.99 * m)


# TrivialAugment's "wide" operations, as torchvision's TrivialAugmentWide has them: each maps an
# image and a magnitude m in [-1, 1] (the sign drawn too, so shears, translations, rotations and
# enhancements go both ways) to an image.
_WIDE_OPERATIONS: tuple[Callable[[Image.Image, float], Image.Image], ...] = (
    lambda image, m: image,
    lambda image, m: _affine(image, (1, 0.99 * m, 0, 0, 1, 0)),  # shear x
    lambda image, m: _affine(image, (1, 0, 0, 0.99 * m, 1, 0)),  # shear y
    lambda image, m: _affine(image, (1, 0, 32 * m, 0, 1, 0)),  # translate x, up to 32 pixels
    lambda image, m: _affine(image, (1, 0, 0, 0, 1, 32 * m)),  # translate y
    lambda image, m: image.rotate(135 * m, fillcolor=_GREY),
    _enhance(ImageEnhance.Brightness),
    _enhance(ImageEnhance.Color),
    _enhance(ImageEnhance.Contrast),
    _enhance(ImageEnhance.Sharpness),
    lambda image, m: ImageOps.posterize(image, 8 - round(6 * abs(m))),  # 8 bits down to 2
    lambda image, m: ImageOps.solarize(image, round(255 * (1 - abs(m)))),
    lambda image, m: ImageOps.autocontrast(image),
    lambda image, m: ImageOps.equalize(image),
)


def trivial_augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """TrivialAugment (Müller & Hutter, 2021), its wide search space: each uint8 image goes
    through one operation drawn uniformly, at a magnitude drawn uniformly from 31 steps.

    A policy with nothing to tune, stronger than flips and translations, for when those leave a
    network fitting its training images better without gaining on held-out ones.
    """
    operations = rng.integers(0, len(_WIDE_OPERATIONS), len(images))
    magnitudes = rng.integers(0, 31, len(images)) / 30 * rng.choice((-1, 1), len(images))
    return np.stack([np.asarray(_WIDE_OPERATIONS[op](Image.fromarray(image), m))
                     for image, op, m in zip(images, operations, magnitudes)])


def mixup(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator,
          alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Mixup (Zhang et al., 2018): each image and its label become a convex combination with
    those of another image of the batch, weighted by a draw from Beta(alpha, alpha) per image."""
    weight = rng.beta(alpha, alpha, len(images)).astype(np.float32)
    partner = rng.permutation(len(images))

    def mixed(a: np.ndarray) -> np.ndarray:  # w * a + (1 - w) * a[partner], w broadcast over a's other axes
        w = weight.reshape(-1, *[1] * (a.ndim - 1))
        return (w * (a - a[partner]) + a[partner]).astype(np.float32)

    return mixed(images), mixed(labels)


class CifarBatches(keras.utils.PyDataset):
    """Preprocessed (and optionally augmented) batches of one split.

    Args:
        images: uint8 images (N, H, W, 3).
        labels: one-hot float32 labels (N, classes).
        preprocessing: the fitted `Preprocessing`, applied once up front.
        batch_size: images per (global) batch; the last batch may be smaller
            unless `drop_remainder`.
        shuffle, flip, translate, cutout: training-time randomness.
        trivial_augment: each image first goes through `trivial_augment`.
        mixup: Beta(mixup, mixup) mixes each training image and target with
            another's of its batch (`mixup`); 0: no mixing.
        teacher: preprocessed images to probabilities: each batch's targets are
            its predictions on the batch as augmented and mixed, not `labels`.
        seed: the run's seed.
        shard: (index, count): this process's part of every batch in a
            multi-process run. The whole batch is drawn and augmented in every
            process and each keeps its slice, so the global batch is the same
            as in a single-process run.
        drop_remainder: drop a last, smaller batch (data-parallel steps need
            batches that split evenly over the devices).
        threads: with more than one, that many threads prepare the next
            batches while the current step runs (numpy releases the GIL in
            the copies that make a batch), which a GPU needs: one thread
            makes ~17,000 images/s. Keras' own `PyDataset(workers=N)` is not
            used for this: its enqueuer prefetches batches before
            `on_epoch_begin` (for the batch `fit` takes to build its metrics)
            and serves them in the next epoch. Here each batch is keyed by
            (epoch, index), so the batches are the same for any `threads`.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        preprocessing: Preprocessing,
        batch_size: int,
        *,
        shuffle: bool = False,
        flip: bool = False,
        translate: int = 0,
        cutout: int = 0,
        trivial_augment: bool = False,
        mixup: float = 0.0,
        teacher: Callable[[np.ndarray], np.ndarray] | None = None,
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
        drop_remainder: bool = False,
        threads: int = 1,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.preprocessing, self.trivial_augment = preprocessing, trivial_augment
        # TrivialAugment works on pixels: its images are preprocessed batch by batch, the others once.
        self.x = images if trivial_augment else preprocessing(images)
        self.y = np.asarray(labels, dtype=np.float32)
        self.batch_size = batch_size
        self.shuffle, self.flip, self.translate, self.cutout, self.seed = shuffle, flip, translate, cutout, seed
        self.mixup, self.teacher = mixup, teacher
        self.shard, self.drop_remainder = shard, drop_remainder
        self.epoch = 0
        self._order = self._order_for(0)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="batches") if threads > 1 else None
        self._ahead = 2 * threads
        self._pending: dict[tuple[int, int], Future] = {}

    def set_epoch(self, epoch: int) -> None:
        """Chooses the epoch whose order and augmentation the batches follow."""
        if epoch != self.epoch:
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()
        self.epoch = epoch
        self._order = self._order_for(epoch)

    def _order_for(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.y))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.y))

    def sample(self, count: int) -> np.ndarray:
        """`count` of the split's images as training sees them, preprocessed, augmented and mixed, but
        unsharded: the same in every process and every epoch (the first of the seed's epoch-0
        order, under augmentation of their own)."""
        return self._augmented(self._order_for(0)[:count], 0, 0, 2)[0]

    def _augmented(self, picked: np.ndarray, *key: int) -> tuple[np.ndarray, np.ndarray]:
        """Images `picked` and their targets under the split's augmentation and mixup, drawn from the
        seed and `key`."""
        x, y = self.x[picked], self.y[picked]
        if self.trivial_augment:
            x = self.preprocessing(trivial_augment(x, np.random.default_rng([self.seed, *key, 4])))
        if self.flip or self.translate or self.cutout:
            x = augment(x, np.random.default_rng([self.seed, *key]), self.flip, self.translate, self.cutout)
        if self.mixup:
            x, y = mixup(x, y, np.random.default_rng([self.seed, *key, 3]), self.mixup)
        return x, y

    def __len__(self) -> int:
        rounding = math.floor if self.drop_remainder else math.ceil
        return rounding(len(self.y) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        if self._pool is None:
            return self._batch(self._order, self.epoch, index)
        for ahead in range(index, min(index + self._ahead, len(self))):
            if (self.epoch, ahead) not in self._pending:
                self._pending[self.epoch, ahead] = self._pool.submit(self._batch, self._order, self.epoch, ahead)
        return self._pending.pop((self.epoch, index)).result()

    def _batch(self, order: np.ndarray, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Batch `index` of `epoch`, whose data order is `order`."""
        picked = order[index * self.batch_size : (index + 1) * self.batch_size]
        x, y = self._augmented(picked, epoch, index, 1)
        if self.teacher is not None:
            y = self.teacher(x)
        index, count = self.shard
        if count > 1:
            part = len(picked) // count
            x, y = x[index * part : (index + 1) * part], y[index * part : (index + 1) * part]
        return x, y


class EpochSeeder(keras.callbacks.Callback):
    """Keys the pipeline and every Dropout layer's random stream to the epoch.

    Keras does not save Dropout's `SeedGenerator` state nor a pipeline's
    position, so after a resume both would replay epoch 0's randomness. Setting
    them from (seed, epoch) at each epoch start makes a resumed run repeat the
    uninterrupted one exactly. Each draw adds 1 to the second word of a
    generator's state, so the epochs start `STEPS_APART` apart: epoch e + 1 must
    not replay epoch e's masks shifted by one step.
    """

    STEPS_APART = 1 << 20  # more steps than any epoch has (50,000 images at batch 1)

    def __init__(self, batches: CifarBatches, seed: int):
        super().__init__()
        self.batches, self.seed = batches, seed

    def on_epoch_begin(self, epoch: int, logs=None) -> None:
        self.batches.set_epoch(epoch)
        for i, layer in enumerate(self.model.layers):
            generator = getattr(layer, "seed_generator", None)
            if generator is not None:
                generator.state.assign(np.array([self.seed * 1000 + i, epoch * self.STEPS_APART % 2**32],
                                                  dtype=generator.state.dtype))
