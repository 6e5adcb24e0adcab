"""`ReptileModel`: bad inputs are clear errors before any work (issue #13).

Every case checks that the meta-weights are unchanged after the error.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_reptile
from keras_reptile import ReptileModel

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _conv(num_classes=3, **kwargs):
    keras.utils.set_random_seed(0)
    backbone = keras_reptile.models.conv4(
        (8, 8, 1), num_classes=num_classes, filters=4, num_blocks=2
    )
    model = ReptileModel(
        backbone, inner_steps=1, inner_batch_size=4, eval_inner_steps=1, **kwargs
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=SCCE)
    return model


def _regression(units=1):
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([keras.Input((3,)), keras.layers.Dense(units)])
    model = ReptileModel(backbone, inner_steps=1, inner_batch_size=4, eval_inner_steps=1)
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    return model


def _images(num_classes=6, per_class=4):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(num_classes), per_class).astype("int32")
    x = rng.normal(size=(len(y), 8, 8, 1)).astype("float32")
    return x, y


def _episodes(ways, meta_batch_size=2):
    x, y = _images()
    return keras_reptile.episodes.from_arrays(
        x, y, ways=ways, shots=1, query_shots=1, meta_batch_size=meta_batch_size, seed=0
    )


def _weights(model):
    return [w.numpy() for w in model.weights]


def _assert_unchanged(model, before):
    after = _weights(model)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------
# 5. Fractional labels for a sparse loss


def test_fractional_sparse_labels_are_an_error_and_whole_floats_are_accepted():
    model = _conv()
    x, _ = _images()
    before = _weights(model)
    with pytest.raises(
        ValueError,
        match=r"Expected whole-number class ids in `support_y` for a sparse "
        r"classification loss .*Received: support_y\[0\]=0.9 among 1 non-integer",
    ):
        model.adapt(x[:3], np.array([0.9, 1.0, 2.0], "float32"))
    with pytest.raises(ValueError, match=r"Received: support_y\[1\]=1.99 among 2 "):
        model.adapt_and_predict(
            x[:3], np.array([0.0, 1.99, 0.5], "float32"), x[3:5]
        )
    with pytest.raises(ValueError, match=r"Received: support_y\[2\]=nan"):
        model.adapt(x[:3], np.array([0.0, 1.0, np.nan], "float32"))
    _assert_unchanged(model, before)
    # Whole-number floats are class ids.
    outputs = model.adapt_and_predict(x[:3], np.array([0.0, 1.0, 2.0], "float32"), x[3:5])
    assert outputs.shape == (2, 3)
    assert model.adapt(x[:3], np.array([[0.0], [1.0], [2.0]])).built
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------
# 6. Regression targets that do not match the model's outputs


def test_regression_targets_must_match_the_output_shape():
    model = _regression(units=1)
    x = np.ones((4, 3), "float32")
    before = _weights(model)
    with pytest.raises(
        ValueError,
        match=r"Expected `support_y` of shape \[rows, 1\] or \[rows\], matching "
        r"the model's outputs \[rows, 1\]. Received: support_y.shape=\(4, 2\)",
    ):
        model.adapt(x, np.zeros((4, 2), "float32"))
    with pytest.raises(ValueError, match=r"Received: support_y.shape=\(4, 1, 1\)"):
        model.adapt_and_predict(x, np.zeros((4, 1, 1), "float32"), x)
    _assert_unchanged(model, before)
    for y in (np.zeros((4,), "float32"), np.zeros((4, 1), "float32")):
        assert model.adapt_and_predict(x, y, x).shape == (4, 1)

    two = _regression(units=2)
    before = _weights(two)
    # [S] would be broadcast to both outputs.
    with pytest.raises(
        ValueError,
        match=r"Expected `support_y` of shape \[rows, 2\], matching the model's "
        r"outputs \[rows, 2\]. Received: support_y.shape=\(4,\)",
    ):
        two.adapt(x, np.zeros((4,), "float32"))
    _assert_unchanged(two, before)
    assert two.adapt_and_predict(x, np.zeros((4, 2), "float32"), x).shape == (4, 2)


def test_regression_episodes_must_match_the_output_shape_before_training():
    model = _regression(units=1)
    before = _weights(model)
    episode = {
        "support_x": np.ones((2, 4, 3), "float32"),
        "support_y": np.zeros((2, 4), "float32"),
        "query_x": np.ones((2, 2, 3), "float32"),
        "query_y": np.zeros((2, 2, 2), "float32"),
    }
    tasks = tf.data.Dataset.from_tensors(episode).repeat()
    message = (
        r"Expected `x` `query_y` of shape \[meta_batch, rows, 1\] or "
        r"\[meta_batch, rows\], matching the model's outputs \[rows, 1\]. "
        r"Received: shape=\(2, 2, 2\)"
    )
    with pytest.raises(ValueError, match=message):
        model.fit(tasks, steps_per_epoch=1, verbose=0)
    with pytest.raises(ValueError, match=message):
        model.train_on_batch(episode)
    with pytest.raises(ValueError, match=message):
        model.evaluate(tasks, steps=1, verbose=0)
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------
# 7. NaN or Inf in the support or query set


def test_non_finite_support_or_query_inputs_are_an_error():
    model = _conv()
    x, y = _images()
    bad = x[:6].copy()
    bad[1, 0, 0, 0] = np.nan
    bad[4, 3, 2, 0] = np.inf
    before = _weights(model)
    message = (
        r"Expected `{}` to contain only finite values. Received: non-finite "
        r"values \(NaN or Inf\) in 2 examples, at rows \[1, 4\]"
    )
    with pytest.raises(ValueError, match=message.format("support_x")):
        model.adapt(bad, y[:6] % 3)
    with pytest.raises(ValueError, match=message.format("support_x")):
        model.adapt_and_predict(bad, y[:6] % 3, x[:2])
    with pytest.raises(ValueError, match=message.format("query_x")):
        model.adapt_and_predict(x[:6], y[:6] % 3, bad)
    _assert_unchanged(model, before)


def test_non_finite_regression_targets_are_an_error():
    model = _regression()
    x = np.ones((4, 3), "float32")
    before = _weights(model)
    with pytest.raises(ValueError, match=r"`support_y` to contain only finite .* rows \[2\]"):
        model.adapt(x, np.array([0.0, 1.0, np.inf, 2.0], "float32"))
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------
# 8. Nothing to meta-train


def test_a_model_without_trainable_weights_cannot_be_meta_trained():
    model = _conv()
    model.model.trainable = False
    before = _weights(model)
    tasks = _episodes(ways=3)
    message = (
        r"Expected the wrapped model to have trainable weights: there is "
        r"nothing to meta-train. Received a model with no trainable weights"
    )
    with pytest.raises(ValueError, match=message):
        model.fit(tasks, steps_per_epoch=1, verbose=0)
    with pytest.raises(ValueError, match=message):
        model.train_on_batch(next(iter(tasks)))
    _assert_unchanged(model, before)
    # Evaluation and adaptation of a frozen model still work.
    model.evaluate(tasks, steps=1, verbose=0)
    x, y = _images()
    assert model.adapt_and_predict(x[:3], y[:3] % 3, x[:2]).shape == (2, 3)
    _assert_unchanged(model, before)


def test_an_unbuilt_frozen_model_is_built_and_refused_before_training():
    backbone = keras.Sequential([keras.layers.Flatten(), keras.layers.Dense(3)])
    backbone.trainable = False
    model = ReptileModel(backbone, inner_steps=1, inner_batch_size=4)
    model.compile(optimizer="sgd", loss=SCCE)
    with pytest.raises(ValueError, match="nothing to meta-train"):
        model.fit(_episodes(ways=3), steps_per_epoch=1, verbose=0)
    assert backbone.built
    before = _weights(model)
    with pytest.raises(ValueError, match="nothing to meta-train"):
        model.fit(_episodes(ways=3), steps_per_epoch=1, verbose=0)
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------
# 9. Episode labels beyond the model's outputs


def test_episode_labels_beyond_the_outputs_are_an_error_before_training():
    model = _conv(num_classes=3)
    before = _weights(model)
    five_way = _episodes(ways=5)
    with pytest.raises(
        ValueError,
        match=r"Expected episode labels in \[0, 2\] \(the model has 3 outputs\). "
        r"Received labels from 0 to 4 in `x` `support_y`.",
    ):
        model.fit(five_way, steps_per_epoch=1, verbose=0)
    with pytest.raises(ValueError, match=r"labels from 0 to 4 in `x` `support_y`"):
        model.evaluate(five_way, steps=1, verbose=0)
    _assert_unchanged(model, before)


def test_validation_data_with_more_ways_fails_before_the_first_epoch():
    model = _conv(num_classes=3)
    before = _weights(model)
    with pytest.raises(
        ValueError,
        match=r"Expected episode labels in \[0, 2\] \(the model has 3 outputs\). "
        r"Received labels from 0 to 4 in `validation_data` `support_y`.",
    ):
        model.fit(
            _episodes(ways=3), steps_per_epoch=2, validation_data=_episodes(ways=5),
            validation_steps=1, verbose=0,
        )
    _assert_unchanged(model, before)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_in_memory_episode_batches_are_checked():
    model = _conv(num_classes=3)
    before = _weights(model)
    episode = {k: v.numpy() for k, v in next(iter(_episodes(ways=3))).items()}
    episode["query_y"] = episode["query_y"].copy()
    episode["query_y"][1, 2] = 7
    message = r"Received labels from 0 to 7 in `x` `query_y`."
    with pytest.raises(ValueError, match=message):
        model.train_on_batch(episode)
    with pytest.raises(ValueError, match=message):
        model.test_on_batch(episode)
    episode["query_y"] = episode["query_y"].astype("float32")
    episode["query_y"][1, 2] = 0.5
    with pytest.raises(ValueError, match=r"whole-number class ids in `x` `query_y`.*"
                       r"query_y\[1, 2\]=0.5"):
        model.train_on_batch(episode)
    _assert_unchanged(model, before)


# ----------------------------------------------------------------------------
# 10. Labels that are not numbers


@pytest.mark.parametrize("make_model", [_conv, _regression], ids=["sparse", "regression"])
def test_string_labels_are_a_type_error_naming_the_dtype(make_model):
    model = make_model()
    shape = model.model.inputs[0].shape[1:]
    x = np.zeros((3,) + tuple(shape), "float32")
    before = _weights(model)
    message = (
        r"Expected numeric labels in `support_y` \(class ids or regression "
        r"targets\). Received labels of dtype string."
    )
    with pytest.raises(TypeError, match=message):
        model.adapt(x, np.array(["a", "b", "c"]))
    with pytest.raises(TypeError, match=message):
        model.adapt_and_predict(x, [b"a", b"b", b"c"], x)
    _assert_unchanged(model, before)


def test_string_episode_labels_are_a_type_error_before_training():
    model = _conv()
    before = _weights(model)
    episode = {k: v.numpy() for k, v in next(iter(_episodes(ways=3))).items()}
    episode["support_y"] = episode["support_y"].astype(str)
    with pytest.raises(
        TypeError,
        match=r"Expected numeric labels in `x` `support_y` .*dtype string.",
    ):
        model.fit(tf.data.Dataset.from_tensors(episode).repeat(), steps_per_epoch=1,
                  verbose=0)
    _assert_unchanged(model, before)


def test_safe_mode_loading_refuses_code_in_a_keras_file_and_runs_none(tmp_path):
    # A `.keras` file whose wrapped network carries Python code (a Lambda
    # layer whose function, when run, writes a marker file). Loading it with
    # `safe_mode=True` (Keras's default) must refuse before running it, and
    # the library's own classes must not be a way around that. The same file
    # of a network without code loads under `safe_mode=True`.
    marker = tmp_path / "code_ran"
    # A Python lambda is saved as bytecode: what safe mode exists to refuse.
    # The path is a constant of its code (Keras restores no closure or
    # default arguments of a lambda).
    side_effect = eval(
        f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), x)[1]"
    )

    def save(net, name):
        model = ReptileModel(net, inner_steps=1, eval_inner_steps=1)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        model.build((None, 2))
        path = tmp_path / name
        model.save(path)
        return path

    unsafe = save(keras.Sequential([
        keras.Input((2,)), keras.layers.Lambda(side_effect), keras.layers.Dense(1),
    ]), "unsafe.keras")
    marker.unlink(missing_ok=True)  # building the model ran the Lambda once
    with pytest.raises(ValueError, match="safe_mode"):
        keras.saving.load_model(unsafe, safe_mode=True)
    assert not marker.exists()
    # The check is not vacuous: the same file, loaded unsafely and called,
    # does run the code.
    keras.saving.load_model(unsafe, safe_mode=False).model(np.ones((1, 2), "float32"))
    assert marker.read_text() == "ran"

    safe = save(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]), "safe.keras")
    loaded = keras.saving.load_model(safe, safe_mode=True)
    assert isinstance(loaded, ReptileModel)


# ----------------------------------------------------------------------
# Issue 27: non-finite adaptation, learning rates, empty episodes, flags,
# ragged and complex arrays.


def _line(eval_inner_steps=3, learning_rate=0.1):
    """y = w x + b with w = 2, b = 0, adapted by SGD on the mean squared error."""
    net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, name="line")])
    net.set_weights([np.full((1, 1), 2.0, "float32"), np.zeros(1, "float32")])
    model = ReptileModel(
        net, inner_optimizer=keras.optimizers.SGD(learning_rate),
        eval_inner_steps=eval_inner_steps, eval_inner_batch_size=1,
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    return model


# One example x = 1e10, y = 0, learning rate 0.1: the residual is r = w x + b
# and the kernel's gradient 2 r x.
# Step 1: r = 2e10, gradient 4e20, w = 2 - 4e19 = -4e19 (finite).
# Step 2: r = -4e29, gradient -8e39: beyond float32 (3.4e38), w = +Inf.
DIVERGING = (np.array([[1e10]], "float32"), np.array([0.0], "float32"))


def test_adaptation_that_makes_a_weight_non_finite_names_the_step():
    model = _line()
    before = _weights(model)
    message = r"Adaptation step 2 of 3 made `[^`]*line/kernel` non-finite \(NaN or Inf\)"
    with pytest.raises(FloatingPointError, match=message):
        model.adapt(*DIVERGING)
    with pytest.raises(FloatingPointError, match=message):
        model.adapt_and_predict(*DIVERGING, np.ones((2, 1), "float32"))
    # x = 1e19: the first gradient, 2 (2e19) 1e19 = 4e38, is beyond float32.
    with pytest.raises(FloatingPointError, match="Adaptation step 1 of 3 made"):
        model.adapt(DIVERGING[0] * 1e9, DIVERGING[1])
    _assert_unchanged(model, before)


def test_query_outputs_that_overflow_are_an_error_not_inf():
    model = _line(eval_inner_steps=1)
    # Support x = 0, y = 0: the residual is b = 0, so nothing moves and
    # w stays 2; the query 3e38 gives 6e38, beyond float32.
    support = (np.zeros((1, 1), "float32"), np.zeros(1, "float32"))
    with pytest.raises(
        FloatingPointError,
        match=r"Expected finite outputs after adaptation. Received: 1 NaN or "
        r"Inf values in the query outputs, although all 1 adaptation steps "
        r"kept every weight finite",
    ):
        model.adapt_and_predict(*support, np.array([[1.0], [3e38]], "float32"))
    # Finite outputs are returned as before: 2 x.
    np.testing.assert_array_equal(
        model.adapt_and_predict(*support, np.array([[1.0], [3.0]], "float32")),
        [[2.0], [6.0]],
    )


@pytest.mark.parametrize("rate", [float("nan"), float("inf")])
def test_non_finite_learning_rates_are_refused(rate):
    net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    with pytest.raises(
        ValueError,
        match=r"Expected `inner_optimizer` to have a finite learning rate: a "
        rf"NaN or Inf one makes every weight it updates NaN. Received: its "
        rf"learning rate is {rate}",
    ):
        ReptileModel(net, inner_optimizer=keras.optimizers.SGD(rate))
    schedule = keras.optimizers.schedules.ExponentialDecay(rate, 10, 0.5)
    with pytest.raises(
        ValueError,
        match=r"Received: its learning-rate schedule's first value is "
        rf"{rate}",
    ):
        ReptileModel(net, inner_optimizer=keras.optimizers.Adam(schedule))
    model = ReptileModel(net)
    with pytest.raises(
        ValueError,
        match=r"Expected `optimizer` to have a finite learning rate",
    ):
        model.compile(optimizer=keras.optimizers.SGD(schedule), loss="mse")


def _one_episode(support_rows, query_rows):
    episode = {
        "support_x": np.zeros((1, support_rows, 1), "float32"),
        "support_y": np.zeros((1, support_rows), "float32"),
        "query_x": np.zeros((1, query_rows, 1), "float32"),
        "query_y": np.zeros((1, query_rows), "float32"),
    }
    return tf.data.Dataset.from_tensors(episode).repeat()


@pytest.mark.parametrize(
    "support_rows, query_rows, key",
    [(2, 0, "query_x"), (0, 2, "support_x")],
)
def test_empty_support_or_query_sets_are_refused_before_any_step(
    support_rows, query_rows, key
):
    model = _line()
    before = _weights(model)
    tasks = _one_episode(support_rows, query_rows)
    shape = (1, support_rows if key == "support_x" else query_rows, 1)
    message = (
        rf"Expected `{key}` episodes with at least one example per task. "
        rf"Received: {key}.shape=\({shape[0]}, {shape[1]}, {shape[2]}\)"
    )
    with pytest.raises(ValueError, match=message):
        model.fit(tasks, steps_per_epoch=1, verbose=0)
    with pytest.raises(ValueError, match=message):
        model.evaluate(tasks, steps=1, verbose=0)
    assert int(model.optimizer.iterations) == 0
    _assert_unchanged(model, before)


def test_numpy_bools_are_flags_and_strings_are_not():
    net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model = ReptileModel(net, transductive=np.bool_(True),
                         parallel_tasks=np.bool_(False))
    assert model.transductive is True and model.parallel_tasks is False
    assert model.get_config()["transductive"] is True
    with pytest.raises(
        TypeError,
        match=r"Expected `transductive` to be a bool. Received: "
        r"transductive='yes' of type str",
    ):
        model.transductive = "yes"


@pytest.mark.parametrize(
    "support_x, error, match",
    [
        ([[1.0], [2.0, 3.0]], ValueError,
         "Expected `support_x` to be a dense array with rows of equal length. "
         "Received: a ragged nested sequence"),
        (tf.ragged.constant([[1.0], [2.0, 3.0]]), ValueError,
         "Expected `support_x` to be a dense array with rows of equal length. "
         r"Received: a `tf.RaggedTensor` with shape \(2, None\)"),
        (np.ones((2, 1)) + 1j, TypeError,
         "Expected `support_x` to hold real numbers: the imaginary part would "
         "be dropped. Received: support_x.dtype=complex128"),
        (tf.complex(tf.ones((2, 1)), tf.ones((2, 1))), TypeError,
         "Expected `support_x` to hold real numbers: the imaginary part would "
         "be dropped. Received: support_x.dtype=complex64"),
    ],
)
def test_ragged_or_complex_support_sets_name_the_argument(support_x, error, match):
    model = _line()
    before = _weights(model)
    with pytest.raises(error, match=match):
        model.adapt(support_x, np.zeros(2, "float32"))
    _assert_unchanged(model, before)
