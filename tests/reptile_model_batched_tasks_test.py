"""`ReptileModel(batched_tasks=...)`: evaluation's tasks in one computation.

Every comparison is against the same model evaluated task by task
(`batched_tasks=False`, the path the rest of the suite checks against
reference loops).
"""

import keras
import numpy as np
import pytest

import keras_reptile
from keras_reptile import ReptileModel
from keras_reptile import batched_tasks

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


@pytest.fixture
def batched_calls(monkeypatch):
    """Counts traces of the batched inner loop."""
    calls = []
    original = batched_tasks.adapt

    def counting(*args, **kwargs):
        calls.append(args[3].shape[0])  # the tasks of the call
        return original(*args, **kwargs)

    monkeypatch.setattr(batched_tasks, "adapt", counting)
    return calls


def _tasks(ways=3, shots=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((60, 10, 10, 1)).astype("float32")
    y = np.repeat(np.arange(6), 10)
    return keras_reptile.episodes.from_arrays(
        x, y, ways=ways, shots=shots, query_shots=2, meta_batch_size=3, seed=seed)


def _model(batched="auto", net=None, **kwargs):
    keras.utils.set_random_seed(0)
    net = net or keras_reptile.models.conv4((10, 10, 1), num_classes=3, filters=4,
                                            num_blocks=2)
    kwargs = dict(dict(inner_steps=2, inner_batch_size=3, eval_inner_steps=12,
                       eval_inner_batch_size=3), **kwargs)
    model = ReptileModel(net, batched_tasks=batched, **kwargs)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=SCCE, metrics=["accuracy"],
                  jit_compile=False)
    return model


@pytest.mark.parametrize("options", [
    dict(),
    dict(transductive=True),
    dict(head="prototype"),
    dict(carry_inner_optimizer_state=True),
])
def test_evaluate_and_predict_match_the_per_task_path(options, batched_calls):
    results, outputs = {}, {}
    for batched in ("auto", False):
        model = _model(batched, **options)
        model.fit(_tasks(seed=1), steps_per_epoch=2, verbose=0)
        results[batched] = model.evaluate(_tasks(), steps=2, verbose=0, return_dict=True)
        outputs[batched] = model.predict(_tasks().take(2), verbose=0)
    # Traced once each for evaluate and predict, with the 3 tasks of a
    # meta-batch; never by `fit`'s meta-steps or by the per-task model.
    assert batched_calls == [3, 3]
    np.testing.assert_allclose(outputs["auto"], outputs[False], atol=2e-4)
    assert results["auto"]["accuracy"] == results[False]["accuracy"]
    np.testing.assert_allclose(results["auto"]["loss"], results[False]["loss"], atol=1e-4)


def test_few_shot_accuracy_and_validation_use_it(batched_calls):
    model = _model()
    model.fit(_tasks(seed=1), steps_per_epoch=1, validation_data=_tasks(),
              validation_steps=1, verbose=0)
    assert batched_calls == [3]
    reference = _model(False)
    reference.fit(_tasks(seed=1), steps_per_epoch=1, verbose=0)
    accuracy = keras_reptile.evaluation.few_shot_accuracy(model, _tasks(), num_tasks=6)
    expected = keras_reptile.evaluation.few_shot_accuracy(reference, _tasks(), num_tasks=6)
    np.testing.assert_array_equal(accuracy.per_task, expected.per_task)


def test_auto_adapts_task_by_task_where_batching_does_not_apply(batched_calls):
    # A Dropout layer draws per task from a seed threaded through the tasks.
    net = keras.Sequential([
        keras.Input((10, 10, 1)), keras.layers.Flatten(), keras.layers.Dropout(0.1),
        keras.layers.Dense(3)])
    model = _model(net=net)
    model.evaluate(_tasks(), steps=1, verbose=0)
    assert batched_calls == []
    # Under XLA, whose grouped convolutions are slow on CPU.
    xla = _model()
    xla.compile(optimizer="sgd", loss=SCCE, metrics=["accuracy"], jit_compile=True)
    xla.evaluate(_tasks(), steps=1, verbose=0)
    assert batched_calls == []
    # The same conv4 without XLA is batched; with False it never is.
    _model(False).evaluate(_tasks(), steps=1, verbose=0)
    assert batched_calls == []
    _model().evaluate(_tasks(), steps=1, verbose=0)
    assert batched_calls == [3]


def test_true_refuses_a_model_it_cannot_batch_before_any_work():
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, kernel_regularizer="l2")])
    with pytest.raises(ValueError, match=(
            r"with `batched_tasks=True`, but layer 'dense\w*' \(Dense\) has a kernel "
            "regularizer. Pass `batched_tasks=\"auto\"`")):
        ReptileModel(net, batched_tasks=True)
    # An unbuilt model is checked when evaluation first traces.
    unbuilt = keras.Sequential([keras.layers.Dropout(0.1), keras.layers.Dense(3)])
    model = ReptileModel(unbuilt, batched_tasks=True, eval_inner_steps=1, inner_batch_size=2)
    model.compile(optimizer="sgd", loss=SCCE)
    rng = np.random.default_rng(0)
    tasks = keras_reptile.episodes.from_arrays(
        rng.random((20, 4)).astype("float32"), np.repeat(np.arange(4), 5), ways=2,
        shots=1, query_shots=1, meta_batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"\(Dropout\) is not one of the layers batched"):
        model.evaluate(tasks, steps=1, verbose=0)


def test_invalid_value_is_refused():
    with pytest.raises(ValueError, match=(
            'Expected `batched_tasks` to be "auto", True or False. '
            "Received: batched_tasks='yes'")):
        _model("yes")


def test_setting_survives_keras_save_and_load(tmp_path):
    model = _model(True)
    model.fit(_tasks(seed=1), steps_per_epoch=1, verbose=0)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.batched_tasks is True
    np.testing.assert_allclose(
        loaded.predict(_tasks().take(1), verbose=0),
        model.predict(_tasks().take(1), verbose=0), atol=1e-5)


def test_graph_and_eager_evaluation_agree(batched_calls):
    graph = _model()
    eager = _model()
    eager.compile(optimizer=keras.optimizers.SGD(0.5), loss=SCCE, metrics=["accuracy"],
                  run_eagerly=True)
    results = [m.evaluate(_tasks(), steps=1, verbose=0, return_dict=True)
               for m in (graph, eager)]
    # Both batched: traced once by the graph, called once by the eager step.
    assert batched_calls == [3, 3]
    np.testing.assert_allclose(results[0]["loss"], results[1]["loss"], atol=1e-5)
