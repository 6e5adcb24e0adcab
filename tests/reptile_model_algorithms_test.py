"""ANIL and Meta-SGD through every public path of `ReptileModel`.

fit, evaluate, adapt, adapt_and_predict, the exported SavedModel, the
`.keras` round trip, exact resume with `BackupAndRestore` and Keras Tuner
over `algorithm`, each checked against a plain eager adaptation loop.
"""

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf

import keras_reptile
from keras_reptile import ReptileModel
from keras_reptile.callbacks import BackupAndRestore
from keras_reptile.tuning import ReptileHyperModel

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
INNER_LR = 0.1
EVAL_STEPS = 3
TOL = dict(rtol=1e-5, atol=1e-6)


def _data():
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(8, 6))
    y = np.repeat(np.arange(8), 6).astype("int32")
    x = (protos[y] + 0.5 * rng.normal(size=(48, 6))).astype("float32")
    return x, y


def _episodes(seed=0, query_shots=1):
    x, y = _data()
    return keras_reptile.episodes.from_arrays(
        x, y, ways=3, shots=2, query_shots=query_shots, meta_batch_size=2, seed=seed)


def _model(algorithm):
    keras.utils.set_random_seed(0)
    net = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="relu", name="body"),
        keras.layers.Dense(3, name="head"),
    ])
    model = ReptileModel(
        net, inner_optimizer=keras.optimizers.SGD(INNER_LR), inner_steps=2,
        inner_batch_size=3, eval_inner_steps=EVAL_STEPS, eval_inner_batch_size=3,
        algorithm=algorithm,
    )
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss=SCCE, metrics=["accuracy"])
    return model


def _rates(model):
    """Per weight, the inner loop's learning rates in a plain loop: Meta-SGD's
    learned ones; for ANIL the inner SGD's on the head and 0 on the body."""
    if model.algorithm == keras_reptile.algorithms.get("metasgd"):
        return [v.numpy() for v in model.trainable_variables if "meta_sgd_rate" in v.path]
    return [0.0, 0.0, INNER_LR, INNER_LR]


def _plain_adapt(weights, rates, sx, sy, steps=EVAL_STEPS, batch_size=3):
    """Plain eager inner loop: step t on rows (3t + j) mod S, w <- w - rate * grad."""
    w = [tf.constant(v) for v in weights]
    for t in range(steps):
        rows = [(t * batch_size + j) % len(sx) for j in range(batch_size)]
        with tf.GradientTape() as tape:
            tape.watch(w)
            logits = tf.nn.relu(sx[rows] @ w[0] + w[1]) @ w[2] + w[3]
            loss = SCCE(sy[rows], logits)
        w = [v - r * g for v, r, g in zip(w, rates, tape.gradient(loss, w))]
    return [v.numpy() for v in w]


def _plain_outputs(weights, x):
    return np.maximum(x @ weights[0] + weights[1], 0.0) @ weights[2] + weights[3]


@pytest.mark.parametrize("algorithm", ["anil", "metasgd"])
def test_fit_evaluate_adapt_export_and_keras_round_trip(algorithm, tmp_path):
    model = _model(algorithm)
    history = model.fit(_episodes(), steps_per_epoch=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    rates = _rates(model)
    if algorithm == "metasgd":
        # Learned: the checks below would not see a rate left at INNER_LR.
        assert min(np.abs(r - INNER_LR).max() for r in rates) > 1e-4
    theta = model.model.get_weights()

    x, y = _data()
    sx, sy, qx = x[[0, 6, 12, 1, 7, 13]], np.array([0, 1, 2] * 2, "int32"), x[[2, 8, 14]]
    expected = _plain_adapt(theta, rates, sx, sy)
    adapted = model.adapt(sx, sy)
    for got, want in zip(adapted.get_weights(), expected):
        np.testing.assert_allclose(got, want, **TOL)
    if algorithm == "anil":
        for got, want in zip(adapted.get_weights()[:2], theta[:2]):
            np.testing.assert_array_equal(got, want)  # the body is shared
    outputs = model.adapt_and_predict(sx, sy, qx)
    np.testing.assert_allclose(outputs, _plain_outputs(expected, qx), **TOL)

    # evaluate: the mean query loss of the plain loop's adapted weights.
    episode = next(iter(_episodes(seed=3, query_shots=2)))
    losses = []
    for b in range(2):
        weights = _plain_adapt(theta, rates, episode["support_x"][b].numpy(),
                               episode["support_y"][b].numpy())
        losses.append(SCCE(episode["query_y"][b],
                           _plain_outputs(weights, episode["query_x"][b].numpy())))
    logs = model.evaluate(tf.data.Dataset.from_tensors(episode), verbose=0, return_dict=True)
    np.testing.assert_allclose(logs["loss"], np.mean(losses), **TOL)
    np.testing.assert_array_equal(model.model.get_weights()[0], theta[0])

    # The served adaptation is the same, with the learned rates.
    served = tf.saved_model.load(model.export(str(tmp_path / "1"), verbose=False))
    np.testing.assert_allclose(served.adapt_and_predict(sx, sy, qx)["outputs"], outputs, **TOL)

    # .keras: the rates and the optimizer state come back; training goes on
    # identically.
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    assert loaded.algorithm == model.algorithm
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(loaded.adapt_and_predict(sx, sy, qx), outputs, **TOL)
    batch = next(iter(_episodes(seed=5)))
    model.train_on_batch(batch)
    loaded.train_on_batch(batch)
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(got, want, **TOL)


class _CrashAt(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == self.step:
            raise RuntimeError("simulated crash")


def _state(model):
    return model.get_weights() + [v.numpy() for v in model.optimizer.variables]


def test_backup_and_restore_resumes_meta_sgd_exactly(tmp_path):
    # A run that crashes after meta-step 5 (last backup after step 4) and is
    # resumed by a new model ends where an uninterrupted run does, the
    # learned rates and their Adam moments included.
    reference = _model("metasgd")
    reference.fit(_episodes(), epochs=2, steps_per_epoch=4, verbose=0, shuffle=False)

    backup_dir = str(tmp_path / "backup")
    backup = BackupAndRestore(backup_dir, save_freq=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _model("metasgd").fit(backup.resumable(_episodes()), epochs=2, steps_per_epoch=4,
                              verbose=0, shuffle=False, callbacks=[backup, _CrashAt(5)])
    resumed = _model("metasgd")
    backup = BackupAndRestore(backup_dir, save_freq=2)
    resumed.fit(backup.resumable(_episodes()), epochs=2, steps_per_epoch=4, verbose=0,
                shuffle=False, callbacks=[backup])
    for got, want in zip(_state(resumed), _state(reference)):
        np.testing.assert_array_equal(got, want)


def test_keras_tuner_searches_over_anil_and_meta_sgd(tmp_path):
    def backbone(hp):
        return keras.Sequential([
            keras.Input((6,)),
            keras.layers.Dense(hp.Choice("units", [4, 8]), activation="relu"),
            keras.layers.Dense(3),
        ])

    hypermodel = ReptileHyperModel(
        backbone, lambda meta_batch_size: _episodes(), meta_steps=4, inner_steps=2,
        inner_batch_size=[3], meta_batch_size=[2], eval_inner_steps=2,
        eval_inner_batch_size=3, algorithm=["anil", "metasgd"],
        inner_optimizer=keras.optimizers.SGD(INNER_LR),
    )
    tuner = keras_tuner.RandomSearch(
        hypermodel, objective=keras_tuner.Objective("val_accuracy", direction="max"),
        max_trials=4, seed=1, directory=str(tmp_path))
    tuner.search(epochs=2, steps_per_epoch=2, validation_data=_episodes(seed=1, query_shots=2),
                 validation_steps=1, verbose=0)
    seen = set()
    for trial in tuner.oracle.get_best_trials(4):
        values = trial.hyperparameters.values
        model = tuner.load_model(trial)
        assert model.algorithm == keras_reptile.algorithms.get(values["algorithm"])
        rates = [v for v in model.trainable_variables if "meta_sgd_rate" in v.path]
        assert len(rates) == (4 if values["algorithm"] == "metasgd" else 0)
        for rate in rates:  # the trial's trained rates were loaded
            assert np.abs(rate.numpy() - values["inner_learning_rate"]).max() > 1e-5
        seen.add(values["algorithm"])
    assert seen == {"anil", "metasgd"}
