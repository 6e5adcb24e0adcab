"""Fixtures shared by several test files.

* `scalar_model` and `hand_episode`: the one-weight model y = w x and the
  two-task episode whose meta-steps the algorithm tests derive by hand;
* `central_differences`: the gradient of a scalar function of a list of
  arrays by central finite differences, the reference for the second-order
  algorithms' meta-gradients;
* `plain`: a plain eager reference for adaptation (a fresh real Keras
  optimizer on a clone, support rows in turn) and for non-transductive
  query outputs, which reference loops compare the model against.
"""

import os
import types

# TensorFlow turns its oneDNN CPU kernels on by default only on some x86 CPUs
# (seen: on with Intel AVX-512, off on an AMD EPYC with AVX2). Without them
# grouped convolutions fail, and `batched_tasks="auto"` rightly falls back to
# one task at a time; the suite runs the batched path on every x86 machine.
# Set before TensorFlow is imported; an explicit setting is kept.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture
def scalar_model():
    """`scalar_model(w=1.0)`: y_hat = w x, one weight and no bias."""

    def make(w=1.0):
        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
        model.set_weights([np.array([[w]], "float32")])
        return model

    return make


@pytest.fixture
def hand_episode():
    """Two tasks, two support rows each, one query row each:
    task A rows (x, y) = (1, 3), (2, 2); task B (1, 0), (1, 1); queries (1, 1)."""
    return {
        "support_x": np.array([[[1.0], [2.0]], [[1.0], [1.0]]], "float32"),
        "support_y": np.array([[3.0, 2.0], [0.0, 1.0]], "float32"),
        "query_x": np.array([[[1.0]], [[1.0]]], "float32"),
        "query_y": np.array([[1.0], [1.0]], "float32"),
    }


@pytest.fixture
def central_differences():
    """`central_differences(f, params, h=1e-6)`: df/dparams, entry by entry.

    `f` maps a list of float64 arrays to a float; each entry of each array is
    moved by +h and -h in turn, the others held fixed, and the slope is
    (f(+h) - f(-h)) / 2h. Returns a list of arrays shaped like `params`.
    """

    def gradient(f, params, h=1e-6):
        grads = []
        for i, w in enumerate(params):
            grad = np.zeros_like(w)
            for index in np.ndindex(w.shape):
                values = []
                for sign in (1, -1):
                    moved = [p.copy() for p in params]
                    moved[i][index] += sign * h
                    values.append(f(moved))
                grad[index] = (values[0] - values[1]) / (2 * h)
            grads.append(grad)
        return grads

    return gradient


def _plain_adaptation(network, x, y, steps, batch_size, optimizer, loss):
    """A clone of `network` adapted eagerly by `optimizer()` (a fresh real
    Keras optimizer): step t trains on rows t*batch_size + j, wrapping."""
    clone = keras.models.clone_model(network)
    clone.set_weights(network.get_weights())
    opt = optimizer()
    for t in range(steps):
        rows = [(t * batch_size + j) % len(x) for j in range(batch_size)]
        with tf.GradientTape() as tape:
            value = loss(y[rows], clone(x[rows], training=True))
        opt.apply_gradients(zip(tape.gradient(value, clone.trainable_variables),
                                clone.trainable_variables))
    return clone


def _plain_query_outputs(adapted, support_x, query_x):
    """Non-transductive query outputs of an adapted clone: every
    BatchNormalization normalises with the support set's own moments
    (biased variance), one query at a time."""
    norms = [layer for layer in adapted.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    if norms:
        # In training mode each normalisation uses the support batch's
        # moments, so the inputs of every layer are those inference will see.
        inputs = keras.Model(adapted.inputs, [layer.input for layer in norms])(
            [support_x], training=True)
        for layer, h in zip(norms, inputs):
            h = np.asarray(h)
            layer.moving_mean.assign(h.mean(axis=(0, 1, 2)))
            layer.moving_variance.assign(h.var(axis=(0, 1, 2)))
    return np.concatenate([adapted(q[None], training=False).numpy() for q in query_x])


@pytest.fixture
def plain():
    """`plain.adapt(network, x, y, steps, batch_size, optimizer, loss)` and
    `plain.query_outputs(adapted, support_x, query_x)`."""
    return types.SimpleNamespace(adapt=_plain_adaptation, query_outputs=_plain_query_outputs)
