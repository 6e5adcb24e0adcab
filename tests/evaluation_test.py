"""Few-shot accuracy with confidence intervals."""

import keras
import numpy as np
import pytest

import keras_reptile
from keras_reptile import evaluation


def test_confidence_interval_matches_hand_computation():
    # Accuracies 1, 0.5, 0.5, 0: mean 0.5; sample std = sqrt(0.5/3) = 0.40825;
    # 1.96 * 0.40825 / sqrt(4) = 0.40008.
    result = evaluation.confidence_interval([1.0, 0.5, 0.5, 0.0])
    assert result.mean == pytest.approx(0.5)
    assert result.ci95 == pytest.approx(0.400083, rel=1e-5)
    assert result.num_tasks == 4
    assert "50.00% ± 40.01%" in str(result)
    assert evaluation.confidence_interval([0.8]).ci95 == 0.0
    with pytest.raises(ValueError, match="at least one task"):
        evaluation.confidence_interval([])


def _model_and_tasks(transductive=False):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(6, 8, 8, 1))
    y = np.repeat(np.arange(6), 10)
    x = (protos[y] + 0.8 * rng.normal(size=(60, 8, 8, 1))).astype("float32")
    model = keras_reptile.ReptileModel(
        keras_reptile.models.conv4((8, 8, 1), 3, filters=4, num_blocks=2),
        inner_optimizer=keras.optimizers.SGD(0.1),
        eval_inner_steps=4, eval_inner_batch_size=3, transductive=transductive,
    )
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    tasks = keras_reptile.episodes.from_arrays(
        x, y, ways=3, shots=1, query_shots=3, meta_batch_size=4, seed=3
    )
    return model, tasks


def _plain_accuracies(plain, model, tasks, num_batches, transductive):
    """Per-task query accuracy from a plain loop: 4 real SGD(0.1) steps on the
    3 support rows, then the query outputs with the support set's
    BatchNormalization moments, or (transductive) the query batch's own."""
    scce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    accuracies = []
    for batch in tasks.take(num_batches):
        for sx, sy, qx, qy in zip(*(batch[k].numpy() for k in
                                    ("support_x", "support_y", "query_x", "query_y"))):
            adapted = plain.adapt(model.model, sx, sy, 4, 3,
                                  lambda: keras.optimizers.SGD(0.1), scce)
            if transductive:
                outputs = adapted(qx, training=True).numpy()
            else:
                outputs = plain.query_outputs(adapted, sx, qx)
            accuracies.append(np.mean(outputs.argmax(-1) == qy))
    return np.array(accuracies)


@pytest.mark.parametrize("transductive", [False, True])
def test_accuracies_match_a_plain_loop_and_the_interval_its_formula(transductive, plain):
    model, tasks = _model_and_tasks(transductive)
    result = evaluation.few_shot_accuracy(model, tasks, num_tasks=8)
    expected = _plain_accuracies(plain, model, tasks, 2, transductive)
    assert result.num_tasks == 8
    # 9 queries per task: accuracies are multiples of 1/9.
    np.testing.assert_allclose(result.per_task, expected, rtol=0, atol=1e-6)
    assert result.mean == pytest.approx(expected.mean(), abs=1e-6)
    # 95% interval: 1.96 sample standard deviations over sqrt(8).
    assert result.ci95 == pytest.approx(1.96 * expected.std(ddof=1) / np.sqrt(8), rel=1e-6)
    # `evaluate` on the same 2 meta-batches reports the same mean.
    _, accuracy = model.evaluate(tasks, steps=2, verbose=0)
    assert accuracy == pytest.approx(expected.mean(), abs=1e-6)
    # Not all tasks alike, so the comparison is not trivial.
    assert len(set(expected)) > 1


def test_transductive_override_is_temporary():
    model, tasks = _model_and_tasks(transductive=False)
    before = evaluation.few_shot_accuracy(model, tasks, num_tasks=4)
    overridden = evaluation.few_shot_accuracy(model, tasks, num_tasks=4, transductive=True)
    assert model.transductive is False
    after = evaluation.few_shot_accuracy(model, tasks, num_tasks=4)
    np.testing.assert_array_equal(after.per_task, before.per_task)
    reference, _ = _model_and_tasks(transductive=True)
    expected = evaluation.few_shot_accuracy(reference, tasks, num_tasks=4)
    np.testing.assert_allclose(overridden.per_task, expected.per_task)


def test_predict_on_episodes_returns_query_outputs_per_task(plain):
    model, tasks = _model_and_tasks()
    outputs = model.predict(tasks.take(2), verbose=0)
    assert outputs.shape == (8, 9, 3)  # 2 batches x 4 tasks, 9 queries, 3 ways
    # Task 5 (batch 1, task 1) as a plain loop adapts and predicts it.
    batch = {k: v[1].numpy() for k, v in list(tasks.take(2))[1].items()}
    adapted = plain.adapt(model.model, batch["support_x"], batch["support_y"], 4, 3,
                          lambda: keras.optimizers.SGD(0.1),
                          keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    np.testing.assert_allclose(
        outputs[5], plain.query_outputs(adapted, batch["support_x"], batch["query_x"]),
        rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    model, tasks = _model_and_tasks()
    with pytest.raises(ValueError, match="`num_tasks` to be a positive integer"):
        evaluation.few_shot_accuracy(model, tasks, num_tasks=0)
    with pytest.raises(TypeError, match="`transductive` to be None or a bool"):
        evaluation.few_shot_accuracy(model, tasks, transductive="yes")
    with pytest.raises(ValueError, match="Expected an episodic"):
        evaluation.few_shot_accuracy(model, [1, 2, 3])


def test_numpy_scalars_are_the_ints_and_bools_they_hold():
    model, tasks = _model_and_tasks()
    plain = evaluation.few_shot_accuracy(model, tasks, num_tasks=4, transductive=True)
    numpy = evaluation.few_shot_accuracy(
        model, tasks, num_tasks=np.int64(4), transductive=np.bool_(True))
    np.testing.assert_array_equal(numpy.per_task, plain.per_task)


def test_regression_models_are_refused_before_any_step():
    # The sine model: one output, float targets. Argmax of one output is
    # always 0, so "accuracy" would be a fake number.
    network = keras.Sequential([keras.Input((1,)), keras.layers.Dense(8, activation="tanh"),
                                keras.layers.Dense(1)])
    model = keras_reptile.ReptileModel(network)
    model.compile(optimizer="sgd", loss="mse")
    tasks = keras_reptile.datasets.sine(meta_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="Expected a classifier for few-shot accuracy"):
        evaluation.few_shot_accuracy(model, tasks, num_tasks=2)


def test_one_hot_labels_are_scored_as_the_classes_they_encode():
    model, tasks = _model_and_tasks()
    sparse = evaluation.few_shot_accuracy(model, tasks, num_tasks=4)
    one_hot_model, _ = _model_and_tasks()
    one_hot_model.compile(
        optimizer="sgd",
        loss=keras.losses.CategoricalCrossentropy(from_logits=True))

    def to_one_hot(batch):
        return dict(batch, support_y=keras.ops.one_hot(batch["support_y"], 3),
                    query_y=keras.ops.one_hot(batch["query_y"], 3))

    one_hot = evaluation.few_shot_accuracy(one_hot_model, tasks.map(to_one_hot), num_tasks=4)
    # Same seed, same weights, same tasks: the same per-task accuracies.
    np.testing.assert_allclose(one_hot.per_task, sparse.per_task)


@pytest.mark.parametrize("take", [0, 1])
def test_more_tasks_than_the_dataset_holds_is_an_error(take):
    model, tasks = _model_and_tasks()  # 4 tasks per meta-batch
    # Known length: refused before any step. 0 batches, or 1 batch of 4 < 100.
    with pytest.raises(ValueError, match=rf"Expected `episodes` to hold at least num_tasks=100 tasks \(25 meta-batches "
                                         rf"of 4\). Received: a dataset of {4 * take} tasks"):
        evaluation.few_shot_accuracy(model, tasks.take(take), num_tasks=100)
    # Unknown length (a filter): found out when the data runs out.
    unknown = tasks.take(take).filter(lambda batch: True)
    with pytest.raises(ValueError, match=rf"Received: a dataset of {4 * take} tasks"):
        evaluation.few_shot_accuracy(model, unknown, num_tasks=100)
