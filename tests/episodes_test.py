"""Tests for `keras_reptile.episodes`.

The synthetic features encode the example they come from: every value of
example `i` lies in `[100 * i, 100 * i + 99]`, and the values within an image
are all different. So the minimum of a row gives back `i` even after a
rotation, and the row itself tells which rotation was applied.
"""

import numpy as np
import pytest
import tensorflow as tf

from keras_reptile import episodes

KEYS = ("support_x", "support_y", "query_x", "query_y")


def _data(sizes, labels=None, shape=(3, 3, 1), dtype="float32"):
    """Examples of classes `labels` (default `0..C-1`) with `sizes` examples.

    Examples of a class are interleaved with the other classes, so a bug that
    assumed contiguous classes would be caught.
    """
    labels = list(range(len(sizes))) if labels is None else labels
    y = np.concatenate([np.full(n, c) for c, n in zip(labels, sizes)])
    y = np.random.default_rng(0).permutation(y)
    n = y.shape[0]
    x = 100.0 * np.arange(n).reshape((n,) + (1,) * len(shape))
    x = x + np.arange(np.prod(shape)).reshape(shape)
    return x.astype(dtype), y


def _ids(rows):
    return (rows.reshape(rows.shape[0], -1).min(axis=1) // 100).astype(int)


def _tasks(dataset, num_batches):
    """The first tasks of `dataset`, one NumPy dict per task."""
    tasks = []
    for batch in dataset.take(num_batches).as_numpy_iterator():
        for b in range(batch["support_y"].shape[0]):
            tasks.append({k: batch[k][b] for k in KEYS})
    return tasks


def _check_task(task, x, y, ways, shots, query_shots):
    """Checks one task independently of the sampler; returns its classes."""
    support_ids = _ids(task["support_x"])
    query_ids = _ids(task["query_x"])
    np.testing.assert_array_equal(task["support_x"], x[support_ids])
    np.testing.assert_array_equal(task["query_x"], x[query_ids])
    all_ids = np.concatenate([support_ids, query_ids])
    assert len(set(all_ids.tolist())) == all_ids.size
    classes = []
    for label in range(ways):
        support_classes = y[support_ids[task["support_y"] == label]]
        query_classes = y[query_ids[task["query_y"] == label]]
        assert support_classes.size == shots
        assert query_classes.size == query_shots
        assert len(set(support_classes.tolist())) == 1
        np.testing.assert_array_equal(query_classes, support_classes[0])
        classes.append(support_classes[0])
    assert sorted(set(task["support_y"].tolist())) == list(range(ways))
    assert sorted(set(task["query_y"].tolist())) == list(range(ways))
    assert len(set(classes)) == ways
    return classes


def _blocked(labels, shots):
    """Whether labels come in runs of `shots` equal values."""
    runs = labels.reshape(-1, shots)
    return bool(np.all(runs == runs[:, :1]))


# ----------------------------------------------------------------------------
# from_arrays


@pytest.mark.parametrize(
    "shape, dtype, expected_dtype",
    [
        ((3, 3, 1), "float32", tf.float32),
        ((3, 3, 1), "uint8", tf.float32),
        ((2, 2), "float64", tf.float64),
        ((4,), "int64", tf.float32),
        ((5,), "float16", tf.float16),
    ],
)
def test_element_spec_is_static(shape, dtype, expected_dtype):
    x, y = _data([4] * 6, shape=shape, dtype="float32")
    x = (x % 200).astype(dtype)
    dataset = episodes.from_arrays(
        x, y, ways=3, shots=2, query_shots=1, meta_batch_size=5, seed=0
    )
    spec = dataset.element_spec
    assert set(spec) == set(KEYS)
    assert spec["support_x"] == tf.TensorSpec((5, 6) + shape, expected_dtype)
    assert spec["query_x"] == tf.TensorSpec((5, 3) + shape, expected_dtype)
    assert spec["support_y"] == tf.TensorSpec((5, 6), tf.int32)
    assert spec["query_y"] == tf.TensorSpec((5, 3), tf.int32)
    batch = next(iter(dataset))
    assert batch["support_x"].dtype == expected_dtype
    assert batch["support_x"].shape == (5, 6) + shape


def test_dataset_is_infinite():
    x, y = _data([2] * 3)
    dataset = episodes.from_arrays(x, y, ways=2, shots=1, seed=0)
    assert dataset.cardinality() == tf.data.INFINITE_CARDINALITY


def test_tasks_are_valid_episodes():
    labels = [-3, 0, 7, 12, 1000, 42]
    x, y = _data([8] * 6, labels=labels)
    dataset = episodes.from_arrays(
        x, y, ways=4, shots=2, query_shots=3, meta_batch_size=3, seed=1
    )
    tasks = _tasks(dataset, 20)
    assert len(tasks) == 60
    for task in tasks:
        classes = _check_task(task, x, y, ways=4, shots=2, query_shots=3)
        assert set(classes) <= set(labels)


def test_unequal_class_sizes():
    sizes = [2, 3, 7, 2, 5, 4]
    x, y = _data(sizes)
    dataset = episodes.from_arrays(
        x, y, ways=3, shots=1, query_shots=1, meta_batch_size=10, seed=2
    )
    used = set()
    for task in _tasks(dataset, 30):
        _check_task(task, x, y, ways=3, shots=1, query_shots=1)
        used.update(_ids(task["support_x"]).tolist())
        used.update(_ids(task["query_x"]).tolist())
    # Every example of every class, even the largest, is eventually drawn,
    # and padding never leaks in (checked by `_check_task`).
    assert used == set(range(sum(sizes)))


def test_classes_and_labels_are_drawn_uniformly():
    x, y = _data([3] * 6)
    dataset = episodes.from_arrays(
        x, y, ways=2, shots=1, query_shots=1, meta_batch_size=30, seed=3
    )
    counts = np.zeros(6)
    label_counts = np.zeros((6, 2))
    for task in _tasks(dataset, 10):
        classes = _check_task(task, x, y, ways=2, shots=1, query_shots=1)
        for label, c in enumerate(classes):
            counts[c] += 1
            label_counts[c, label] += 1
    # 300 tasks of 2 of 6 classes: 100 draws per class expected (std ~8).
    assert np.all((counts > 70) & (counts < 130)), counts
    # Each class gets label 0 and label 1 about equally often.
    assert np.all(np.abs(label_counts[:, 0] - label_counts[:, 1]) < 50)


def test_support_and_query_are_shuffled():
    x, y = _data([6] * 5)
    dataset = episodes.from_arrays(
        x, y, ways=3, shots=2, query_shots=2, meta_batch_size=10, seed=4
    )
    tasks = _tasks(dataset, 2)
    support_blocked = [_blocked(t["support_y"], 2) for t in tasks]
    query_blocked = [_blocked(t["query_y"], 2) for t in tasks]
    # A random order is in label blocks with probability 6 / 90.
    assert sum(support_blocked) < 8
    assert sum(query_blocked) < 8
    assert not all(np.all(np.diff(t["support_y"]) >= 0) for t in tasks)


def _assert_same_tasks(a, b):
    assert len(a) == len(b)
    for task_a, task_b in zip(a, b):
        for key in KEYS:
            np.testing.assert_array_equal(task_a[key], task_b[key])


def _differ(a, b):
    return any(
        not np.array_equal(ta[k], tb[k]) for ta, tb in zip(a, b) for k in KEYS
    )


def test_same_seed_gives_same_episodes():
    x, y = _data([5] * 8)
    kwargs = dict(ways=4, shots=2, query_shots=2, meta_batch_size=3)
    first = _tasks(episodes.from_arrays(x, y, seed=7, **kwargs), 5)
    second = _tasks(episodes.from_arrays(x, y, seed=7, **kwargs), 5)
    other = _tasks(episodes.from_arrays(x, y, seed=8, **kwargs), 5)
    _assert_same_tasks(first, second)
    assert _differ(first, other)


def test_episodes_do_not_depend_on_meta_batch_size():
    x, y = _data([5] * 8)
    kwargs = dict(ways=4, shots=2, query_shots=2, seed=5)
    one = _tasks(episodes.from_arrays(x, y, meta_batch_size=1, **kwargs), 12)
    four = _tasks(episodes.from_arrays(x, y, meta_batch_size=4, **kwargs), 3)
    _assert_same_tasks(one, four)


def test_seed_none_follows_numpy_global_seed():
    x, y = _data([5] * 8)
    kwargs = dict(ways=4, shots=2, query_shots=2, meta_batch_size=2)
    np.random.seed(11)
    first = _tasks(episodes.from_arrays(x, y, **kwargs), 3)
    np.random.seed(11)
    second = _tasks(episodes.from_arrays(x, y, **kwargs), 3)
    third = _tasks(episodes.from_arrays(x, y, **kwargs), 3)
    _assert_same_tasks(first, second)
    assert _differ(first, third)


def test_tensor_and_integral_float_inputs_match_numpy():
    x, y = _data([4] * 5, labels=[3, 1, 4, 15, 9])
    kwargs = dict(ways=3, shots=2, query_shots=1, meta_batch_size=2, seed=6)
    expected = _tasks(episodes.from_arrays(x, y, **kwargs), 3)
    from_tensors = episodes.from_arrays(
        tf.constant(x), tf.constant(y), **kwargs
    )
    from_floats = episodes.from_arrays(x, y.astype("float64"), **kwargs)
    _assert_same_tasks(_tasks(from_tensors, 3), expected)
    _assert_same_tasks(_tasks(from_floats, 3), expected)


# ----------------------------------------------------------------------------
# Rotations


def _rotation_classes(task, x, y, ways, shots, query_shots):
    """Like `_check_task`, with classes `(class, quarter_turns)`."""

    def classes_of(rows):
        out = []
        for row, i in zip(rows, _ids(rows)):
            turns = [
                k
                for k in range(4)
                if np.array_equal(row, np.rot90(x[i], k, axes=(0, 1)))
            ]
            assert len(turns) == 1
            out.append((int(y[i]), turns[0]))
        return out

    support = classes_of(task["support_x"])
    query = classes_of(task["query_x"])
    # A drawing may be in a class and, rotated, in another class of the same
    # task; as (example, rotation) pairs, the rows are all distinct.
    rows = [
        (i, turns)
        for name, classes in (("support_x", support), ("query_x", query))
        for i, (_, turns) in zip(_ids(task[name]), classes)
    ]
    assert len(set(rows)) == len(rows)
    classes = []
    for label in range(ways):
        s = {c for c, l in zip(support, task["support_y"]) if l == label}
        q = {c for c, l in zip(query, task["query_y"]) if l == label}
        assert len(s) == 1 and s == q
        assert np.sum(task["support_y"] == label) == shots
        assert np.sum(task["query_y"] == label) == query_shots
        classes.append(s.pop())
    assert len(set(classes)) == ways
    return classes


@pytest.mark.parametrize("shape", [(3, 3, 1), (3, 3), (3, 3, 2)])
def test_rotations_give_four_classes_per_class(shape):
    x, y = _data([4, 4], labels=[5, 9], shape=shape)
    dataset = episodes.from_arrays(
        x,
        y,
        ways=8,
        shots=1,
        query_shots=1,
        meta_batch_size=4,
        seed=0,
        rotations=True,
    )
    assert dataset.element_spec["support_x"].shape == (4, 8) + shape
    for task in _tasks(dataset, 3):
        classes = _rotation_classes(task, x, y, ways=8, shots=1, query_shots=1)
        assert set(classes) == {(c, k) for c in (5, 9) for k in range(4)}


def test_rotations_mix_rotated_and_original_classes():
    x, y = _data([4] * 5)
    dataset = episodes.from_arrays(
        x, y, ways=3, shots=2, query_shots=1, meta_batch_size=20, seed=1,
        rotations=True,
    )
    seen = set()
    for task in _tasks(dataset, 5):
        seen.update(
            _rotation_classes(task, x, y, ways=3, shots=2, query_shots=1)
        )
    assert seen == {(c, k) for c in range(5) for k in range(4)}


# ----------------------------------------------------------------------------
# Groups


def _grouped_data():
    # Group "a" has 4 classes, "b" has 3, "c" has 1.
    class_groups = {0: "a", 1: "a", 2: "a", 3: "a", 4: "b", 5: "b", 6: "b",
                    7: "c"}
    x, y = _data([4] * 8)
    groups = np.array([class_groups[c] for c in y])
    return x, y, groups, class_groups


def test_groups_keep_each_task_within_one_group():
    x, y, groups, class_groups = _grouped_data()
    dataset = episodes.from_arrays(
        x, y, ways=3, shots=1, query_shots=1, meta_batch_size=20, seed=0,
        groups=groups,
    )
    used = []
    for task in _tasks(dataset, 5):
        classes = _check_task(task, x, y, ways=3, shots=1, query_shots=1)
        task_groups = {class_groups[c] for c in classes}
        assert len(task_groups) == 1
        used.append(task_groups.pop())
    # Group "c" has too few classes for 3 ways; the other two are drawn
    # about equally often (50 expected each out of 100).
    assert set(used) == {"a", "b"}
    assert 30 < used.count("a") < 70


def test_groups_with_rotations_count_rotated_classes():
    x, y, groups, class_groups = _grouped_data()
    dataset = episodes.from_arrays(
        x, y, ways=4, shots=1, query_shots=1, meta_batch_size=20, seed=0,
        groups=groups, rotations=True,
    )
    used = set()
    for task in _tasks(dataset, 5):
        classes = _rotation_classes(task, x, y, ways=4, shots=1, query_shots=1)
        task_groups = {class_groups[c] for c, _ in classes}
        assert len(task_groups) == 1
        used.update(task_groups)
        if task_groups == {"c"}:
            assert sorted(classes) == [(7, k) for k in range(4)]
    # With rotations, the one class of "c" makes 4 classes: enough.
    assert used == {"a", "b", "c"}


# ----------------------------------------------------------------------------
# from_dataset


def test_from_dataset_matches_from_arrays():
    x, y = _data([4] * 6, labels=[2, 4, 6, 8, 10, 12])
    groups = (y > 6).astype("int32")
    kwargs = dict(ways=3, shots=2, query_shots=1, meta_batch_size=2, seed=9,
                  rotations=True, groups=groups)
    expected = _tasks(episodes.from_arrays(x, y, **kwargs), 4)
    examples = tf.data.Dataset.from_tensor_slices((x, y))
    _assert_same_tasks(_tasks(episodes.from_dataset(examples, **kwargs), 4),
                       expected)


def test_from_dataset_reads_more_than_one_batch():
    x, y = _data([300] * 5, shape=(2,))
    kwargs = dict(ways=2, shots=1, query_shots=1, meta_batch_size=2, seed=0)
    examples = tf.data.Dataset.from_tensor_slices((x, y)).batch(7).unbatch()
    _assert_same_tasks(
        _tasks(episodes.from_dataset(examples, **kwargs), 3),
        _tasks(episodes.from_arrays(x, y, **kwargs), 3),
    )


# ----------------------------------------------------------------------------
# from_task_fn


def _task_fn(seed):
    x = tf.random.stateless_uniform([7, 2], seed)
    return {
        "support_x": x[:4],
        "support_y": tf.reduce_sum(x[:4], axis=1),
        "query_x": x[4:],
        "query_y": tf.reduce_sum(x[4:], axis=1),
    }


def test_from_task_fn_shapes_and_seeds():
    seeds = []

    def task_fn(seed):
        seeds.append(seed)
        return _task_fn(seed)

    dataset = episodes.from_task_fn(task_fn, meta_batch_size=3, seed=0)
    assert seeds[0].shape == (2,) and seeds[0].dtype == tf.int64
    spec = dataset.element_spec
    assert spec["support_x"] == tf.TensorSpec((3, 4, 2), tf.float32)
    assert spec["support_y"] == tf.TensorSpec((3, 4), tf.float32)
    assert spec["query_x"] == tf.TensorSpec((3, 3, 2), tf.float32)
    assert spec["query_y"] == tf.TensorSpec((3, 3), tf.float32)
    tasks = _tasks(dataset, 4)
    for task in tasks:
        np.testing.assert_allclose(
            task["support_y"], task["support_x"].sum(axis=1), rtol=1e-6
        )
    # Every task gets its own seed.
    firsts = {tuple(t["support_x"][0]) for t in tasks}
    assert len(firsts) == 12


def test_from_task_fn_is_deterministic():
    def tasks(seed):
        dataset = episodes.from_task_fn(_task_fn, meta_batch_size=2, seed=seed)
        return _tasks(dataset, 3)

    first, second, other = tasks(1), tasks(1), tasks(2)
    _assert_same_tasks(first, second)
    assert _differ(first, other)


def _without(key):
    def task_fn(seed):
        task = _task_fn(seed)
        del task[key]
        return task

    return task_fn


def _with_extra(seed):
    return dict(_task_fn(seed), extra=tf.zeros([1]))


def _unknown_shape(seed):
    task = _task_fn(seed)
    keep = tf.random.stateless_uniform([4], seed) > 0.5
    task["support_x"] = tf.boolean_mask(task["support_x"], keep)
    return task


def _mismatched_lengths(seed):
    task = _task_fn(seed)
    task["query_y"] = task["query_y"][:2]
    return task


def _mismatched_inputs(seed):
    task = _task_fn(seed)
    task["query_x"] = task["query_x"][:, :1]
    return task


def _empty(role):
    """A task function whose `{role}_x` and `{role}_y` hold no examples."""

    def task_fn(seed):
        task = _task_fn(seed)
        task[f"{role}_x"] = tf.zeros([0, 2])
        task[f"{role}_y"] = tf.zeros([0])
        return task

    return task_fn


@pytest.mark.parametrize(
    "task_fn, error, match",
    [
        ("not callable", TypeError, "Expected `task_fn` to be a callable"),
        (_empty("query"), ValueError,
         r"Expected `task_fn` to return a non-empty 'query_x' \(at least one "
         r"example\). Received: query_x with shape \(0, 2\)"),
        (_empty("support"), ValueError,
         r"Expected `task_fn` to return a non-empty 'support_x' \(at least one "
         r"example\). Received: support_x with shape \(0, 2\)"),
        (lambda seed: tf.zeros([3]), TypeError, "to return a dict"),
        (_without("query_y"), ValueError, r"missing keys \['query_y'\]"),
        (_with_extra, ValueError, r"unexpected keys \['extra'\]"),
        (_unknown_shape, ValueError, "fully known static shape"),
        (_mismatched_lengths, ValueError, "`query_x` and `query_y`"),
        (_mismatched_inputs, ValueError, "same input shape"),
    ],
)
def test_from_task_fn_errors(task_fn, error, match):
    with pytest.raises(error, match=match):
        episodes.from_task_fn(task_fn, seed=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(meta_batch_size=0), ValueError,
         "Expected `meta_batch_size` to be a positive integer"),
        (dict(seed="0"), TypeError, "Expected `seed` to be an integer"),
    ],
)
def test_from_task_fn_argument_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        episodes.from_task_fn(_task_fn, **kwargs)


# ----------------------------------------------------------------------------
# Bad input to from_arrays and from_dataset.

X, Y = _data([5, 5, 3], labels=[10, 20, 7])
GOOD = dict(ways=2, shots=1, query_shots=1)


@pytest.mark.parametrize(
    "x, y, kwargs, error, match",
    [
        (X, Y, dict(GOOD, ways=0), ValueError,
         r"Expected `ways` to be a positive integer. Received: ways=0"),
        (X, Y, dict(GOOD, ways=True), ValueError, "Received: ways=True"),
        (X, Y, dict(GOOD, ways=2.0), ValueError, "Received: ways=2.0"),
        (X, Y, dict(GOOD, shots=-1), ValueError,
         "`shots` to be a positive integer"),
        (X, Y, dict(GOOD, query_shots=0), ValueError,
         "`query_shots` to be a positive integer"),
        (X, Y, dict(GOOD, meta_batch_size=0), ValueError,
         "`meta_batch_size` to be a positive integer"),
        (X, Y, dict(GOOD, seed=1.5), TypeError,
         "Expected `seed` to be an integer"),
        (X[:-1], Y, GOOD, ValueError, "same number of examples"),
        (X, Y.reshape(-1, 1), GOOD, ValueError, "1-D array"),
        (X, np.where(Y == 7, 1.5, Y), GOOD, ValueError,
         "labels must be integers"),
        (X, np.where(Y == 7, np.nan, Y), GOOD, ValueError,
         "labels must be integers"),
        (X, Y.astype(str), GOOD, TypeError, "integer class labels"),
        (X.astype(str), Y, GOOD, TypeError, "numeric features"),
        (X[:0], Y[:0], GOOD, ValueError, "at least one example"),
        (X, Y, dict(GOOD, shots=2, query_shots=2), ValueError,
         r"Class 7 has 3 examples, but `shots \+ query_shots` = 4 examples "
         "per class are needed"),
        (X, Y, dict(GOOD, ways=4), ValueError,
         r"`y` has 3 classes. Received: ways=4"),
        (X, Y, dict(GOOD, ways=13, rotations=True), ValueError,
         r"4 x 3 = 12 classes .*Received: ways=13"),
        (X, Y, dict(GOOD, groups=np.zeros(5)), ValueError,
         r"one group id per example, shape \(13,\)"),
        (X, Y, dict(GOOD, groups=(np.arange(13) % 2)), ValueError,
         r"class \d+ has examples in groups \[0, 1\]"),
        (X, Y, dict(GOOD, ways=2, groups=Y), ValueError,
         "largest group has 1 classes"),
        (X[:, :2, :, 0], Y, dict(GOOD, rotations=True), ValueError,
         r"square image features .* input_shape=\(2, 3\)"),
        (X.reshape(13, 9), Y, dict(GOOD, rotations=True), ValueError,
         r"square image features .* input_shape=\(9,\)"),
        # Issue 27: inputs that were accepted and went wrong later.
        (np.zeros((30, 2), "float32"), np.repeat([1e20, 2e20, 5.0], 10),
         dict(GOOD), ValueError,
         r"Expected the class labels in `y` to fit in int64 \(below 2\*\*63 "
         r"in magnitude\). Received: y\[0\]=1e\+20 among 20 labels"),
        (X[:, 0, 0, 0], Y, GOOD, ValueError,
         r"Expected `x` to have shape \[N, \*input_shape\]. Received: "
         r"x.shape=\(13,\) \(one feature per example is `x\[:, None\]`\)"),
        ([[1.0], [2.0, 3.0]], [0, 1], GOOD, ValueError,
         "Expected `x` to be a dense array with rows of equal length. "
         "Received: a ragged nested sequence"),
        (tf.ragged.constant([[1.0], [2.0, 3.0]]), [0, 1], GOOD, ValueError,
         "Expected `x` to be a dense array with rows of equal length. "
         r"Received: a `tf.RaggedTensor` with shape \(2, None\)"),
        (X + 1j, Y, GOOD, TypeError,
         "Expected `x` to hold real numbers: the imaginary part would be "
         "dropped. Received: x.dtype=complex64"),
        (X, Y + 0j, GOOD, TypeError,
         "Expected `y` to hold real numbers: the imaginary part would be "
         "dropped. Received: y.dtype=complex128"),
        (X, Y, dict(GOOD, groups=[0] * 6 + ["a"] * 7), TypeError,
         r"Expected `groups` to hold ids of one kind: all numbers or all "
         r"strings. Received: ids of types \['int', 'str'\]"),
        (X, Y, dict(GOOD, groups=np.array([0] * 6 + ["a"] * 7, object)),
         TypeError,
         r"Expected `groups` to hold ids of one kind: all numbers or all "
         r"strings. Received: ids of types \['int', 'str'\]"),
    ],
)
def test_from_arrays_errors(x, y, kwargs, error, match):
    with pytest.raises(error, match=match):
        episodes.from_arrays(x, y, **kwargs)


def test_string_group_ids_and_whole_float_labels_near_int64_are_accepted():
    # Row i holds i, so the rows of a task tell which examples it drew.
    x = np.arange(6, dtype="float32")[:, None]
    y = [0.0, 0.0, 2.0**62, 2.0**62, 1.0, 1.0]
    groups = ["a", "a", "a", "a", "b", "b"]
    tasks = episodes.from_arrays(x, y, ways=2, shots=1, query_shots=1,
                                 groups=groups, seed=0)
    task = next(iter(tasks))
    # Only group "a" has 2 classes: 0 (rows 0, 1) and 2**62 (rows 2, 3),
    # kept apart, each with its own label in support and query.
    rows = np.concatenate([task["support_x"][0, :, 0], task["query_x"][0, :, 0]])
    labels = np.concatenate([task["support_y"][0], task["query_y"][0]])
    assert sorted(rows.tolist()) == [0.0, 1.0, 2.0, 3.0]
    by_class = {label: sorted(rows[labels == label] // 2) for label in (0, 1)}
    assert sorted(map(tuple, by_class.values())) == [(0.0, 0.0), (1.0, 1.0)]


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_from_arrays_rejects_non_finite_features(dtype):
    x = X.astype(dtype)
    x[3, 0, 1, 0] = np.nan
    x[7, 2, 2, 0] = np.inf
    x[8] = -np.inf
    with pytest.raises(
        ValueError,
        match=r"Expected `x` to contain only finite values. Received: "
        r"non-finite values \(NaN or Inf\) in 3 examples, at rows \[3, 7, 8\]$",
    ):
        episodes.from_arrays(x, Y, **GOOD)
    # Through `from_dataset` too, which reads into arrays.
    with pytest.raises(ValueError, match=r"at rows \[3, 7, 8\]"):
        episodes.from_dataset(_examples(x=x), **GOOD)


def test_from_arrays_lists_the_first_non_finite_rows():
    x = np.zeros((30, 2), "float32")
    x[::2, 1] = np.nan  # Rows 0, 2, ..., 28: 15 of them.
    y = np.arange(30) % 3
    with pytest.raises(
        ValueError,
        match=r"in 15 examples, at rows "
        r"\[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, \.\.\.\]$",
    ):
        episodes.from_arrays(x, y, **GOOD)
    # Large finite values, and integer features (cast to float32), are fine.
    x[::2, 1] = np.finfo("float32").max
    episodes.from_arrays(x, y, **GOOD)
    episodes.from_arrays(np.full((30, 2), 255, "uint8"), y, **GOOD)


def _examples(x=X, y=Y):
    return tf.data.Dataset.from_tensor_slices((x, y))


@pytest.mark.parametrize(
    "dataset, kwargs, error, match",
    [
        ((X, Y), GOOD, TypeError, "to be a `tf.data.Dataset`"),
        (_examples().repeat(), GOOD, ValueError, "infinite cardinality"),
        (tf.data.Dataset.from_tensor_slices({"x": X, "y": Y}), GOOD,
         TypeError, r"elements to be `\(x, y\)` pairs"),
        (tf.data.Dataset.from_tensor_slices(X), GOOD, TypeError,
         r"elements to be `\(x, y\)` pairs"),
        (tf.data.Dataset.from_tensor_slices((X, Y, Y)), GOOD, TypeError,
         r"elements to be `\(x, y\)` pairs"),
        (_examples().batch(4), GOOD, ValueError, r"dataset.unbatch\(\)"),
        (_examples().take(0), GOOD, ValueError, "non-empty `dataset`"),
        (_examples(), dict(GOOD, ways=0), ValueError,
         "`ways` to be a positive integer"),
        (_examples(y=np.where(Y == 7, 0.5, Y)), GOOD, ValueError,
         "labels must be integers"),
        (_examples(), dict(GOOD, ways=5), ValueError,
         "`y` has 3 classes"),
    ],
)
def test_from_dataset_errors(dataset, kwargs, error, match):
    with pytest.raises(error, match=match):
        episodes.from_dataset(dataset, **kwargs)


def test_from_dataset_rejects_examples_of_different_shapes():
    def gen():
        yield np.zeros(2, "float32"), 0
        yield np.zeros(3, "float32"), 1

    dataset = tf.data.Dataset.from_generator(
        gen,
        output_signature=(
            tf.TensorSpec([None], tf.float32),
            tf.TensorSpec([], tf.int32),
        ),
    )
    with pytest.raises(ValueError, match="the same shape"):
        episodes.from_dataset(dataset, **GOOD)
