"""The inner optimizer's state object, on hand-computed values."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reptile import _inner_state
from keras_reptile import inner_loop


def test_fresh_state_starts_a_new_optimizer_at_iteration_zero():
    assert _inner_state.FRESH.is_fresh
    assert _inner_state.FRESH.slots is None
    assert _inner_state.FRESH.iteration == 0
    assert not _inner_state.InnerOptimizerState({"m": []}, 3).is_fresh


def test_after_a_meta_step_the_slots_are_the_task_mean_and_the_count_advances():
    start = _inner_state.InnerOptimizerState(
        {"m": [tf.constant([0.0, 0.0])], "v": [tf.constant([1.0, 1.0])]},
        tf.constant(7, tf.int64),
    )
    ends = [
        {"m": [tf.constant([1.0, 2.0])], "v": [tf.constant([2.0, 4.0])]},
        {"m": [tf.constant([3.0, 6.0])], "v": [tf.constant([4.0, 0.0])]},
    ]
    after = _inner_state.after_meta_step(start, ends, steps=5)
    # (1 + 3) / 2 = 2, (2 + 6) / 2 = 4; (2 + 4) / 2 = 3, (4 + 0) / 2 = 2.
    np.testing.assert_array_equal(after.slots["m"][0], [2.0, 4.0])
    np.testing.assert_array_equal(after.slots["v"][0], [3.0, 2.0])
    assert int(after.iteration) == 12
    assert sorted(after.slots) == ["m", "v"]


class _Owner(keras.layers.Layer):
    """A layer that owns the carried state's variables, as `ReptileModel` does."""


def _net():
    net = keras.Sequential(
        [keras.Input((2,)), keras.layers.Dense(1, name="d")], name="net"
    )
    net.get_layer("d").set_weights(
        [np.array([[1.0], [2.0]], "float32"), np.array([0.5], "float32")]
    )
    return net


def test_carried_state_is_made_from_a_fresh_optimizer_and_read_back():
    net = _net()
    rule = inner_loop.InnerOptimizer(keras.optimizers.Adam(0.1), net.trainable_variables)
    owner = _Owner()
    carried = _inner_state.CarriedInnerState(owner.add_weight, rule)
    # Adam: m and v per trainable variable, then the iteration count.
    assert [v.name for v in owner.weights] == [
        "inner_m_net_d_kernel", "inner_m_net_d_bias",
        "inner_v_net_d_kernel", "inner_v_net_d_bias",
        "inner_iterations",
    ]
    state = carried.read(rule)
    assert int(state.iteration) == 0
    for key in ("m", "v"):
        np.testing.assert_array_equal(state.slots[key][0], np.zeros((2, 1)))
        np.testing.assert_array_equal(state.slots[key][1], np.zeros((1,)))


def test_carried_state_stores_an_update_and_reads_it_back():
    net = _net()
    rule = inner_loop.InnerOptimizer(keras.optimizers.Adam(0.1), net.trainable_variables)
    carried = _inner_state.CarriedInnerState(_Owner().add_weight, rule)
    update = _inner_state.InnerOptimizerState(
        {
            "m": [tf.constant([[1.0], [2.0]]), tf.constant([3.0])],
            "v": [tf.constant([[4.0], [5.0]]), tf.constant([6.0])],
        },
        tf.constant(3, tf.int64),
    )
    carried.assign(update)
    state = carried.read(rule)
    assert int(state.iteration) == 3
    np.testing.assert_array_equal(state.slots["m"][0], [[1.0], [2.0]])
    np.testing.assert_array_equal(state.slots["v"][1], [6.0])


def test_carried_state_refuses_another_optimizer_type():
    net = _net()
    adam = inner_loop.InnerOptimizer(keras.optimizers.Adam(0.1), net.trainable_variables)
    carried = _inner_state.CarriedInnerState(_Owner().add_weight, adam)
    # A new learning rate keeps the state valid; another slot layout does not.
    carried.read(inner_loop.InnerOptimizer(
        keras.optimizers.Adam(0.5), net.trainable_variables
    ))
    sgd = inner_loop.InnerOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9), net.trainable_variables
    )
    with pytest.raises(ValueError, match="carried inner-optimizer state was made for"):
        carried.read(sgd)
