"""ANIL: hand-derived meta-steps, central finite differences, its head and errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reptile import ReptileModel
from keras_reptile import algorithms

MODES = {
    "eager": dict(run_eagerly=True),
    "graph": dict(run_eagerly=False, jit_compile=False),
    "xla": dict(run_eagerly=False, jit_compile=True),
}


def _two_scalars(u, v):
    """y_hat = v (u x): body u, head v (the last layer), no biases."""
    net = keras.Sequential([
        keras.Input((1,)),
        keras.layers.Dense(1, use_bias=False, name="body"),
        keras.layers.Dense(1, use_bias=False, name="head"),
    ])
    net.set_weights([np.array([[u]], "float32"), np.array([[v]], "float32")])
    return net


def _reference_scalar_step(u, v, episode, first_order, a=0.1, lr=0.5):
    """One ANIL meta-step on y_hat = v u x, derivatives carried by hand.

    Loss (v u x - y)^2 per row; an inner step on (x, y) adapts v only:
        v' = v - 2 a (v u x - y) u x,
        dv'/dv = 1 - 2 a u^2 x^2,   dv'/du = -2 a (2 v u x^2 - y x).
    Query (x, y): L = (v_K u x - y)^2, dL/dv_K = 2 r u x, and directly
    dL/du = 2 r v_K x, r = v_K u x - y. Second order: dL/dv = dL/dv_K dv_K/dv,
    dL/du = dL/du + dL/dv_K dv_K/du; first order: dv_K/dv = 1, dv_K/du = 0.
    """
    grads = []
    for sx, sy, qx, qy in zip(*(episode[k] for k in
                                ("support_x", "support_y", "query_x", "query_y"))):
        vk, dv, du = v, 1.0, 0.0
        for x, y in zip(sx[:, 0], sy):
            step_dv = 1 - 2 * a * u * u * x * x
            step_du = -2 * a * (2 * vk * u * x * x - y * x)
            du = step_dv * du + step_du
            dv = step_dv * dv
            vk = vk - 2 * a * (vk * u * x - y) * u * x
        x, y = qx[0, 0], qy[0]
        r = vk * u * x - y
        if first_order:
            dv, du = 1.0, 0.0
        grads.append((2 * r * vk * x + 2 * r * u * x * du, 2 * r * u * x * dv))
    gu, gv = np.mean(grads, axis=0)
    return u - lr * gu, v - lr * gv


# The hand episode (tests/conftest.py), u = v = 1, inner SGD 0.1, two steps
# of one row, outer SGD(0.5). With u = 1 the head's adaptation is the
# scalar model's of algorithms_test: task A v = 1 -> 1.4 -> 1.08, dv_2/dv =
# 0.8 * 0.2 = 0.16; task B v = 1 -> 0.8 -> 0.84, dv_2/dv = 0.8 * 0.8 = 0.64.
# dv_2/du: A, steps (1, 3) then (2, 2): dv_1/du = -0.2 (2 - 3) = 0.2,
#   dv_2/du = 0.2 * 0.2 - 0.2 (2 * 1.4 * 4 - 4) = 0.04 - 1.44 = -1.4;
#   B, (1, 0) then (1, 1): dv_1/du = -0.4, dv_2/du = 0.8 * -0.4 - 0.2 (1.6 - 1)
#   = -0.44.
# Query (1, 1): r = 0.08 (A), -0.16 (B); dL/dv_2 = 2r = 0.16, -0.32;
#   direct dL/du = 2 r v_2 = 0.1728, -0.2688.
# ANIL: g_v = mean(0.16 * 0.16, -0.32 * 0.64) = -0.0896;
#   g_u = mean(0.1728 + 0.16 * -1.4, -0.2688 + -0.32 * -0.44)
#       = mean(-0.0512, -0.128) = -0.0896; u = v = 1 + 0.5 * 0.0896 = 1.0448.
# First-order ANIL: g_v = mean(0.16, -0.32) = -0.08 -> v = 1.04;
#   g_u = mean(0.1728, -0.2688) = -0.048 -> u = 1.024.
# (MAML adapts u too and moves both to 0.615: algorithms_test's MAML.)
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(
    "algorithm, first_step",
    [("anil", (1.0448, 1.0448)), (algorithms.ANIL(first_order=True), (1.024, 1.04))],
)
def test_two_meta_steps_match_the_hand_derivation(algorithm, first_step, mode, hand_episode):
    model = ReptileModel(
        _two_scalars(1.0, 1.0), inner_optimizer=keras.optimizers.SGD(0.1),
        inner_steps=2, inner_batch_size=1, algorithm=algorithm,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", **MODES[mode])
    first_order = model.algorithm.first_order
    logs = model.train_on_batch(hand_episode, return_dict=True)
    u, v = (float(w[0, 0]) for w in model.model.get_weights())
    np.testing.assert_allclose((u, v), first_step, rtol=1e-6)
    np.testing.assert_allclose(
        (u, v), _reference_scalar_step(1.0, 1.0, hand_episode, first_order), rtol=1e-6)
    # Query loss of the adapted heads: (0.08^2 + 0.16^2) / 2.
    np.testing.assert_allclose(logs["loss"], 0.016, rtol=1e-5)
    model.train_on_batch(hand_episode)
    expected = _reference_scalar_step(*first_step, hand_episode, first_order)
    np.testing.assert_allclose(
        [float(w[0, 0]) for w in model.model.get_weights()], expected, rtol=1e-5)


def _tanh_net(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((3,), dtype="float64"),
        keras.layers.Dense(4, activation="tanh", dtype="float64"),
        keras.layers.Dense(1, dtype="float64"),
    ])


def _meta_loss(theta, tasks):
    """Plain eager loop: 3 inner SGD(0.3) steps of 2 rows on the head
    (weights 2 and 3) only, then the mean query MSE over the tasks."""
    losses = []
    for support_x, support_y, query_x, query_y in tasks:
        w = [tf.constant(t) for t in theta]
        head = w[2:]
        hidden = tf.tanh(tf.matmul(support_x, w[0]) + w[1])
        for step in range(3):
            rows = [(step * 2 + j) % len(support_x) for j in range(2)]
            with tf.GradientTape() as tape:
                tape.watch(head)
                out = tf.matmul(tf.gather(hidden, rows), head[0]) + head[1]
                loss = tf.reduce_mean((support_y[rows][:, None] - out) ** 2)
            head = [h - 0.3 * g for h, g in zip(head, tape.gradient(loss, head))]
        out = tf.matmul(tf.tanh(tf.matmul(query_x, w[0]) + w[1]), head[0]) + head[1]
        losses.append(float(tf.reduce_mean((query_y[:, None] - out) ** 2)))
    return np.mean(losses)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_meta_steps_follow_central_finite_differences(mode, central_differences):
    # ANIL's outer gradient is the gradient of the mean query loss after the
    # head's adaptation (the body's entries included); outer SGD(1) makes
    # each meta-step theta -> theta - gradient.
    net = _tanh_net(1)
    rng = np.random.default_rng(0)
    episode = {
        "support_x": rng.normal(size=(2, 4, 3)), "support_y": rng.normal(size=(2, 4)),
        "query_x": rng.normal(size=(2, 3, 3)), "query_y": rng.normal(size=(2, 3)),
    }
    tasks = list(zip(*(episode[k] for k in ("support_x", "support_y", "query_x", "query_y"))))
    model = ReptileModel(
        net, inner_optimizer=keras.optimizers.SGD(0.3), inner_steps=3,
        inner_batch_size=2, algorithm="anil",
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras.losses.MeanSquaredError(dtype="float64"), **MODES[mode])
    theta = net.get_weights()
    for _ in range(2):
        grads = central_differences(lambda w: _meta_loss(w, tasks), theta)
        expected = [t - g for t, g in zip(theta, grads)]
        model.train_on_batch(episode)
        theta = net.get_weights()
        for after, want in zip(theta, expected):
            np.testing.assert_allclose(after, want, rtol=1e-5, atol=1e-8)
    # The body's gradient is not zero: it is learned through the head's loop.
    assert np.abs(expected[0] - _tanh_net(1).get_weights()[0]).max() > 1e-3


def test_named_head_layers_choose_what_the_inner_loop_adapts(hand_episode):
    # Naming every layer makes ANIL MAML; naming the body alone adapts u:
    # by the symmetry of v u x in u and v, from u = v = 1 that is the hand
    # derivation above with u and v swapped.
    def step(algorithm):
        model = ReptileModel(
            _two_scalars(1.0, 1.0), inner_optimizer=keras.optimizers.SGD(0.1),
            inner_steps=2, inner_batch_size=1, algorithm=algorithm)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        model.train_on_batch(hand_episode)
        return [float(w[0, 0]) for w in model.model.get_weights()]

    np.testing.assert_allclose(
        step(algorithms.ANIL(head_layers=["body", "head"])), step("maml"), rtol=1e-6)
    np.testing.assert_allclose(
        step(algorithms.ANIL(first_order=True, head_layers="body")), (1.04, 1.024), rtol=1e-6)
    assert algorithms.ANIL(head_layers=("head",)).get_config() == {
        "first_order": False, "head_layers": ["head"]}


def test_evaluation_adapts_the_head_only(hand_episode):
    # adapt() runs the inner loop of evaluation: the body keeps theta's u,
    # the head follows the hand derivation's task A (v = 1 -> 1.4 -> 1.08).
    model = ReptileModel(
        _two_scalars(1.0, 1.0), inner_optimizer=keras.optimizers.SGD(0.1),
        eval_inner_steps=2, eval_inner_batch_size=1, algorithm="anil")
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    adapted = model.adapt(hand_episode["support_x"][0], hand_episode["support_y"][0])
    u, v = (float(w[0, 0]) for w in adapted.get_weights())
    np.testing.assert_allclose((u, v), (1.0, 1.08), rtol=1e-6)


def test_bad_head_layers_raise_at_construction():
    with pytest.raises(TypeError, match=r"Expected `head_layers` to be None or a non-empty "
                       r"list of layer names\. Received: head_layers=3"):
        algorithms.ANIL(head_layers=3)
    with pytest.raises(ValueError, match=r"Expected `head_layers` to name layers of the "
                       r"wrapped model 'sequential.*', among \['body', 'head'\]\. Received: "
                       r"head_layers=\['neck'\], unknown \['neck'\]"):
        ReptileModel(_two_scalars(1.0, 1.0), algorithm=algorithms.ANIL(head_layers=["neck"]))
    net = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1, name="dense_out"),
                            keras.layers.Flatten(name="flat")])
    with pytest.raises(ValueError, match=r"Expected the ANIL head to have trainable weights "
                       r"for the inner loop to adapt\. Received: head layers \['flat'\]"):
        ReptileModel(net, algorithm=algorithms.ANIL(head_layers=["flat"]))
