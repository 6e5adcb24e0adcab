"""Property-based tests of the episode sampler (`keras_reptile.episodes`).

Hypothesis draws the sampling problem (number of classes, unequal class
sizes, arbitrary class ids, optional groups and rotations, ways, shots,
query shots, meta-batch size, seed) and every drawn episode is checked
against the raw arrays only: each image is mapped back to the row it was
taken from, and the turn it was rotated by, using NumPy alone. Nothing is
compared with what the sampler itself reports.

The features make that mapping exact. Row `i` of `x` is a square image
whose values are `i * P + 0 .. i * P + P - 1` (`P` pixels), all different:
the minimum of any rotation of it gives back `i`, and comparing with
`np.rot90(x[i], k)` gives the number of quarter turns `k`.

Every example builds a `tf.data` pipeline, so the problems are small and
the number of examples modest; `deadline=None` because the first pipeline
of a process also pays for TensorFlow's start-up.
"""

import hypothesis
import hypothesis.strategies as st
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reptile import episodes

KEYS = ("support_x", "support_y", "query_x", "query_y")

# Each example builds one or more `tf.data` pipelines (about 0.3-1 s each
# on a busy 2-core machine), so the default profile draws few examples and
# many tasks per pipeline; the `slow` variants draw more problems.
# `database=None`: no `.hypothesis/` directory in the working tree; a
# failure prints the example and a `@reproduce_failure` blob instead.
FAST = dict(deadline=None, database=None, print_blob=True,
            suppress_health_check=[hypothesis.HealthCheck.too_slow])
VALIDITY_EXAMPLES, SLOW_VALIDITY_EXAMPLES = 16, 120
DETERMINISM_EXAMPLES, SLOW_DETERMINISM_EXAMPLES = 5, 40
TASKS_PER_PROBLEM = 12

# Episodes compared when two seeds must give different ones. Every problem
# has at least two possible episodes (a class has at least `shots +
# query_shots` >= 2 examples to split into support and query), so two
# different seeds agree on all of them with probability at most 2**-48.
DIFFERENT_SEED_EPISODES = 48


@st.composite
def problems(draw, rotations=None, groups=None):
    """A labelled data set and valid `from_arrays` arguments for it."""
    rotations = draw(st.booleans()) if rotations is None else rotations
    grouped = draw(st.booleans()) if groups is None else groups
    shots = draw(st.integers(1, 3))
    query_shots = draw(st.integers(1, 3))
    num_classes = draw(st.integers(1, 7))
    # Unequal class sizes, all large enough for one task.
    sizes = draw(
        st.lists(
            st.integers(shots + query_shots, shots + query_shots + 3),
            min_size=num_classes,
            max_size=num_classes,
        )
    )
    # Arbitrary, non-contiguous class ids, possibly negative.
    class_ids = draw(
        st.lists(
            st.integers(-1000, 1000),
            min_size=num_classes,
            max_size=num_classes,
            unique=True,
        )
    )
    copies = 4 if rotations else 1
    if grouped:
        num_groups = draw(st.integers(1, num_classes))
        group_of_class = draw(
            st.lists(
                st.integers(0, num_groups - 1),
                min_size=num_classes,
                max_size=num_classes,
            )
        )
        group_names = draw(
            st.sampled_from([
                np.arange(num_groups) * 7 - 3,  # Integer ids.
                np.array([f"alphabet-{g}" for g in range(num_groups)]),
            ])
        )
        largest = max(np.bincount(group_of_class))
    else:
        group_of_class = None
        largest = num_classes
    ways = draw(st.integers(1, min(5, copies * largest)))
    meta_batch_size = draw(st.integers(1, 3))
    seed = draw(st.integers(-(2**63), 2**63 - 1))
    side = draw(st.sampled_from([2, 3]))
    channels = draw(st.sampled_from([None, 1, 2])) if rotations else (
        draw(st.sampled_from([None, 1]))
    )
    y_dtype = draw(st.sampled_from(["int64", "int32", "float32"]))
    x_dtype = draw(st.sampled_from(["float32", "float64"]))

    y = np.concatenate(
        [np.full(n, c) for c, n in zip(class_ids, sizes)]
    )
    # Shuffled, so that the examples of a class are not contiguous.
    order = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).permutation(
        y.size
    )
    y = y[order]
    num_examples = y.size
    pixels = side * side * (channels or 1)
    shape = (side, side) if channels is None else (side, side, channels)
    x = (
        np.arange(num_examples * pixels).reshape((num_examples,) + shape)
    ).astype(x_dtype)
    groups_array = None
    if grouped:
        class_index = {c: i for i, c in enumerate(class_ids)}
        groups_array = group_names[
            [group_of_class[class_index[c]] for c in y]
        ]
    return dict(
        x=x,
        y=y.astype(y_dtype),
        groups=groups_array,
        rotations=rotations,
        ways=ways,
        shots=shots,
        query_shots=query_shots,
        meta_batch_size=meta_batch_size,
        seed=seed,
        pixels=pixels,
    )


def _build(problem, **overrides):
    kwargs = {
        key: problem[key]
        for key in (
            "ways", "shots", "query_shots", "meta_batch_size", "seed",
            "rotations", "groups",
        )
    }
    kwargs.update(overrides)
    return episodes.from_arrays(problem["x"], problem["y"], **kwargs)


def _tasks(dataset, num_tasks):
    """The first `num_tasks` tasks of `dataset`, one NumPy dict per task."""
    tasks = []
    for batch in dataset.as_numpy_iterator():
        for b in range(batch["support_y"].shape[0]):
            tasks.append({key: batch[key][b] for key in KEYS})
        if len(tasks) >= num_tasks:
            return tasks[:num_tasks]
    raise AssertionError("the episodic dataset ended")


def _decode(images, problem):
    """Maps each image back to `(source row, quarter turns)`, from `x` only."""
    x = problem["x"]
    decoded = []
    for image in images:
        row = int(image.min()) // problem["pixels"]
        assert 0 <= row < x.shape[0], "an image that is not from `x`"
        turns = [
            k for k in range(4 if problem["rotations"] else 1)
            if np.array_equal(image, np.rot90(x[row], k, axes=(0, 1)))
        ]
        # The images are asymmetric: at most one rotation matches.
        assert len(turns) == 1, (
            f"image from row {row} is not x[{row}]"
            + (" rotated by a multiple of 90 degrees" if problem["rotations"] else "")
        )
        decoded.append((row, turns[0]))
    return decoded


def _check_task(task, problem):
    """Checks one task against the raw arrays; returns its (class, turns)."""
    ways, shots, query_shots = (
        problem["ways"], problem["shots"], problem["query_shots"]
    )
    y = problem["y"]
    side_shape = problem["x"].shape[1:]
    assert task["support_x"].shape == (ways * shots,) + side_shape
    assert task["query_x"].shape == (ways * query_shots,) + side_shape
    assert task["support_x"].dtype == problem["x"].dtype
    assert task["support_y"].dtype == np.int32
    assert task["query_y"].dtype == np.int32

    support = _decode(task["support_x"], problem)
    query = _decode(task["query_x"], problem)
    # No example twice in a task, within or across support and query. (With
    # rotations, the same row may come back under another turn: that is
    # another class's example.)
    assert len(set(support + query)) == len(support) + len(query)

    # Labels are exactly 0..ways-1, `shots` (`query_shots`) of each.
    np.testing.assert_array_equal(
        np.bincount(task["support_y"], minlength=ways), np.full(ways, shots)
    )
    np.testing.assert_array_equal(
        np.bincount(task["query_y"], minlength=ways), np.full(ways, query_shots)
    )
    assert task["support_y"].max() == ways - 1
    assert task["query_y"].max() == ways - 1

    # Each label is one class (an original class id and a rotation), the
    # same in the support and the query set; different labels, different
    # classes.
    label_class = {}
    for (row, turns), label in zip(
        support + query,
        np.concatenate([task["support_y"], task["query_y"]]),
    ):
        this_class = (y[row].item(), turns)
        assert label_class.setdefault(int(label), this_class) == this_class, (
            f"label {label} holds classes {label_class[int(label)]} and "
            f"{this_class}"
        )
    classes = [label_class[label] for label in range(ways)]
    assert len(set(classes)) == ways, f"classes repeat in a task: {classes}"

    if problem["groups"] is not None:
        # The group of a rotated class is its original's.
        task_groups = {
            problem["groups"][row].item() for row, _ in support + query
        }
        assert len(task_groups) == 1, (
            f"a task draws classes from several groups: {sorted(task_groups)}"
        )
    return classes


def _assert_same_tasks(a, b):
    assert len(a) == len(b)
    for task_a, task_b in zip(a, b):
        for key in KEYS:
            np.testing.assert_array_equal(task_a[key], task_b[key])


def _same(a, b):
    return all(
        np.array_equal(task_a[key], task_b[key])
        for task_a, task_b in zip(a, b)
        for key in KEYS
    )


# ----------------------------------------------------------------------------
# Every task is a valid N-way K-shot task of the raw data


def _check_problem(problem):
    copies = 4 if problem["rotations"] else 1
    eligible = None
    if problem["groups"] is not None:
        # Groups with at least `ways` classes (rotations count as classes of
        # the original's group), computed from the raw arrays.
        classes_per_group = {}
        for label, group in zip(problem["y"].tolist(), problem["groups"].tolist()):
            classes_per_group.setdefault(group, set()).add(label)
        eligible = {
            g for g, members in classes_per_group.items()
            if copies * len(members) >= problem["ways"]
        }
    num_tasks = max(TASKS_PER_PROBLEM, 2 * problem["meta_batch_size"])
    for task in _tasks(_build(problem), num_tasks):
        classes = _check_task(task, problem)
        assert all(0 <= turns < copies for _, turns in classes)
        if eligible is not None:
            (row, _), = _decode(task["support_x"][:1], problem)
            assert problem["groups"][row].item() in eligible


@hypothesis.settings(max_examples=VALIDITY_EXAMPLES, **FAST)
@hypothesis.given(problem=problems())
def test_every_task_is_a_valid_few_shot_task_of_the_arrays(problem):
    _check_problem(problem)


@pytest.mark.slow
@hypothesis.settings(max_examples=SLOW_VALIDITY_EXAMPLES, **FAST)
@hypothesis.given(problem=problems())
def test_every_task_is_a_valid_few_shot_task_of_the_arrays_many_problems(problem):
    _check_problem(problem)


# ----------------------------------------------------------------------------
# Determinism per seed


def _check_determinism(problem, wraps, other_meta_batch_size, other_seed,
                       global_seed):
    num_tasks = TASKS_PER_PROBLEM
    first = _tasks(_build(problem), DIFFERENT_SEED_EPISODES)
    # The same sequence of tasks from a pipeline built again, with the seed
    # as another Python integer of the same value modulo 2**64 (seeds wrap
    # into int64) and another meta-batch size.
    again = _tasks(
        _build(
            problem,
            seed=problem["seed"] + wraps * 2**64,
            meta_batch_size=other_meta_batch_size,
        ),
        num_tasks,
    )
    _assert_same_tasks(first[:num_tasks], again)
    # From a dataset of the same examples, in the same order: the same too.
    from_dataset = episodes.from_dataset(
        tf.data.Dataset.from_tensor_slices((problem["x"], problem["y"])),
        ways=problem["ways"],
        shots=problem["shots"],
        query_shots=problem["query_shots"],
        meta_batch_size=problem["meta_batch_size"],
        seed=problem["seed"],
        rotations=problem["rotations"],
        groups=problem["groups"],
    )
    _assert_same_tasks(first[:num_tasks], _tasks(from_dataset, num_tasks))
    # Another seed: other tasks.
    assert not _same(
        first, _tasks(_build(problem, seed=other_seed), DIFFERENT_SEED_EPISODES)
    )
    # `seed=None` draws the seed from NumPy's global generator when the
    # pipeline is built: `keras.utils.set_random_seed` fixes it.
    keras.utils.set_random_seed(global_seed)
    unseeded = _tasks(_build(problem, seed=None), num_tasks)
    keras.utils.set_random_seed(global_seed)
    _assert_same_tasks(unseeded, _tasks(_build(problem, seed=None), num_tasks))


def _other_seed(problem):
    return st.integers(-(2**63), 2**63 - 1).filter(
        lambda s: (s - problem["seed"]) % 2**64 != 0
    )


@hypothesis.settings(max_examples=DETERMINISM_EXAMPLES, **FAST)
@hypothesis.given(
    problem=problems(), wraps=st.sampled_from([0, 1, -1]),
    other_meta_batch_size=st.integers(1, 4), data=st.data(),
    global_seed=st.integers(0, 2**31 - 1),
)
def test_episodes_are_a_function_of_the_seed(
    problem, wraps, other_meta_batch_size, data, global_seed
):
    other_seed = data.draw(_other_seed(problem), label="other_seed")
    _check_determinism(
        problem, wraps, other_meta_batch_size, other_seed, global_seed
    )


@pytest.mark.slow
@hypothesis.settings(max_examples=SLOW_DETERMINISM_EXAMPLES, **FAST)
@hypothesis.given(
    problem=problems(), wraps=st.sampled_from([0, 1, -1]),
    other_meta_batch_size=st.integers(1, 4), data=st.data(),
    global_seed=st.integers(0, 2**31 - 1),
)
def test_episodes_are_a_function_of_the_seed_many_problems(
    problem, wraps, other_meta_batch_size, data, global_seed
):
    other_seed = data.draw(_other_seed(problem), label="other_seed")
    _check_determinism(
        problem, wraps, other_meta_batch_size, other_seed, global_seed
    )


# ----------------------------------------------------------------------------
# The problem generator itself


def test_problems_cover_the_options():
    # The properties above are only as strong as the problems drawn: check
    # that the generator reaches every option (not vacuous), deterministically.
    seen = set()

    @hypothesis.settings(max_examples=200, deadline=None, database=None,
                         derandomize=True)
    @hypothesis.given(problem=problems())
    def collect(problem):
        seen.add(("rotations", problem["rotations"]))
        seen.add(("groups", problem["groups"] is not None))
        seen.add(("ways>1", problem["ways"] > 1))
        seen.add(("ways>classes", problem["ways"] > len(set(problem["y"].tolist()))))
        seen.add(("unequal sizes", len(set(np.unique(problem["y"], return_counts=True)[1].tolist())) > 1))
        seen.add(("negative class id", bool((problem["y"] < 0).any())))
        seen.add(("float labels", problem["y"].dtype.kind == "f"))
        seen.add(("meta_batch>1", problem["meta_batch_size"] > 1))
        if problem["groups"] is not None:
            seen.add(("several groups", len(set(problem["groups"].tolist())) > 1))
            seen.add(("string groups", problem["groups"].dtype.kind == "U"))

    collect()
    expected = {
        ("rotations", True), ("rotations", False), ("groups", True),
        ("groups", False), ("ways>1", True), ("ways>classes", True),
        ("unequal sizes", True), ("negative class id", True),
        ("float labels", True), ("meta_batch>1", True),
        ("several groups", True), ("string groups", True),
    }
    assert expected <= seen, sorted(expected - seen)


def test_task_checks_detect_wrong_tasks():
    # The checks are only as strong as `_check_task`: a repeated example, a
    # rotated image where rotations are off, a label holding two classes
    # and an image from outside `x` must each fail them.
    x = np.arange(12 * 4, dtype="float32").reshape(12, 2, 2)
    y = np.repeat([5, -2, 9], 4)
    problem = dict(
        x=x, y=y, groups=None, rotations=False, ways=2, shots=2,
        query_shots=2, meta_batch_size=1, seed=3, pixels=4,
    )
    task = _tasks(_build(problem), 1)[0]
    _check_task(task, problem)

    def broken(key, value):
        wrong = dict(task)
        wrong[key] = value
        with pytest.raises(AssertionError):
            _check_task(wrong, problem)

    broken("query_x", task["support_x"].copy())  # Support and query overlap.
    broken("support_x", np.rot90(task["support_x"], 1, axes=(1, 2)))
    swapped = task["support_y"].copy()
    first = np.flatnonzero(swapped == 0)[0]
    other = np.flatnonzero(swapped == 1)[0]
    swapped[[first, other]] = swapped[[other, first]]
    # Label 0 now holds one example of label 1's class, and vice versa.
    broken("support_y", swapped)
    broken("support_x", task["support_x"] + 1000.0)  # Not an image of `x`.
