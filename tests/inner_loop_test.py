"""The functional inner loop against real Keras optimizers applied eagerly."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reptile import inner_loop

S, BATCH, STEPS = 7, 3, 4  # 4 steps of 3 rows over 7 rows: wraps around


def _mlp(seed=0, constraint=None):
    keras.utils.set_random_seed(seed)
    return keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, activation="tanh", kernel_constraint=constraint),
            keras.layers.Dense(3),
        ]
    )


def _data(seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(S, 4)).astype("float32"),
        rng.integers(0, 3, size=(S,)).astype("int32"),
    )


LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _reference(model, optimizer, x, y, steps, batch_size):
    """A plain eager loop: the real optimizer, one `apply_gradients` per step."""
    for t in range(steps):
        rows = [(t * batch_size + j) % len(x) for j in range(batch_size)]
        with tf.GradientTape() as tape:
            loss = LOSS(y[rows], model(x[rows], training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return [v.numpy() for v in model.trainable_variables]


def _functional(model, optimizer, x, y, steps, batch_size):
    params, _ = inner_loop.adapt(
        model,
        [tf.convert_to_tensor(v) for v in model.trainable_variables],
        [tf.convert_to_tensor(v) for v in model.non_trainable_variables],
        tf.constant(x),
        tf.constant(y),
        loss_fn=LOSS,
        optimizer=inner_loop.InnerOptimizer(optimizer, model.trainable_variables),
        steps=steps,
        batch_size=batch_size,
    )
    return [p.numpy() for p in params]


OPTIMIZERS = {
    "sgd": lambda: keras.optimizers.SGD(0.1),
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9),
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(0.01),
    "adam_beta1_0": lambda: keras.optimizers.Adam(0.01, beta_1=0.0),
    "adam_amsgrad": lambda: keras.optimizers.Adam(0.01, amsgrad=True),
    "adamw": lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    "adamax": lambda: keras.optimizers.Adamax(0.01),
    "rmsprop": lambda: keras.optimizers.RMSprop(0.01),
    "rmsprop_momentum_centered": lambda: keras.optimizers.RMSprop(
        0.01, momentum=0.5, centered=True
    ),
    "adagrad": lambda: keras.optimizers.Adagrad(0.1),
    "lion": lambda: keras.optimizers.Lion(0.01),
    "sgd_clipnorm": lambda: keras.optimizers.SGD(0.5, clipnorm=0.1),
    "sgd_clipvalue": lambda: keras.optimizers.SGD(0.5, clipvalue=0.01),
    "adam_global_clipnorm": lambda: keras.optimizers.Adam(0.01, global_clipnorm=0.1),
    "sgd_weight_decay": lambda: keras.optimizers.SGD(0.1, weight_decay=0.5),
    "sgd_schedule": lambda: keras.optimizers.SGD(
        keras.optimizers.schedules.ExponentialDecay(0.5, 1, 0.5)
    ),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matches_real_optimizer_applied_eagerly(name):
    x, y = _data()
    expected = _reference(_mlp(), OPTIMIZERS[name](), x, y, STEPS, BATCH)
    actual = _functional(_mlp(), OPTIMIZERS[name](), x, y, STEPS, BATCH)
    for e, a, v in zip(expected, actual, _mlp().trainable_variables):
        assert not np.allclose(e, v.numpy()), "the optimizer should have moved"
        np.testing.assert_allclose(a, e, rtol=2e-6, atol=2e-7)


def test_constraint_is_applied_after_each_step():
    x, y = _data()
    constraint = keras.constraints.MaxNorm(0.1)
    expected = _reference(_mlp(constraint=constraint), keras.optimizers.SGD(1.0), x, y, STEPS, BATCH)
    actual = _functional(_mlp(constraint=constraint), keras.optimizers.SGD(1.0), x, y, STEPS, BATCH)
    for e, a in zip(expected, actual):
        np.testing.assert_allclose(a, e, rtol=2e-6, atol=2e-7)


def test_while_loop_equals_unrolled_loop():
    x, y = _data(1)
    model = _mlp()
    kwargs = dict(loss_fn=LOSS, batch_size=BATCH)
    theta = [tf.convert_to_tensor(v) for v in model.trainable_variables]
    rule = inner_loop.InnerOptimizer(keras.optimizers.Adam(0.01), model.trainable_variables)
    unrolled, _ = inner_loop.adapt(model, theta, [], x, y, optimizer=rule, steps=5, **kwargs)
    looped, _ = tf.function(
        lambda steps: inner_loop.adapt(model, theta, [], x, y, optimizer=rule, steps=steps, **kwargs)
    )(tf.constant(5))
    for u, w in zip(unrolled, looped):
        np.testing.assert_allclose(u.numpy(), w.numpy(), rtol=1e-6, atol=1e-7)


def test_does_not_touch_the_model_variables():
    x, y = _data()
    model = _mlp()
    before = [v.numpy().copy() for v in model.weights]
    _functional(model, keras.optimizers.Adam(0.1), x, y, 3, BATCH)
    for b, v in zip(before, model.weights):
        np.testing.assert_array_equal(b, v.numpy())


def test_adapted_weights_are_differentiable_through_the_inner_loop():
    # y = w * x, one SGD step on (x, y) = (2, 1) with squared error:
    #   w' = w - lr * 2x(wx - y)  =>  dw'/dw = 1 - 2 lr x^2 = 1 - 2*0.1*4 = 0.2
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    w = tf.constant([[3.0]])
    rule = inner_loop.InnerOptimizer(keras.optimizers.SGD(0.1), model.trainable_variables)
    with tf.GradientTape() as tape:
        tape.watch(w)
        (w_adapted,), _ = inner_loop.adapt(
            model, [w], [], tf.constant([[2.0]]), tf.constant([[1.0]]),
            loss_fn=lambda yt, yp: tf.reduce_sum(tf.square(yp - yt)),
            optimizer=rule, steps=1, batch_size=1,
        )
    # w' = 3 - 0.1 * 2*2*(6 - 1) = 1.0
    np.testing.assert_allclose(w_adapted.numpy(), [[1.0]], rtol=1e-6)
    np.testing.assert_allclose(tape.gradient(w_adapted, w).numpy(), [[0.2]], rtol=1e-5)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "graph"])
def test_recompute_runs_each_step_again_in_the_backward_pass_only(compiled):
    # y = w * x, SGD 0.1, squared error on (2, 1), 3 steps from w = 3:
    #   w' = w - 0.4 (2w - 1) = 0.2 w + 0.4: 3 -> 1.0 -> 0.6 -> 0.52, and
    #   dw'/dw = 0.2 per step, so d(w_3)/dw = 0.008.
    # The loss function is called once per step in the forward pass; with
    # `recompute` once more per step when the gradient is taken, after the
    # forward pass (the recomputation waits for the incoming gradient).
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False)])
    rule = inner_loop.InnerOptimizer(keras.optimizers.SGD(0.1), model.trainable_variables)
    calls = []

    def loss_fn(yt, yp):
        calls.append("loss")  # at trace time under tf.function
        return tf.reduce_sum(tf.square(yp - yt))

    def adapt_and_differentiate(w, recompute):
        with tf.GradientTape() as tape:
            tape.watch(w)
            (adapted,), _ = inner_loop.adapt(
                model, [w], [], tf.constant([[2.0]]), tf.constant([[1.0]]),
                loss_fn=loss_fn, optimizer=rule, steps=3, batch_size=1,
                recompute=recompute,
            )
        calls.append("forward done")
        return adapted, tape.gradient(adapted, w)

    w = tf.constant([[3.0]])
    for recompute, expected_calls in ((False, 3), (True, 6)):
        calls.clear()
        run = tf.function(adapt_and_differentiate) if compiled else adapt_and_differentiate
        adapted, gradient = run(w, recompute)
        np.testing.assert_allclose(adapted.numpy(), [[0.52]], rtol=1e-6)
        np.testing.assert_allclose(gradient.numpy(), [[0.008]], rtol=1e-5)
        assert calls.count("loss") == expected_calls, calls
        assert calls.index("forward done") == 3, calls


def test_recompute_needs_a_python_int_number_of_steps():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    rule = inner_loop.InnerOptimizer(keras.optimizers.SGD(0.1), model.trainable_variables)
    with pytest.raises(ValueError, match="Expected a Python int number of steps"):
        inner_loop.adapt(model, [tf.convert_to_tensor(v) for v in model.trainable_variables],
                         [], tf.ones((2, 1)), tf.ones((2, 1)), loss_fn=LOSS,
                         optimizer=rule, steps=tf.constant(3), batch_size=1, recompute=True)


def test_regularization_losses_use_the_adapted_weights():
    # Loss = 0 data term + 0.5 * w^2 (L2 with l2=0.5); SGD lr 0.1:
    #   w' = w - 0.1 * w = 0.9 w  per step, so two steps give 0.81 w.
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(
                1, use_bias=False, kernel_regularizer=keras.regularizers.L2(0.5)
            ),
        ]
    )
    w = tf.constant([[2.0]])
    rule = inner_loop.InnerOptimizer(keras.optimizers.SGD(0.1), model.trainable_variables)
    (w_adapted,), _ = inner_loop.adapt(
        model, [w], [], tf.zeros((1, 1)), tf.zeros((1, 1)),
        loss_fn=lambda yt, yp: tf.reduce_sum(yp * 0.0),
        optimizer=rule, steps=2, batch_size=1,
    )
    np.testing.assert_allclose(w_adapted.numpy(), [[1.62]], rtol=1e-6)


def test_unsupported_optimizer_type_is_rejected():
    with pytest.raises(TypeError, match="Expected `inner_optimizer` to be one of"):
        inner_loop.InnerOptimizer(keras.optimizers.Ftrl(0.1), [])

    class MySGD(keras.optimizers.SGD):
        pass

    with pytest.raises(TypeError, match="MySGD"):
        inner_loop.InnerOptimizer(MySGD(0.1), [])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(use_ema=True), "use_ema"),
        (dict(gradient_accumulation_steps=2), "gradient_accumulation_steps"),
        (dict(loss_scale_factor=128.0), "loss_scale_factor"),
    ],
)
def test_unsupported_optimizer_options_are_rejected(kwargs, name):
    with pytest.raises(ValueError, match=f"does not support `{name}`"):
        inner_loop.InnerOptimizer(keras.optimizers.SGD(0.1, **kwargs), [])


def test_supported_optimizers_lists_names():
    assert "Adam" in inner_loop.supported_optimizers()
    assert "SGD" in inner_loop.supported_optimizers()
