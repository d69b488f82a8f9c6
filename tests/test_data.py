import os
import pickle

import numpy as np
import pytest

from allcnn.data import DatasetError, DataError, hold_out, load_cifar10, recorded_split, train_val_split
from allcnn.pipeline import CifarBatches, augment
from allcnn.preprocessing import Preprocessing, fit_preprocessing
from conftest import SHARED_DATA


def _check(train, test, n_train=200, n_test=40):
    (x, y), (xt, _) = train, test
    assert x.shape == (n_train, 32, 32, 3) and x.dtype == np.uint8
    assert xt.shape == (n_test, 32, 32, 3) and y.dtype == np.int64
    assert set(np.unique(y)) <= set(range(10))


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_loads_folder_or_parent(cifar_dir, sub):
    _check(*load_cifar10(cifar_dir / sub))


def test_loads_tar_gz_without_extracting(cifar_archive):
    before = set(cifar_archive.parent.iterdir())
    _check(*load_cifar10(cifar_archive))
    _check(*load_cifar10(cifar_archive.parent))  # the archive's folder works too
    assert set(cifar_archive.parent.iterdir()) == before


def test_env_var(cifar_dir, monkeypatch):
    monkeypatch.setenv("ALLCNN_DATA_DIR", str(cifar_dir))
    _check(*load_cifar10())


def test_pixel_layout_matches_official_planes(cifar_dir):
    folder = cifar_dir / "cifar-10-batches-py"
    with open(folder / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")[b"data"][0]
    (x, _), _ = load_cifar10(cifar_dir)
    np.testing.assert_array_equal(x[0, :, :, 0].ravel(), raw[:1024])  # R plane, row-major
    np.testing.assert_array_equal(x[0, :, :, 2].ravel(), raw[2048:])


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_refused_and_payload_never_runs(cifar_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(cifar_dir / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({b"data": _Payload(), b"labels": []}, f)
    with pytest.raises(DataError, match=r"data_batch_3.*refusing to load (posix|os)\.system"):
        load_cifar10(cifar_dir)
    assert not (tmp_path / "PWNED").exists()


def test_truncated_batch_names_file(cifar_dir):
    path = cifar_dir / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(DataError, match="data_batch_2: truncated or corrupt"):
        load_cifar10(cifar_dir)


def test_bad_shape_and_labels_and_meta(cifar_dir):
    folder = cifar_dir / "cifar-10-batches-py"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(DataError, match=r"test_batch: b'data' must be uint8 of shape \(N, 3072\)"):
        load_cifar10(cifar_dir)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    with pytest.raises(DataError, match="labels outside 0..9"):
        load_cifar10(cifar_dir)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a"] * 10}, f)
    with pytest.raises(DataError, match="class names"):
        load_cifar10(cifar_dir)


def test_missing_everything_gives_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no CIFAR-10 found in .*--data-dir|expected a cifar-10-batches-py"):
        load_cifar10(tmp_path)
    monkeypatch.delenv("ALLCNN_DATA_DIR", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setattr("keras.datasets.cifar10.load_data", lambda: (_ for _ in ()).throw(OSError("offline")))
    with pytest.raises(DataError, match="CIFAR-10 not found.*Point --data-dir"):
        load_cifar10()


def test_train_val_split_is_seeded_and_disjoint():
    x = np.arange(100).reshape(100, 1)
    y = np.arange(100)
    (xa, ya), (xv, yv) = train_val_split(x, y, 20, seed=3)
    (_, ya2), (_, yv2) = train_val_split(x, y, 20, seed=3)
    assert len(yv) == 20 and len(ya) == 80 and not set(ya) & set(yv)
    np.testing.assert_array_equal(yv, yv2)
    assert not np.array_equal(yv, train_val_split(x, y, 20, seed=4)[1][1])


def test_recorded_split_writes_out_cifars_default_and_keeps_a_fraction():
    assert recorded_split() == recorded_split(5000) == {"val_size": 5000}  # as older manifest entries (0) compare
    assert recorded_split(40) == {"val_size": 40}
    assert recorded_split(40, 0.25) == recorded_split(0, 0.25) == {"val_split": 0.25}  # hold_out takes the fraction
    assert recorded_split(dataset="folder") == {"val_size": 0}  # a folder's default is no one count


def test_hold_out_defaults_per_dataset_and_keeps_explicit_splits():
    x, y = np.arange(6000).reshape(6000, 1), np.arange(6000) % 10
    same = lambda a, b: all(np.array_equal(u, v) for u, v in zip((*a[0], *a[1]), (*b[0], *b[1])))  # noqa: E731
    assert same(hold_out(x, y, "cifar10", seed=1), train_val_split(x, y, 5000, seed=1))  # CIFAR: the paper's 5,000
    for dataset in ("cifar10", "folder"):  # explicit settings: the images held out before
        assert same(hold_out(x, y, dataset, 40, seed=2), train_val_split(x, y, 40, seed=2))
        assert same(hold_out(x, y, dataset, 40, 0.25, seed=2), train_val_split(x, y, 1500, seed=2))
    # An image folder: 10%, at least one image of each class, even of a class with one image.
    x, y = np.arange(20).reshape(20, 1), np.array([0] * 12 + [1] * 7 + [2])
    for seed in range(5):
        (xt, yt), (xv, yv) = hold_out(x, y, "folder", seed=seed)
        assert len(yv) == 3 and sorted(yv) == [0, 1, 2] and len(yt) == 17 and not set(xt.ravel()) & set(xv.ravel())
    (_, _), (_, yv) = hold_out(np.arange(60).reshape(60, 1), np.arange(60) % 3, "folder")
    assert len(yv) == 6 and set(yv) == {0, 1, 2}
    with pytest.raises(DatasetError, match="3 validation images of 3: hold out at least one and leave some"):
        hold_out(x[:3], np.arange(3), "folder")


@pytest.mark.parametrize("method", ["scale", "standardize", "zca"])
def test_preprocessing_roundtrip(method, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    prep = fit_preprocessing(method, images)
    out = prep(images)
    assert out.dtype == np.float32 and out.shape == images.shape
    if method == "standardize":
        np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0, atol=1e-4)
        np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1, atol=1e-3)
    prep.save(tmp_path / "preprocessing.json")
    np.testing.assert_allclose(Preprocessing.load(tmp_path / "preprocessing.json")(images), out, rtol=1e-5, atol=1e-5)


def test_augment_flips_and_translates():
    images = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1) + 1
    rng = np.random.default_rng(0)
    out = augment(images, rng, flip=False, translate=1)
    assert out.shape == images.shape
    for original, shifted in zip(images, out):
        # Every shifted image is a window of the zero-padded original.
        padded = np.pad(original, ((1, 1), (1, 1), (0, 0)))
        assert any(np.array_equal(padded[dy:dy + 4, dx:dx + 4], shifted) for dy in range(3) for dx in range(3))
    flipped = augment(images, np.random.default_rng(1), flip=True, translate=0)
    for original, f in zip(images, flipped):
        assert np.array_equal(f, original) or np.array_equal(f, original[:, ::-1])


def test_cutout_zeroes_one_clipped_square_per_image():
    images = np.ones((500, 32, 32, 3), np.float32)
    out = augment(images, np.random.default_rng(0), flip=False, translate=0, cutout=16)
    sides = []
    for image in out:
        rows, cols = np.nonzero((image == 0).all(-1))
        # The zeros are one solid rectangle, every channel, the rest untouched.
        top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        assert len(rows) == (bottom - top) * (right - left) and np.isin(image, (0, 1)).all()
        for low, high in ((top, bottom), (left, right)):
            assert high - low == 16 or low == 0 or high == 32  # a full side unless clipped at a border
            sides.append(high - low)
    assert min(sides) == 8 and max(sides) == 16  # centred anywhere: clipped to half at the border
    assert np.array_equal(augment(images, np.random.default_rng(0), flip=False, translate=0), images)


def _random_split(count: int, lowest: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`count` random uint8 images (pixels from `lowest`) and one-hot labels of 10 classes."""
    rng = np.random.default_rng(0)
    return (rng.integers(lowest, 256, (count, 32, 32, 3), dtype=np.uint8),
            np.eye(10, dtype=np.float32)[rng.integers(0, 10, count)])


def test_batches_depend_only_on_seed_epoch_and_index():
    images, labels = _random_split(50)
    prep = fit_preprocessing("scale", images)
    make = lambda: CifarBatches(images, labels, prep, 16, shuffle=True, flip=True, translate=4, seed=7)  # noqa: E731
    a, b = make(), make()
    assert len(a) == 4 and len(a[3][0]) == 2
    b.set_epoch(5)
    b.set_epoch(2)
    a.set_epoch(2)
    np.testing.assert_array_equal(a[1][0], b[1][0])
    a.set_epoch(3)
    assert not np.array_equal(a[1][0], b[1][0])


def test_sample_is_augmented_as_training_is_and_fixed_across_epochs():
    # Batch norm statistics recomputed on it must be those the network learnt under augmentation.
    images, labels = _random_split(50, lowest=1)
    prep = fit_preprocessing("scale", images)
    make = lambda **augmentation: CifarBatches(images, labels, prep, 16, shuffle=True, seed=7,  # noqa: E731
                                               **augmentation)
    clean = make().sample(20)
    np.testing.assert_array_equal(clean, prep(images)[np.random.default_rng([7, 0]).permutation(50)[:20]])
    cut = make(cutout=16)
    sample = cut.sample(20)
    cut.set_epoch(3)
    np.testing.assert_array_equal(cut.sample(20), sample)
    np.testing.assert_array_equal(make(cutout=16).sample(20), sample)
    erased = (sample == 0).all(axis=-1)
    assert erased.sum(axis=(1, 2)).min() >= 8 * 8  # every image lost a square, the rest is unchanged
    np.testing.assert_array_equal(np.where(erased[..., None], 0, clean), sample)


def test_threads_prepare_the_same_batches_whatever_was_prefetched():
    images, labels = _random_split(100)
    prep = fit_preprocessing("scale", images)
    make = lambda threads: CifarBatches(images, labels, prep, 8, shuffle=True, flip=True, translate=4,  # noqa: E731
                                        seed=3, threads=threads)
    one, threaded = make(1), make(3)
    # As `fit` does: a batch taken before epoch 0 (to build the metrics) leaves batches
    # of epoch 0 prefetched; a resumed run then jumps to its epoch.
    threaded[0]
    for epoch in (0, 4, 5):
        one.set_epoch(epoch)
        threaded.set_epoch(epoch)
        for index in range(len(one)):
            for got, expected in zip(threaded[index], one[index]):
                np.testing.assert_array_equal(got, expected)
    assert len(threaded._pending) <= 2 * 3


def test_dropout_masks_are_keyed_by_epoch_and_never_replayed_by_the_next():
    import keras

    from allcnn.pipeline import EpochSeeder

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dropout(0.5, seed=1)])
    seeder = EpochSeeder(CifarBatches(np.zeros((4, 32, 32, 3), np.uint8), np.zeros((4, 10)),
                                      Preprocessing("scale"), 2), seed=0)
    seeder.set_model(model)
    ones = np.ones((8, 64), np.float32)

    def masks(epoch: int, steps: int) -> list[np.ndarray]:
        seeder.on_epoch_begin(epoch)
        return [keras.ops.convert_to_numpy(model(ones, training=True)) for _ in range(steps)]

    first = masks(0, 2)
    assert not np.array_equal(masks(1, 1)[0], first[1])  # each draw steps the seed: epoch 1 must not replay epoch 0
    np.testing.assert_array_equal(masks(0, 2), first)  # a resumed epoch draws what the uninterrupted one did

@pytest.mark.realdata
@pytest.mark.skipif(not (SHARED_DATA / "cifar-10-batches-py").is_dir(), reason="../shared/data absent")
def test_real_cifar10():
    (x, y), (xt, yt) = load_cifar10(SHARED_DATA)
    assert x.shape == (50000, 32, 32, 3) and xt.shape == (10000, 32, 32, 3)
    assert np.bincount(y).tolist() == [5000] * 10
    assert np.bincount(yt).tolist() == [1000] * 10


def test_shipped_folders_are_found():
    from allcnn.resources import configs_dir, weights_dir

    assert (configs_dir() / "paper.toml").is_file()
    assert (weights_dir() / "manifest.json").is_file()


def test_missing_or_damaged_preprocessing_file_is_one_line(tmp_path):
    from allcnn.errors import AllcnnError

    with pytest.raises(AllcnnError, match=f"{tmp_path / 'none.json'}: No such file"):
        Preprocessing.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{bad")
    with pytest.raises(AllcnnError, match=f"{tmp_path / 'bad.json'}: damaged preprocessing file"):
        Preprocessing.load(tmp_path / "bad.json")


def test_mixup_mixes_each_image_and_its_target_with_another_of_its_batch_alike():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    labels = np.eye(32, dtype=np.float32)  # one class per image: a mixed target names both images and weights
    prep = fit_preprocessing("scale", images)
    mixed = CifarBatches(images, labels, prep, 32, shuffle=True, seed=5, mixup=1.0)
    plain = CifarBatches(images, labels, prep, 32, shuffle=True, seed=5)
    (x, y), (x_mixed, y_mixed) = plain[0], mixed[0]
    np.testing.assert_allclose(y_mixed.sum(axis=1), 1, atol=1e-6)
    own, partner = y.argmax(axis=1), np.argsort(-(y_mixed - y * y_mixed), axis=1)[:, 0]
    weight = y_mixed[np.arange(32), own]
    assert 0.3 < weight.mean() < 0.7 and (weight < 0.99).mean() > 0.8  # Beta(1, 1): uniform
    where = {label: row for row, label in enumerate(own)}
    expected = weight[:, None, None, None] * x + (1 - weight[:, None, None, None]) * x[[where[p] for p in partner]]
    mixed_rows = weight < 1 - 1e-6
    np.testing.assert_allclose(x_mixed[mixed_rows], expected[mixed_rows], atol=1e-5)
    np.testing.assert_array_equal(mixed[0][0], x_mixed)  # keyed by (seed, epoch, index): the same again
    assert not np.allclose(mixed.sample(16), plain.sample(16))  # batch norm statistics see mixed images too


def test_trivial_augment_draws_one_wide_operation_and_magnitude_per_image():
    from allcnn.pipeline import _WIDE_OPERATIONS, trivial_augment
    from PIL import Image

    images, _ = _random_split(400)
    out = trivial_augment(images, np.random.default_rng(1))
    assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(trivial_augment(images, np.random.default_rng(1)), out)
    assert 0.05 < (out == images).all(axis=(1, 2, 3)).mean() < 0.3  # identity, autocontrast (noise spans 0..255), m = 0
    image = Image.fromarray(images[0])
    geometric_and_enhancing = _WIDE_OPERATIONS[1:10]
    for operation in geometric_and_enhancing:
        np.testing.assert_array_equal(np.asarray(operation(image, 0.0)), images[0])  # magnitude 0: unchanged
        assert not np.array_equal(np.asarray(operation(image, -0.5)), np.asarray(operation(image, 0.5)))  # both ways
    translated = np.asarray(_WIDE_OPERATIONS[3](image, 0.5))  # 16 pixels: the right half moves left, grey behind
    np.testing.assert_array_equal(translated[:, :16], images[0][:, 16:])
    assert (translated[:, 16:] == 128).all()


def test_trivial_augment_batches_are_preprocessed_after_it_and_keyed_like_the_others():
    images, labels = _random_split(48)
    prep = fit_preprocessing("standardize", images)
    make = lambda **augmentation: CifarBatches(images, labels, prep, 16, shuffle=True, seed=2,  # noqa: E731
                                               **augmentation)
    plain, augmented = make(), make(trivial_augment=True)
    x, y = augmented[1]
    np.testing.assert_array_equal(y, plain[1][1])  # the same images, in the same order
    assert x.dtype == np.float32 and abs(float(x.mean())) < 0.5  # standardized, not raw pixels
    assert 1 <= (x == plain[1][0]).all(axis=(1, 2, 3)).sum() < 16  # identity (or m = 0) leaves a few as they were
    np.testing.assert_array_equal(make(trivial_augment=True)[1][0], x)
    augmented.set_epoch(1)
    assert not np.array_equal(augmented[1][0], x)
    assert not np.array_equal(make(trivial_augment=True).sample(16), plain.sample(16))


def test_a_teacher_gives_each_batch_the_targets_of_its_images_as_augmented():
    """`teacher_augmented`: the targets are the teacher's predictions on the batch the student sees
    (flipped, translated, cut out and mixed), not the labels nor the images before augmentation."""
    images, labels = _random_split(40)
    prep = fit_preprocessing("standardize", images)
    weights = np.random.default_rng(1).normal(size=(32 * 32 * 3, 10)).astype(np.float32)

    def teacher(x: np.ndarray) -> np.ndarray:  # a linear softmax classifier
        logits = x.reshape(len(x), -1) @ weights
        exp = np.exp(logits - logits.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)

    make = lambda **kwargs: CifarBatches(images, labels, prep, 16, shuffle=True, flip=True, translate=4,  # noqa: E731
                                         cutout=8, mixup=1.0, seed=5, **kwargs)
    taught, plain = make(teacher=teacher), make()
    x, y = taught[1]
    np.testing.assert_array_equal(x, plain[1][0])  # the same images, augmented alike
    np.testing.assert_allclose(y, teacher(x), rtol=1e-6)
    assert not np.allclose(y, plain[1][1], atol=0.05)
    unaugmented = prep(images[taught._order[16:32]])
    assert not np.allclose(y, teacher(unaugmented), atol=0.05)
    assert y.shape == (16, 10) and np.allclose(y.sum(axis=1), 1, rtol=1e-5)
