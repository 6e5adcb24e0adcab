"""Omniglot handwritten characters for few-shot meta-learning.

Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015) holds 1,623 handwritten
characters from 50 alphabets, each drawn once by 20 different people. It is
the standard benchmark for Reptile, MAML and other few-shot learners: every
character is a class, and a task is an N-way K-shot classification problem
over a few characters.

`omniglot()` loads the data into an `Omniglot` container of decoded images,
ready for `Omniglot.episodes()` (a `tf.data.Dataset` of few-shot tasks) or for
plain supervised training via `Omniglot.arrays()`. It reads either

* the official zip files (`images_background.zip`, `images_evaluation.zip`,
  `images_background_small1.zip`, `images_background_small2.zip`) from a
  local directory, with no network access; the decoded arrays are cached in
  `~/.keras/datasets/keras_reptile_omniglot/` so later loads are fast; or
* the TensorFlow Datasets `omniglot` data set, when no directory is given
  (this needs `tensorflow-datasets`, and network access the first time).

Images are float32 in `[0, 1]` with the strokes as 1.0 on a 0.0 background
(the raw PNGs are black ink on white, which is inverted), resized to
`image_size x image_size` with area averaging and a trailing channel axis.

Example:

```python
from keras_reptile.datasets.omniglot import omniglot

data = omniglot("/path/to/omniglot_zips", splits=("small1", "small2"))
train, test = data.split_by_alphabet(num_test=2, seed=0)
tasks = train.episodes(ways=5, shots=1, meta_batch_size=4, seed=0)
```
"""

import hashlib
import os
import warnings
import zipfile

import numpy as np
import tensorflow as tf

from keras_reptile import _durable

__all__ = ["Omniglot", "OmniglotDownloadError", "omniglot"]

# Short split name -> official zip file name.
SPLIT_FILES = {
    "small1": "images_background_small1.zip",
    "small2": "images_background_small2.zip",
    "background": "images_background.zip",
    "evaluation": "images_evaluation.zip",
}

# Short split name -> TFDS `omniglot` split name.
TFDS_SPLITS = {
    "small1": "small1",
    "small2": "small2",
    "background": "train",
    "evaluation": "test",
}

# Bump when the cache file format or the preprocessing changes.
_CACHE_VERSION = 1
_DECODE_BATCH_SIZE = 512


class OmniglotDownloadError(OSError):
    """Raised when TFDS cannot download or prepare the Omniglot data.

    This happens, for example, on a machine without internet access when the
    TFDS `omniglot` data set has not been prepared before. Pass
    `omniglot(data_dir=...)` pointing at a directory that holds the official
    Omniglot zip files instead.
    """


class Omniglot:
    """Decoded Omniglot characters: one class per (alphabet, character).

    A light container of NumPy arrays (not a Keras object). Classes are kept
    in a deterministic order, sorted by (alphabet, character) when produced by
    `omniglot()`; a class index is a position in that order.

    Args:
        images: float32 array of shape
            `(num_classes, drawings_per_class, height, width, 1)`, strokes 1.0
            on a 0.0 background.
        alphabets: sequence of `num_classes` alphabet names, one per class.
        characters: sequence of `num_classes` character names, one per class
            (e.g. `"character01"`).

    Attributes:
        images: the float32 image array described above.
        alphabets: tuple of the alphabet name of each class.
        characters: tuple of the character name of each class.
    """

    def __init__(self, images, alphabets, characters):
        images = np.asarray(images, dtype="float32")
        if images.ndim != 5 or images.shape[-1] != 1:
            raise ValueError(
                "Expected `images` to have shape (num_classes, "
                "drawings_per_class, height, width, 1). "
                f"Received: images.shape={images.shape}"
            )
        alphabets = tuple(str(a) for a in alphabets)
        characters = tuple(str(c) for c in characters)
        num_classes = images.shape[0]
        if len(alphabets) != num_classes or len(characters) != num_classes:
            raise ValueError(
                "Expected one alphabet and one character name per class. "
                f"Received: images.shape={images.shape}, "
                f"len(alphabets)={len(alphabets)}, "
                f"len(characters)={len(characters)}"
            )
        keys = list(zip(alphabets, characters))
        if len(set(keys)) != len(keys):
            raise ValueError(
                "Expected each (alphabet, character) pair to appear once. "
                f"Received duplicates: {_duplicates(keys)[:5]}"
            )
        self.images = images
        self.alphabets = alphabets
        self.characters = characters

    @property
    def num_classes(self):
        """Number of classes (distinct characters)."""
        return self.images.shape[0]

    @property
    def drawings_per_class(self):
        """Number of drawings of each character (20 for Omniglot)."""
        return self.images.shape[1]

    @property
    def image_size(self):
        """Side length of the square images, in pixels."""
        return self.images.shape[2]

    @property
    def alphabet_names(self):
        """Sorted tuple of the distinct alphabet names."""
        return tuple(sorted(set(self.alphabets)))

    def __repr__(self):
        return (
            f"<Omniglot num_classes={self.num_classes} "
            f"alphabets={len(self.alphabet_names)} "
            f"drawings_per_class={self.drawings_per_class} "
            f"image_size={self.image_size}>"
        )

    def arrays(self):
        """Flattens the data into per-drawing arrays.

        Returns:
            A tuple `(x, y, groups)`: `x` is float32 of shape
            `(num_classes * drawings_per_class, height, width, 1)`; `y` is
            int32 of shape `(N,)` with the class index of each drawing; and
            `groups` is int32 of shape `(N,)` with the index of its alphabet
            in `alphabet_names`. Drawings of a class are contiguous.
        """
        num_classes, drawings = self.images.shape[:2]
        x = self.images.reshape(
            (num_classes * drawings,) + self.images.shape[2:]
        )
        y = np.repeat(np.arange(num_classes, dtype="int32"), drawings)
        index = {name: i for i, name in enumerate(self.alphabet_names)}
        class_groups = np.array(
            [index[a] for a in self.alphabets], dtype="int32"
        ).reshape((num_classes,))
        groups = np.repeat(class_groups, drawings)
        return x, y, groups

    def select_alphabets(self, names):
        """Keeps only the classes of the given alphabets.

        Args:
            names: an alphabet name or a sequence of alphabet names, as in
                `alphabet_names`.

        Returns:
            A new `Omniglot` with the classes of those alphabets, in the
            original order.

        Raises:
            ValueError: if a name is not one of `alphabet_names`, or no names
                are given.
        """
        names = _as_name_tuple(names, "names")
        self._check_alphabets(names)
        wanted = set(names)
        indices = [i for i, a in enumerate(self.alphabets) if a in wanted]
        return self._subset(indices)

    def split_by_alphabet(self, test_alphabets=None, *, num_test=None, seed=0):
        """Holds out whole alphabets, so no alphabet is on both sides.

        Pass exactly one of `test_alphabets` (explicit names) or `num_test`
        (how many alphabets to draw at random, reproducibly for a `seed`).

        Args:
            test_alphabets: an alphabet name or sequence of names to put in
                the test set.
            num_test: number of alphabets to hold out at random.
            seed: integer seed for the random choice (used with `num_test`).

        Returns:
            A tuple `(train, test)` of `Omniglot` objects.

        Raises:
            ValueError: if both or neither of `test_alphabets` and `num_test`
                are given, a name is unknown, or a side would be empty.
        """
        if (test_alphabets is None) == (num_test is None):
            raise ValueError(
                "Expected exactly one of `test_alphabets` and `num_test`. "
                f"Received: test_alphabets={test_alphabets}, "
                f"num_test={num_test}"
            )
        all_names = self.alphabet_names
        if num_test is not None:
            num_test = _check_count(num_test, "num_test", len(all_names))
            rng = np.random.default_rng(seed)
            chosen = rng.choice(len(all_names), size=num_test, replace=False)
            test_names = tuple(all_names[i] for i in sorted(chosen))
        else:
            test_names = _as_name_tuple(test_alphabets, "test_alphabets")
            self._check_alphabets(test_names)
            if len(set(test_names)) >= len(all_names):
                raise ValueError(
                    "Expected `test_alphabets` to leave at least one alphabet "
                    f"for training. Received: test_alphabets={test_alphabets}"
                )
        held_out = set(test_names)
        train_names = tuple(n for n in all_names if n not in held_out)
        return (
            self.select_alphabets(train_names),
            self.select_alphabets(test_names),
        )

    def split_by_character(self, num_test, *, seed=0):
        """Holds out randomly chosen characters (classes).

        Unlike `split_by_alphabet`, an alphabet can appear on both sides; no
        character does.

        Args:
            num_test: number of characters to put in the test set.
            seed: integer seed for the random choice.

        Returns:
            A tuple `(train, test)` of `Omniglot` objects, each keeping the
            original class order.

        Raises:
            ValueError: if `num_test` is not between 1 and `num_classes - 1`.
        """
        num_test = _check_count(num_test, "num_test", self.num_classes)
        rng = np.random.default_rng(seed)
        test_idx = np.sort(
            rng.choice(self.num_classes, size=num_test, replace=False)
        )
        train_idx = np.setdiff1d(np.arange(self.num_classes), test_idx)
        return self._subset(train_idx), self._subset(test_idx)

    def episodes(
        self,
        *,
        ways,
        shots,
        query_shots=1,
        meta_batch_size=1,
        seed=None,
        rotations=False,
        within_alphabet=False,
        augment=None,
        augment_per="image",
    ):
        """Builds a `tf.data.Dataset` of few-shot tasks from these classes.

        Delegates to `keras_reptile.episodes.from_arrays` on `arrays()`.

        Args:
            ways: number of classes per task.
            shots: number of support examples per class.
            query_shots: number of query examples per class.
            meta_batch_size: number of tasks per dataset element.
            seed: optional integer seed for reproducible task sampling.
            rotations: whether to augment classes with 90-degree rotations.
            within_alphabet: if True, each task draws all its classes from a
                single alphabet (a harder, more realistic setting).
            augment: optional Keras image augmentation layers applied to
                every drawing of a task (for meta-training only; see
                `keras_reptile.augmentation.affine_distortions`).
            augment_per: `"image"` (each drawing its own draw) or `"class"`
                (one draw per class, making new classes; see
                `keras_reptile.episodes.from_arrays`).

        Returns:
            The `tf.data.Dataset` returned by
            `keras_reptile.episodes.from_arrays`.
        """
        from keras_reptile import episodes as episodes_lib

        x, y, groups = self.arrays()
        return episodes_lib.from_arrays(
            x,
            y,
            ways=ways,
            shots=shots,
            query_shots=query_shots,
            meta_batch_size=meta_batch_size,
            seed=seed,
            rotations=rotations,
            groups=groups if within_alphabet else None,
            augment=augment,
            augment_per=augment_per,
        )

    def _check_alphabets(self, names):
        if not names:
            raise ValueError(
                "Expected at least one alphabet name. Received: names=()"
            )
        known = set(self.alphabet_names)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(
                f"Unknown alphabet(s) {unknown}. Expected names among: "
                f"{list(self.alphabet_names)}"
            )

    def _subset(self, indices):
        indices = np.asarray(indices, dtype="int64").reshape((-1,))
        return Omniglot(
            self.images[indices],
            [self.alphabets[i] for i in indices],
            [self.characters[i] for i in indices],
        )


def omniglot(
    data_dir=None,
    *,
    splits=("small1", "small2"),
    image_size=28,
    cache_dir=None,
):
    """Loads Omniglot as an `Omniglot` container of decoded images.

    With `data_dir`, reads the official zip files from that directory:
    `"small1"` -> `images_background_small1.zip`, `"small2"` ->
    `images_background_small2.zip`, `"background"` -> `images_background.zip`,
    `"evaluation"` -> `images_evaluation.zip` (laid out as
    `<split>/<Alphabet>/characterNN/<id>_<drawer>.png`). The decoded arrays of
    each zip are cached in `cache_dir`, keyed by the zip's SHA-256 and
    `image_size`, so later loads skip PNG decoding.

    Without `data_dir`, loads the TensorFlow Datasets `omniglot` data set
    (TFDS splits `small1`, `small2`, `train`, `test`), downloading and
    preparing it in the TFDS data directory if needed. TFDS keeps its own
    cache, so `cache_dir` is not used. Within a class, drawings then follow
    the TFDS record order (deterministic) instead of file-name order.

    Classes are (alphabet, character) pairs sorted by alphabet then character;
    drawings are sorted by file name. A character present in several splits
    (Greek and Latin are in both `small1` and `small2`) is kept once, from the
    first split listed.

    Args:
        data_dir: directory holding the Omniglot zip files, or `None` to use
            TensorFlow Datasets.
        splits: a split name or a sequence of split names among `"small1"`,
            `"small2"`, `"background"` and `"evaluation"`.
        image_size: side length in pixels of the returned square images
            (the originals are 105x105).
        cache_dir: directory for the decoded-array cache. Defaults to
            `~/.keras/datasets/keras_reptile_omniglot/` (under `$KERAS_HOME`
            if set). Pass `False` to disable the cache.

    Returns:
        An `Omniglot` object with float32 `images` of shape
        `(num_classes, 20, image_size, image_size, 1)`, strokes 1.0 on 0.0.

    Raises:
        ValueError: for an unknown split name or an invalid `image_size`, or
            if a zip file does not have the Omniglot layout.
        FileNotFoundError: if `data_dir` or a zip file in it is missing.
        ImportError: if `data_dir` is `None` and `tensorflow-datasets` is not
            installed.
        OmniglotDownloadError: (an `OSError`) if `data_dir` is `None` and TFDS
            cannot download or prepare Omniglot, e.g. offline.

    Example:

    ```python
    # A directory holding images_background_small1.zip and
    # images_background_small2.zip (the official Omniglot zips).
    data = omniglot("~/data/omniglot", splits=("small1", "small2"))
    data.images.shape  # (242, 20, 28, 28, 1): 8 alphabets, Greek and
                       # Latin de-duplicated.
    train, test = data.split_by_alphabet(num_test=2, seed=0)
    ```
    """
    splits = _check_splits(splits)
    image_size = _check_image_size(image_size)
    if data_dir is None:
        parts = [_load_tfds_split(s, image_size) for s in splits]
    else:
        data_dir = os.path.expanduser(os.fspath(data_dir))
        if not os.path.isdir(data_dir):
            raise FileNotFoundError(
                f"Omniglot data directory not found: {data_dir}. Expected a "
                "directory holding the Omniglot zip files "
                f"({', '.join(SPLIT_FILES[s] for s in splits)})."
            )
        cache_dir = _resolve_cache_dir(cache_dir)
        parts = [
            _load_zip_split(data_dir, s, image_size, cache_dir) for s in splits
        ]
    return _merge(parts, image_size)


# ----------------------------------------------------------------------------
# Argument checking.


def _check_splits(splits):
    if isinstance(splits, str):
        splits = (splits,)
    try:
        splits = tuple(splits)
    except TypeError:
        raise ValueError(
            "Expected `splits` to be a split name or a sequence of split "
            f"names among {list(SPLIT_FILES)}. Received: splits={splits!r}"
        ) from None
    if not splits:
        raise ValueError(
            "Expected at least one split name among "
            f"{list(SPLIT_FILES)}. Received: splits={splits!r}"
        )
    for split in splits:
        if not isinstance(split, str) or split not in SPLIT_FILES:
            raise ValueError(
                f"Unknown Omniglot split {split!r}. Expected one of "
                f"{list(SPLIT_FILES)}. Received: splits={splits!r}"
            )
    # Drop repeats, keeping the first occurrence.
    return tuple(dict.fromkeys(splits))


def _check_image_size(image_size):
    if (
        isinstance(image_size, (bool, np.bool_))
        or not isinstance(image_size, (int, np.integer))
        or image_size <= 0
    ):
        raise ValueError(
            "Expected `image_size` to be a positive integer. "
            f"Received: image_size={image_size!r}"
        )
    return int(image_size)


def _check_count(value, name, total):
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or not 1 <= value <= total - 1
    ):
        raise ValueError(
            f"Expected `{name}` to be an integer between 1 and {total - 1} "
            f"(out of {total}), so that both sides are non-empty. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def _as_name_tuple(names, arg_name):
    if isinstance(names, str):
        return (names,)
    try:
        return tuple(str(n) for n in names)
    except TypeError:
        raise ValueError(
            f"Expected `{arg_name}` to be a name or a sequence of names. "
            f"Received: {arg_name}={names!r}"
        ) from None


def _duplicates(items):
    seen, dups = set(), []
    for item in items:
        if item in seen and item not in dups:
            dups.append(item)
        seen.add(item)
    return dups


# ----------------------------------------------------------------------------
# Preprocessing shared by both sources.


def _to_strokes(image, image_size):
    """uint8 `(H, W, C)` black on white -> float32 `(S, S, 1)` ink in [0, 1]."""
    image = tf.cast(image[..., :1], "float32") / 255.0
    image = 1.0 - image
    image = tf.image.resize(image, (image_size, image_size), method="area")
    return tf.clip_by_value(image, 0.0, 1.0)


def _decode_pngs(png_bytes, image_size):
    """Decodes and preprocesses PNG byte strings in one tf.data pipeline.

    Args:
        png_bytes: list of PNG-encoded byte strings.
        image_size: target side length.

    Returns:
        float32 array of shape `(len(png_bytes), image_size, image_size, 1)`.
    """
    if not png_bytes:
        return np.zeros((0, image_size, image_size, 1), "float32")
    ds = tf.data.Dataset.from_tensor_slices(tf.constant(png_bytes, tf.string))
    ds = ds.map(
        lambda b: _to_strokes(tf.io.decode_png(b, channels=1), image_size),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.batch(_DECODE_BATCH_SIZE)
    return np.concatenate(list(ds.as_numpy_iterator()), axis=0)


def _stack_classes(keys, drawings, images, source):
    """Groups per-drawing images into `(num_classes, drawings, S, S, 1)`.

    Args:
        keys: list of (alphabet, character) per class, in class order.
        drawings: list (per class) of lists of row indices into `images`.
        images: float32 `(N, S, S, 1)` array.
        source: description of the data for error messages.
    """
    counts = {len(d) for d in drawings}
    if len(counts) > 1:
        by_count = {}
        for key, d in zip(keys, drawings):
            by_count.setdefault(len(d), key)
        raise ValueError(
            "Expected every Omniglot character to have the same number of "
            f"drawings, but {source} has characters with "
            f"{sorted(counts)} drawings (e.g. "
            + ", ".join(f"{k}: {n}" for n, k in sorted(by_count.items()))
            + ")."
        )
    order = np.array(drawings, dtype="int64").reshape((len(keys), -1))
    return images[order]


def _merge(parts, image_size):
    """Merges per-split (images, alphabets, characters), first one wins."""
    chosen = {}
    for images, alphabets, characters in parts:
        for i, key in enumerate(zip(alphabets, characters)):
            if key not in chosen:
                chosen[key] = images[i]
    drawing_counts = {v.shape[0] for v in chosen.values()}
    if len(drawing_counts) > 1:
        raise ValueError(
            "Expected every split to have the same number of drawings per "
            f"character. Received: {sorted(drawing_counts)}"
        )
    keys = sorted(chosen)
    if keys:
        images = np.stack([chosen[k] for k in keys])
    else:
        images = np.zeros((0, 0, image_size, image_size, 1), "float32")
    return Omniglot(images, [k[0] for k in keys], [k[1] for k in keys])


# ----------------------------------------------------------------------------
# Source 1: official zip files, with a decoded-array cache.


def _resolve_cache_dir(cache_dir):
    if cache_dir is False:
        return None
    if cache_dir is None:
        keras_home = os.environ.get(
            "KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras")
        )
        cache_dir = os.path.join(
            keras_home, "datasets", "keras_reptile_omniglot"
        )
    return os.path.expanduser(os.fspath(cache_dir))


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_path(cache_dir, zip_path, image_size):
    stem = os.path.splitext(os.path.basename(zip_path))[0]
    sha = _sha256(zip_path)
    name = f"{stem}-{sha[:16]}-{image_size}px-v{_CACHE_VERSION}.npz"
    return os.path.join(cache_dir, name), sha


def _read_cache(path, sha, image_size):
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            if (
                str(f["sha256"]) != sha
                or int(f["image_size"]) != image_size
                or int(f["version"]) != _CACHE_VERSION
            ):
                return None
            images = f["images"].astype("float32", copy=False)
            alphabets = [str(a) for a in f["alphabets"]]
            characters = [str(c) for c in f["characters"]]
    except Exception:  # A corrupt or partial cache file: decode again.
        return None
    if images.shape[:1] != (len(alphabets),) or len(characters) != len(
        alphabets
    ):
        return None
    return images, alphabets, characters


def _write_cache(path, sha, image_size, images, alphabets, characters):
    cache_dir = os.path.dirname(path)
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with _durable.atomic_write(path) as tmp_path:
            with open(tmp_path, "wb") as f:
                np.savez_compressed(
                    f,
                    images=images,
                    alphabets=np.array(alphabets, dtype=str),
                    characters=np.array(characters, dtype=str),
                    sha256=np.array(sha),
                    image_size=np.array(image_size),
                    version=np.array(_CACHE_VERSION),
                )
    except OSError as e:
        warnings.warn(
            f"Could not write the Omniglot cache file {path}: {e}. The data "
            "will be decoded again next time; pass a writable `cache_dir` "
            "to avoid this.",
            stacklevel=3,
        )


def _load_zip_split(data_dir, split, image_size, cache_dir):
    zip_path = os.path.join(data_dir, SPLIT_FILES[split])
    if not os.path.isfile(zip_path):
        present = sorted(
            f for f in os.listdir(data_dir) if f.lower().endswith(".zip")
        )
        raise FileNotFoundError(
            f"Omniglot split {split!r} not found: expected the file "
            f"{zip_path} (the official Omniglot zip "
            f"'{SPLIT_FILES[split]}'). Zip files found in {data_dir}: "
            f"{present or 'none'}."
        )
    cache_path = sha = None
    if cache_dir is not None:
        cache_path, sha = _cache_path(cache_dir, zip_path, image_size)
        cached = _read_cache(cache_path, sha, image_size)
        if cached is not None:
            return cached
    result = _decode_zip(zip_path, image_size)
    if cache_path is not None:
        _write_cache(cache_path, sha, image_size, *result)
    return result


def _decode_zip(zip_path, image_size):
    """Reads one Omniglot zip into (images, alphabets, characters)."""
    groups = {}
    try:
        with zipfile.ZipFile(zip_path) as archive:
            for info in archive.infolist():
                parts = info.filename.replace("\\", "/").split("/")
                if (
                    info.is_dir()
                    or len(parts) < 3
                    or not parts[-1].lower().endswith(".png")
                    or any(p.startswith((".", "__MACOSX")) for p in parts)
                ):
                    continue
                alphabet, character, filename = parts[-3:]
                groups.setdefault((alphabet, character), []).append(
                    (filename, info)
                )
            if not groups:
                raise ValueError(
                    f"No Omniglot images found in {zip_path}. Expected PNG "
                    "files laid out as "
                    "<split>/<Alphabet>/characterNN/<id>_<drawer>.png."
                )
            keys = sorted(groups)
            png_bytes, drawings = [], []
            for key in keys:
                rows = []
                for _, info in sorted(groups[key], key=lambda t: t[0]):
                    rows.append(len(png_bytes))
                    png_bytes.append(archive.read(info))
                drawings.append(rows)
    except zipfile.BadZipFile as e:
        raise ValueError(
            f"Could not read {zip_path} as a zip file: {e}. Expected an "
            "official Omniglot zip file."
        ) from e
    images = _decode_pngs(png_bytes, image_size)
    images = _stack_classes(keys, drawings, images, zip_path)
    return images, [k[0] for k in keys], [k[1] for k in keys]


# ----------------------------------------------------------------------------
# Source 2: TensorFlow Datasets.


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(
            "Loading Omniglot with `data_dir=None` requires the "
            "`tensorflow-datasets` package (`pip install "
            "tensorflow-datasets`, or `pip install keras-reptile[datasets]`)."
            " Alternatively, pass `data_dir=` pointing at a directory that "
            f"holds the official Omniglot zip files ({SPLIT_FILES['small1']}"
            ", ...)."
        ) from e
    return tfds


def _load_tfds_split(split, image_size):
    tfds = _import_tfds()
    tfds_split = TFDS_SPLITS[split]
    builder = tfds.builder("omniglot")
    try:
        builder.download_and_prepare()
    except Exception as e:
        raise OmniglotDownloadError(
            "TensorFlow Datasets could not download or prepare the Omniglot "
            f"data set (into {builder.data_dir}): "
            f"{type(e).__name__}: {e}. If this machine is offline, download "
            "the official Omniglot zip files ("
            + ", ".join(SPLIT_FILES.values())
            + ") from https://github.com/brendenlake/omniglot (python/ "
            "folder) and pass `omniglot(data_dir=...)` pointing at the "
            "directory that holds them."
        ) from e
    ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
    alphabet_names = builder.info.features["alphabet"].names

    def preprocess(example):
        return (
            _to_strokes(example["image"], image_size),
            example["alphabet"],
            example["alphabet_char_id"],
        )

    ds = ds.map(
        preprocess, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    ds = ds.batch(_DECODE_BATCH_SIZE)
    images, alphabet_ids, char_ids = [], [], []
    for batch_images, batch_alphabets, batch_chars in ds.as_numpy_iterator():
        images.append(batch_images)
        alphabet_ids.append(batch_alphabets)
        char_ids.append(batch_chars)
    if not images:
        raise ValueError(
            f"The TFDS omniglot split {tfds_split!r} is empty. Expected "
            "Omniglot images."
        )
    images = np.concatenate(images, axis=0)
    alphabet_ids = np.concatenate(alphabet_ids, axis=0)
    char_ids = np.concatenate(char_ids, axis=0)

    groups = {}
    for row, (a, c) in enumerate(zip(alphabet_ids, char_ids)):
        key = (alphabet_names[int(a)], f"character{int(c) + 1:02d}")
        groups.setdefault(key, []).append(row)
    keys = sorted(groups)
    drawings = [groups[k] for k in keys]
    images = _stack_classes(
        keys, drawings, images, f"the TFDS omniglot split {tfds_split!r}"
    )
    return images, [k[0] for k in keys], [k[1] for k in keys]
