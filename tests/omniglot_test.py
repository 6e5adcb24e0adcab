"""Tests for `keras_reptile.datasets.omniglot`.

Three kinds of data are used:

* small synthetic zips built in `tmp_path` with the official layout, whose
  decoded values can be computed by hand (sorting, de-duplication, inversion,
  resizing, caching, errors);
* the real Omniglot "background small" zips at
  `<repo root>/../shared/data/omniglot` (skipped when absent), decoded once per
  session into a temporary cache;
* TFDS's `tfds.testing.mock_data`, which fakes the TFDS `omniglot` builder
  without any download.
"""

import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from keras_reptile.datasets.omniglot import Omniglot
from keras_reptile.datasets.omniglot import OmniglotDownloadError
from keras_reptile.datasets.omniglot import omniglot

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA_DIR = (REPO_ROOT.parent / "shared" / "data" / "omniglot").resolve()
SMALL1 = "images_background_small1.zip"
SMALL2 = "images_background_small2.zip"


# ----------------------------------------------------------------------------
# Synthetic zips.


def _png(black_pixels=(), size=8, block=None):
    """A white `size x size` grayscale PNG with some black pixels.

    Args:
        black_pixels: pixel indices `r * size + c` to paint black.
        size: side length.
        block: optional `(r0, r1, c0, c1)` rectangle to paint black.
    """
    image = np.full((size, size, 1), 255, np.uint8)
    for p in black_pixels:
        image[p // size, p % size] = 0
    if block is not None:
        r0, r1, c0, c1 = block
        image[r0:r1, c0:c1] = 0
    return tf.io.encode_png(image).numpy()


def _write_zip(path, top, files, extra=()):
    """Writes `files`, a list of ((alphabet, character, filename), png)."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{top}/", b"")
        for (alphabet, character, filename), data in files:
            archive.writestr(f"{top}/{alphabet}/{character}/{filename}", data)
        for name, data in extra:
            archive.writestr(name, data)


# Each synthetic drawing is black at one pixel whose index is its id, so
# image_size=8 (no resizing) maps it to a one-hot 8x8 image.
ZIP_A = [  # images_background_small1.zip, deliberately unsorted.
    (("Zeta", "character02", "0002_02.png"), 5),
    (("Zeta", "character02", "0002_01.png"), 4),
    (("Zeta", "character01", "0001_01.png"), 2),
    (("Zeta", "character01", "0001_02.png"), 3),
    (("Alpha", "character01", "0003_02.png"), 1),
    (("Alpha", "character01", "0003_01.png"), 0),
]
ZIP_B = [  # images_background_small2.zip; Alpha/character01 again, redrawn.
    (("Beta", "character01", "0004_01.png"), 10),
    (("Beta", "character01", "0004_02.png"), 11),
    (("Alpha", "character01", "0003_01.png"), 20),
    (("Alpha", "character01", "0003_02.png"), 21),
]


@pytest.fixture
def synthetic_dir(tmp_path):
    data_dir = tmp_path / "zips"
    data_dir.mkdir()
    for name, spec in [(SMALL1, ZIP_A), (SMALL2, ZIP_B)]:
        _write_zip(
            data_dir / name,
            name[: -len(".zip")],
            [(key, _png([pixel])) for key, pixel in spec],
            extra=[
                (f"__MACOSX/{name[:-4]}/Alpha/._junk.png", b"not a png"),
                (f"{name[:-4]}/README.txt", b"ignored"),
            ],
        )
    return data_dir


def _pixel_ids(data):
    """The black-pixel id of each drawing, shape (num_classes, drawings)."""
    flat = data.images.reshape(data.images.shape[:2] + (-1,))
    return flat.argmax(axis=-1)


def test_synthetic_sorting_dedup_and_inversion(synthetic_dir, tmp_path):
    data = omniglot(
        synthetic_dir,
        splits=("small1", "small2"),
        image_size=8,
        cache_dir=tmp_path / "cache",
    )
    assert isinstance(data, Omniglot)
    assert data.images.dtype == np.float32
    assert data.images.shape == (4, 2, 8, 8, 1)
    assert data.num_classes == 4
    assert data.drawings_per_class == 2
    assert data.image_size == 8
    # Classes sorted by (alphabet, character); Alpha/character01 once, from
    # the first split listed.
    assert data.alphabets == ("Alpha", "Beta", "Zeta", "Zeta")
    assert data.characters == (
        "character01",
        "character01",
        "character01",
        "character02",
    )
    assert data.alphabet_names == ("Alpha", "Beta", "Zeta")
    # Drawings sorted by file name; ink (black) -> 1.0, paper (white) -> 0.0.
    np.testing.assert_array_equal(
        _pixel_ids(data), [[0, 1], [10, 11], [2, 3], [4, 5]]
    )
    expected = np.zeros((4, 2, 64), np.float32)
    for c, row in enumerate(_pixel_ids(data)):
        expected[c, np.arange(2), row] = 1.0
    np.testing.assert_array_equal(data.images.reshape(4, 2, 64), expected)

    # The other order keeps small2's Alpha/character01.
    swapped = omniglot(
        synthetic_dir,
        splits=("small2", "small1"),
        image_size=8,
        cache_dir=tmp_path / "cache",
    )
    assert swapped.alphabets == data.alphabets
    np.testing.assert_array_equal(
        _pixel_ids(swapped), [[20, 21], [10, 11], [2, 3], [4, 5]]
    )


def test_synthetic_single_split_as_string(synthetic_dir, tmp_path):
    data = omniglot(
        synthetic_dir, splits="small2", image_size=8, cache_dir=False
    )
    assert data.alphabets == ("Alpha", "Beta")
    np.testing.assert_array_equal(_pixel_ids(data), [[20, 21], [10, 11]])
    assert not (tmp_path / "cache").exists()


def test_synthetic_arrays(synthetic_dir):
    data = omniglot(synthetic_dir, image_size=8, cache_dir=False)
    x, y, groups = data.arrays()
    assert x.shape == (8, 8, 8, 1) and x.dtype == np.float32
    assert y.dtype == np.int32 and groups.dtype == np.int32
    np.testing.assert_array_equal(y, [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(groups, [0, 0, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(
        x.reshape(8, -1).argmax(-1), [0, 1, 10, 11, 2, 3, 4, 5]
    )


def test_resize_area_average_known_values(tmp_path):
    # 8x8 white; drawing 1 has a black 4x4 top-left square, drawing 2 a black
    # 4x2 strip there. Stored under the official evaluation zip name.
    _write_zip(
        tmp_path / "images_evaluation.zip",
        "images_evaluation",
        [
            (("Mu", "character01", "0009_01.png"), _png(block=(0, 4, 0, 4))),
            (("Mu", "character01", "0009_02.png"), _png(block=(0, 4, 0, 2))),
        ],
    )
    data = omniglot(
        tmp_path, splits="evaluation", image_size=2, cache_dir=False
    )
    np.testing.assert_allclose(
        data.images[0, :, :, :, 0],
        [[[1.0, 0.0], [0.0, 0.0]], [[0.5, 0.0], [0.0, 0.0]]],
        atol=1e-6,
    )
    data = omniglot(
        tmp_path, splits="evaluation", image_size=4, cache_dir=False
    )
    expected = np.zeros((4, 4), np.float32)
    expected[:2, :2] = 1.0
    np.testing.assert_allclose(data.images[0, 0, :, :, 0], expected, atol=1e-6)
    expected[:2, 1] = 0.0
    np.testing.assert_allclose(data.images[0, 1, :, :, 0], expected, atol=1e-6)


def test_cache_written_reused_and_invalidated(
    synthetic_dir, tmp_path, monkeypatch
):
    cache_dir = tmp_path / "cache"
    first = omniglot(synthetic_dir, image_size=8, cache_dir=cache_dir)
    cached = sorted(p.name for p in cache_dir.iterdir())
    assert len(cached) == 2
    assert cached[0].startswith("images_background_small1-")
    assert cached[1].startswith("images_background_small2-")
    assert all(name.endswith("-8px-v1.npz") for name in cached)
    assert not any(p.name.endswith(".zip") for p in cache_dir.iterdir())

    def no_decode(*args, **kwargs):
        raise AssertionError("PNG decoding should have been skipped.")

    # No PNG is decoded at all (TensorFlow's own decoder refuses).
    monkeypatch.setattr(tf.io, "decode_png", no_decode)
    second = omniglot(synthetic_dir, image_size=8, cache_dir=cache_dir)
    np.testing.assert_array_equal(second.images, first.images)
    assert second.alphabets == first.alphabets
    assert second.characters == first.characters

    # Another image size is another cache entry, and needs decoding.
    with pytest.raises(AssertionError, match="should have been skipped"):
        omniglot(synthetic_dir, image_size=4, cache_dir=cache_dir)
    monkeypatch.undo()

    # A changed zip (same name) is decoded again, not served from the cache.
    _write_zip(
        synthetic_dir / SMALL2,
        "images_background_small2",
        [(key, _png([pixel + 30])) for key, pixel in ZIP_B],
    )
    changed = omniglot(
        synthetic_dir, splits="small2", image_size=8, cache_dir=cache_dir
    )
    np.testing.assert_array_equal(_pixel_ids(changed), [[50, 51], [40, 41]])


def test_default_cache_dir_is_under_keras_home(
    synthetic_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    omniglot(synthetic_dir, splits="small1", image_size=8)
    cache_dir = tmp_path / "keras_home" / "datasets" / "keras_reptile_omniglot"
    assert len(list(cache_dir.glob("images_background_small1-*.npz"))) == 1
    assert not list(synthetic_dir.glob("*.npz"))


def test_corrupt_cache_file_is_ignored(synthetic_dir, tmp_path):
    cache_dir = tmp_path / "cache"
    first = omniglot(
        synthetic_dir, splits="small1", image_size=8, cache_dir=cache_dir
    )
    (cache_file,) = cache_dir.iterdir()
    cache_file.write_bytes(b"garbage")
    again = omniglot(
        synthetic_dir, splits="small1", image_size=8, cache_dir=cache_dir
    )
    np.testing.assert_array_equal(again.images, first.images)


# ----------------------------------------------------------------------------
# Container methods (synthetic, in memory).


def _toy(num_alphabets=4, chars_per_alphabet=3, drawings=2, size=4):
    alphabets, characters = [], []
    for a in range(num_alphabets):
        for c in range(chars_per_alphabet):
            alphabets.append(f"Alphabet{a}")
            characters.append(f"character{c + 1:02d}")
    n = len(alphabets)
    images = np.arange(n * drawings * size * size, dtype=np.float32)
    images = images.reshape(n, drawings, size, size, 1) / images.size
    return Omniglot(images, alphabets, characters)


def _keys(data):
    return set(zip(data.alphabets, data.characters))


def test_select_alphabets():
    data = _toy()
    sub = data.select_alphabets(["Alphabet2", "Alphabet0"])
    assert sub.alphabet_names == ("Alphabet0", "Alphabet2")
    assert sub.num_classes == 6
    np.testing.assert_array_equal(sub.images[:3], data.images[:3])
    np.testing.assert_array_equal(sub.images[3:], data.images[6:9])
    assert data.select_alphabets("Alphabet1").num_classes == 3
    with pytest.raises(
        ValueError, match=r"Unknown alphabet.*'Klingon'.*Alphabet0"
    ):
        data.select_alphabets(["Alphabet1", "Klingon"])
    with pytest.raises(ValueError, match="at least one alphabet"):
        data.select_alphabets([])


def test_split_by_alphabet():
    data = _toy(num_alphabets=6)
    train, test = data.split_by_alphabet(num_test=2, seed=3)
    assert len(test.alphabet_names) == 2 and len(train.alphabet_names) == 4
    assert not set(train.alphabet_names) & set(test.alphabet_names)
    assert train.num_classes + test.num_classes == data.num_classes
    assert _keys(train) | _keys(test) == _keys(data)
    again_train, again_test = data.split_by_alphabet(num_test=2, seed=3)
    assert again_test.alphabet_names == test.alphabet_names
    np.testing.assert_array_equal(again_train.images, train.images)
    chosen = {
        data.split_by_alphabet(num_test=2, seed=s)[1].alphabet_names
        for s in range(10)
    }
    assert len(chosen) > 1  # The seed matters.

    train, test = data.split_by_alphabet(["Alphabet4", "Alphabet1"])
    assert test.alphabet_names == ("Alphabet1", "Alphabet4")
    assert train.alphabet_names == (
        "Alphabet0",
        "Alphabet2",
        "Alphabet3",
        "Alphabet5",
    )
    train, test = data.split_by_alphabet("Alphabet0")
    assert test.alphabet_names == ("Alphabet0",)


def test_split_by_alphabet_errors():
    data = _toy()
    with pytest.raises(
        ValueError, match="exactly one of `test_alphabets` and `num_test`"
    ):
        data.split_by_alphabet()
    with pytest.raises(
        ValueError, match="exactly one of `test_alphabets` and `num_test`"
    ):
        data.split_by_alphabet(["Alphabet0"], num_test=1)
    with pytest.raises(ValueError, match="Unknown alphabet"):
        data.split_by_alphabet(["Nope"])
    with pytest.raises(ValueError, match="leave at least one alphabet"):
        data.split_by_alphabet(list(data.alphabet_names))
    for bad in (0, 4, -1, 1.5, True):
        with pytest.raises(
            ValueError,
            match="Expected `num_test` to be an integer between 1 and 3",
        ):
            data.split_by_alphabet(num_test=bad)


def test_split_by_character():
    data = _toy()
    train, test = data.split_by_character(5, seed=1)
    assert test.num_classes == 5 and train.num_classes == data.num_classes - 5
    assert not _keys(train) & _keys(test)
    assert _keys(train) | _keys(test) == _keys(data)
    again_train, again_test = data.split_by_character(5, seed=1)
    assert again_test.characters == test.characters
    assert again_test.alphabets == test.alphabets
    np.testing.assert_array_equal(again_test.images, test.images)
    chosen = {
        tuple(sorted(_keys(data.split_by_character(5, seed=s)[1])))
        for s in range(10)
    }
    assert len(chosen) > 1
    for bad in (0, data.num_classes, 2.0):
        with pytest.raises(
            ValueError, match="Expected `num_test` to be an integer"
        ):
            data.split_by_character(bad)


def test_container_validation():
    with pytest.raises(ValueError, match="Expected `images` to have shape"):
        Omniglot(np.zeros((2, 3, 4, 4)), ["a", "b"], ["c1", "c2"])
    with pytest.raises(
        ValueError, match="one alphabet and one character name per class"
    ):
        Omniglot(np.zeros((2, 3, 4, 4, 1)), ["a"], ["c1", "c2"])
    with pytest.raises(ValueError, match="appear once"):
        Omniglot(np.zeros((2, 3, 4, 4, 1)), ["a", "a"], ["c1", "c1"])
    assert "num_classes=12" in repr(_toy())


def test_episodes_delegates_to_from_arrays(monkeypatch):
    from keras_reptile import episodes as episodes_lib

    calls = []

    def fake_from_arrays(x, y, **kwargs):
        calls.append((x, y, kwargs))
        return "dataset"

    monkeypatch.setattr(episodes_lib, "from_arrays", fake_from_arrays)
    data = _toy()
    x, y, groups = data.arrays()
    assert data.episodes(ways=3, shots=1) == "dataset"
    assert (
        data.episodes(
            ways=2,
            shots=4,
            query_shots=3,
            meta_batch_size=5,
            seed=7,
            rotations=True,
            within_alphabet=True,
            augment="layers",
            augment_per="class",
        )
        == "dataset"
    )
    (x0, y0, kw0), (x1, y1, kw1) = calls
    np.testing.assert_array_equal(x0, x)
    np.testing.assert_array_equal(y0, y)
    assert kw0 == dict(
        ways=3,
        shots=1,
        query_shots=1,
        meta_batch_size=1,
        seed=None,
        rotations=False,
        groups=None,
        augment=None,
        augment_per="image",
    )
    np.testing.assert_array_equal(kw1.pop("groups"), groups)
    assert kw1 == dict(
        ways=2,
        shots=4,
        query_shots=3,
        meta_batch_size=5,
        seed=7,
        rotations=True,
        augment="layers",
        augment_per="class",
    )


# ----------------------------------------------------------------------------
# Bad input.


def test_unknown_split(synthetic_dir):
    with pytest.raises(
        ValueError,
        match=r"Unknown Omniglot split 'small3'.*'small1'.*'evaluation'",
    ):
        omniglot(synthetic_dir, splits=("small1", "small3"))
    with pytest.raises(ValueError, match="at least one split"):
        omniglot(synthetic_dir, splits=())


def test_missing_zip_and_dir(synthetic_dir, tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"images_background\.zip"
    ) as info:
        omniglot(synthetic_dir, splits="background", cache_dir=False)
    assert str(synthetic_dir) in str(info.value)
    assert SMALL1 in str(info.value)  # Lists what is there.
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        omniglot(tmp_path / "nowhere")


@pytest.mark.parametrize("bad", [0, -28, 2.5, "28", True, None])
def test_bad_image_size(synthetic_dir, bad):
    with pytest.raises(
        ValueError,
        match=(
            r"Expected `image_size` to be a positive integer\. "
            r"Received: image_size="
        ),
    ) as info:
        omniglot(synthetic_dir, image_size=bad)
    assert f"image_size={bad!r}" in str(info.value)


def test_bad_zip_contents(tmp_path):
    (tmp_path / SMALL1).write_bytes(b"this is not a zip")
    with pytest.raises(ValueError, match="Could not read .* as a zip file"):
        omniglot(tmp_path, splits="small1", cache_dir=False)
    _write_zip(tmp_path / SMALL1, "x", [], extra=[("x/readme.txt", b"hi")])
    with pytest.raises(ValueError, match="No Omniglot images found"):
        omniglot(tmp_path, splits="small1", cache_dir=False)
    _write_zip(
        tmp_path / SMALL1,
        "images_background_small1",
        [
            (("A", "character01", "1_01.png"), _png([1])),
            (("A", "character01", "1_02.png"), _png([2])),
            (("A", "character02", "2_01.png"), _png([3])),
        ],
    )
    with pytest.raises(ValueError, match="same number of drawings"):
        omniglot(tmp_path, splits="small1", cache_dir=False)


# ----------------------------------------------------------------------------
# TFDS source.

TFDS_ALPHABETS = [f"Alphabet_{i:02d}" for i in range(50)]


def _tfds_examples(rows):
    """rows: list of (alphabet_id, alphabet_char_id, black_block)."""
    images = []
    for _, _, (r0, r1, c0, c1) in rows:
        image = np.full((105, 105, 3), 255, np.uint8)
        image[r0:r1, c0:c1] = 0
        images.append(image)
    return {
        "image": np.stack(images),
        "alphabet": np.array([r[0] for r in rows], np.int64),
        "alphabet_char_id": np.array([r[1] for r in rows], np.int64),
        "label": np.arange(len(rows), dtype=np.int64),
    }


# Per TFDS split: 2 drawings per character; alphabet 7's character 0 is in
# both small1 and small2 (with different drawings), like Greek and Latin.
TOP_LEFT, TOP_RIGHT, BOTTOM_LEFT = (
    (0, 35, 0, 35),
    (0, 35, 70, 105),
    (70, 105, 0, 35),
)
TFDS_SPLIT_ROWS = {
    "small1": [
        (7, 0, TOP_LEFT),
        (3, 11, TOP_RIGHT),
        (7, 0, TOP_LEFT),
        (3, 11, BOTTOM_LEFT),
    ],
    "small2": [
        (7, 0, BOTTOM_LEFT),
        (7, 0, BOTTOM_LEFT),
        (9, 2, TOP_RIGHT),
        (9, 2, TOP_RIGHT),
    ],
    "train": [(1, 0, TOP_LEFT), (1, 0, TOP_LEFT)],
}


def _mock_as_dataset(self, split, **kwargs):
    # A prepared TFDS omniglot has the real alphabet names in its
    # dataset_info; the code-only mock has "0".."49", so set some names.
    self.info.features["alphabet"].names = TFDS_ALPHABETS
    return tf.data.Dataset.from_tensor_slices(
        _tfds_examples(TFDS_SPLIT_ROWS[str(split)])
    )


@pytest.fixture
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def test_tfds_source_with_controlled_mock_data(tfds, tmp_path):
    with tfds.testing.mock_data(as_dataset_fn=_mock_as_dataset):
        data = omniglot(
            splits=("small1", "small2"), image_size=3, cache_dir=tmp_path
        )
        background = omniglot(splits="background", image_size=3)
    assert not list(tmp_path.iterdir())  # TFDS keeps its own cache.
    assert (
        data.images.shape == (3, 2, 3, 3, 1) and data.images.dtype == np.float32
    )
    assert data.alphabets == ("Alphabet_03", "Alphabet_07", "Alphabet_09")
    assert data.characters == ("character12", "character01", "character03")
    corner = {TOP_LEFT: (0, 0), TOP_RIGHT: (0, 2), BOTTOM_LEFT: (2, 0)}

    def one_hot(block):
        image = np.zeros((3, 3, 1), np.float32)
        image[corner[block]] = 1.0
        return image

    expected = np.stack(
        [
            [one_hot(TOP_RIGHT), one_hot(BOTTOM_LEFT)],  # TFDS record order.
            [one_hot(TOP_LEFT), one_hot(TOP_LEFT)],  # From small1, not small2.
            [one_hot(TOP_RIGHT), one_hot(TOP_RIGHT)],
        ]
    )
    np.testing.assert_allclose(data.images, expected, atol=1e-6)
    # "background" is the TFDS "train" split.
    assert background.alphabets == ("Alphabet_01",)
    assert background.characters == ("character01",)


def test_tfds_source_with_random_mock_data(tfds):
    with tfds.testing.mock_data(
        num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE
    ):
        data = omniglot(splits="small1", image_size=14)
    assert data.images.dtype == np.float32
    assert data.images.shape[2:] == (14, 14, 1)
    assert data.images.shape[0] * data.images.shape[1] == 6
    assert 0.0 <= data.images.min() and data.images.max() <= 1.0
    # Without prepared metadata, the ClassLabel names are "0".."49".
    assert all(name.isdigit() for name in data.alphabets)
    assert all(
        c.startswith("character") and c[9:].isdigit() for c in data.characters
    )


def test_tfds_offline_error_message(tfds, tmp_path, monkeypatch):
    from tensorflow_datasets.core import constants
    from tensorflow_datasets.core.utils import gcs_utils

    empty = tmp_path / "tfds"
    empty.mkdir()
    monkeypatch.setattr(constants, "DATA_DIR", str(empty))
    monkeypatch.setattr(gcs_utils, "is_dataset_on_gcs", lambda *a, **k: False)

    def offline(*args, **kwargs):
        raise ConnectionError("Network is unreachable (simulated)")

    for name in ("download", "download_and_extract", "extract"):
        monkeypatch.setattr(tfds.download.DownloadManager, name, offline)
    with pytest.raises(OmniglotDownloadError) as info:
        omniglot(splits="small1")
    message = str(info.value)
    assert isinstance(info.value, OSError)
    assert "could not download or prepare the Omniglot" in message
    assert "data_dir=" in message and SMALL1 in message
    assert str(empty) in message
    assert info.value.__cause__ is not None


def test_tfds_missing_gives_clear_import_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tensorflow_datasets" or name.startswith(
            "tensorflow_datasets."
        ):
            raise ImportError("No module named 'tensorflow_datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(
        ImportError,
        match=r"requires the `tensorflow-datasets` package.*data_dir=",
    ):
        omniglot(splits="small1")


# ----------------------------------------------------------------------------
# Real data (skipped when absent).


def _require_real_data():
    missing = [f for f in (SMALL1, SMALL2) if not (REAL_DATA_DIR / f).is_file()]
    if missing:
        pytest.skip(
            f"Real Omniglot data not found: expected {missing} in "
            f"{REAL_DATA_DIR} (<repo root>/../shared/data/omniglot)."
        )


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory):
    """Decodes both real zips once into a fresh cache; returns (dir, data)."""
    _require_real_data()
    cache_dir = tmp_path_factory.mktemp("omniglot_cache")
    data = omniglot(
        REAL_DATA_DIR, splits=("small1", "small2"), cache_dir=cache_dir
    )
    return cache_dir, data


@pytest.fixture(scope="module")
def real_both(real_cache):
    return real_cache[1]


@pytest.fixture(scope="module")
def real_small1(real_cache):
    return omniglot(REAL_DATA_DIR, splits="small1", cache_dir=real_cache[0])


@pytest.fixture(scope="module")
def real_small2(real_cache):
    return omniglot(REAL_DATA_DIR, splits="small2", cache_dir=real_cache[0])


def test_real_small1(real_small1):
    assert real_small1.num_classes == 136
    assert real_small1.alphabet_names == (
        "Balinese",
        "Early_Aramaic",
        "Greek",
        "Korean",
        "Latin",
    )
    assert real_small1.images.shape == (136, 20, 28, 28, 1)


def test_real_small2(real_small2):
    assert real_small2.num_classes == 156
    assert real_small2.alphabet_names == (
        "Greek",
        "Japanese_(katakana)",
        "Latin",
        "Sanskrit",
        "Tagalog",
    )


def test_real_both_deduplicated(real_both):
    keys = list(zip(real_both.alphabets, real_both.characters))
    assert real_both.num_classes == 242
    assert len(real_both.alphabet_names) == 8
    assert len(set(keys)) == len(keys)
    assert keys == sorted(keys)
    counts = {a: real_both.alphabets.count(a) for a in real_both.alphabet_names}
    assert counts == {
        "Balinese": 24,
        "Early_Aramaic": 22,
        "Greek": 24,
        "Japanese_(katakana)": 47,
        "Korean": 40,
        "Latin": 26,
        "Sanskrit": 42,
        "Tagalog": 17,
    }
    x, y, groups = real_both.arrays()
    assert x.shape == (242 * 20, 28, 28, 1)
    assert set(np.unique(y)) == set(range(242))
    assert set(np.unique(groups)) == set(range(8))


def test_real_image_values(real_both):
    images = real_both.images
    assert images.dtype == np.float32
    assert images.shape == (242, 20, 28, 28, 1)
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.mean() < 0.2  # Mostly background...
    assert np.median(images) == 0.0  # ...which is exactly 0.
    per_drawing_max = images.reshape(242 * 20, -1).max(axis=1)
    assert per_drawing_max.min() > 0.5  # Every drawing has ink...
    assert images.max() > 0.99  # ...at full intensity 1.0.


def test_real_shared_characters_identical(real_small1, real_small2, real_both):
    def index(data):
        return {
            k: i for i, k in enumerate(zip(data.alphabets, data.characters))
        }

    i1, i2, ib = index(real_small1), index(real_small2), index(real_both)
    shared = set(i1) & set(i2)
    assert {a for a, _ in shared} == {"Greek", "Latin"}
    assert len(shared) == 24 + 26
    for key in sorted(shared):
        np.testing.assert_array_equal(
            real_small1.images[i1[key]], real_small2.images[i2[key]]
        )
        np.testing.assert_array_equal(
            real_small1.images[i1[key]], real_both.images[ib[key]]
        )


def test_real_cache_skips_decoding(real_cache, monkeypatch):
    cache_dir, first = real_cache
    names = sorted(p.name for p in cache_dir.iterdir())
    assert len(names) == 2
    assert names[0].startswith("images_background_small1-")
    assert names[1].startswith("images_background_small2-")

    def no_decode(*args, **kwargs):
        raise AssertionError("PNG decoding should have been skipped.")

    # No PNG is decoded at all (TensorFlow's own decoder refuses).
    monkeypatch.setattr(tf.io, "decode_png", no_decode)
    second = omniglot(REAL_DATA_DIR, cache_dir=cache_dir)
    np.testing.assert_array_equal(second.images, first.images)
    assert second.alphabets == first.alphabets
    assert second.characters == first.characters


def test_real_split_by_alphabet(real_both):
    train, test = real_both.split_by_alphabet(num_test=3, seed=0)
    assert len(test.alphabet_names) == 3
    assert not set(train.alphabet_names) & set(test.alphabet_names)
    assert set(train.alphabet_names) | set(test.alphabet_names) == set(
        real_both.alphabet_names
    )
    assert train.num_classes + test.num_classes == 242
    again = real_both.split_by_alphabet(num_test=3, seed=0)
    assert again[1].alphabet_names == test.alphabet_names
    assert again[0].characters == train.characters


def test_real_split_by_character(real_both):
    train, test = real_both.split_by_character(42, seed=5)
    assert (train.num_classes, test.num_classes) == (200, 42)
    assert not _keys(train) & _keys(test)
    assert (
        real_both.split_by_character(42, seed=5)[1].characters
        == test.characters
    )


def test_real_episodes_within_alphabet(real_both):
    """Every task of a within-alphabet stream uses a single alphabet."""
    x, _, groups = real_both.arrays()
    # Identify each image by its bytes to recover its alphabet from a task.
    alphabet_of = {}
    for image, group in zip(x, groups):
        alphabet_of.setdefault(image.tobytes(), set()).add(int(group))
    ds = real_both.episodes(
        ways=5,
        shots=2,
        query_shots=1,
        meta_batch_size=4,
        seed=0,
        within_alphabet=True,
    )
    assert ds.element_spec["support_x"].shape == (4, 10, 28, 28, 1)
    assert ds.element_spec["query_x"].shape == (4, 5, 28, 28, 1)
    seen = set()
    for episode in ds.take(5).as_numpy_iterator():
        for task in range(4):
            images = np.concatenate(
                [episode["support_x"][task], episode["query_x"][task]]
            )
            found = set()
            for image in images:
                found |= alphabet_of[image.tobytes()]
            assert len(found) == 1, found
            seen |= found
    assert len(seen) > 1  # Different tasks use different alphabets.
