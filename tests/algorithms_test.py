"""Meta-learning algorithms: hand-derived meta-steps and finite differences."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_reptile
from keras_reptile import ReptileModel
from keras_reptile import algorithms

MODES = {
    "eager": dict(run_eagerly=True),
    "graph": dict(run_eagerly=False, jit_compile=False),
    "xla": dict(run_eagerly=False, jit_compile=True),
}


def _one_meta_step(net, episode, algorithm, mode):
    model = ReptileModel(
        net,
        inner_optimizer=keras.optimizers.SGD(0.1),
        inner_steps=2,
        inner_batch_size=1,
        algorithm=algorithm,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", **MODES[mode])
    episodes = tf.data.Dataset.from_tensors(episode).repeat()
    history = model.fit(episodes, steps_per_epoch=1, verbose=0)
    return model.model.get_weights()[0][0, 0], history.history["loss"][0]


# y_hat = w x, loss (w x - y)^2 on one row per step, inner SGD lr 0.1, two
# inner steps over rows 0, 1, w starts at 1; a step on row x multiplies
# d(phi)/dw by (1 - 2 * 0.1 * x^2).
# Task A, support (1, 3), (2, 2): phi = 1 -> 1.4 -> 1.08;
#   d(phi)/dw = (1 - 0.2) * (1 - 0.8) = 0.16.
# Task B, support (1, 0), (1, 1): phi = 1 -> 0.8 -> 0.84;
#   d(phi)/dw = 0.8 * 0.8 = 0.64.
# Query (1, 1): dL/d(phi) = 2 (phi - 1): A 0.16, B -0.32.
# FOMAML: mean(0.16, -0.32) = -0.08; outer SGD(0.5): w = 1 + 0.04 = 1.04.
# MAML: mean(0.16 * 0.16, -0.32 * 0.64) = mean(0.0256, -0.2048) = -0.0896;
#   w = 1 + 0.5 * 0.0896 = 1.0448.
# Reptile: mean phi = 0.96, w = 1 - 0.5 * (1 - 0.96) = 0.98.
# Reported query loss, the same for all: ((1.08-1)^2 + (0.84-1)^2)/2 = 0.016.
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(
    "algorithm, expected",
    [
        ("reptile", 0.98),
        ("fomaml", 1.04),
        (algorithms.MAML(first_order=True), 1.04),
        ("maml", 1.0448),
        (algorithms.MAML(), 1.0448),
        (algorithms.MAML(recompute_inner_steps=True), 1.0448),
    ],
)
def test_one_meta_step_matches_hand_derivation(algorithm, expected, mode, scalar_model, hand_episode):
    w, loss = _one_meta_step(scalar_model(1.0), hand_episode, algorithm, mode)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    np.testing.assert_allclose(loss, 0.016, rtol=1e-5)


def _tanh_net(seed, head_units=None):
    # float64 so that central finite differences are accurate to ~1e-9.
    keras.utils.set_random_seed(seed)
    layers = [
        keras.Input((3,), dtype="float64"),
        keras.layers.Dense(4, activation="tanh", dtype="float64"),
    ]
    if head_units:
        layers.append(keras.layers.Dense(head_units, dtype="float64"))
    else:
        layers.append(keras.layers.Dense(1, dtype="float64"))
    return keras.Sequential(layers)


def _loss(classify):
    # float64 losses: Keras computes losses in float32 unless told.
    if classify:
        return keras.losses.SparseCategoricalCrossentropy(from_logits=True, dtype="float64")
    return keras.losses.MeanSquaredError(dtype="float64")


def _reference_query_loss(theta, task, *, classify, head):
    """Plain eager loop: (head,) 3 inner SGD steps of 2 rows, then query loss."""
    support_x, support_y, query_x, query_y = task
    loss_fn = _loss(classify)
    weights = [tf.constant(t) for t in theta]
    if head:
        embed = np.tanh(support_x @ weights[0] + weights[1])
        onehot = np.eye(head)[support_y.astype(int)]
        counts = onehot.sum(0)
        protos = onehot.T @ embed / np.maximum(counts, 1e-12)[:, None]
        present = counts > 0
        # Same formula as the library, in TF, so it can be differentiated.
        embed_t = tf.tanh(tf.matmul(support_x, weights[0]) + weights[1])
        protos_t = tf.matmul(tf.constant(onehot), embed_t, transpose_a=True) / np.maximum(
            counts, 1e-12
        )[:, None]
        np.testing.assert_allclose(protos_t.numpy(), protos)
        weights[2] = tf.where(present[None, :], 2.0 * tf.transpose(protos_t), 0.0)
        weights[3] = tf.where(
            present, -tf.reduce_sum(protos_t**2, axis=1), tf.constant(-1e4, tf.float64)
        )
    for step in range(3):
        rows = [(step * 2 + j) % len(support_x) for j in range(2)]
        with tf.GradientTape() as tape:
            tape.watch(weights)
            hidden = tf.tanh(tf.matmul(support_x[rows], weights[0]) + weights[1])
            out = tf.matmul(hidden, weights[2]) + weights[3]
            loss = loss_fn(support_y[rows], out)
        grads = tape.gradient(loss, weights)
        weights = [w - 0.3 * g for w, g in zip(weights, grads)]
    hidden = tf.tanh(tf.matmul(query_x, weights[0]) + weights[1])
    out = tf.matmul(hidden, weights[2]) + weights[3]
    return float(loss_fn(query_y, out))


def _tasks(classify, seed=0):
    rng = np.random.default_rng(seed)
    support_x = rng.normal(size=(2, 4, 3))
    query_x = rng.normal(size=(2, 3, 3))
    if classify:
        support_y = np.array([[0, 1, 0, 1], [1, 0, 1, 0]], "float64")
        query_y = np.array([[0, 1, 1], [1, 0, 0]], "float64")
    else:
        support_y = rng.normal(size=(2, 4))
        query_y = rng.normal(size=(2, 3))
    return support_x, support_y, query_x, query_y


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("recompute", [False, True], ids=["kept", "recomputed"])
@pytest.mark.parametrize("head", [False, True])
def test_maml_gradient_equals_central_finite_differences(head, recompute, mode,
                                                          central_differences):
    # MAML's outer gradient (the second-order term included) is the gradient
    # of the mean query loss after adaptation; outer SGD(1) makes the
    # meta-step theta -> theta - gradient, so the gradient is read off it.
    # With the prototype head the gradient also flows through the head's
    # mapping from support embeddings (3 units, 2 classes: one unused).
    classify = head
    net = _tanh_net(1, head_units=3 if head else None)
    theta = [w.astype("float64") for w in net.get_weights()]
    support_x, support_y, query_x, query_y = _tasks(classify)
    tasks = [
        (support_x[b], support_y[b], query_x[b], query_y[b]) for b in range(2)
    ]

    def meta_loss(weights):
        return np.mean([
            _reference_query_loss(weights, t, classify=classify,
                                  head=3 if head else None)
            for t in tasks
        ])

    expected = central_differences(meta_loss, theta)

    model = ReptileModel(
        net, inner_optimizer=keras.optimizers.SGD(0.3), inner_steps=3,
        inner_batch_size=2, algorithm=algorithms.MAML(recompute_inner_steps=recompute),
        head="prototype" if head else None,
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=_loss(classify), **MODES[mode])
    model.train_on_batch({
        "support_x": support_x, "support_y": support_y,
        "query_x": query_x, "query_y": query_y,
    })
    for before, after, grad in zip(theta, model.model.get_weights(), expected):
        np.testing.assert_allclose(before - after, grad, rtol=1e-5, atol=1e-8)
    if head:
        # The head's own meta-weights are replaced per task: no gradient.
        np.testing.assert_allclose(expected[2], 0.0, atol=1e-8)
        assert np.abs(expected[0]).max() > 1e-3  # flows into the embedding


def test_fomaml_drops_exactly_the_second_order_term(scalar_model):
    # FOMAML's gradient is dL/d(phi); MAML's is dL/d(phi) * d(phi)/d(theta).
    # With one inner step on w x (loss (w x - y)^2, lr a), d(phi)/dw is
    # 1 - 2 a x^2 (see the hand derivation above), so the two gradients
    # differ by that factor, which is not 1 for x != 0.
    episode = {
        "support_x": np.array([[[2.0]]], "float32"),
        "support_y": np.array([[1.0]], "float32"),
        "query_x": np.array([[[1.0]]], "float32"),
        "query_y": np.array([[0.0]], "float32"),
    }
    grads = {}
    for name in ("fomaml", "maml"):
        model = ReptileModel(scalar_model(1.0), inner_optimizer=keras.optimizers.SGD(0.1),
                             inner_steps=1, inner_batch_size=1, algorithm=name)
        model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
        model.train_on_batch(episode)
        grads[name] = 1.0 - model.model.get_weights()[0][0, 0]
    # phi = 1 - 0.1 * 2 * 2 * (2 - 1) = 0.6; dL/dphi = 2 * 0.6 = 1.2;
    # d(phi)/dw = 1 - 0.2 * 4 = 0.2.
    np.testing.assert_allclose(grads["fomaml"], 1.2, rtol=1e-6)
    np.testing.assert_allclose(grads["maml"], 1.2 * 0.2, rtol=1e-6)


def test_algorithm_names_configs_and_errors(scalar_model):
    assert algorithms.names() == ["anil", "fomaml", "maml", "metasgd", "reptile"]
    assert algorithms.get("fomaml") == algorithms.MAML(first_order=True)
    assert algorithms.get("MAML") == algorithms.MAML()
    assert algorithms.get("maml") != algorithms.get("fomaml")
    # Same config, other class: ANIL is not MAML.
    assert algorithms.get("anil") != algorithms.MAML()
    assert algorithms.get("metasgd") == algorithms.MetaSGD()
    for algorithm in (algorithms.Reptile(), algorithms.MAML(), algorithms.MAML(True),
                      algorithms.ANIL(True, head_layers=["dense"]), algorithms.MetaSGD(True)):
        config = keras.saving.serialize_keras_object(algorithm)
        assert algorithms.get(config) == algorithm
        # Equal algorithms hash alike (trace keys), lists in configs too.
        assert hash(algorithms.get(config)) == hash(algorithm)
    with pytest.raises(ValueError, match="Expected `algorithm` to be one of"):
        algorithms.get("sgd")
    with pytest.raises(TypeError, match="Expected `first_order` to be a bool"):
        algorithms.MAML(first_order="yes")
    with pytest.raises(TypeError, match="Expected `recompute_inner_steps` to be a bool"):
        algorithms.MAML(recompute_inner_steps=1)
    with pytest.raises(ValueError, match="nothing to recompute"):
        algorithms.MAML(first_order=True, recompute_inner_steps=True)
    recomputing = algorithms.MAML(recompute_inner_steps=True)
    assert recomputing != algorithms.MAML()
    assert repr(recomputing) == "MAML(first_order=False, recompute_inner_steps=True)"
    assert algorithms.get(keras.saving.serialize_keras_object(recomputing)) == recomputing
    # Configs written before the option existed still load.
    assert algorithms.MAML.from_config({"first_order": False}) == algorithms.MAML()
    with pytest.raises(ValueError, match="Received: algorithm='protonet'"):
        ReptileModel(scalar_model(), algorithm="protonet")


@pytest.mark.parametrize("mode, steps", [("graph", 12), ("xla", 6)])
def test_recomputed_inner_steps_give_the_same_meta_step_on_a_conv_net(mode, steps):
    # A conv net with BatchNorm (float state threaded through the steps)
    # and Dropout (an integer seed-generator state), Adam, and in graph mode
    # 12 inner steps (beyond the unrolling threshold: recomputation unrolls
    # them, the kept version runs a `tf.while_loop`, which XLA cannot
    # differentiate twice, hence 6 steps there): the
    # meta-weights and BatchNorm statistics after one MAML meta-step are
    # those of the step that keeps its activations, to float rounding.
    rng = np.random.default_rng(0)
    episode = {
        "support_x": rng.normal(size=(2, 6, 8, 8, 1)).astype("float32"),
        "support_y": np.tile(np.arange(3), (2, 2)).astype("int32"),
        "query_x": rng.normal(size=(2, 3, 8, 8, 1)).astype("float32"),
        "query_y": np.tile(np.arange(3), (2, 1)).astype("int32"),
    }
    results = []
    for recompute in (False, True):
        keras.utils.set_random_seed(1)
        net = keras.Sequential([
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(4, 3, strides=2, padding="same", use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.2, seed=3),
            keras.layers.Dense(3),
        ])
        initial = [w.numpy().copy() for w in net.trainable_weights]
        model = ReptileModel(
            net, inner_optimizer=keras.optimizers.Adam(0.01), inner_steps=steps,
            inner_batch_size=3, algorithm=algorithms.MAML(recompute_inner_steps=recompute),
        )
        model.compile(optimizer=keras.optimizers.SGD(1.0),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      **MODES[mode])
        model.train_on_batch(episode)
        results.append({"trainable": [w.numpy().copy() for w in net.trainable_weights],
                        "all": [w.copy() for w in model.model.get_weights()]})
    for kept, recomputed in zip(results[0]["all"], results[1]["all"]):
        np.testing.assert_allclose(recomputed, kept, rtol=1e-5, atol=1e-6)
    # The step moved the trainable weights (equal results are not two no-ops).
    moved = zip(results[0]["trainable"], initial)
    assert max(np.abs(k - i).max() for k, i in moved) > 1e-3
