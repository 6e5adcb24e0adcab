"""`ReptileModel`'s choice of XLA per step function under `jit_compile`."""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_reptile
from keras_reptile import ReptileModel

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture
def jit_flags(monkeypatch):
    """The `jit_compile` of every `tf.function` created while it is active.

    Keras wraps each step in `tf.function(..., jit_compile=...)` when it
    makes the step function; recording the argument shows what TensorFlow
    was asked to compile with XLA, without reaching into Keras.
    """
    flags = []
    original = tf.function

    def recording(*args, **kwargs):
        flags.append(kwargs.get("jit_compile"))
        return original(*args, **kwargs)

    monkeypatch.setattr(tf, "function", recording)
    return flags


def _tasks(ways=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((40, 4, 4, 1)).astype("float32")
    y = np.repeat(np.arange(4), 10)
    return keras_reptile.episodes.from_arrays(
        x, y, ways=ways, shots=1, query_shots=1, meta_batch_size=2, seed=seed)


def _model(algorithm="reptile", inner_steps=2, layers=()):
    net = keras.Sequential([
        keras.Input((4, 4, 1)), *layers, keras.layers.Flatten(),
        keras.layers.Dense(2)])
    return ReptileModel(net, algorithm=algorithm, inner_steps=inner_steps,
                        inner_batch_size=2, eval_inner_steps=2)


def _train_flag(model, flags, **compile_kwargs):
    model.compile(optimizer="sgd", loss=SCCE, **compile_kwargs)
    flags.clear()
    model.make_train_function(force=True)
    # Keras makes one `tf.function` per step function: the step itself.
    return flags[0]


# Keras's own "auto" turns XLA off where TensorFlow sees only CPUs, and on
# where it sees an accelerator.
CPU_ONLY = all(device.device_type == "CPU" for device in tf.config.list_physical_devices())


def test_auto_compiles_the_meta_step_with_xla(jit_flags):
    assert _train_flag(_model(), jit_flags) is True


@pytest.mark.skipif(not CPU_ONLY, reason="Keras's own auto compiles evaluation with XLA "
                                         "where TensorFlow sees an accelerator")
def test_auto_leaves_evaluation_to_keras_which_avoids_xla_on_cpus(jit_flags):
    model = _model()
    assert _train_flag(model, jit_flags) is True
    jit_flags.clear()
    model.make_test_function(force=True)
    model.make_predict_function(force=True)
    assert jit_flags[0] is False
    assert all(flag in (None, False) for flag in jit_flags)


def test_an_explicit_jit_compile_decides(jit_flags):
    assert _train_flag(_model(), jit_flags, jit_compile=False) is False
    assert _train_flag(_model(), jit_flags, jit_compile=True) is True


def test_auto_fit_gives_the_same_meta_weights_as_without_xla():
    histories, weights = [], []
    for jit_compile in ("auto", False):
        keras.utils.set_random_seed(1)
        model = _model()
        model.compile(optimizer="sgd", loss=SCCE, jit_compile=jit_compile)
        histories.append(model.fit(_tasks(), steps_per_epoch=3, verbose=0).history)
        weights.append(model.model.get_weights())
    for auto, plain in zip(*weights):
        np.testing.assert_allclose(auto, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(histories[0]["loss"], histories[1]["loss"], rtol=1e-5)


def test_auto_avoids_xla_for_second_order_maml_through_a_while_loop(jit_flags):
    # 11 inner steps run in a tf.while_loop, whose second-order gradient
    # XLA cannot compile; recomputation unrolls the loop.
    steps = keras_reptile.inner_loop.MAX_UNROLLED_STEPS + 1
    assert _train_flag(_model("maml", steps), jit_flags) is False
    assert _train_flag(_model("fomaml", steps), jit_flags) is True
    recomputed = keras_reptile.algorithms.MAML(recompute_inner_steps=True)
    assert _train_flag(_model(recomputed, steps), jit_flags) is True
    assert _train_flag(_model("maml", 2), jit_flags) is True


def test_auto_avoids_xla_for_layers_that_do_not_support_it(jit_flags):
    class NoXla(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.supports_jit = False

        def call(self, x):
            return x

    assert _train_flag(_model(layers=[NoXla()]), jit_flags) is False


def test_run_eagerly_makes_no_compiled_step(jit_flags):
    model = _model()
    model.compile(optimizer="sgd", loss=SCCE, run_eagerly=True)
    jit_flags.clear()
    model.make_train_function(force=True)
    assert jit_flags == []


def test_saved_model_keeps_auto_and_resolves_it_again(tmp_path, jit_flags):
    model = _model()
    model.compile(optimizer="sgd", loss=SCCE)
    model.fit(_tasks(), steps_per_epoch=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    jit_flags.clear()
    loaded.make_train_function(force=True)
    assert jit_flags[0] is True


def test_loading_compiles_with_the_saved_settings(tmp_path):
    model = _model()
    model.compile(optimizer=keras.optimizers.SGD(0.25), loss=SCCE,
                  metrics=["accuracy"], jit_compile=False)
    model.fit(_tasks(), steps_per_epoch=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        loaded = keras.saving.load_model(path)
    assert loaded.compiled
    assert loaded.get_compile_config()["jit_compile"] is False
    assert float(loaded.optimizer.learning_rate) == 0.25
    np.testing.assert_allclose(
        loaded.evaluate(_tasks(seed=3), steps=2, verbose=0),
        model.evaluate(_tasks(seed=3), steps=2, verbose=0), rtol=1e-6)


class _NumpyProbe(keras.layers.Layer):
    """The identity through `tf.numpy_function`, which XLA cannot compile;
    Keras's `supports_jit` stays True, so only the compile fails."""

    def call(self, x):
        y = tf.numpy_function(lambda a: a, [x], x.dtype, stateful=False)
        return tf.ensure_shape(y, x.shape)


def test_auto_falls_back_to_the_graph_when_xla_cannot_compile_the_step():
    # The failed XLA attempt consumes one meta-batch; the run then equals a
    # run without XLA on the episodes after it.
    runs = {}
    for jit_compile, skip in (("auto", 0), (False, 1)):
        keras.utils.set_random_seed(2)
        model = _model(layers=[_NumpyProbe()])
        model.compile(optimizer="sgd", loss=SCCE, jit_compile=jit_compile)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model.fit(_tasks().skip(skip), steps_per_epoch=3, verbose=0)
        runs[jit_compile] = (model.model.get_weights(), int(model.optimizer.iterations),
                             [str(w.message) for w in caught
                              if "could not be compiled with XLA" in str(w.message)])
    (auto, auto_steps, auto_warnings), (plain, plain_steps, plain_warnings) = (
        runs["auto"], runs[False])
    assert auto_steps == plain_steps == 3
    assert len(auto_warnings) == 1 and "jit_compile=False" in auto_warnings[0]
    assert plain_warnings == []
    for a, b in zip(auto, plain):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_an_explicit_xla_request_that_cannot_compile_fails_loudly():
    model = _model(layers=[_NumpyProbe()])
    model.compile(optimizer="sgd", loss=SCCE, jit_compile=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="compile"):
        model.fit(_tasks(), steps_per_epoch=1, verbose=0)
