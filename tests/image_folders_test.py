"""Tests for `keras_reptile.episodes.from_directory` (`image_folders.py`).

The folders are written by the tests. Most images encode where they come
from: in an image of class `c` (the `c`-th class folder in sorted order) the
first row is `CLASS_STEP * (c + 1)` and the other rows are
`IMAGE_STEP * (i + 1)` for its `i`-th file, so a decoded image tells its
class and file whatever the sampler did. The equivalence with the Omniglot
loader uses a synthetic zip in the official layout, and a small subset of the
real `images_background_small1.zip` when `../shared/data/omniglot` is there.
"""

import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_reptile import augmentation
from keras_reptile import episodes
from keras_reptile.datasets.omniglot import omniglot

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_SMALL1 = (
    REPO_ROOT.parent / "shared" / "data" / "omniglot" / "images_background_small1.zip"
)
KEYS = ("support_x", "support_y", "query_x", "query_y")
CLASS_STEP = 25
IMAGE_STEP = 10
SIZE = 4


def _write(path, pixels, fmt="PNG"):
    """Writes uint8 `pixels` (H, W) or (H, W, C) to `path` with PIL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(pixels, np.uint8)
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    Image.fromarray(pixels).save(path, format=fmt)


def _coded(c, i):
    pixels = np.full((SIZE, SIZE), IMAGE_STEP * (i + 1), np.uint8)
    pixels[0] = CLASS_STEP * (c + 1)
    return pixels


def _decode_codes(images):
    """`(class, file)` of each image of `[N, H, W, 1]` values in [0, 1]."""
    values = np.round(images[..., 0] * 255.0)
    classes = np.round(values[:, 0, 0] / CLASS_STEP).astype(int) - 1
    files = np.round(values[:, 1, 0] / IMAGE_STEP).astype(int) - 1
    return classes, files


def _coded_folder(root, sizes, names=None):
    """Class folders `names` (default `class_0`...) with `sizes` coded PNGs."""
    names = names or [f"class_{c}" for c in range(len(sizes))]
    for c, (name, n) in enumerate(zip(names, sizes)):
        for i in range(n):
            _write(Path(root) / name / f"img_{i:02d}.png", _coded(c, i))
    return Path(root)


def _tasks(dataset, num_batches):
    tasks = []
    for batch in dataset.take(num_batches).as_numpy_iterator():
        for b in range(batch["support_y"].shape[0]):
            tasks.append({k: batch[k][b] for k in KEYS})
    return tasks


def _build(directory, **kwargs):
    options = dict(
        ways=3, shots=2, query_shots=1, seed=0, image_size=(SIZE, SIZE),
        color_mode="grayscale", interpolation="nearest",
    )
    options.update(kwargs)
    return episodes.from_directory(directory, **options)


def _check_task(task, ways, shots, query_shots):
    """The task's classes, checked against the images' own codes."""
    support_classes, support_files = _decode_codes(task["support_x"])
    query_classes, query_files = _decode_codes(task["query_x"])
    pairs = list(zip(support_classes, support_files)) + list(
        zip(query_classes, query_files)
    )
    assert len(set(pairs)) == len(pairs), "an image appears twice in a task"
    classes = []
    for label in range(ways):
        in_support = support_classes[task["support_y"] == label]
        in_query = query_classes[task["query_y"] == label]
        assert in_support.size == shots and in_query.size == query_shots
        assert len(set(in_support.tolist()) | set(in_query.tolist())) == 1
        classes.append(int(in_support[0]))
    assert len(set(classes)) == ways, "two labels share a class"
    return classes


# ----------------------------------------------------------------------------
# Layout, labels, determinism.


def test_class_names_sorted_and_other_files_ignored(tmp_path):
    root = tmp_path / "data"
    png = _coded(0, 0)
    for name in ("b", "a", "C"):
        _write(root / name / "1.png", png)
        _write(root / name / "2.PNG", png)
        _write(root / name / "sub" / "3.jpg", png, "JPEG")
        (root / name / "notes.txt").write_text("not an image")
        (root / name / "labels.csv").write_text("1,2")
        (root / name / "image.webp").write_bytes(b"RIFF....WEBP")
        (root / name / "._4.png").write_bytes(b"macOS metadata")
    (root / ".ipynb_checkpoints" / "x").mkdir(parents=True)
    (root / "README.md").write_text("top-level files are not classes")
    (root / "stray.png").write_bytes(b"a top-level file is no class")

    tasks = _build(root, ways=2, shots=1, query_shots=1)

    assert tasks.class_names == ["C", "a", "b"]
    expected = [
        str(root / name / file)
        for name in ("C", "a", "b")
        for file in ("1.png", "2.PNG", os.path.join("sub", "3.jpg"))
    ]
    assert tasks.file_paths == expected
    assert not hasattr(tasks, "group_names")
    episode = next(iter(tasks))
    assert episode["support_x"].shape == (1, 2, SIZE, SIZE, 1)
    assert episode["support_x"].dtype == tf.float32
    assert episode["query_y"].dtype == tf.int32


def test_labels_match_the_class_folders(tmp_path):
    root = _coded_folder(tmp_path, [3, 5, 4, 6, 3])
    tasks = _build(root, ways=3, shots=2, query_shots=1, meta_batch_size=4, seed=7)
    seen = set()
    for task in _tasks(tasks, 10):
        seen.update(_check_task(task, ways=3, shots=2, query_shots=1))
    assert seen == {0, 1, 2, 3, 4}


def test_deterministic_for_a_seed(tmp_path):
    root = _coded_folder(tmp_path, [4] * 6)

    def first(seed, **kwargs):
        dataset = _build(root, ways=3, shots=1, query_shots=2, meta_batch_size=2,
                         seed=seed, rotations=True, verify="header", **kwargs)
        return _tasks(dataset, 3)

    a, b, other = first(3), first(3), first(4)
    for x, y in zip(a, b):
        for key in KEYS:
            np.testing.assert_array_equal(x[key], y[key])
    assert any(
        not np.array_equal(x["support_x"], y["support_x"]) for x, y in zip(a, other)
    )
    # Augmented episodes too, whatever the order the parallel map runs in.
    layers = augmentation.affine_distortions(image_size=SIZE, translation=1)
    a = first(5, augment=layers)
    b = first(5, augment=layers)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["query_x"], y["query_x"])


def test_seed_none_follows_numpy_global_seed(tmp_path):
    root = _coded_folder(tmp_path, [3] * 4)

    def first():
        np.random.seed(11)
        return _tasks(_build(root, seed=None), 2)

    for x, y in zip(first(), first()):
        np.testing.assert_array_equal(x["support_x"], y["support_x"])


def test_files_are_read_in_the_pipeline_not_up_front(tmp_path):
    root = _coded_folder(tmp_path, [3] * 3)
    tasks = _build(root, ways=3, shots=2, query_shots=1, verify="header")
    # Rewrite every file after the dataset is built: class codes stay, every
    # image's file code becomes 7.
    for c in range(3):
        for i in range(3):
            _write(root / f"class_{c}" / f"img_{i:02d}.png", _coded(c, 6))
    task = _tasks(tasks, 1)[0]
    _, files = _decode_codes(np.concatenate([task["support_x"], task["query_x"]]))
    assert set(files.tolist()) == {6}


def test_groups_parent_gives_within_group_tasks(tmp_path):
    root = tmp_path / "alphabets"
    layout = {"Greek": 3, "Latin": 4, "Runic": 2}  # Runic is too small for 3 ways.
    c = 0
    class_group = {}
    for group, num_classes in layout.items():
        for k in range(num_classes):
            for i in range(3):
                _write(root / group / f"character{k:02d}" / f"{i}.png", _coded(c, i))
            class_group[c] = group
            c += 1
    (root / "Greek" / "loose.png").write_bytes(b"files beside class folders are ignored")

    tasks = _build(root, ways=3, shots=1, query_shots=1, meta_batch_size=4,
                   groups="parent", seed=1)

    assert tasks.group_names == ["Greek", "Latin", "Runic"]
    assert tasks.class_names[:4] == [
        "Greek/character00", "Greek/character01", "Greek/character02",
        "Latin/character00",
    ]
    assert len(tasks.class_names) == 9
    groups_seen = set()
    for task in _tasks(tasks, 10):
        classes = _check_task(task, ways=3, shots=1, query_shots=1)
        groups = {class_group[c] for c in classes}
        assert len(groups) == 1, f"a task spans groups {groups}"
        groups_seen |= groups
    assert groups_seen == {"Greek", "Latin"}


# ----------------------------------------------------------------------------
# Formats, channels, resizing.


# Per file: (class folder / name, pixels, PIL format, expected value per
# color mode). RGB becomes gray with the ITU-R 601 weights; gray is repeated
# into RGB; a missing alpha channel is opaque (255). JPEG is lossy.
_GRAY = np.full((SIZE, SIZE), 100, np.uint8)
_RGB = np.zeros((SIZE, SIZE, 3), np.uint8) + np.array([200, 100, 50], np.uint8)
_RGBA = np.concatenate([_RGB, np.full((SIZE, SIZE, 1), 128, np.uint8)], -1)
_LUMA = 0.2989 * 200 + 0.587 * 100 + 0.114 * 50
_AS_GRAY = {"grayscale": [100], "rgb": [100] * 3, "rgba": [100] * 3 + [255]}
_AS_RGB = {"grayscale": [_LUMA], "rgb": [200, 100, 50], "rgba": [200, 100, 50, 255]}
FORMAT_FILES = [
    ("a_png/c.png", _RGB, "PNG", _AS_RGB),
    ("a_png/g.png", _GRAY, "PNG", _AS_GRAY),
    ("a_png/t.png", _RGBA, "PNG",
     {"grayscale": [_LUMA], "rgb": [200, 100, 50], "rgba": [200, 100, 50, 128]}),
    ("b_bmp/c.bmp", _RGB, "BMP", _AS_RGB),
    ("b_bmp/g.bmp", _GRAY, "BMP", _AS_GRAY),  # Keras cannot read it as grayscale.
    ("b_bmp/g2.bmp", _GRAY, "BMP", _AS_GRAY),
    ("c_gif/g.gif", _GRAY, "GIF", _AS_GRAY),  # Nor GIFs as grayscale or RGBA.
    ("c_gif/g2.gif", _GRAY, "GIF", _AS_GRAY),
    ("c_gif/g3.GIF", _GRAY, "GIF", _AS_GRAY),
    ("d_jpg/c.jpeg", _RGB, "JPEG", _AS_RGB),  # Nor JPEGs as RGBA.
    ("d_jpg/g.jpg", _GRAY, "JPEG", _AS_GRAY),
    ("d_jpg/g2.JPG", _GRAY, "JPEG", _AS_GRAY),
]


def test_formats_and_color_modes(tmp_path):
    root = tmp_path / "formats"
    for name, pixels, fmt, _ in reversed(FORMAT_FILES):
        _write(root / name, pixels, fmt)
    for mode, channels in (("grayscale", 1), ("rgb", 3), ("rgba", 4)):
        tasks = episodes.from_directory(
            root, ways=4, shots=2, query_shots=1, seed=0, image_size=(6, 5),
            color_mode=mode,
        )
        assert tasks.class_names == ["a_png", "b_bmp", "c_gif", "d_jpg"]
        assert tasks.file_paths == [str(root / name) for name, *_ in FORMAT_FILES]
        # One task holds every image: 4 classes x 3 files.
        task = _tasks(tasks, 1)[0]
        images = np.concatenate([task["support_x"], task["query_x"]])
        assert images.shape == (12, 6, 5, channels)
        # The images are constant, and resizing keeps a constant image.
        pixels = images.reshape(12, -1, channels) * 255.0
        assert np.ptp(pixels, axis=1).max() < 2.0
        got = sorted(map(tuple, pixels.mean(axis=1)))
        wanted = sorted(tuple(values[mode]) for *_, values in FORMAT_FILES)
        np.testing.assert_allclose(got, wanted, atol=3.0)


def test_invert_and_resize(tmp_path):
    root = tmp_path / "ink"
    for c in range(2):
        pixels = np.full((10, 10), 255, np.uint8)
        pixels[2:8, 4:6] = 0  # A black bar on white.
        for i in range(2):
            _write(root / f"c{c}" / f"{i}.png", pixels)
    for invert in (False, True):
        tasks = episodes.from_directory(
            root, ways=2, shots=1, seed=0, image_size=(5, 5),
            color_mode="grayscale", interpolation="area", invert=invert,
        )
        image = _tasks(tasks, 1)[0]["support_x"][0, ..., 0]
        # Area resize 10 -> 5 averages 2x2 blocks: the bar covers rows 1-3,
        # column 2 in full.
        bar = np.zeros((5, 5))
        bar[1:4, 2] = 1.0
        np.testing.assert_allclose(image, bar if invert else 1.0 - bar, atol=1e-6)


# ----------------------------------------------------------------------------
# The same episodes as the Omniglot loader on the same drawings.


def _synthetic_omniglot(tmp_path):
    """An Omniglot-layout zip: 3 alphabets x 3-4 characters x 5 drawings."""
    rng = np.random.default_rng(0)
    zips = tmp_path / "zips"
    zips.mkdir()
    top = "images_background_small1"
    with zipfile.ZipFile(zips / "images_background_small1.zip", "w") as archive:
        archive.writestr(f"{top}/", b"")
        for alphabet, characters in (("Beta", 4), ("Alpha", 3), ("Gamma", 4)):
            for k in range(characters):
                for d in range(5):
                    ink = rng.random((12, 12)) < 0.3
                    pixels = np.where(ink, 0, 255).astype(np.uint8)[..., None]
                    name = f"{top}/{alphabet}/character{k + 1:02d}/{k:04d}_{d + 1:02d}.png"
                    archive.writestr(name, tf.io.encode_png(pixels).numpy())
        archive.writestr(f"{top}/README.txt", b"ignored by both")
    return zips


def _assert_same_episodes(a, b, num_batches=3):
    for x, y in zip(a.take(num_batches).as_numpy_iterator(),
                    b.take(num_batches).as_numpy_iterator()):
        for key in ("support_y", "query_y"):
            np.testing.assert_array_equal(x[key], y[key])
        # The same TensorFlow ops on the same bytes: equal to the bit.
        for key in ("support_x", "query_x"):
            np.testing.assert_array_equal(x[key], y[key])


SETTINGS = {
    "plain": dict(rotations=False),
    "rotations": dict(rotations=True),
    "within_alphabet": dict(rotations=True, within=True),
    "augment_per_image": dict(rotations=True, augment="image"),
    "augment_per_class": dict(rotations=True, within=True, augment="class"),
}


@pytest.mark.parametrize("setting", sorted(SETTINGS))
def test_same_episodes_as_the_omniglot_loader(tmp_path, setting):
    """The drawings written out as PNGs: `alphabet/character/` for
    within-alphabet tasks, else one `<alphabet>_<character>` folder each."""
    options = dict(SETTINGS[setting])
    within = options.pop("within", False)
    per = options.pop("augment", None)
    if per:
        options["augment"] = augmentation.affine_distortions(
            rotation=20, shear=0.2, zoom=0.1, translation=1, image_size=6
        )
        options["augment_per"] = per
    zips = _synthetic_omniglot(tmp_path)
    data = omniglot(zips, splits="small1", image_size=6, cache_dir=False)
    loader = data.episodes(ways=3, shots=2, query_shots=2, meta_batch_size=3,
                           seed=42, within_alphabet=within, **options)
    tasks = episodes.from_directory(
        _extract(zips / "images_background_small1.zip", tmp_path / "folders",
                 flatten=not within),
        ways=3, shots=2, query_shots=2, meta_batch_size=3, seed=42,
        image_size=(6, 6), color_mode="grayscale", interpolation="area",
        invert=True, groups="parent" if within else None, **options,
    )
    expected_names = [f"{a}/{c}" for a, c in zip(data.alphabets, data.characters)]
    if not within:
        expected_names = [name.replace("/", "_") for name in expected_names]
    assert tasks.class_names == expected_names
    _assert_same_episodes(loader, tasks)


def _extract(zip_path, destination, flatten):
    """Writes the zip's PNGs out as files; `flatten`: one folder per
    character, named `<alphabet>_<character>`, instead of the tree."""
    with zipfile.ZipFile(zip_path) as archive:
        for info in archive.infolist():
            parts = info.filename.split("/")
            if info.is_dir() or not parts[-1].endswith(".png"):
                continue
            alphabet, character, filename = parts[-3:]
            folder = (
                destination / f"{alphabet}_{character}"
                if flatten
                else destination / alphabet / character
            )
            folder.mkdir(parents=True, exist_ok=True)
            (folder / filename).write_bytes(archive.read(info))
    return destination


@pytest.mark.skipif(
    not REAL_SMALL1.is_file(),
    reason=f"the real Omniglot zip is not at {REAL_SMALL1} (../shared absent)",
)
def test_same_episodes_as_the_omniglot_loader_on_real_drawings(tmp_path):
    # A small real subset: 2 alphabets x 6 characters x 20 drawings, as a zip
    # in the official layout for the loader and as files for from_directory.
    subset = tmp_path / "zips" / "images_background_small1.zip"
    subset.parent.mkdir()
    with zipfile.ZipFile(REAL_SMALL1) as real, zipfile.ZipFile(subset, "w") as out:
        names = sorted(n for n in real.namelist() if n.endswith(".png"))
        alphabets = sorted({n.split("/")[1] for n in names})[:2]
        for name in names:
            _, alphabet, character, _ = name.split("/")
            if alphabet in alphabets and int(character[-2:]) <= 6:
                out.writestr(name, real.read(name))
    data = omniglot(subset.parent, splits="small1", image_size=28, cache_dir=False)
    assert data.images.shape == (12, 20, 28, 28, 1)
    loader = data.episodes(ways=5, shots=1, query_shots=3, meta_batch_size=4,
                           seed=2024, rotations=True, within_alphabet=True)
    folders = _extract(subset, tmp_path / "folders", flatten=False)
    tasks = episodes.from_directory(
        folders, ways=5, shots=1, query_shots=3, meta_batch_size=4, seed=2024,
        image_size=(28, 28), color_mode="grayscale", interpolation="area",
        invert=True, rotations=True, groups="parent",
    )
    assert tasks.group_names == list(alphabets)
    _assert_same_episodes(loader, tasks, num_batches=2)


# ----------------------------------------------------------------------------
# Errors, all raised before the dataset is built.


def test_missing_directory_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="Expected `directory` to be an existing directory with one sub-folder per class.*no such directory"):
        _build(tmp_path / "nowhere")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(ValueError, match="a file, not a directory"):
        _build(tmp_path / "file.png")
    with pytest.raises(TypeError, match="Expected `directory` to be a path"):
        _build(3)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "image.png").write_bytes(b"no class folder")
    with pytest.raises(ValueError, match="Expected `directory` to hold one sub-folder per class"):
        _build(tmp_path / "empty")
    with pytest.raises(ValueError, match="Expected `directory` to hold <group>/<class>/ sub-folders"):
        _coded_folder(tmp_path / "flat", [3, 3, 3])
        _build(tmp_path / "flat", groups="parent")


def test_a_class_too_small_is_named_with_its_count(tmp_path):
    root = _coded_folder(tmp_path, [4, 2, 4, 0], names=["cat", "dog", "eel", "fox"])
    (root / "dog" / "dog.txt").write_text("other files do not count")
    (root / "fox").mkdir()  # An empty class folder is a class of 0 images.
    with pytest.raises(
        ValueError,
        match=r"Expected every class to have at least `shots \+ query_shots` = 3 "
        r"images. Received: class 'dog' has 2 images.*2 classes are too small; "
        r"also 'fox' \(0\)",
    ):
        _build(root, ways=2, shots=2, query_shots=1)


def test_fewer_classes_than_ways(tmp_path):
    root = _coded_folder(tmp_path / "three", [3, 3, 3])
    with pytest.raises(ValueError, match=r"Expected `ways` to be at most the number of classes, but .* has 3 classes. Received: ways=4"):
        _build(root, ways=4, shots=1)
    with pytest.raises(ValueError, match=r"4 x 3 = 12 classes with `rotations=True`. Received: ways=13"):
        _build(root, ways=13, shots=1, rotations=True)
    _build(root, ways=12, shots=1, rotations=True)  # Enough rotated classes.
    tree = tmp_path / "tree"
    for group, n in (("g1", 2), ("g2", 3)):
        for k in range(n):
            for i in range(2):
                _write(tree / group / f"c{k}" / f"{i}.png", _coded(k, i))
    with pytest.raises(ValueError, match=r"Expected at least one group with `ways` classes.*Received: ways=4, and the largest group, 'g2', has 3 classes"):
        _build(tree, ways=4, shots=1, groups="parent")


def test_unreadable_or_corrupt_images_are_named(tmp_path):
    root = _coded_folder(tmp_path / "data", [3, 3, 3])
    empty = root / "class_0" / "empty.png"
    empty.write_bytes(b"")
    text = root / "class_1" / "text.jpg"
    text.write_bytes(b"hello, not a JPEG")
    broken = root / "class_2" / "gone.png"
    os.symlink(tmp_path / "deleted.png", broken)
    with pytest.raises(ValueError, match="Expected every image file to be a readable PNG, JPEG, GIF or BMP image") as info:
        _build(root)
    message = str(info.value)
    assert "Received: 3 of the 12 files are not: " in message
    assert f"{empty} is empty" in message
    assert f"{text} is not a PNG, JPEG, GIF or BMP file" in message
    assert f"{broken} cannot be read" in message
    for path in (empty, text, broken):
        path.unlink()

    # A PNG cut short: its header is fine, its data is not. It replaces a
    # file, so that every task below holds it.
    (root / "class_1" / "img_00.png").unlink()
    truncated = root / "class_1" / "truncated.png"
    truncated.write_bytes(tf.io.encode_png(np.full((30, 30, 1), 7, np.uint8)).numpy()[:40])
    with pytest.raises(ValueError, match=r"Received: 1 of the 9 files is not: .*truncated.png cannot be decoded \(Invalid PNG"):
        _build(root)
    # With verify="header" the dataset is built; decoding fails in the pipeline.
    tasks = _build(root, verify="header", ways=3, shots=2, query_shots=1)
    with pytest.raises(tf.errors.InvalidArgumentError):
        _tasks(tasks, 1)


def test_bad_arguments(tmp_path):
    root = _coded_folder(tmp_path, [3, 3, 3])
    missing = tmp_path / "nowhere"  # Argument errors come before the folder's.
    cases = [
        (dict(color_mode="gray"), ValueError, "Expected `color_mode` to be one of 'grayscale', 'rgb' or 'rgba'. Received: color_mode='gray'"),
        (dict(image_size=28), ValueError, "Expected `image_size` to be a tuple of two positive integers (height, width). Received: image_size=28"),
        (dict(image_size=(28, 0)), ValueError, "Expected `image_size` to be a tuple of two positive integers"),
        (dict(image_size=(28, 28.0)), ValueError, "Expected `image_size` to be a tuple of two positive integers"),
        (dict(interpolation="cubic"), ValueError, "Expected `interpolation` to be one of 'bilinear', 'nearest'"),
        (dict(groups="alphabet"), ValueError, "Expected `groups` to be None or 'parent'"),
        (dict(verify="none"), ValueError, "Expected `verify` to be one of 'decode', 'header'"),
        (dict(invert=1), TypeError, "Expected `invert` to be a bool"),
        (dict(rotations="yes"), TypeError, "Expected `rotations` to be a bool"),
        (dict(rotations=True, image_size=(28, 32)), ValueError, "`rotations=True` requires square images"),
        (dict(ways=0), ValueError, "Expected `ways` to be a positive integer. Received: ways=0"),
        (dict(shots=True), ValueError, "Expected `shots` to be a positive integer"),
        (dict(meta_batch_size=-1), ValueError, "Expected `meta_batch_size` to be a positive integer"),
        (dict(seed="0"), TypeError, "Expected `seed` to be an integer or None"),
        (dict(augment="flip"), TypeError, "image preprocessing layer"),
        (dict(augment_per="task"), ValueError, "Expected `augment_per` to be 'image' or 'class'"),
    ]
    for kwargs, error, message in cases:
        for directory in (root, missing):
            with pytest.raises(error, match=re.escape(message)):
                _build(directory, **kwargs)
