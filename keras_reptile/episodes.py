"""Episodic `tf.data` pipelines of few-shot tasks for meta-learning.

An episodic dataset is an infinite `tf.data.Dataset` whose elements are dicts
holding `meta_batch_size` tasks:

* `support_x`: `[meta_batch, S, *input_shape]`, the examples to adapt on;
* `support_y`: `[meta_batch, S]`, their labels;
* `query_x`: `[meta_batch, Q, *input_shape]`, the examples to evaluate on;
* `query_y`: `[meta_batch, Q]`, their labels.

Every dimension is static, so the `element_spec` is fully defined and a model
can be built from it. For N-way K-shot classification (`from_arrays`,
`from_dataset`) `S = ways * shots`, `Q = ways * query_shots`, and labels are
int32 in `0..ways-1`. Any other task family (e.g. regression) can be written
as a function of a random seed and turned into a dataset with
`from_task_fn`.

Sampling uses stateless random ops keyed by (seed, episode number), so an
integer `seed` gives the same sequence of episodes every time, whatever the
`meta_batch_size` and however many threads build the episodes.
"""

import numpy as np
import tensorflow as tf

from keras_reptile import augmentation
from keras_reptile._validation import EPISODE_KEYS
from keras_reptile._validation import check_finite_rows
from keras_reptile._validation import check_group_ids
from keras_reptile._validation import dense_array
from keras_reptile._validation import check_positive_int
from keras_reptile.image_folders import from_directory

__all__ = ["from_arrays", "from_dataset", "from_directory", "from_task_fn"]

# Examples per batch when `from_dataset` reads a dataset into memory.
_MATERIALIZE_BATCH_SIZE = 1024


def from_arrays(
    x,
    y,
    *,
    ways,
    shots,
    query_shots=1,
    meta_batch_size=1,
    seed=None,
    rotations=False,
    groups=None,
    augment=None,
    augment_per="image",
):
    """Builds N-way K-shot classification episodes from labelled arrays.

    Each task draws `ways` distinct classes uniformly without replacement,
    then `shots` support and `query_shots` query examples of each class, all
    distinct. The i-th drawn class is labelled `i`, in both the support and
    the query set, so labels are `0..ways-1` in a random assignment. The
    support and the query set are each shuffled, so labels are not in blocks.
    Classes may have different numbers of examples.

    The data is held in memory as a constant tensor; only the sampling runs
    in the `tf.data` pipeline.

    Args:
        x: Array or eager tensor of shape `[N, *input_shape]`. Floating
            features keep their dtype; other dtypes (e.g. uint8 images) are
            cast to float32.
        y: Array or eager tensor of shape `[N]` with the class of each
            example: arbitrary integers, not necessarily contiguous. A float
            array is accepted if every value is a whole number.
        ways: Number of classes per task.
        shots: Number of support examples per class.
        query_shots: Number of query examples per class.
        meta_batch_size: Number of tasks per dataset element.
        seed: Integer seed for reproducible sampling. If `None`, a seed is
            drawn once, here, from NumPy's global generator, so
            `keras.utils.set_random_seed()` also makes the episodes
            reproducible.
        rotations: If `True`, each class `c` also yields three new classes:
            the images of `c` rotated by 90, 180 and 270 degrees (Omniglot's
            usual augmentation). There are then `4 * C` classes to draw from,
            and a task may hold both `c` and a rotation of it (so the same
            example may appear in both, rotated differently). Needs square
            image features of shape `[H, W]` or `[H, W, channels]`.
        groups: Optional array of shape `[N]` with a group id (e.g. the
            alphabet) of each example. Every class must belong to a single
            group. Each task then first draws, uniformly, one of the groups
            that have at least `ways` classes, and takes all its classes from
            that group. Rotated classes belong to the group of the original.
        augment: Optional Keras image preprocessing layer (e.g.
            `keras.layers.RandomRotation`) or list of layers, applied in
            order to every support and query image after `rotations`, each
            image with its own draw (see
            `keras_reptile.augmentation.affine_distortions`). The draws come
            from each task's seed, so the episodes stay reproducible and
            resumable. For meta-training data only: held-out tasks should see
            the images as they are. Needs image features `[H, W]` or
            `[H, W, channels]`.
        augment_per: `"image"` (default): every support and query image
            gets its own draw of `augment`, so a class's drawings vary.
            `"class"`: one draw per class of a task, applied alike to all
            its support and query images, so a distorted class is a new
            class (as `rotations` makes them). A class's images pass through
            the layers stacked as the channels of one image, so this suits
            geometric layers (rotation, shear, zoom, translation, flips),
            which treat every channel alike, not colour ones.

    Returns:
        An infinite `tf.data.Dataset` of episode dicts with keys
        `support_x` `[meta_batch_size, ways * shots, *input_shape]`,
        `support_y` `[meta_batch_size, ways * shots]` (int32),
        `query_x` `[meta_batch_size, ways * query_shots, *input_shape]` and
        `query_y` `[meta_batch_size, ways * query_shots]` (int32).

    Raises:
        ValueError: If an argument is out of range, `x`, `y` and `groups`
            have different lengths, `x` is ragged or has fewer than 2 axes,
            `y` is not a vector of integer labels (float labels beyond int64
            included), a class has fewer than `shots + query_shots`
            examples, there are fewer than `ways` classes (in any group, when
            `groups` is given), a class spans several groups,
            `rotations=True` with non-square features, `x` has NaN or Inf
            values, or `augment_per` is not `"image"` or `"class"`.
        TypeError: If `x` or `y` is not numeric or holds complex numbers,
            `groups` mixes numbers and strings, or `seed` is not an integer.

    Example:

    >>> x = np.random.rand(100, 28, 28, 1).astype("float32")
    >>> y = np.repeat(np.arange(10), 10)
    >>> tasks = from_arrays(x, y, ways=5, shots=1, query_shots=2,
    ...                     meta_batch_size=4, seed=0)
    >>> episode = next(iter(tasks))
    >>> episode["support_x"].shape, episode["query_y"].shape
    (TensorShape([4, 5, 28, 28, 1]), TensorShape([4, 10]))
    """
    ways, shots, query_shots, meta_batch_size = _check_sampling_args(
        ways, shots, query_shots, meta_batch_size
    )
    seed = _check_seed(seed)
    layers = augmentation.check(augment)
    per_class_augment = augmentation.check_per(augment_per) == "class" and bool(layers)
    x, y = _check_examples(x, y)
    num_examples = x.shape[0]
    input_shape = x.shape[1:]
    if layers and len(input_shape) not in (2, 3):
        raise ValueError(
            "`augment` requires image features of shape (H, W) or (H, W, "
            f"channels). Received: input_shape={tuple(input_shape)}"
        )
    if rotations and not (
        len(input_shape) in (2, 3) and input_shape[0] == input_shape[1]
    ):
        raise ValueError(
            "`rotations=True` requires square image features of shape "
            "(H, W) or (H, W, channels) with H == W. Received: "
            f"input_shape={tuple(input_shape)}"
        )

    class_ids, class_of_example, class_sizes = np.unique(
        y, return_inverse=True, return_counts=True
    )
    class_of_example = class_of_example.reshape(-1)
    per_class = shots + query_shots
    too_small = np.flatnonzero(class_sizes < per_class)
    if too_small.size:
        c = too_small[0]
        others = (
            f" ({too_small.size} classes are too small.)"
            if too_small.size > 1
            else ""
        )
        raise ValueError(
            f"Class {class_ids[c]} has {class_sizes[c]} examples, but "
            f"`shots + query_shots` = {per_class} examples per class are "
            f"needed.{others}"
        )

    num_classes = class_ids.size
    # With rotations, class `e` is base class `e // 4` turned `e % 4` times.
    copies = 4 if rotations else 1
    num_sampled_classes = copies * num_classes
    if ways > num_sampled_classes:
        counted = (
            f"4 x {num_classes} = {num_sampled_classes} classes with "
            "`rotations=True`"
            if rotations
            else f"{num_classes} classes"
        )
        raise ValueError(
            f"Expected `ways` to be at most the number of classes, but `y` "
            f"has {counted}. Received: ways={ways}"
        )

    if groups is None:
        group_members = [np.arange(num_sampled_classes)]
    else:
        class_group = _class_groups(
            groups, num_examples, class_ids, class_of_example, num_classes
        )
        group_members = _eligible_groups(
            np.repeat(class_group, copies), ways
        )

    index_table = _padded_table(_split_by_class(class_of_example, class_sizes))
    group_table = _padded_table(group_members)
    group_sizes = np.array([len(m) for m in group_members], "int32")
    num_groups = len(group_members)

    # tf.data runs on the host: keep the captured constants there too.
    with tf.device("/cpu:0"):
        features = tf.convert_to_tensor(x)
        index_table = tf.constant(index_table, tf.int64)
        class_sizes = tf.constant(class_sizes, tf.int32)
        group_table = tf.constant(group_table, tf.int32)
        group_sizes = tf.constant(group_sizes, tf.int32)

    def task_fn(task_seed):
        seeds = tf.unstack(tf.random.experimental.stateless_split(task_seed, 5))
        group = tf.random.stateless_uniform(
            [], seeds[0], minval=0, maxval=num_groups, dtype=tf.int32
        )
        picks = _sample_distinct(
            group_sizes[group], group_table.shape[1], ways, seeds[1]
        )
        classes = tf.gather(group_table[group], picks)
        base_classes = classes // copies
        positions = _sample_distinct(
            tf.gather(class_sizes, base_classes),
            index_table.shape[1],
            per_class,
            seeds[2],
        )
        examples = tf.gather(
            tf.gather(index_table, base_classes), positions, batch_dims=1
        )
        labels = tf.broadcast_to(
            tf.range(ways, dtype=tf.int32)[:, None], [ways, per_class]
        )
        turns = tf.broadcast_to((classes % copies)[:, None], [ways, per_class])
        class_images = None
        if per_class_augment:
            # All of a task's images at once, [ways, per_class, ...], so one
            # draw per class reaches its support and query images alike.
            class_images = tf.gather(features, examples)
            if rotations:
                class_images = tf.reshape(
                    _rotate(
                        tf.reshape(class_images, [ways * per_class, *input_shape]),
                        tf.reshape(turns, [-1]),
                    ),
                    [ways, per_class, *input_shape],
                )
            class_images = augmentation.apply_per_class(
                layers, class_images, tf.random.experimental.stateless_fold_in(task_seed, 3)
            )

        def take(start, count, shuffle_seed, augment_seed):
            # Rows come out grouped by class; shuffle so labels are mixed.
            order = tf.random.experimental.stateless_shuffle(
                tf.range(ways * count), shuffle_seed
            )

            def pick(t):
                t = t[:, start : start + count]
                return tf.gather(tf.reshape(t, [-1, *t.shape[2:]]), order)

            row_labels = pick(labels)
            if class_images is not None:
                return pick(class_images), row_labels
            rows = tf.gather(features, pick(examples))
            if rotations:
                rows = _rotate(rows, pick(turns))
            if layers:
                rows = augmentation.apply(layers, rows, augment_seed)
            return rows, row_labels

        # Seeds folded in apart from the five split above, so the episodes
        # without `augment` are the same as ever.
        support_x, support_y = take(
            0, shots, seeds[3], tf.random.experimental.stateless_fold_in(task_seed, 1)
        )
        query_x, query_y = take(
            shots, query_shots, seeds[4],
            tf.random.experimental.stateless_fold_in(task_seed, 2),
        )
        return {
            "support_x": support_x,
            "support_y": support_y,
            "query_x": query_x,
            "query_y": query_y,
        }

    return from_task_fn(task_fn, meta_batch_size=meta_batch_size, seed=seed)


def from_dataset(
    dataset,
    *,
    ways,
    shots,
    query_shots=1,
    meta_batch_size=1,
    seed=None,
    rotations=False,
    groups=None,
    augment=None,
    augment_per="image",
):
    """Builds N-way K-shot classification episodes from a dataset of examples.

    Reads the whole (finite) dataset into memory once, then behaves exactly
    like `from_arrays` on the resulting arrays: with the same data and seed,
    both return the same episodes.

    Args:
        dataset: A finite `tf.data.Dataset` of unbatched `(x, y)` pairs, `x`
            one example and `y` its integer class (a scalar).
        ways: Number of classes per task.
        shots: Number of support examples per class.
        query_shots: Number of query examples per class.
        meta_batch_size: Number of tasks per dataset element.
        seed: Integer seed for reproducible sampling, or `None` (see
            `from_arrays`).
        rotations: Whether to add rotated copies of each class (see
            `from_arrays`).
        groups: Optional array with the group id of each example, in the
            dataset's order (see `from_arrays`).
        augment: Optional image augmentation layers (see `from_arrays`).
        augment_per: `"image"` or `"class"` (see `from_arrays`).

    Returns:
        An infinite `tf.data.Dataset` of episode dicts, as returned by
        `from_arrays`.

    Raises:
        TypeError: If `dataset` is not a `tf.data.Dataset` of `(x, y)` pairs.
        ValueError: If `dataset` is infinite, empty or batched, its examples
            differ in shape, or for any reason listed in `from_arrays`.

    Example:

    >>> examples = tf.data.Dataset.from_tensor_slices(
    ...     (np.random.rand(60, 8).astype("float32"), np.arange(60) % 6))
    >>> tasks = from_dataset(examples, ways=3, shots=2, seed=0)
    >>> tasks.element_spec["support_x"].shape
    TensorShape([1, 6, 8])
    """
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            "Expected `dataset` to be a `tf.data.Dataset` of `(x, y)` pairs. "
            f"Received: dataset={dataset!r} of type {type(dataset).__name__}"
        )
    spec = dataset.element_spec
    if not (
        isinstance(spec, tuple)
        and len(spec) == 2
        and all(isinstance(s, tf.TensorSpec) for s in spec)
    ):
        raise TypeError(
            "Expected `dataset` elements to be `(x, y)` pairs of tensors. "
            f"Received: element_spec={spec}"
        )
    if spec[1].shape.rank not in (None, 0):
        raise ValueError(
            "Expected `dataset` to yield unbatched `(x, y)` pairs with a "
            "scalar label `y` (call `dataset.unbatch()` on a batched "
            f"dataset). Received: y with shape {spec[1].shape}"
        )
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            "Expected a finite `dataset`, since it is read into memory once. "
            "Received: a dataset of infinite cardinality (remove `repeat()`)."
        )
    # Check the cheap arguments before a possibly long read.
    _check_sampling_args(ways, shots, query_shots, meta_batch_size)
    _check_seed(seed)
    augmentation.check(augment)
    augmentation.check_per(augment_per)

    xs, ys = [], []
    try:
        batches = dataset.batch(_MATERIALIZE_BATCH_SIZE)
        for batch_x, batch_y in batches.as_numpy_iterator():
            xs.append(batch_x)
            ys.append(batch_y)
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(
            "Expected every example `x` of `dataset` to have the same shape. "
            f"Could not stack them: {e.message}"
        ) from e
    if not xs:
        raise ValueError("Expected a non-empty `dataset`. Received: 0 examples")
    return from_arrays(
        np.concatenate(xs),
        np.concatenate(ys),
        ways=ways,
        shots=shots,
        query_shots=query_shots,
        meta_batch_size=meta_batch_size,
        seed=seed,
        rotations=rotations,
        groups=groups,
        augment=augment,
        augment_per=augment_per,
    )


def from_task_fn(task_fn, *, meta_batch_size=1, seed=None):
    """Builds an episodic dataset from a function that samples one task.

    `task_fn(seed)` is called in the `tf.data` pipeline with a different seed
    for each task, and must build the task from TensorFlow ops, using
    stateless random ops (`tf.random.stateless_uniform`, ...) with that seed
    as its only source of randomness. The episodes are then reproducible.

    Args:
        task_fn: A callable taking a shape `[2]` int64 seed tensor and
            returning a dict with the keys `support_x` `[S, *input_shape]`,
            `support_y` `[S, ...]`, `query_x` `[Q, *input_shape]` and
            `query_y` `[Q, ...]`, all with static shapes. Labels may have any
            dtype (e.g. float32 targets for regression).
        meta_batch_size: Number of tasks per dataset element.
        seed: Integer seed from which each task's seed is derived, or `None`
            to draw one from NumPy's global generator.

    Returns:
        An infinite `tf.data.Dataset` of dicts with the same keys, each value
        with a leading `meta_batch_size` dimension.

    Raises:
        TypeError: If `task_fn` is not callable or does not return a dict, or
            `seed` is not an integer.
        ValueError: If `meta_batch_size` is not a positive integer, the dict
            has missing or unexpected keys, a shape is not fully known, the
            support or query set is empty, or the support (query) inputs and
            labels differ in length.

    Example:

    >>> def task_fn(seed):
    ...     x = tf.random.stateless_uniform([15, 1], seed)
    ...     return {"support_x": x[:10], "support_y": 2.0 * x[:10, 0],
    ...             "query_x": x[10:], "query_y": 2.0 * x[10:, 0]}
    >>> tasks = from_task_fn(task_fn, meta_batch_size=8, seed=0)
    >>> tasks.element_spec["query_x"].shape
    TensorShape([8, 5, 1])
    """
    if not callable(task_fn):
        raise TypeError(
            "Expected `task_fn` to be a callable taking a seed tensor. "
            f"Received: task_fn={task_fn!r} of type {type(task_fn).__name__}"
        )
    meta_batch_size = check_positive_int("meta_batch_size", meta_batch_size)
    base_seed = tf.constant([_check_seed(seed), 0], tf.int64)

    def make_task(index):
        # `fold_in` gives each episode its own seed, independent of the order
        # in which parallel calls run.
        task_seed = tf.random.experimental.stateless_fold_in(base_seed, index)
        return task_fn(task_seed)

    tasks = tf.data.Dataset.counter(dtype=tf.int64).map(
        make_task, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    _check_task_spec(tasks.element_spec)
    tasks = tasks.batch(meta_batch_size, drop_remainder=True)
    return tasks.prefetch(tf.data.AUTOTUNE)


def _check_task_spec(spec):
    if not isinstance(spec, dict):
        raise TypeError(
            "Expected `task_fn` to return a dict with keys "
            f"{list(EPISODE_KEYS)}. Received: a value with structure {spec}"
        )
    missing = [k for k in EPISODE_KEYS if k not in spec]
    unexpected = sorted(str(k) for k in spec if k not in EPISODE_KEYS)
    if missing or unexpected:
        raise ValueError(
            "Expected `task_fn` to return a dict with keys "
            f"{list(EPISODE_KEYS)}. Received: missing keys {missing}, "
            f"unexpected keys {unexpected}"
        )
    for key in EPISODE_KEYS:
        if not isinstance(spec[key], tf.TensorSpec):
            raise TypeError(
                f"Expected `task_fn` to return a tensor for {key!r}. "
                f"Received: {spec[key]}"
            )
        shape = spec[key].shape
        # The meta-batch is stacked with static shapes so that models can be
        # built from `element_spec`.
        if not shape.is_fully_defined() or shape.rank < 1:
            raise ValueError(
                f"Expected `task_fn` to return {key!r} with a fully known "
                "static shape of rank >= 1 (use `tf.ensure_shape` if needed)."
                f" Received: {key} with shape {shape}"
            )
    for x_key, y_key in (("support_x", "support_y"), ("query_x", "query_y")):
        # An empty query set would report a loss of 0.0, an empty support
        # set fail inside the step.
        if spec[x_key].shape[0] == 0:
            raise ValueError(
                f"Expected `task_fn` to return a non-empty {x_key!r} (at least "
                f"one example). Received: {x_key} with shape {spec[x_key].shape}"
            )
        if spec[x_key].shape[0] != spec[y_key].shape[0]:
            raise ValueError(
                f"Expected `{x_key}` and `{y_key}` to have the same number of "
                f"examples. Received: {x_key} with shape {spec[x_key].shape}, "
                f"{y_key} with shape {spec[y_key].shape}"
            )
    if spec["support_x"].shape[1:] != spec["query_x"].shape[1:]:
        raise ValueError(
            "Expected `support_x` and `query_x` to have the same input shape. "
            f"Received: support_x with shape {spec['support_x'].shape}, "
            f"query_x with shape {spec['query_x'].shape}"
        )


def _check_sampling_args(ways, shots, query_shots, meta_batch_size):
    return (
        check_positive_int("ways", ways),
        check_positive_int("shots", shots),
        check_positive_int("query_shots", query_shots),
        check_positive_int("meta_batch_size", meta_batch_size),
    )


def _check_seed(seed):
    """Returns `seed` as a signed 64-bit integer, drawing one if `None`."""
    if seed is None:
        return int(np.random.randint(np.iinfo(np.int64).max, dtype=np.int64))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(
            "Expected `seed` to be an integer or None. "
            f"Received: seed={seed!r} of type {type(seed).__name__}"
        )
    # Wrap into int64 so that any Python integer is a usable seed.
    seed = int(seed) % 2**64
    return seed - 2**64 if seed >= 2**63 else seed


def _check_examples(x, y):
    x = dense_array("x", x)
    y = dense_array("y", y)
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool):
        raise TypeError(
            "Expected `x` to hold numeric features. "
            f"Received: x.dtype={x.dtype}"
        )
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype("float32")
    # A model takes a batch of examples of rank >= 1: 1-D features would be
    # accepted here and fail inside the traced step.
    if x.ndim < 2:
        hint = " (one feature per example is `x[:, None]`)" if x.ndim == 1 else ""
        raise ValueError(
            "Expected `x` to have shape [N, *input_shape]. "
            f"Received: x.shape={x.shape}{hint}"
        )
    if y.ndim != 1:
        raise ValueError(
            f"Expected `y` to be a 1-D array of N class labels. "
            f"Received: y.shape={y.shape}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            "Expected `x` and `y` to have the same number of examples. "
            f"Received: x.shape={x.shape}, y.shape={y.shape}"
        )
    if x.shape[0] == 0:
        raise ValueError("Expected at least one example. Received: N=0")
    # A NaN or Inf feature would turn every meta-gradient it reaches into
    # NaN, long after the pipeline was built.
    check_finite_rows("x", x)
    if np.issubdtype(y.dtype, np.floating):
        bad = np.flatnonzero(~np.isfinite(y) | (np.round(y) != y))
        if bad.size:
            raise ValueError(
                "Expected integer class labels in `y`: labels must be "
                f"integers. Received: y[{bad[0]}]={y[bad[0]]}"
            )
        # Beyond int64 the cast wraps: 1e20 and 2e20 would become one class.
        bad = np.flatnonzero(np.abs(y) >= 2.0**63)
        if bad.size:
            raise ValueError(
                "Expected the class labels in `y` to fit in int64 (below "
                f"2**63 in magnitude). Received: y[{bad[0]}]={y[bad[0]]} "
                f"among {bad.size} labels out of range"
            )
        y = y.astype("int64")
    elif not np.issubdtype(y.dtype, np.integer):
        raise TypeError(
            "Expected `y` to hold integer class labels. "
            f"Received: y.dtype={y.dtype}"
        )
    return x, y


def _class_groups(groups, num_examples, class_ids, class_of_example, n):
    """Returns the group index of each class, checking there is exactly one."""
    groups = check_group_ids("groups", groups)
    if groups.ndim != 1 or groups.shape[0] != num_examples:
        raise ValueError(
            "Expected `groups` to have one group id per example, shape "
            f"({num_examples},). Received: groups.shape={groups.shape}"
        )
    group_ids, group_of_example = np.unique(groups, return_inverse=True)
    pairs = np.unique(
        np.stack([class_of_example, group_of_example.reshape(-1)], axis=1),
        axis=0,
    )
    spanning = np.flatnonzero(np.bincount(pairs[:, 0], minlength=n) > 1)
    if spanning.size:
        c = spanning[0]
        names = group_ids[pairs[pairs[:, 0] == c, 1]].tolist()
        raise ValueError(
            "Expected every class to belong to exactly one group. Received: "
            f"class {class_ids[c]} has examples in groups {names}"
        )
    class_group = np.empty(n, "int64")
    class_group[pairs[:, 0]] = pairs[:, 1]
    return class_group


def _eligible_groups(group_of_class, ways):
    """Lists the classes of each group that has at least `ways` classes."""
    members = [
        np.flatnonzero(group_of_class == g)
        for g in np.unique(group_of_class)
    ]
    eligible = [m for m in members if len(m) >= ways]
    if not eligible:
        raise ValueError(
            f"Expected at least one group with `ways` = {ways} classes, since "
            "every task takes its classes from one group. Received: the "
            f"largest group has {max(len(m) for m in members)} classes"
        )
    return eligible


def _split_by_class(class_of_example, class_sizes):
    order = np.argsort(class_of_example, kind="stable")
    return np.split(order, np.cumsum(class_sizes)[:-1])


def _padded_table(rows):
    """Stacks index lists of unequal lengths into a zero-padded matrix."""
    table = np.zeros((len(rows), max(len(r) for r in rows)), "int64")
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table


def _sample_distinct(sizes, width, k, seed):
    """Draws `k` distinct positions below each of `sizes`, in random order.

    Table rows are padded to a common `width`: positions at or past a row's
    size get noise below any real draw, so they are never in the top `k`.
    """
    noise = tf.random.stateless_uniform(sizes.shape.as_list() + [width], seed)
    valid = tf.range(width) < sizes[..., None]
    return tf.math.top_k(tf.where(valid, noise, -1.0), k=k).indices


def _rotate(images, turns):
    """Rotates each image by its own number of quarter turns (0 to 3)."""
    # `tf.image.rot90` takes one `k` per call: compute all four rotations
    # and pick one per image.
    flat = images.shape.rank == 3
    if flat:
        images = images[..., None]
    rotated = tf.stack([tf.image.rot90(images, k) for k in range(4)], axis=1)
    images = tf.gather(rotated, turns, axis=1, batch_dims=1)
    return images[..., 0] if flat else images
