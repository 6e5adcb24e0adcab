"""`_entry_checks`: an entry point's checks, given the network, loss and strategy.

No `ReptileModel`: the checks are given a plain network, a strategy stand-in
with the replica count under test, and a build callback that records what it
was asked to build.
"""

import contextlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reptile import _entry_checks
from keras_reptile import algorithms

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


class _Strategy:
    def __init__(self, replicas):
        self.num_replicas_in_sync = replicas

    def scope(self):
        return contextlib.nullcontext()


def _checks(network=None, algorithm="reptile", replicas=1, compiled=True, built=None):
    network = network or keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    built = [] if built is None else built

    def build(example_shape):
        built.append(tuple(example_shape))
        if not network.built:
            network.build((None,) + tuple(example_shape))

    return _entry_checks.EntryChecks(
        network, algorithms.get(algorithm), _Strategy(replicas), build,
        compiled=compiled, compiled_loss=SCCE if compiled else None,
        loss=SCCE if compiled else None, head=None,
    )


def _batch(tasks=2, rows=3, labels=3):
    rng = np.random.default_rng(0)
    return {
        "support_x": rng.normal(size=(tasks, rows, 2)).astype("float32"),
        "support_y": np.tile(np.arange(rows) % labels, (tasks, 1)).astype("int32"),
        "query_x": rng.normal(size=(tasks, rows, 2)).astype("float32"),
        "query_y": np.tile(np.arange(rows) % labels, (tasks, 1)).astype("int32"),
    }


def test_a_call_is_checked_before_any_work():
    _checks().call("train", _batch(), is_batch=True)
    with pytest.raises(ValueError, match=r"Received a meta-batch of 3 tasks, split as \[2, 1\]"):
        _checks(replicas=2).call("predict", _batch(tasks=3), is_batch=True)
    # Labels beyond the network's 3 outputs, found before the step runs.
    with pytest.raises(ValueError, match="support_y"):
        _checks().call("test", _batch(labels=5, rows=5), is_batch=True)
    with pytest.raises(ValueError, match="Call `compile\\(\\)` with a `loss`"):
        _checks(compiled=False).call("train", _batch(), is_batch=True)


def test_second_order_algorithms_are_refused_for_training_on_several_replicas():
    _checks(algorithm="maml", replicas=2).call("test", _batch(), is_batch=True)
    _checks(algorithm="fomaml", replicas=2).call("train", _batch(), is_batch=True)
    with pytest.raises(ValueError, match="Second-order meta-gradients"):
        _checks(algorithm="maml", replicas=2).call("train", _batch(), is_batch=True)


def test_an_unbuilt_network_is_built_for_the_examples_it_is_given():
    built = []
    network = keras.Sequential([keras.layers.Dense(3)])
    support_x, support_y, query_x, query_y = _checks(network, built=built).task(
        np.zeros((4, 2), "float32"), np.array([0, 1, 2, 0]))
    assert built == [(2,)] and network.built
    assert isinstance(support_x, tf.Tensor) and support_x.shape == (4, 2)
    assert support_y.numpy().tolist() == [0, 1, 2, 0]
    assert query_x is None and query_y is None


def test_predict_episodes_need_no_query_targets():
    batch = _batch()
    del batch["query_y"]
    episodes = _checks().prediction_episodes(batch)
    assert episodes["query_y"] is None
    assert episodes["query_x"].shape == (2, 3, 2)


def test_a_meta_update_without_a_query_set():
    x, y = np.ones((3, 2), "float32"), np.array([0, 1, 2])
    task = _checks().meta_update_task(x, y)
    # Reptile: the support set stands in for the query set.
    np.testing.assert_array_equal(task["query_x"], x)
    np.testing.assert_array_equal(task["query_y"], y)
    with pytest.raises(ValueError, match="Expected `query_x` and `query_y` for a meta-update"):
        _checks(algorithm="maml").meta_update_task(x, y)


def test_steps_default_or_checked():
    assert _entry_checks.steps(None, 7) == 7
    assert _entry_checks.steps(2, 7) == 2
    with pytest.raises(ValueError, match="Received: steps=0"):
        _entry_checks.steps(0, 7)
