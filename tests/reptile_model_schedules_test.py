"""The outer step size ε: `ReduceLROnPlateau`, learning-rate schedules."""

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


# y_hat = w x, loss (w x - y)^2 on one row per step (grad 2x(wx - y)), inner
# SGD lr 0.1, 2 inner steps over rows 0, 1, from any meta-weight w:
# Task A, rows (1, 3), (2, 2):
#   step 0: w1 = w - 0.2 (w - 3) = 0.8 w + 0.6
#   step 1: w2 = w1 - 0.4 (2 w1 - 2) = 0.2 w1 + 0.8 = 0.16 w + 0.92
# Task B, rows (1, 0), (1, 1):
#   step 0: w1 = w - 0.2 w = 0.8 w
#   step 1: w2 = w1 - 0.2 (w1 - 1) = 0.8 w1 + 0.2 = 0.64 w + 0.2
# mean phi = 0.4 w + 0.56, so a Reptile step with outer SGD(eps) is
#   w <- w + eps (mean phi - w) = w + eps (0.56 - 0.6 w).
# (At w = 1 and eps = 0.5: 0.98, the step of reptile_model_test.py.)
def _reptile_steps(w, epsilons):
    for eps in epsilons:
        w = w + eps * (0.56 - 0.6 * w)
    return w


def _scalar_reptile(net, **kwargs):
    return ReptileModel(
        net,
        inner_optimizer=keras.optimizers.SGD(0.1),
        inner_steps=2,
        inner_batch_size=1,
        eval_inner_steps=1,
        eval_inner_batch_size=1,
        **kwargs,
    )


def _validation_episode():
    # One few-shot validation task: support (1, 1), query (1, 1). Adapting w
    # one SGD step on (1, 1) gives 0.8 w + 0.2, which stays near 1 (w moves
    # in [0.93, 1]), above the 0.5 threshold: the query (label 1) is always
    # right, so val_accuracy is 1.0 every epoch and has stopped improving
    # after the first.
    one = np.ones((1, 1, 1), "float32")
    return {"support_x": one, "support_y": one[..., 0], "query_x": one,
            "query_y": one[..., 0]}


class _EpochStart(keras.callbacks.Callback):
    """Records (ε, w) at the start of every epoch."""

    def __init__(self):
        super().__init__()
        self.records = []

    def on_epoch_begin(self, epoch, logs=None):
        self.records.append((
            float(self.model.optimizer.learning_rate),
            float(self.model.model.get_weights()[0][0, 0]),
        ))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_reduce_lr_on_plateau_reduces_epsilon_and_later_steps_use_it(mode, hand_episode, scalar_model):
    model = _scalar_reptile(scalar_model(1.0))
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss="mse",
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy")],
        **MODES[mode],
    )
    before = float(model.optimizer.learning_rate)
    start = _EpochStart()
    # patience=1: val_accuracy (1.0 throughout, see above) sets the best at
    # the end of epoch 0 and fails to improve at the end of every later one,
    # so ε is halved after epochs 1, 2 and 3.
    plateau = keras.callbacks.ReduceLROnPlateau(
        monitor="val_accuracy", mode="max", factor=0.5, patience=1
    )
    steps_per_epoch = 2
    history = model.fit(
        tf.data.Dataset.from_tensors(hand_episode).repeat(),
        steps_per_epoch=steps_per_epoch,
        epochs=4,
        validation_data=tf.data.Dataset.from_tensors(_validation_episode()),
        callbacks=[start, plateau],
        verbose=0,
    )
    assert history.history["val_accuracy"] == [1.0] * 4
    np.testing.assert_allclose(before, 0.5)
    np.testing.assert_allclose(float(model.optimizer.learning_rate), 0.0625)
    epsilons = [0.5, 0.5, 0.25, 0.125]  # ε during each epoch
    np.testing.assert_allclose([lr for lr, _ in start.records], epsilons)
    # Keras logs the ε each epoch ran with, before reducing it.
    np.testing.assert_allclose(history.history["learning_rate"], epsilons)

    # The meta-weights after each epoch follow the hand-computed steps with
    # the reduced ε, from the first meta-step after each reduction on.
    w, expected = 1.0, []
    for eps in epsilons:
        expected.append(w)
        w = _reptile_steps(w, [eps] * steps_per_epoch)
    np.testing.assert_allclose([w for _, w in start.records], expected, rtol=1e-6)
    np.testing.assert_allclose(model.model.get_weights()[0][0, 0], w, rtol=1e-6)
    # A step that kept the old ε would land measurably elsewhere.
    stale = _reptile_steps(expected[2], [0.5] * steps_per_epoch)
    assert abs(stale - expected[3]) > 1e-3


def _classification_episodes(seed, meta_batch_size):
    rng = np.random.default_rng(0)
    prototypes = rng.normal(size=(8, 6))
    y = np.repeat(np.arange(8), 6)
    x = (prototypes[y] + 0.8 * rng.normal(size=(len(y), 6))).astype("float32")
    return keras_reptile.episodes.from_arrays(
        x, y, ways=3, shots=1, query_shots=2,
        meta_batch_size=meta_batch_size, seed=seed,
    )


def test_reduce_lr_on_plateau_follows_few_shot_val_accuracy_of_a_classifier():
    # The README recipe: 3-way 1-shot classification, val_accuracy after
    # adaptation on the same validation episodes every epoch.
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(3),
    ])
    model = ReptileModel(
        backbone, inner_optimizer=keras.optimizers.SGD(0.1),
        inner_steps=3, inner_batch_size=3, eval_inner_steps=5,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    validation = _classification_episodes(seed=1, meta_batch_size=4).take(2).cache()
    history = model.fit(
        _classification_episodes(seed=0, meta_batch_size=2),
        steps_per_epoch=5,
        epochs=4,
        validation_data=validation,
        callbacks=[keras.callbacks.ReduceLROnPlateau(
            monitor="val_accuracy", mode="max", factor=0.5, patience=1,
            min_delta=1e-4,
        )],
        verbose=0,
    ).history
    # With patience 1 and no cooldown, ε halves after exactly the epochs
    # whose val_accuracy does not beat the best so far by min_delta.
    epsilon, best, expected = 1.0, -np.inf, []
    for accuracy in history["val_accuracy"]:
        expected.append(epsilon)
        if accuracy > best + 1e-4:
            best = accuracy
        else:
            epsilon *= 0.5
    np.testing.assert_allclose(history["learning_rate"], expected)
    np.testing.assert_allclose(float(model.optimizer.learning_rate), epsilon)
    assert epsilon < 1.0, history  # the run did plateau (deterministic seeds)


def test_reduce_lr_on_plateau_with_a_schedule_is_an_error_before_any_step(hand_episode, scalar_model):
    # Keras's ReduceLROnPlateau sets `optimizer.learning_rate`, which a
    # `LearningRateSchedule` does not allow; Keras itself would raise a
    # TypeError only at the first reduction (here after 2 epochs).
    model = _scalar_reptile(scalar_model(1.0))
    model.compile(
        optimizer=keras.optimizers.SGD(
            keras.optimizers.schedules.PolynomialDecay(0.5, 100, 0.0)
        ),
        loss="mse",
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy")],
    )
    with pytest.raises(ValueError, match="cannot lower a learning-rate schedule"):
        model.fit(
            tf.data.Dataset.from_tensors(hand_episode).repeat(),
            steps_per_epoch=2,
            epochs=4,
            validation_data=tf.data.Dataset.from_tensors(_validation_episode()),
            callbacks=[keras.callbacks.ReduceLROnPlateau(
                monitor="val_accuracy", mode="max", patience=1)],
            verbose=0,
        )
    assert int(model.optimizer.iterations.numpy()) == 0


@pytest.mark.parametrize("mode", sorted(MODES))
def test_schedule_sets_epsilon_of_every_meta_step(mode, hand_episode, scalar_model):
    # PolynomialDecay(0.5, 4, 0): eps_k = 0.5 (1 - k / 4) at iteration k,
    # i.e. 0.5, 0.375, 0.25, 0.125, then 0 (the weights stop moving).
    model = _scalar_reptile(scalar_model(1.0))
    model.compile(
        optimizer=keras.optimizers.SGD(
            keras.optimizers.schedules.PolynomialDecay(0.5, 4, 0.0)
        ),
        loss="mse",
        **MODES[mode],
    )
    start = _EpochStart()
    model.fit(
        tf.data.Dataset.from_tensors(hand_episode).repeat(),
        steps_per_epoch=2, epochs=3, callbacks=[start], verbose=0,
    )
    epsilons = [0.5, 0.375, 0.25, 0.125, 0.0, 0.0]
    expected = [_reptile_steps(1.0, epsilons[:k]) for k in (0, 2, 4)]
    np.testing.assert_allclose([w for _, w in start.records], expected, rtol=1e-6)
    np.testing.assert_allclose([lr for lr, _ in start.records], [0.5, 0.25, 0.0], atol=1e-7)
    np.testing.assert_allclose(
        model.model.get_weights()[0][0, 0], _reptile_steps(1.0, epsilons), rtol=1e-6
    )
