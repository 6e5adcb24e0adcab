"""Meta-SGD: hand-derived meta-steps of θ and α, central finite differences, errors."""

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


def _rates(model):
    """Meta-SGD's α variables, in the order of the network's weights."""
    return [v for v in model.trainable_variables if "meta_sgd_rate" in v.path]


def _reference_scalar_step(w, alpha, episode, first_order, lr=0.1):
    """One Meta-SGD meta-step on y_hat = w x, derivatives carried by hand.

    An inner step on (x, y): g = 2 (phi x - y) x, phi' = phi - alpha g, so
    dphi'/dphi = 1 - 2 alpha x^2 and dphi'/dalpha = -g at fixed phi:
        dphi/dw <- (1 - 2 alpha x^2) dphi/dw,
        dphi/dalpha <- (1 - 2 alpha x^2) dphi/dalpha - g.
    First order (g a constant): dphi/dw = 1, dphi/dalpha <- dphi/dalpha - g.
    Query (x, y): dL/dphi = 2 (phi x - y) x.
    """
    grads = []
    for sx, sy, qx, qy in zip(*(episode[k] for k in
                                ("support_x", "support_y", "query_x", "query_y"))):
        phi, dw, da = w, 1.0, 0.0
        for x, y in zip(sx[:, 0], sy):
            g = 2 * (phi * x - y) * x
            factor = 1.0 if first_order else 1 - 2 * alpha * x * x
            dw, da = factor * dw, factor * da - g
            phi = phi - alpha * g
        dl = 2 * (phi * qx[0, 0] - qy[0]) * qx[0, 0]
        grads.append((dl * dw, dl * da))
    gw, ga = np.mean(grads, axis=0)
    return w - lr * gw, alpha - lr * ga


# y_hat = w x, w = 1, alpha = 0.1 (the inner SGD's rate), task A of the hand
# episode (tests/conftest.py): support (1, 3) then (2, 2), query (1, 1);
# outer SGD(0.1).
# Step (1, 3): g = 2 (1 - 3) = -4, phi = 1.4; dphi/dw = 0.8, dphi/dalpha = 4.
# Step (2, 2): g = 2 (2.8 - 2) 2 = 3.2, phi = 1.08, factor 1 - 0.8 = 0.2;
#   dphi/dw = 0.16, dphi/dalpha = 0.2 * 4 - 3.2 = -2.4.
# Query: dL/dphi = 2 * 0.08 = 0.16; g_w = 0.0256, g_alpha = -0.384:
#   w = 1 - 0.00256 = 0.99744, alpha = 0.1 + 0.0384 = 0.1384.
# First order: dphi/dw = 1, dphi/dalpha = 4 - 3.2 = 0.8; g_w = 0.16,
#   g_alpha = 0.128: w = 0.984, alpha = 0.1 - 0.0128 = 0.0872.
# The query loss reported is that of phi = 1.08: 0.08^2 = 0.0064.
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(
    "algorithm, first_step",
    [("metasgd", (0.99744, 0.1384)), (algorithms.MetaSGD(first_order=True), (0.984, 0.0872))],
)
def test_two_meta_steps_of_w_and_alpha_match_the_hand_derivation(
        algorithm, first_step, mode, scalar_model, hand_episode):
    episode = {k: v[:1] for k, v in hand_episode.items()}
    model = ReptileModel(
        scalar_model(1.0), inner_optimizer=keras.optimizers.SGD(0.1),
        inner_steps=2, inner_batch_size=1, algorithm=algorithm,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", **MODES[mode])
    (rate,) = _rates(model)
    np.testing.assert_allclose(rate.numpy(), [[0.1]], rtol=1e-7)
    first_order = model.algorithm.first_order
    logs = model.train_on_batch(episode, return_dict=True)
    w, alpha = float(model.model.get_weights()[0][0, 0]), float(rate.numpy()[0, 0])
    np.testing.assert_allclose((w, alpha), first_step, rtol=1e-5)
    np.testing.assert_allclose(
        (w, alpha), _reference_scalar_step(1.0, 0.1, episode, first_order), rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], 0.0064, rtol=1e-4)
    # The second step adapts with the updated alpha.
    model.train_on_batch(episode)
    expected = _reference_scalar_step(w, alpha, episode, first_order)
    np.testing.assert_allclose(
        (model.model.get_weights()[0][0, 0], rate.numpy()[0, 0]), expected, rtol=1e-5)


def _meta_loss(theta, alpha, tasks):
    """Plain eager loop: 3 inner steps phi <- phi - alpha * grad on 2 rows of
    a tanh net, then the mean query MSE over the tasks."""
    losses = []
    for support_x, support_y, query_x, query_y in tasks:
        w = [tf.constant(t) for t in theta]
        for step in range(3):
            rows = [(step * 2 + j) % len(support_x) for j in range(2)]
            with tf.GradientTape() as tape:
                tape.watch(w)
                out = tf.matmul(tf.tanh(tf.matmul(support_x[rows], w[0]) + w[1]), w[2]) + w[3]
                loss = tf.reduce_mean((support_y[rows][:, None] - out) ** 2)
            w = [p - a * g for p, a, g in zip(w, alpha, tape.gradient(loss, w))]
        out = tf.matmul(tf.tanh(tf.matmul(query_x, w[0]) + w[1]), w[2]) + w[3]
        losses.append(float(tf.reduce_mean((query_y[:, None] - out) ** 2)))
    return np.mean(losses)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_two_meta_steps_follow_central_finite_differences(mode, central_differences):
    # The outer gradient for theta and alpha is the gradient of the mean
    # query loss after the inner loop; outer SGD(1) makes each meta-step
    # (theta, alpha) -> (theta, alpha) - gradient. alpha starts at distinct
    # entries, so that each rate's own derivative is checked.
    keras.utils.set_random_seed(1)
    net = keras.Sequential([
        keras.Input((3,), dtype="float64"),
        keras.layers.Dense(4, activation="tanh", dtype="float64"),
        keras.layers.Dense(1, dtype="float64"),
    ])
    rng = np.random.default_rng(0)
    episode = {
        "support_x": rng.normal(size=(2, 4, 3)), "support_y": rng.normal(size=(2, 4)),
        "query_x": rng.normal(size=(2, 3, 3)), "query_y": rng.normal(size=(2, 3)),
    }
    tasks = list(zip(*(episode[k] for k in ("support_x", "support_y", "query_x", "query_y"))))
    model = ReptileModel(
        net, inner_optimizer=keras.optimizers.SGD(0.3), inner_steps=3,
        inner_batch_size=2, algorithm="metasgd",
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0),
                  loss=keras.losses.MeanSquaredError(dtype="float64"), **MODES[mode])
    rates = _rates(model)
    for rate in rates:
        rate.assign(rng.uniform(0.1, 0.5, size=rate.shape))
    for _ in range(2):
        theta, alpha = net.get_weights(), [r.numpy() for r in rates]
        grads = central_differences(
            lambda p: _meta_loss(p[:len(theta)], p[len(theta):], tasks), theta + alpha)
        model.train_on_batch(episode)
        after = net.get_weights() + [r.numpy() for r in rates]
        for value, before, grad in zip(after, theta + alpha, grads):
            np.testing.assert_allclose(value, before - grad, rtol=1e-5, atol=1e-8)
    assert min(np.abs(g).max() for g in grads[4:]) > 1e-3  # alpha really moves


@pytest.mark.parametrize(
    "inner_optimizer",
    [keras.optimizers.Adam(0.1), keras.optimizers.SGD(0.1, momentum=0.9),
     keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5))],
    ids=["adam", "momentum", "schedule"],
)
def test_anything_but_plain_sgd_is_refused_at_construction(inner_optimizer, scalar_model):
    with pytest.raises(ValueError, match=r"Expected a plain `SGD` inner optimizer \(no "
                       r"momentum, weight decay, clipping or learning-rate schedule\) with "
                       r"Meta-SGD, whose learned rates replace its update\. Received: "
                       r"inner_optimizer="):
        ReptileModel(scalar_model(), inner_optimizer=inner_optimizer, algorithm="metasgd")


def test_rates_are_made_when_the_network_is_built(hand_episode):
    # A network built by the first fit gets its rates then, at the
    # optimizer's learning rate, and they are trained.
    net = keras.Sequential([keras.layers.Dense(1, use_bias=False)])
    model = ReptileModel(net, inner_optimizer=keras.optimizers.SGD(0.1), inner_steps=2,
                         inner_batch_size=1, algorithm="metasgd")
    assert _rates(model) == []
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    model.fit(tf.data.Dataset.from_tensors(hand_episode), verbose=0)
    (rate,) = _rates(model)
    assert rate.shape == (1, 1) and abs(float(rate.numpy()[0, 0]) - 0.1) > 1e-3
    assert algorithms.MetaSGD().get_config() == {"first_order": False}
    with pytest.raises(TypeError, match=r"Expected `first_order` to be a bool\. "
                       r"Received: first_order=1"):
        algorithms.MetaSGD(first_order=1)
