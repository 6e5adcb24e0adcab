"""`batched_tasks`: all tasks' inner loops as one computation.

The reference for every comparison is `inner_loop.adapt` run once per task
(itself checked against hand-derived numbers and the real Keras optimizers
in `inner_loop_test.py`), and one hand-derived case.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reptile import algorithms
from keras_reptile import batched_tasks
from keras_reptile import inner_loop
from keras_reptile import models

MSE = keras.losses.MeanSquaredError()
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _rule(net, optimizer=None):
    optimizer = optimizer or keras.optimizers.Adam(1e-2, beta_1=0.0)
    return inner_loop.InnerOptimizer(optimizer, net.trainable_variables)


def _values(variables):
    return [v.value for v in variables]


def _per_task_start(net, tasks, seed):
    """Different start weights per task: a mix-up between tasks shows."""
    rng = np.random.default_rng(seed)
    trainable = [
        tf.stack([v.value + rng.normal(0, 0.05, v.shape).astype("float32")
                  for _ in range(tasks)])
        for v in net.trainable_variables
    ]
    non_trainable = [tf.stack([v.value] * tasks) for v in net.non_trainable_variables]
    return trainable, non_trainable


def _both(net, x, y, loss, steps, batch_size, optimizer=None, seed=0):
    """(per-task reference, batched) adapted weights and state, stacked."""
    tasks = x.shape[0]
    rule = _rule(net, optimizer)
    trainable, non_trainable = _per_task_start(net, tasks, seed)
    reference = [
        inner_loop.adapt(
            net, [w[t] for w in trainable], [s[t] for s in non_trainable], x[t], y[t],
            loss_fn=loss, optimizer=rule, steps=steps, batch_size=batch_size,
        )
        for t in range(tasks)
    ]
    batched = tf.function(
        lambda: batched_tasks.adapt(
            net, trainable, non_trainable, x, y, loss_fn=loss, optimizer=rule,
            steps=steps, batch_size=batch_size,
        )
    )()
    expected = [
        [tf.stack([r[part][i] for r in reference]) for i in range(len(reference[0][part]))]
        for part in (0, 1)
    ]
    return expected, batched


def _assert_close(expected, received, atol):
    assert len(expected) == len(received)
    for e, r in zip(expected, received):
        np.testing.assert_allclose(r.numpy(), e.numpy(), atol=atol, rtol=0)


def test_two_dense_tasks_take_their_own_sgd_step():
    net = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    net.layers[0].set_weights([np.array([[1.0], [2.0]]), np.zeros(1)])
    trainable = [tf.stack([v.value] * 2) for v in net.trainable_variables]
    x = tf.constant([[[1.0, 0.0]], [[0.0, 1.0]]])  # [tasks, rows, features]
    y = tf.constant([[[3.0]], [[0.0]]])
    params, _, _ = batched_tasks.adapt(
        net, trainable, [], x, y, loss_fn=MSE,
        optimizer=_rule(net, keras.optimizers.SGD(0.1)), steps=1, batch_size=1,
    )
    # Task 0: prediction 1·1 + 2·0 = 1, loss (1 - 3)², gradient 2·(1 - 3)·x
    # = [-4, 0] for the kernel and -4 for the bias; w ← w - 0.1·g:
    # kernel [1.4, 2.0], bias 0.4. Task 1: prediction 2, gradient
    # 2·(2 - 0)·[0, 1] = [0, 4] and 4: kernel [1.0, 1.6], bias -0.4.
    np.testing.assert_allclose(params[0].numpy(), [[[1.4], [2.0]], [[1.0], [1.6]]], atol=1e-6)
    np.testing.assert_allclose(params[1].numpy(), [[0.4], [-0.4]], atol=1e-6)


@pytest.mark.parametrize("steps", [3, 12])  # unrolled, and a tf.while_loop
def test_conv4_with_batch_norm_matches_the_per_task_loop(steps):
    keras.utils.set_random_seed(1)
    net = models.conv4((12, 12, 1), num_classes=3, filters=4, num_blocks=2)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((3, 6, 12, 12, 1)), tf.float32)
    y = tf.constant(np.tile([0, 1, 2, 0, 1, 2], (3, 1)))
    (weights, state), (b_weights, b_state, _) = _both(net, x, y, SCCE, steps, 4)
    _assert_close(weights, b_weights, atol=2e-4)
    # The BatchNormalization moving statistics, updated at every step.
    _assert_close(state, b_state, atol=2e-5)


def test_every_supported_layer_matches_the_per_task_loop():
    keras.utils.set_random_seed(2)
    net = keras.Sequential([
        keras.Input((8, 8, 2)),
        keras.layers.Conv2D(3, 3, padding="valid", activation="tanh"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Conv2D(4, 2, strides=1, padding="same", dilation_rate=2),
        keras.layers.BatchNormalization(center=False),
        keras.layers.LeakyReLU(0.1),
        keras.layers.AveragePooling2D(1),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(5, activation="relu"),
        keras.layers.BatchNormalization(momentum=0.5, scale=False),  # per-task rows
        keras.layers.Reshape((5, 1)),
        keras.layers.Flatten(),
        keras.layers.Activation("elu"),
        keras.layers.Dense(2, activation="softmax"),
    ])
    loss = keras.losses.SparseCategoricalCrossentropy()
    rng = np.random.default_rng(1)
    x = tf.constant(rng.random((4, 5, 8, 8, 2)), tf.float32)
    y = tf.constant(rng.integers(0, 2, (4, 5)))
    assert batched_tasks.unsupported_reason(net, _rule(net)) is None
    (weights, state), (b_weights, b_state, _) = _both(
        net, x, y, loss, 4, 3, keras.optimizers.SGD(0.1, momentum=0.9))
    _assert_close(weights, b_weights, atol=1e-5)
    _assert_close(state, b_state, atol=1e-5)


def test_frozen_layers_keep_their_weights_and_statistics():
    keras.utils.set_random_seed(3)
    net = models.conv4((8, 8, 1), num_classes=2, filters=3, num_blocks=2)
    net.get_layer("conv1").trainable = False
    net.get_layer("bn2").trainable = False  # inference mode, moving statistics
    rng = np.random.default_rng(2)
    x = tf.constant(rng.random((2, 4, 8, 8, 1)), tf.float32)
    y = tf.constant([[0, 1, 0, 1]] * 2)
    (weights, state), (b_weights, b_state, _) = _both(net, x, y, SCCE, 3, 4)
    _assert_close(weights, b_weights, atol=1e-5)
    _assert_close(state, b_state, atol=1e-6)
    # The frozen kernel and statistics come back unchanged for every task.
    kernel = net.non_trainable_variables.index(net.get_layer("conv1").kernel)
    np.testing.assert_array_equal(
        b_state[kernel].numpy(), np.stack([net.get_layer("conv1").kernel.numpy()] * 2))


def test_a_carried_optimizer_state_and_iteration_are_continued():
    keras.utils.set_random_seed(4)
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    rule = _rule(net)
    rng = np.random.default_rng(3)
    x = tf.constant(rng.random((2, 4, 3)), tf.float32)
    y = tf.constant(rng.random((2, 4, 2)), tf.float32)
    start = _values(net.trainable_variables)
    carried = rule.init(start)
    carried = {k: [v + 0.01 for v in values] for k, values in carried.items()}
    reference = [
        inner_loop.adapt(net, start, [], x[t], y[t], loss_fn=MSE, optimizer=rule,
                         steps=2, batch_size=2, optimizer_state=carried,
                         first_iteration=5, return_optimizer_state=True)
        for t in range(2)
    ]
    stacked = {k: [tf.stack([v, v]) for v in values] for k, values in carried.items()}
    params, _, state = batched_tasks.adapt(
        net, [tf.stack([w, w]) for w in start], [], x, y, loss_fn=MSE, optimizer=rule,
        steps=2, batch_size=2, optimizer_state=stacked, first_iteration=5,
    )
    for i in range(len(start)):
        np.testing.assert_allclose(
            params[i].numpy(), np.stack([r[0][i] for r in reference]), atol=1e-6)
        np.testing.assert_allclose(
            state["v"][i].numpy(), np.stack([r[2]["v"][i] for r in reference]), atol=1e-7)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(2)

    def call(self, x):
        return self.dense(x)


def _residual():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(4)(inputs)
    return keras.Model(inputs, keras.layers.Dense(2)(keras.layers.Add()([inputs, hidden])))


@pytest.mark.parametrize("make_net, optimizer, reason", [
    (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5, name="drop"),
                               keras.layers.Dense(2)]),
     None, "layer 'drop' (Dropout) is not one of the layers batched"),
    (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(
        2, kernel_regularizer="l2")]), None, "has a kernel regularizer"),
    (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(
        2, kernel_constraint="max_norm")]), None, "has a kernel constraint"),
    (lambda: keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(
        2, 1, groups=2)]), None, "is grouped or channels-first"),
    (lambda: keras.Sequential([keras.Input((4, 4, 2)), keras.layers.Conv2D(
        2, 1, activation="softmax")]), None, "has activation 'softmax'"),
    (_residual, None, "is not fed by the previous layer alone"),
    (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]),
     keras.optimizers.SGD(0.1, global_clipnorm=1.0), "clips gradients by norm"),
])
def test_what_cannot_be_batched_says_why(make_net, optimizer, reason):
    net = make_net()
    assert reason in batched_tasks.unsupported_reason(net, _rule(net, optimizer))


def test_a_subclassed_model_is_not_batched():
    net = _Subclassed()
    net(np.zeros((1, 3), "float32"))
    assert "subclassed _Subclassed" in batched_tasks.unsupported_reason(net, _rule(net))


def test_convolutions_need_grouped_convolutions_on_this_machine(monkeypatch):
    net = models.conv4((8, 8, 1), num_classes=2, filters=2, num_blocks=1)
    # The machines this runs on (x86 Linux TensorFlow, oneDNN on by default).
    assert batched_tasks.grouped_convolutions_work()
    assert batched_tasks.unsupported_reason(net, _rule(net)) is None
    monkeypatch.setattr(batched_tasks, "grouped_convolutions_work", lambda: False)
    assert "cannot run grouped convolutions" in batched_tasks.unsupported_reason(
        net, _rule(net))
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert batched_tasks.unsupported_reason(dense, _rule(dense)) is None


def test_freezing_a_layer_after_planning_plans_again():
    net = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2), keras.layers.Dense(2)])
    assert batched_tasks.unsupported_reason(net, _rule(net)) is None
    net.layers[0].trainable = False
    rng = np.random.default_rng(5)
    x = tf.constant(rng.random((2, 3, 3)), tf.float32)
    y = tf.constant(rng.random((2, 3, 2)), tf.float32)
    (weights, state), (b_weights, b_state, _) = _both(net, x, y, MSE, 2, 3)
    _assert_close(weights, b_weights, atol=1e-6)
    _assert_close(state, b_state, atol=0)


def test_adapt_refuses_a_model_it_cannot_batch():
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dropout(0.5), keras.layers.Dense(2)])
    x, y = tf.zeros((2, 3, 4)), tf.zeros((2, 3, 2))
    with pytest.raises(ValueError, match=(
            r"Expected a model whose tasks can be adapted in one batched computation. "
            r"Received model '\w+', but layer 'dropout\w*' \(Dropout\) is not one")):
        batched_tasks.adapt(net, [tf.stack([v.value] * 2) for v in net.trainable_variables],
                            [], x, y, loss_fn=MSE, optimizer=_rule(net), steps=1,
                            batch_size=3)


def _meta_sgd_rule(net):
    rule = _rule(net, keras.optimizers.SGD(0.1))
    # The rates live outside `net`, as they do in the meta-learner.
    rates = algorithms.MetaSGD().build(net, rule, keras.layers.Layer().add_weight)
    return algorithms.MetaSGD().inner_rule(net, rule, rates)


def test_meta_learned_rates_are_not_batched():
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert "meta-learned per weight entry" in batched_tasks.unsupported_reason(
        net, _meta_sgd_rule(net))


def test_whether_evaluation_batches_follows_the_setting():
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    regularised = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(2, kernel_regularizer="l2")])
    decide = batched_tasks.evaluates_batched
    # "auto": where it applies, and only without XLA.
    assert decide("auto", False, dense, _rule(dense)) is True
    assert decide("auto", True, dense, _rule(dense)) is False
    assert decide("auto", False, regularised, _rule(regularised)) is False
    assert decide("auto", False, dense, _meta_sgd_rule(dense)) is False
    # False: never; True: always, also under XLA, and refused where it does not apply.
    assert decide(False, False, dense, _rule(dense)) is False
    assert decide(True, True, dense, _rule(dense)) is True
    with pytest.raises(ValueError, match=(
            r"with `batched_tasks=True`, but layer 'dense\w*' \(Dense\) has a kernel "
            "regularizer")):
        decide(True, False, regularised, _rule(regularised))
    with pytest.raises(ValueError, match="learning rates are meta-learned per weight entry"):
        decide(True, False, dense, _meta_sgd_rule(dense))
