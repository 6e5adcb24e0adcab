"""A non-finite meta-step is never applied (issue #13, item 3).

Each test records the model's variables after every finished meta-step and
checks that after the failing step they are exactly those after the step
before it: meta-weights, BatchNorm statistics, carried inner-optimizer state
and the outer optimizer's slots and iteration count.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_reptile
from keras_reptile import ReptileModel

MODES = {
    "eager": dict(run_eagerly=True),
    "graph": dict(run_eagerly=False, jit_compile=False),
    "xla": dict(run_eagerly=False, jit_compile=True),
}
SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _model(mode, inner_lr=0.1, **kwargs):
    keras.utils.set_random_seed(0)
    net = keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(6),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
        keras.layers.Dense(3),
    ])
    model = ReptileModel(
        net,
        inner_optimizer=keras.optimizers.Adam(inner_lr),
        inner_steps=2,
        inner_batch_size=3,
        carry_inner_optimizer_state=True,
        **kwargs,
    )
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=SCCE, **MODES[mode])
    return model


def _episode(rng, nan=False):
    support_x = rng.normal(size=(2, 6, 4)).astype("float32")
    if nan:
        support_x[1, 4, 2] = np.nan
    return {
        "support_x": support_x,
        "support_y": np.tile(np.array([0, 1, 2, 0, 1, 2], "int32"), (2, 1)),
        "query_x": rng.normal(size=(2, 3, 4)).astype("float32"),
        "query_y": np.tile(np.array([0, 1, 2], "int32"), (2, 1)),
    }


def _episodes(nan_at=None, steps=8):
    """Finite episodes, except the support set of meta-step `nan_at` (1-based)."""
    rng = np.random.default_rng(0)
    episodes = [_episode(rng, nan=(i + 1 == nan_at)) for i in range(steps)]
    spec = {k: tf.TensorSpec(v.shape, v.dtype) for k, v in episodes[0].items()}
    return tf.data.Dataset.from_generator(lambda: iter(episodes), output_signature=spec)


def _state(model):
    return [v.numpy().copy() for v in list(model.weights) + list(model.optimizer.variables)]


class _Recorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.after_step = []

    def on_train_batch_end(self, batch, logs=None):
        self.after_step.append(_state(self.model))


def _assert_equal(state, expected):
    assert len(state) == len(expected)
    for got, want in zip(state, expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_nan_in_step_4_keeps_the_state_after_step_3(mode):
    model = _model(mode)
    recorder = _Recorder()
    with pytest.raises(FloatingPointError, match=r"Meta-step 4 made .* after meta-step 3"):
        model.fit(_episodes(nan_at=4), epochs=1, steps_per_epoch=6,
                  callbacks=[recorder], verbose=0)
    # Steps 1-3 finished; step 4 never reached the callbacks.
    assert len(recorder.after_step) == 3
    _assert_equal(_state(model), recorder.after_step[-1])
    assert int(model.optimizer.iterations.numpy()) == 3
    assert all(np.isfinite(w).all() for w in _state(model))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_diverging_inner_loop_on_the_first_step_keeps_the_initial_weights(mode):
    # Adam's steps are ~lr per coordinate, so lr=1e38 overflows float32
    # within the two inner steps.
    model = _model(mode, inner_lr=1e38)
    before = [v.numpy() for v in model.weights]
    recorder = _Recorder()
    with pytest.raises(FloatingPointError, match="Meta-step 1 made"):
        model.fit(_episodes(), epochs=1, steps_per_epoch=3, callbacks=[recorder], verbose=0)
    assert recorder.after_step == []
    _assert_equal([v.numpy() for v in model.weights], before)
    assert int(model.optimizer.iterations.numpy()) == 0


def test_training_goes_on_after_the_cause_is_fixed():
    model = _model("graph")
    with pytest.raises(FloatingPointError):
        model.fit(_episodes(nan_at=2), epochs=1, steps_per_epoch=4, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 1
    model.fit(_episodes(), epochs=1, steps_per_epoch=3, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 4
    # The refused step left no trace: the state is exactly that of a run that
    # never met the NaN (the same first episode, then the same three), every
    # weight, carried inner moment and outer Adam slot included.
    uninterrupted = _model("graph")
    uninterrupted.fit(_episodes(), epochs=1, steps_per_epoch=1, verbose=0)
    uninterrupted.fit(_episodes(), epochs=1, steps_per_epoch=3, verbose=0)
    _assert_equal(_state(model), _state(uninterrupted))


def test_train_on_batch_is_guarded_too():
    model = _model("graph")
    good, bad = list(_episodes(nan_at=2).take(2))
    model.train_on_batch(good)
    after_one = _state(model)
    with pytest.raises(FloatingPointError, match="Meta-step 2 made"):
        model.train_on_batch(bad)
    _assert_equal(_state(model), after_one)


def test_the_latest_backup_is_kept_and_holds_the_last_finite_step(tmp_path):
    backup_dir = str(tmp_path / "backup")
    model = _model("graph")
    recorder = _Recorder()
    backup = keras_reptile.callbacks.BackupAndRestore(backup_dir, save_freq=1)
    with pytest.raises(FloatingPointError, match="Meta-step 3 made"):
        model.fit(_episodes(nan_at=3), epochs=1, steps_per_epoch=5,
                  callbacks=[recorder, backup], verbose=0)
    assert os.path.isdir(backup_dir)
    # A new process resuming from the backup starts from the state after
    # step 2 and carries on at iteration 2.
    resumed = _model("graph")
    seen = []

    class FirstBatch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if not seen:
                seen.append(_state(self.model))

    resumed.fit(_episodes(), epochs=1, steps_per_epoch=5, verbose=0, callbacks=[
        keras_reptile.callbacks.BackupAndRestore(backup_dir, save_freq=1), FirstBatch()])
    _assert_equal(seen[0][: len(recorder.after_step[-1])], recorder.after_step[-1])


def test_values_that_were_never_finite_are_not_blamed():
    class Masked(keras.layers.Layer):
        def build(self, input_shape):
            # A constant -inf (a mask, say) that no step changes.
            self.mask = self.add_weight(shape=(), initializer="zeros", trainable=False)
            self.mask.assign(-np.inf)

        def call(self, x):
            return x

    def trained(net):
        model = ReptileModel(net, inner_steps=1, inner_batch_size=3)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=SCCE)
        model.fit(_episodes(), epochs=1, steps_per_epoch=3, verbose=0)
        assert int(model.optimizer.iterations.numpy()) == 3
        return net.get_layer("dense").get_weights()

    keras.utils.set_random_seed(0)
    net = keras.Sequential([keras.Input((4,)), Masked(), keras.layers.Dense(3, name="dense")])
    plain = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="dense")])
    plain.set_weights(net.get_layer("dense").get_weights())
    # All three steps applied, as without the (identity) masked layer.
    for got, want in zip(trained(net), trained(plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert net.get_layer(index=0).mask.numpy() == -np.inf


def test_the_message_names_what_an_undone_step_keeps():
    from keras_reptile._finite_guard import kept_description

    assert kept_description(False, False) == (
        "The meta-weights and the outer optimizer's state")
    assert kept_description(True, True) == (
        "The meta-weights, the outer optimizer's state, the non-trainable state "
        "(e.g. BatchNorm statistics) and the carried inner-optimizer state")
