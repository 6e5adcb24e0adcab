"""Few-shot episodes from a directory of images, one sub-folder per class.

`from_directory` (exported as `keras_reptile.episodes.from_directory`) reads
a folder laid out as for `keras.utils.image_dataset_from_directory` and
returns the same episodic `tf.data.Dataset` as
`keras_reptile.episodes.from_arrays` would on the decoded images, without
holding them in memory: only the file paths are listed in Python. The
episodes are sampled by `from_arrays` itself, on a tiny stand-in feature per
file that carries its index (and, once rotated, its quarter turns); the
pipeline then reads, decodes, resizes and rotates the files each task
needs, and applies `augment` with the seeds `from_arrays` would use. With
the same files, labels and seed, both give the same episodes.
"""

import os
import re

import numpy as np
import tensorflow as tf

from keras_reptile import augmentation
from keras_reptile import episodes as episodes_lib
from keras_reptile._validation import check_positive_int

__all__ = ["from_directory"]

# File types read, as `keras.utils.image_dataset_from_directory` reads them.
IMAGE_FORMATS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")

# How each format's files begin: `tf.io.decode_image` goes by content.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)

_CHANNELS = {"grayscale": 1, "rgb": 3, "rgba": 4}

# `tf.image.resize` methods, as Keras accepts them.
_INTERPOLATIONS = (
    "bilinear",
    "nearest",
    "bicubic",
    "area",
    "lanczos3",
    "lanczos5",
    "gaussian",
    "mitchellcubic",
)

# Files named in an error message; the count is given in full.
_MAX_LISTED = 10

# A file's stand-in feature is a 2x2 matrix holding `index + 1` in one
# corner: the flat position of that corner after `from_arrays` rotated it
# `k` quarter turns gives `k`.
_TURNS_OF_CORNER = (0, 3, 1, 2)


def from_directory(
    directory,
    *,
    ways,
    shots,
    query_shots=1,
    meta_batch_size=1,
    seed=None,
    image_size=(256, 256),
    color_mode="rgb",
    interpolation="bilinear",
    invert=False,
    rotations=False,
    groups=None,
    augment=None,
    augment_per="image",
    verify="decode",
):
    """Builds N-way K-shot classification episodes from a folder of images.

    `directory` holds one sub-folder per class, as for
    `keras.utils.image_dataset_from_directory`:

    ```
    directory/
    ├── class_a/
    │   ├── a_image_1.png
    │   └── a_image_2.jpg
    └── class_b/
        └── ...
    ```

    With `groups="parent"`, one more level: `directory/<group>/<class>/`,
    e.g. Omniglot's `alphabet/character/` tree.

    As in Keras, the classes are the sub-folders in sorted order, the images
    of a class are the `.png`, `.jpg`, `.jpeg`, `.gif` and `.bmp` files
    anywhere below its folder (any letter case), files of other types are
    ignored, and images are decoded (first frame of a GIF), converted to
    `color_mode` and resized to `image_size`. Unlike Keras, names starting
    with "." (`.ipynb_checkpoints/`, macOS's `._x.png`) are skipped at every
    level, and pixel values are float32 in `[0, 1]` (Keras gives 0 to 255).

    Only the file paths are listed up front; the files a task needs are
    read, decoded and resized inside the `tf.data` pipeline, so a large
    folder is never held in memory. Tasks are sampled as by
    `keras_reptile.episodes.from_arrays` (see there), which does the
    sampling here: on the same images (same classes and file order) with the
    same seed, both give the same episodes. Deterministic for an integer
    `seed`.

    Image files are checked before the dataset is returned: every file must
    be readable and begin like a PNG, JPEG, GIF or BMP file; with
    `verify="decode"` (the default) every image is also decoded once, in a
    parallel `tf.data` pass that keeps nothing, so that a corrupt or
    truncated file is named here rather than failing training later. For a
    very large folder `verify="header"` skips that pass; a file corrupt past
    its first bytes then stops the pipeline with TensorFlow's decoding
    error, which does not name the file.

    Args:
        directory: Path of the folder of class sub-folders (a string or a
            path-like object).
        ways: Number of classes per task.
        shots: Number of support images per class.
        query_shots: Number of query images per class.
        meta_batch_size: Number of tasks per dataset element.
        seed: Integer seed for reproducible sampling. If `None`, a seed is
            drawn once, here, from NumPy's global generator (so
            `keras.utils.set_random_seed()` makes the episodes
            reproducible).
        image_size: `(height, width)` the images are resized to.
        color_mode: `"grayscale"` (1 channel), `"rgb"` (3) or `"rgba"` (4).
            Any file is converted: a grayscale image is repeated into RGB,
            RGB is weighted into grayscale, a missing alpha channel is
            opaque.
        interpolation: The `tf.image.resize` method: `"bilinear"`,
            `"nearest"`, `"bicubic"`, `"area"`, `"lanczos3"`, `"lanczos5"`,
            `"gaussian"` or `"mitchellcubic"`. `"area"` suits line drawings
            shrunk by a large factor (Omniglot's loader uses it).
        invert: If `True`, every value `v` becomes `1 - v` (before
            resizing): dark ink on white paper becomes strokes of 1.0 on a
            0.0 background, as Omniglot's loader and the shipped
            `keras_reptile.pretrained.load("omniglot")` model have them.
        rotations: If `True`, each class also yields three new classes, its
            images turned by 90, 180 and 270 degrees (see `from_arrays`).
            Needs a square `image_size`.
        groups: `None`, or `"parent"`: the folder above the class folders is
            the class's group (`directory/<group>/<class>/`), and each task
            takes all its classes from one group that has at least `ways`
            classes (within-alphabet tasks on an Omniglot-style tree). Class
            names are then `"<group>/<class>"`.
        augment: Optional Keras image preprocessing layer (e.g.
            `keras.layers.RandomRotation`) or list of layers, applied to
            every support and query image after resizing and `rotations`,
            with the seeds `from_arrays` uses (see
            `keras_reptile.augmentation.affine_distortions`). For
            meta-training data only.
        augment_per: `"image"` (default) or `"class"`: one draw of
            `augment` per image, or one per class of a task (see
            `from_arrays`).
        verify: `"decode"` (default) or `"header"`: how image files are
            checked up front (see above).

    Returns:
        An infinite `tf.data.Dataset` of episode dicts, as returned by
        `from_arrays`: `support_x` `[meta_batch_size, ways * shots, height,
        width, channels]` (float32 in `[0, 1]`), `support_y`
        `[meta_batch_size, ways * shots]` (int32, `0..ways-1`), and
        `query_x`, `query_y` likewise with `ways * query_shots` images. As
        with Keras, the dataset has a `class_names` attribute (the sorted
        class folder names) and a `file_paths` attribute (the image paths,
        class by class, in the order sampled); with `groups="parent"` also
        `group_names`. Dataset transformations (`map`, `take`, ...) return
        new datasets without them.

    Raises:
        ValueError: If `directory` does not exist or has no class
            sub-folders; a class has fewer than `shots + query_shots` images
            (the message names the class and its count); there are fewer
            classes than `ways` (in every group, with `groups="parent"`); an
            image file cannot be read, is not a PNG, JPEG, GIF or BMP file,
            or (with `verify="decode"`) cannot be decoded (the message names
            the files); an argument is out of range: `ways`, `shots`,
            `query_shots` or `meta_batch_size` not a positive integer,
            `image_size` not two positive integers, `color_mode`,
            `interpolation`, `groups`, `augment_per` or `verify` not one of
            its values, `rotations=True` with a non-square `image_size`.
        TypeError: If `directory` is not a path, `seed` is not an integer,
            `invert` or `rotations` is not a bool, or `augment` is not a
            Keras image preprocessing layer or a list of them.

    Example:

    >>> import os, tempfile
    >>> import numpy as np, tensorflow as tf
    >>> root = tempfile.mkdtemp()
    >>> for c in range(4):
    ...     os.makedirs(os.path.join(root, f"class_{c}"))
    ...     for i in range(3):
    ...         pixels = np.full((20, 20, 1), 60 * c, np.uint8)
    ...         tf.io.write_file(os.path.join(root, f"class_{c}", f"{i}.png"),
    ...                          tf.io.encode_png(pixels))
    >>> tasks = from_directory(root, ways=2, shots=1, query_shots=2, seed=0,
    ...                        image_size=(28, 28), color_mode="grayscale")
    >>> tasks.class_names
    ['class_0', 'class_1', 'class_2', 'class_3']
    >>> episode = next(iter(tasks))
    >>> episode["support_x"].shape, episode["query_y"].shape
    (TensorShape([1, 2, 28, 28, 1]), TensorShape([1, 4]))
    """
    # The cheap arguments first, before the folder is listed.
    ways = check_positive_int("ways", ways)
    shots = check_positive_int("shots", shots)
    query_shots = check_positive_int("query_shots", query_shots)
    meta_batch_size = check_positive_int("meta_batch_size", meta_batch_size)
    seed = _check_seed(seed)
    image_size = _check_image_size(image_size)
    channels = _check_color_mode(color_mode)
    _check_choice("interpolation", interpolation, _INTERPOLATIONS)
    _check_bool("invert", invert)
    _check_bool("rotations", rotations)
    if groups is not None and groups != "parent":
        raise ValueError(
            "Expected `groups` to be None or 'parent' (the folder above the "
            f"class folders is the group). Received: groups={groups!r}"
        )
    _check_choice("verify", verify, ("decode", "header"))
    layers = augmentation.check(augment)
    per_class_augment = augmentation.check_per(augment_per) == "class" and bool(layers)
    if rotations and image_size[0] != image_size[1]:
        raise ValueError(
            "`rotations=True` requires square images, with height == width. "
            f"Received: image_size={image_size}"
        )
    directory = _check_directory(directory)

    classes = _list_classes(directory, groups == "parent")
    _check_class_sizes(classes, shots + query_shots, directory)
    copies = 4 if rotations else 1
    _check_ways(classes, ways, copies, directory, groups == "parent")
    paths = [path for _, _, files in classes for path in files]
    _check_headers(paths)
    if verify == "decode":
        _check_decoding(paths, channels)

    # Sampling: `from_arrays` on one stand-in feature per file.
    counts = [len(files) for _, _, files in classes]
    keys = np.zeros((len(paths), 2, 2), "float64")
    keys[:, 0, 0] = np.arange(1, len(paths) + 1)
    labels = np.repeat(np.arange(len(classes)), counts)
    group_ids = None
    group_names = None
    if groups == "parent":
        group_names = sorted({group for group, _, _ in classes})
        number = {name: i for i, name in enumerate(group_names)}
        group_ids = np.repeat([number[group] for group, _, _ in classes], counts)
    tasks = episodes_lib.from_arrays(
        keys,
        labels,
        ways=ways,
        shots=shots,
        query_shots=query_shots,
        meta_batch_size=meta_batch_size,
        seed=seed,
        rotations=rotations,
        groups=group_ids,
    )

    with tf.device("/cpu:0"):
        path_table = tf.constant(paths, tf.string)
        corner_turns = tf.constant(_TURNS_OF_CORNER, tf.int32)
    height, width = image_size
    image_spec = tf.TensorSpec([height, width, channels], tf.float32)

    def load_image(path_index, turns):
        image = _decode(tf.io.read_file(path_table[path_index]), channels)
        image = tf.cast(image, tf.float32) / 255.0
        if invert:
            image = 1.0 - image
        image = tf.image.resize(image, image_size, method=interpolation)
        # Bicubic and Lanczos kernels overshoot.
        image = tf.clip_by_value(image, 0.0, 1.0)
        if rotations:
            image = tf.image.rot90(image, turns)
        return tf.ensure_shape(image, image_spec.shape)

    def load_images(key_batch):
        flat = tf.reshape(key_batch, [-1, 4])
        path_index = tf.cast(tf.round(tf.reduce_sum(flat, axis=1)), tf.int64) - 1
        turns = tf.gather(corner_turns, tf.argmax(flat, axis=1))
        images = tf.map_fn(
            lambda args: load_image(*args),
            (path_index, turns),
            fn_output_signature=image_spec,
        )
        return tf.reshape(images, [*key_batch.shape[:2], height, width, channels])

    # `from_task_fn`'s seeds: task `i` of all is keyed by `fold_in([seed, 0],
    # i)`; `from_arrays` draws `augment` from it folded with 1 (support), 2
    # (query) or 3 (per class).
    base_seed = tf.constant([seed, 0], tf.int64)

    def load_episode(position, episode):
        episode = dict(episode)
        support_x = load_images(episode["support_x"])
        query_x = load_images(episode["query_x"])
        if layers:
            supports, queries = [], []
            for i in range(meta_batch_size):
                task_seed = tf.random.experimental.stateless_fold_in(
                    base_seed, position * meta_batch_size + i
                )
                if per_class_augment:
                    support, query = _augment_per_class(
                        layers,
                        support_x[i],
                        episode["support_y"][i],
                        query_x[i],
                        episode["query_y"][i],
                        ways,
                        tf.random.experimental.stateless_fold_in(task_seed, 3),
                    )
                else:
                    support = augmentation.apply(
                        layers, support_x[i],
                        tf.random.experimental.stateless_fold_in(task_seed, 1),
                    )
                    query = augmentation.apply(
                        layers, query_x[i],
                        tf.random.experimental.stateless_fold_in(task_seed, 2),
                    )
                supports.append(support)
                queries.append(query)
            support_x = tf.ensure_shape(tf.stack(supports), support_x.shape)
            query_x = tf.ensure_shape(tf.stack(queries), query_x.shape)
        episode["support_x"] = support_x
        episode["query_x"] = query_x
        return episode

    tasks = tasks.enumerate().map(
        load_episode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    tasks = tasks.prefetch(tf.data.AUTOTUNE)
    tasks.class_names = [
        name if group is None else f"{group}/{name}" for group, name, _ in classes
    ]
    tasks.file_paths = paths
    if group_names is not None:
        tasks.group_names = group_names
    return tasks


# ----------------------------------------------------------------------------
# Argument checks.


def _check_seed(seed):
    """`seed` as a signed 64-bit integer, as `from_arrays` takes it."""
    if seed is None:
        return int(np.random.randint(np.iinfo(np.int64).max, dtype=np.int64))
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            "Expected `seed` to be an integer or None. "
            f"Received: seed={seed!r} of type {type(seed).__name__}"
        )
    seed = int(seed) % 2**64
    return seed - 2**64 if seed >= 2**63 else seed


def _check_image_size(image_size):
    if (
        isinstance(image_size, (tuple, list))
        and len(image_size) == 2
        and all(
            isinstance(v, (int, np.integer))
            and not isinstance(v, (bool, np.bool_))
            and v > 0
            for v in image_size
        )
    ):
        return int(image_size[0]), int(image_size[1])
    raise ValueError(
        "Expected `image_size` to be a tuple of two positive integers "
        f"(height, width). Received: image_size={image_size!r}"
    )


def _check_color_mode(color_mode):
    if isinstance(color_mode, str) and color_mode in _CHANNELS:
        return _CHANNELS[color_mode]
    raise ValueError(
        "Expected `color_mode` to be one of 'grayscale', 'rgb' or 'rgba'. "
        f"Received: color_mode={color_mode!r}"
    )


def _check_choice(name, value, choices):
    if not (isinstance(value, str) and value in choices):
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(
            f"Expected `{name}` to be one of {listed}. Received: {name}={value!r}"
        )


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"Expected `{name}` to be a bool. Received: {name}={value!r} of "
            f"type {type(value).__name__}"
        )


def _check_directory(directory):
    try:
        path = os.fspath(directory)
    except TypeError:
        raise TypeError(
            "Expected `directory` to be a path (a string or a path-like "
            f"object). Received: directory={directory!r} of type "
            f"{type(directory).__name__}"
        ) from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        what = "a file, not a directory" if os.path.exists(path) else "no such directory"
        raise ValueError(
            "Expected `directory` to be an existing directory with one "
            f"sub-folder per class. Received: directory={path!r} ({what})"
        )
    return path


# ----------------------------------------------------------------------------
# Listing the folder.


def _visible_subfolders(path):
    return [
        name
        for name in sorted(os.listdir(path))
        if not name.startswith(".") and os.path.isdir(os.path.join(path, name))
    ]


def _image_files(class_dir):
    """The image files below `class_dir`, in Keras's order.

    Folders sorted by path, and the files of each folder by name; symbolic
    links to folders are not followed (as Keras's `follow_links=False`).
    """
    found = []
    for root, dirs, files in os.walk(class_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        names = [
            f for f in files
            if not f.startswith(".") and f.lower().endswith(IMAGE_FORMATS)
        ]
        found.append((root, sorted(names)))
    return [
        os.path.join(root, name)
        for root, names in sorted(found, key=lambda item: item[0])
        for name in names
    ]


def _list_classes(directory, grouped):
    """`[(group or None, class name, [paths])]`, sorted by (group, class)."""
    if grouped:
        pairs = [
            (group, os.path.join(directory, group, name), name)
            for group in _visible_subfolders(directory)
            for name in _visible_subfolders(os.path.join(directory, group))
        ]
    else:
        pairs = [
            (None, os.path.join(directory, name), name)
            for name in _visible_subfolders(directory)
        ]
    if not pairs:
        layout = (
            "<group>/<class>/ sub-folders (groups='parent')"
            if grouped
            else "one sub-folder per class"
        )
        raise ValueError(
            f"Expected `directory` to hold {layout}. Received: "
            f"directory={directory!r} with none"
        )
    return [(group, name, _image_files(path)) for group, path, name in pairs]


def _class_label(group, name):
    return repr(name if group is None else f"{group}/{name}")


def _check_class_sizes(classes, needed, directory):
    small = [(g, n, len(f)) for g, n, f in classes if len(f) < needed]
    if not small:
        return
    group, name, count = small[0]
    others = ""
    if len(small) > 1:
        listed = ", ".join(
            f"{_class_label(g, n)} ({c})" for g, n, c in small[1:_MAX_LISTED]
        )
        more = ", ..." if len(small) > _MAX_LISTED else ""
        others = f" {len(small)} classes are too small; also {listed}{more}."
    raise ValueError(
        "Expected every class to have at least `shots + query_shots` = "
        f"{needed} images. Received: class {_class_label(group, name)} has "
        f"{count} images (.png, .jpg, .jpeg, .gif or .bmp files) in "
        f"{directory!r}.{others}"
    )


def _check_ways(classes, ways, copies, directory, grouped):
    def counted(n):
        return (
            f"4 x {n} = {4 * n} classes with `rotations=True`"
            if copies == 4
            else f"{n} classes"
        )

    if ways > copies * len(classes):
        raise ValueError(
            "Expected `ways` to be at most the number of classes, but "
            f"{directory!r} has {counted(len(classes))}. Received: ways={ways}"
        )
    if grouped:
        sizes = {}
        for group, _, _ in classes:
            sizes[group] = sizes.get(group, 0) + 1
        largest = max(sizes, key=lambda g: (sizes[g], g))
        if copies * sizes[largest] < ways:
            raise ValueError(
                "Expected at least one group with `ways` classes, since every "
                "task takes its classes from one group (`groups='parent'`). "
                f"Received: ways={ways}, and the largest group, {largest!r}, "
                f"has {counted(sizes[largest])}"
            )


# ----------------------------------------------------------------------------
# Checking and decoding the files.


def _file_problem(path):
    """Why `path` is not an image file TensorFlow can decode, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    if not head:
        return "is empty"
    if any(head.startswith(signature) for signature, _ in _SIGNATURES):
        return None
    return f"is not a PNG, JPEG, GIF or BMP file (it begins {head!r})"


def _raise_bad_files(problems, total):
    listed = "; ".join(f"{path} {why}" for path, why in problems[:_MAX_LISTED])
    more = "; ..." if len(problems) > _MAX_LISTED else ""
    verb = "is" if len(problems) == 1 else "are"
    raise ValueError(
        "Expected every image file to be a readable PNG, JPEG, GIF or BMP "
        f"image. Received: {len(problems)} of the {total} files {verb} not: "
        f"{listed}{more}. Remove or replace them."
    )


def _check_headers(paths):
    problems = []
    for path in paths:
        why = _file_problem(path)
        if why is not None:
            problems.append((path, why))
    if problems:
        _raise_bad_files(problems, len(paths))


def _check_decoding(paths, channels):
    """Decodes every file once, in parallel, and names those that fail."""
    with tf.device("/cpu:0"):
        table = tf.constant(paths, tf.string)

    def size(index):
        image = _decode(tf.io.read_file(table[index]), channels)
        return index, tf.reduce_prod(tf.shape(image)[:2])

    decoded = (
        tf.data.Dataset.range(len(paths))
        .map(size, num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
        .ignore_errors()
        .batch(4096)
    )
    ok = np.zeros(len(paths), bool)
    for indices, pixels in decoded.as_numpy_iterator():
        ok[indices[pixels > 0]] = True
    bad = np.flatnonzero(~ok)
    if bad.size:
        problems = []
        for i in bad[:_MAX_LISTED]:
            problems.append((paths[i], _decoding_error(paths[i], channels)))
        problems += [(paths[i], "cannot be decoded") for i in bad[_MAX_LISTED:]]
        _raise_bad_files(problems, len(paths))


def _decoding_error(path, channels):
    try:
        image = _decode(tf.io.read_file(path), channels)
    except (tf.errors.OpError, ValueError) as e:
        reason = getattr(e, "message", None) or str(e)
        # TensorFlow's wrapping: "{{function_node ...}} <reason> [Op:DecodeImage]".
        reason = re.sub(r"\{\{function_node [^}]*\}\}|\[Op:.*$", "", reason, flags=re.S)
        return f"cannot be decoded ({reason.strip() or type(e).__name__})"
    return f"cannot be decoded (an image of shape {tuple(image.shape)})"


def _decode(contents, channels):
    """Decodes image bytes to uint8 `[height, width, channels]`.

    `tf.io.decode_image` converts the channels itself where the format's
    decoder can (as Keras uses it); grayscale BMP and GIF files, and RGBA
    from JPEG and GIF files, which it refuses, are decoded as they are and
    converted here.
    """
    decode = tf.io.decode_image
    if channels == 3:
        image = decode(contents, channels=3, expand_animations=False)
    else:
        start = tf.strings.substr(contents, 0, 3)
        is_gif = tf.equal(start, b"GIF")
        if channels == 1:
            native = is_gif | tf.equal(tf.strings.substr(contents, 0, 2), b"BM")
        else:
            native = is_gif | tf.equal(start, b"\xff\xd8\xff")
        image = tf.cond(
            native,
            lambda: _convert_channels(
                decode(contents, channels=0, expand_animations=False), channels
            ),
            lambda: decode(contents, channels=channels, expand_animations=False),
        )
    return tf.ensure_shape(image, [None, None, channels])


def _convert_channels(image, channels):
    """uint8 `[h, w, 1 to 4]` (gray, gray+alpha, RGB, RGBA) to `channels`."""
    have = tf.shape(image)[-1]
    color = have >= 3
    rgb = tf.cond(
        color, lambda: image[..., :3], lambda: tf.tile(image[..., :1], [1, 1, 3])
    )
    if channels == 1:
        return tf.cond(
            color, lambda: tf.image.rgb_to_grayscale(rgb), lambda: image[..., :1]
        )
    alpha = tf.cond(
        tf.equal(have % 2, 0),
        lambda: image[..., -1:],
        lambda: tf.fill(tf.concat([tf.shape(image)[:2], [1]], 0), tf.constant(255, tf.uint8)),
    )
    return tf.concat([rgb, alpha], axis=-1)


def _augment_per_class(layers, support, support_y, query, query_y, ways, seed):
    """`augment_per="class"` on one task, as `from_arrays` draws it.

    `from_arrays` distorts a task's images class by class (class `i` is the
    one labelled `i`), stacked as the channels of one image, before they are
    shuffled. The images of each label are gathered into that layout here,
    distorted with the same seed, and put back in place. The layers treat
    every channel alike, so the order of a class's images does not matter.
    """
    def by_class(images, labels):
        order = tf.argsort(labels, stable=True)
        grouped = tf.gather(images, order)
        return tf.reshape(grouped, [ways, -1, *images.shape[1:]]), order

    support_classes, support_order = by_class(support, support_y)
    query_classes, query_order = by_class(query, query_y)
    shots = support.shape[0] // ways
    distorted = augmentation.apply_per_class(
        layers, tf.concat([support_classes, query_classes], axis=1), seed
    )

    def put_back(images, order, like):
        flat = tf.reshape(images, like.shape)
        return tf.gather(flat, tf.argsort(order))

    return (
        put_back(distorted[:, :shots], support_order, support),
        put_back(distorted[:, shots:], query_order, query),
    )
