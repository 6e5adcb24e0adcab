"""The task engine on its own, without a `ReptileModel`, on hand-computed values.

A one-weight linear model `y = w x` (no bias) with the mean squared error
and plain SGD: from w = 0 on the support set x = [1, 2], y = [2, 4] with
learning rate 0.1, the gradient of mean((w x - y)^2) is
mean(2 (w x - y) x) = (2 (0 - 2) 1 + 2 (0 - 4) 2) / 2 = -10, so w = 1.0 after
one step; then (2 (1 - 2) 1 + 2 (2 - 4) 2) / 2 = -5, so w = 1.5 after two.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reptile import _inner_state
from keras_reptile import _task_adapter
from keras_reptile import algorithms
from keras_reptile import inner_loop


def _engine(steps=2, **kwargs):
    net = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    rule = inner_loop.InnerOptimizer(keras.optimizers.SGD(0.1), net.trainable_variables)
    engine = _task_adapter.TaskAdapter(
        net, rule, keras.losses.MeanSquaredError(),
        _task_adapter.Settings(steps=steps, batch_size=2), **kwargs,
    )
    theta = [tf.convert_to_tensor(v) for v in net.trainable_variables]
    return engine, theta


SUPPORT_X = tf.constant([[1.0], [2.0]])
SUPPORT_Y = tf.constant([[2.0], [4.0]])


@pytest.mark.parametrize("steps, expected", [(1, 1.0), (2, 1.5)])
def test_one_task_adapts_as_computed_by_hand(steps, expected):
    engine, theta = _engine(steps)
    adaptation = engine.adapt(theta, [], SUPPORT_X, SUPPORT_Y)
    np.testing.assert_allclose(adaptation.initial[0], [[0.0]])
    np.testing.assert_allclose(adaptation.weights[0], [[expected]], rtol=1e-6)
    assert adaptation.state == [] and adaptation.optimizer_state is None


def test_the_query_pass_gives_outputs_and_loss_at_the_adapted_weights():
    engine, theta = _engine()
    adaptation = engine.adapt(theta, [], SUPPORT_X, SUPPORT_Y)
    loss, outputs = engine.query(
        adaptation.weights, adaptation.state, tf.constant([[3.0]]), tf.constant([[6.0]])
    )
    # w = 1.5: 1.5 * 3 = 4.5, and (4.5 - 6)^2 = 2.25.
    np.testing.assert_allclose(outputs, [[4.5]], rtol=1e-6)
    np.testing.assert_allclose(loss, 2.25, rtol=1e-6)
    assert engine.query(adaptation.weights, [], tf.constant([[3.0]]))[0] is None


def _episodes():
    # Task 0 as above (w -> 1.5); task 1 with targets halved (w -> 0.75).
    return {
        "support_x": tf.stack([SUPPORT_X, SUPPORT_X]),
        "support_y": tf.stack([SUPPORT_Y, SUPPORT_Y / 2]),
        "query_x": tf.constant([[[3.0]], [[3.0]]]),
        "query_y": tf.constant([[[6.0]], [[3.0]]]),
    }


@pytest.mark.parametrize("parallel", [True, False])
def test_a_meta_batch_gives_one_result_per_task_and_reptiles_gradient(parallel):
    engine, theta = _engine(parallel=parallel)
    results = engine.run(_episodes(), theta, [], algorithms.Reptile())
    weights = [float(r.adaptation.weights[0][0, 0]) for r in results]
    np.testing.assert_allclose(weights, [1.5, 0.75], rtol=1e-6)
    np.testing.assert_allclose(
        [float(r.query_outputs[0, 0]) for r in results], [4.5, 2.25], rtol=1e-6
    )
    # θ − mean φ = 0 − (1.5 + 0.75) / 2.
    gradient = algorithms.Reptile().outer_gradient(theta, results)
    np.testing.assert_allclose(gradient[0], [[-1.125]], rtol=1e-6)


def test_batched_evaluation_finishes_tasks_as_the_per_task_path_does():
    engine, theta = _engine()
    per_task = engine.run(_episodes(), theta, [])
    batched = engine.run(_episodes(), theta, [], batched=True)
    for a, b in zip(per_task, batched):
        np.testing.assert_allclose(a.adaptation.weights[0], b.adaptation.weights[0], rtol=1e-6)
        np.testing.assert_allclose(a.query_outputs, b.query_outputs, rtol=1e-6)
        assert b.gradient is None and b.adaptation.optimizer_state is None


def test_a_carried_start_continues_the_optimizer_and_returns_its_state():
    # SGD with momentum 0.5 starting from a carried velocity m = -1 at
    # iteration 4: Keras's SGD keeps m ← 0.5 m − lr g and w ← w + m, so the
    # first step is m = 0.5 (−1) − 0.1 (−10) = 0.5 and w = 0.5.
    net = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")]
    )
    rule = inner_loop.InnerOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.5), net.trainable_variables
    )
    start = _inner_state.InnerOptimizerState({"m": [tf.constant([[-1.0]])]}, 4)
    engine = _task_adapter.TaskAdapter(
        net, rule, keras.losses.MeanSquaredError(),
        _task_adapter.Settings(steps=1, batch_size=2), inner_start=start,
    )
    theta = [tf.convert_to_tensor(v) for v in net.trainable_variables]
    adaptation = engine.adapt(theta, [], SUPPORT_X, SUPPORT_Y)
    np.testing.assert_allclose(adaptation.weights[0], [[0.5]], rtol=1e-6)
    np.testing.assert_allclose(adaptation.optimizer_state["m"][0], [[0.5]], rtol=1e-6)


def test_state_after_a_meta_step_is_the_task_mean_of_floats_and_the_last_integers():
    def result(float_value, seed):
        adaptation = algorithms.Adaptation(
            [], [], [tf.constant([float_value]), tf.constant([seed], tf.int64)]
        )
        return algorithms.TaskResult(adaptation, None)

    state = _task_adapter.state_after([result(1.0, 7), result(3.0, 9)])
    np.testing.assert_allclose(state[0], [2.0])
    np.testing.assert_array_equal(state[1], [9])
