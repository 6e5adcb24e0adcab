"""`ReptileHyperModel` with Keras Tuner's RandomSearch, BayesianOptimization, Hyperband."""

import importlib
import signal
import sys

import keras
import keras_tuner
import numpy as np
import pytest

import keras_reptile
from keras_reptile import ReptileModel
from keras_reptile.callbacks import GracefulShutdown
from keras_reptile.tuning import ReptileHyperModel

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
REPTILE_HPS = {
    "inner_learning_rate", "inner_steps", "inner_batch_size", "meta_step_size",
    "meta_step_size_schedule", "meta_batch_size", "algorithm", "head",
    "carry_inner_optimizer_state",
}


def _data():
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(8, 6))
    y = np.repeat(np.arange(8), 6).astype("int32")
    x = (protos[y] + 0.5 * rng.normal(size=(48, 6))).astype("float32")
    return x, y


def _train_episodes(meta_batch_size):
    x, y = _data()
    return keras_reptile.episodes.from_arrays(
        x, y, ways=3, shots=2, query_shots=1, meta_batch_size=meta_batch_size, seed=0
    )


def _val_episodes():
    x, y = _data()
    return keras_reptile.episodes.from_arrays(
        x, y, ways=3, shots=2, query_shots=2, meta_batch_size=2, seed=1
    )


def _backbone(hp):
    # The backbone's own hyperparameter, searched with Reptile's.
    return keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(hp.Choice("units", [4, 8]), activation="relu"),
            keras.layers.Dense(3),
        ]
    )


class _Recorder:
    """`make_train_episodes` that records the meta-batch sizes asked for."""

    def __init__(self):
        self.calls = []

    def __call__(self, meta_batch_size):
        self.calls.append(meta_batch_size)
        return _train_episodes(meta_batch_size)


def _hypermodel(make_train_episodes=None, **kwargs):
    options = dict(
        meta_steps=4,
        inner_steps=(1, 2),
        inner_batch_size=[3],
        meta_batch_size=[1, 2],
        eval_inner_steps=2,
        eval_inner_batch_size=3,
    )
    options.update(kwargs)
    return ReptileHyperModel(
        _backbone, make_train_episodes or _train_episodes, **options
    )


SEARCH = dict(
    epochs=2, steps_per_epoch=2, validation_data=_val_episodes(),
    validation_steps=1, verbose=0,
)


def _check_model_matches_hyperparameters(model, values, hypermodel):
    assert isinstance(model, ReptileModel)
    assert model.inner_steps == values["inner_steps"]
    assert model.inner_batch_size == values["inner_batch_size"]
    assert model.eval_inner_steps == hypermodel.eval_inner_steps
    assert model.eval_inner_batch_size == hypermodel.eval_inner_batch_size
    assert type(model.inner_optimizer) is keras.optimizers.Adam
    assert model.inner_optimizer.beta_1 == 0.0
    np.testing.assert_allclose(
        float(model.inner_optimizer.learning_rate), values["inner_learning_rate"],
        rtol=1e-6,
    )
    assert model.model.layers[0].units == values["units"]


def _check_outer_optimizer(model, values, meta_steps):
    lr = model.optimizer.get_config()["learning_rate"]
    if values["meta_step_size_schedule"] == "linear":
        assert lr["class_name"] == "PolynomialDecay"
        config = lr["config"]
        np.testing.assert_allclose(
            config["initial_learning_rate"], values["meta_step_size"], rtol=1e-6
        )
        assert (config["decay_steps"], config["end_learning_rate"], config["power"]) == (
            meta_steps, 0.0, 1.0
        )
    else:
        np.testing.assert_allclose(lr, values["meta_step_size"], rtol=1e-6)


# ----------------------------------------------------------------------------
# RandomSearch


@pytest.fixture(scope="module")
def random_search(tmp_path_factory):
    recorder = _Recorder()
    hypermodel = _hypermodel(recorder)
    tuner = keras_tuner.RandomSearch(
        hypermodel,
        objective=keras_tuner.Objective("val_accuracy", direction="max"),
        max_trials=2,
        seed=3,
        directory=str(tmp_path_factory.mktemp("random")),
    )
    tuner.search(**SEARCH)
    return tuner, hypermodel, recorder


def test_random_search_runs_trials_with_their_meta_batch_size(random_search):
    tuner, _, recorder = random_search
    trials = [tuner.oracle.trials[i] for i in sorted(tuner.oracle.trials)]
    assert [t.status for t in trials] == ["COMPLETED", "COMPLETED"]
    for trial in trials:
        values = trial.hyperparameters.values
        assert set(values) == REPTILE_HPS | {"units"}
        assert 1e-4 <= values["inner_learning_rate"] <= 1e-2
        assert values["inner_steps"] in (1, 2)
        assert values["meta_batch_size"] in (1, 2)
        assert values["meta_step_size_schedule"] in ("constant", "linear")
        # The objective: the best epoch's few-shot validation accuracy.
        history = trial.metrics.get_history("val_accuracy")
        assert trial.score == max(h.value[0] for h in history)
    # Each trial meta-trained on episodes with its own meta-batch size.
    assert recorder.calls == [t.hyperparameters["meta_batch_size"] for t in trials]


def test_random_search_best_model_adapts_and_evaluates(random_search):
    tuner, hypermodel, _ = random_search
    best_trial = tuner.oracle.get_best_trials(1)[0]
    assert best_trial.score == max(t.score for t in tuner.oracle.trials.values())
    best = tuner.get_best_models(1)[0]
    values = best_trial.hyperparameters.values
    _check_model_matches_hyperparameters(best, values, hypermodel)
    _check_outer_optimizer(best, values, meta_steps=4)
    # The checkpoint of the best epoch: evaluating it on the validation
    # episodes (Keras restarts them every epoch) gives the trial's score.
    _, accuracy = best.evaluate(_val_episodes(), steps=1, verbose=0)
    assert accuracy == pytest.approx(best_trial.score)
    task = next(iter(_val_episodes()))
    support_x, support_y = task["support_x"][0], task["support_y"][0]
    adapted = best.adapt(support_x, support_y)
    predictions = adapted.predict(task["query_x"][0], verbose=0)
    assert predictions.shape == (6, 3)
    np.testing.assert_allclose(
        best.adapt_and_predict(support_x, support_y, task["query_x"][0]),
        predictions, rtol=1e-5, atol=1e-6,
    )


# ----------------------------------------------------------------------------
# BayesianOptimization and Hyperband, with the tuner re-compiling the model


def test_bayesian_optimization_with_the_tuner_recompiling(tmp_path):
    pytest.importorskip("sklearn", reason="keras-tuner[bayesian] not installed")
    hypermodel = _hypermodel()
    tuner = keras_tuner.BayesianOptimization(
        hypermodel,
        objective="val_accuracy",
        max_trials=2,
        num_initial_points=1,
        seed=0,
        # The tuner re-compiles every model with these.
        optimizer=keras.optimizers.SGD(0.5),
        loss=SCCE,
        metrics=["accuracy"],
        directory=str(tmp_path),
    )
    tuner.search(**SEARCH)
    assert [t.status for t in tuner.oracle.trials.values()] == ["COMPLETED"] * 2
    best_trial = tuner.oracle.get_best_trials(1)[0]
    best = tuner.get_best_models(1)[0]
    # The meta-learning hyperparameters survived the re-compile...
    _check_model_matches_hyperparameters(best, best_trial.hyperparameters.values, hypermodel)
    # ...and ε is the tuner's.
    assert type(best.optimizer) is keras.optimizers.SGD
    np.testing.assert_allclose(float(best.optimizer.learning_rate), 0.5)
    _, accuracy = best.evaluate(_val_episodes(), steps=1, verbose=0)
    assert accuracy == pytest.approx(best_trial.score)


def test_hyperband_continues_trials_with_their_optimizer_state(tmp_path):
    hypermodel = _hypermodel(meta_steps=2)
    tuner = keras_tuner.Hyperband(
        hypermodel,
        objective="val_accuracy",
        max_epochs=2,
        factor=2,
        seed=0,
        loss=SCCE,  # Re-compiles with the model's optimizer and metrics.
        directory=str(tmp_path),
    )
    search = dict(SEARCH, steps_per_epoch=1)
    del search["epochs"]  # Hyperband sets `epochs` and `initial_epoch`.
    tuner.search(**search)
    trials = list(tuner.oracle.trials.values())
    assert all(t.status == "COMPLETED" for t in trials)
    continued = [t for t in trials if "tuner/trial_id" in t.hyperparameters.values]
    assert continued
    # A continued trial starts from its parent's checkpoint (one meta-step,
    # with its optimizer state and ε schedule position) and runs one more.
    model = tuner.load_model(continued[0])
    assert int(model.optimizer.iterations) == 2
    best = tuner.get_best_models(1)[0]
    assert isinstance(best, ReptileModel)
    _, accuracy = best.evaluate(_val_episodes(), steps=1, verbose=0)
    assert accuracy == pytest.approx(tuner.oracle.get_best_trials(1)[0].score)


# ----------------------------------------------------------------------------
# Interrupting a search


class _SignalAt(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == 1:
            signal.raise_signal(signal.SIGINT)


def test_signal_stops_the_search_without_recording_the_trial(tmp_path):
    shutdown = GracefulShutdown()
    tuner = keras_tuner.RandomSearch(
        _hypermodel(), objective="val_accuracy", max_trials=1, seed=0,
        directory=str(tmp_path), project_name="search",
    )
    with pytest.raises(keras_tuner.errors.FatalError, match="stopped by signal 2"):
        tuner.search(callbacks=[_SignalAt(), shutdown], **SEARCH)
    assert shutdown.received_signal == signal.SIGINT
    assert [t.status for t in tuner.oracle.trials.values()] == ["RUNNING"]
    # Running the search again reruns the stopped trial, to completion.
    tuner = keras_tuner.RandomSearch(
        _hypermodel(), objective="val_accuracy", max_trials=1, seed=0,
        directory=str(tmp_path), project_name="search",
    )
    tuner.search(callbacks=[GracefulShutdown()], **SEARCH)
    assert [t.status for t in tuner.oracle.trials.values()] == ["COMPLETED"]


# ----------------------------------------------------------------------------
# Search space and arguments


def test_build_declares_the_search_space_with_defaults():
    hypermodel = ReptileHyperModel(
        _backbone, _train_episodes, meta_steps=100, meta_step_size=0.5
    )
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)
    kinds = {p.name: type(p).__name__ for p in hp.space}
    space = {p.name: p.get_config() for p in hp.space}
    assert set(space) == REPTILE_HPS | {"units"}
    assert kinds == {
        "inner_learning_rate": "Float", "inner_steps": "Int",
        "inner_batch_size": "Choice", "meta_step_size": "Fixed",
        "meta_step_size_schedule": "Choice", "meta_batch_size": "Choice",
        "units": "Choice", "algorithm": "Fixed", "head": "Fixed",
        "carry_inner_optimizer_state": "Fixed",
    }
    assert (
        space["inner_learning_rate"]["min_value"],
        space["inner_learning_rate"]["max_value"],
        space["inner_learning_rate"]["sampling"],
    ) == (1e-4, 1e-2, "log")
    assert (space["inner_steps"]["min_value"], space["inner_steps"]["max_value"]) == (1, 10)
    assert space["inner_batch_size"]["values"] == [5, 10, 20]
    assert space["meta_step_size_schedule"]["values"] == ["constant", "linear"]
    assert space["meta_batch_size"]["values"] == [1, 2, 5, 10]
    assert space["meta_step_size"]["value"] == 0.5  # A single value: fixed.
    # The model is built from the hyperparameters' current values, with an
    # outer optimizer already built for loading checkpoints.
    values = hp.values
    _check_model_matches_hyperparameters(model, values, hypermodel)
    _check_outer_optimizer(model, values, meta_steps=100)
    assert model.optimizer.built
    assert (model.eval_inner_steps, model.eval_inner_batch_size) == (50, 10)
    assert model.get_compile_config()["metrics"] == ["accuracy"]


def test_linear_schedule_decays_epsilon_to_zero_over_meta_steps():
    hypermodel = _hypermodel(meta_step_size=0.8, meta_step_size_schedule="linear")
    model = hypermodel.build(keras_tuner.HyperParameters())
    schedule = keras.optimizers.schedules.deserialize(
        model.optimizer.get_config()["learning_rate"]
    )
    np.testing.assert_allclose(
        [float(schedule(step)) for step in (0, 1, 2, 4, 6)],
        [0.8, 0.6, 0.4, 0.0, 0.0], atol=1e-7,
    )


def test_fit_rejects_bad_arguments_before_training():
    hypermodel = _hypermodel(meta_step_size_schedule="linear")
    hp = keras_tuner.HyperParameters()
    model = hypermodel.build(hp)
    valid = dict(SEARCH)
    with pytest.raises(ValueError, match="do not pass training data"):
        hypermodel.fit(hp, model, _train_episodes(1), **valid)
    with pytest.raises(ValueError, match="Expected `steps_per_epoch`"):
        hypermodel.fit(hp, model, **dict(valid, steps_per_epoch=None))
    with pytest.raises(ValueError, match="Expected `validation_data`"):
        hypermodel.fit(hp, model, **dict(valid, validation_data=None))
    with pytest.raises(ValueError, match="Expected at most `meta_steps` meta-steps"):
        hypermodel.fit(hp, model, **dict(valid, epochs=3))
    ignoring = _hypermodel(lambda meta_batch_size: _train_episodes(3))
    with pytest.raises(ValueError, match="to return 1 tasks per element"):
        ignoring.fit(hp, model, **valid)
    not_episodes = _hypermodel(lambda meta_batch_size: [1, 2])
    with pytest.raises(TypeError, match="to return an episodic `tf.data.Dataset`"):
        not_episodes.fit(hp, model, **valid)
    assert int(model.optimizer.iterations) == 0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(inner_learning_rate=(1e-2, 1e-4)), ValueError,
         "Expected `inner_learning_rate` to be a positive number, a `\\(min, max\\)`"),
        (dict(inner_steps=(0, 3)), ValueError, "Expected `inner_steps` to be a positive integer"),
        (dict(inner_steps=2.5), ValueError, "Received: inner_steps=2.5"),
        (dict(inner_batch_size=[]), ValueError, "Expected `inner_batch_size`"),
        (dict(meta_step_size=-1.0), ValueError, "Expected `meta_step_size`"),
        (dict(meta_step_size_schedule="cosine"), ValueError,
         "Expected `meta_step_size_schedule` to be one of \\['constant', 'linear'\\]"),
        (dict(meta_batch_size=[1, 2.5]), ValueError, "Expected `meta_batch_size`"),
        (dict(meta_steps=None), ValueError, "Expected `meta_steps`"),
        (dict(meta_steps=0), ValueError, "Expected `meta_steps` to be a positive integer"),
        (dict(eval_inner_steps=0), ValueError, "Expected `eval_inner_steps`"),
        (dict(inner_optimizer=keras.optimizers.Ftrl()), TypeError,
         "Expected `inner_optimizer` to be one of"),
        (dict(transductive="yes"), TypeError, "Expected `transductive` to be a bool"),
        (dict(algorithm="sgd"), ValueError,
         "Expected `algorithm` to be one of \\['anil', 'fomaml', 'maml', 'metasgd', 'reptile'\\]"),
        (dict(algorithm=("reptile", "maml")), ValueError, "a list of them"),
        (dict(head=["none", "learned"]), ValueError, "Expected `head` to be one of"),
        (dict(carry_inner_optimizer_state="yes"), ValueError,
         "Expected `carry_inner_optimizer_state` to be a bool"),
    ],
)
def test_constructor_rejects_bad_search_spaces(kwargs, error, message):
    with pytest.raises(error, match=message):
        _hypermodel(**kwargs)


def test_search_over_algorithm_head_and_carried_state(tmp_path):
    hypermodel = _hypermodel(
        algorithm=["reptile", "fomaml", "maml"], head=["none", "prototype"],
        carry_inner_optimizer_state=[False, True])
    tuner = keras_tuner.RandomSearch(
        hypermodel, objective=keras_tuner.Objective("val_accuracy", direction="max"),
        max_trials=4, seed=1, directory=str(tmp_path))
    tuner.search(**SEARCH)
    trials = tuner.oracle.get_best_trials(4)
    assert len(trials) == 4
    seen = set()
    for trial in trials:
        values = trial.hyperparameters.values
        model = tuner.load_model(trial)
        assert model.algorithm == keras_reptile.algorithms.get(values["algorithm"])
        assert (model.head is None) == (values["head"] == "none")
        assert model.carry_inner_optimizer_state == values["carry_inner_optimizer_state"]
        assert np.isfinite(trial.metrics.get_best_value("val_accuracy"))
        seen.add((values["algorithm"], values["head"]))
    assert len(seen) > 1  # the search really varied them


def test_constructor_accepts_constant_only_schedule_without_meta_steps():
    hypermodel = _hypermodel(meta_steps=None, meta_step_size_schedule="constant")
    model = hypermodel.build(keras_tuner.HyperParameters())
    assert type(model.optimizer) is keras.optimizers.SGD


def test_build_rejects_a_backbone_that_is_not_a_model():
    hypermodel = ReptileHyperModel(lambda hp: "conv4", _train_episodes, meta_steps=4)
    with pytest.raises(TypeError, match="Expected `build_backbone\\(hp\\)` to return"):
        hypermodel.build(keras_tuner.HyperParameters())
    with pytest.raises(TypeError, match="Expected `make_train_episodes` to be callable"):
        ReptileHyperModel(_backbone, None, meta_steps=4)


@pytest.mark.parametrize("missing", ["keras_tuner", "tensorboard"])
def test_missing_optional_dependency_is_a_clear_import_error(monkeypatch, missing):
    # `None` in `sys.modules` makes an import fail, as when not installed;
    # loaded submodules would otherwise still be found there.
    for name in list(sys.modules):
        if name == missing or name.startswith(missing + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, missing, None)
    monkeypatch.delitem(sys.modules, "keras_reptile.tuning")
    with pytest.raises(ImportError, match="pip install keras-reptile\\[tuning\\]"):
        importlib.import_module("keras_reptile.tuning")
