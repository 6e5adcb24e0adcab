"""Few-shot evaluation with the paper's protocol: accuracy ± 95% CI over tasks."""

import dataclasses
import math

import numpy as np

from keras_reptile._losses import loss_kind
from keras_reptile._validation import check_bool
from keras_reptile._validation import check_positive_int


@dataclasses.dataclass(frozen=True)
class FewShotAccuracy:
    """Few-shot accuracy over a set of tasks.

    Attributes:
        mean: Mean over tasks of the query accuracy after adaptation.
        ci95: Half-width of the 95% confidence interval of the mean,
            `1.96 * std / sqrt(num_tasks)` (sample standard deviation).
        per_task: Query accuracy of every task, `[num_tasks]`.
    """

    mean: float
    ci95: float
    per_task: np.ndarray

    @property
    def num_tasks(self):
        return len(self.per_task)

    def __str__(self):
        return (
            f"{100 * self.mean:.2f}% ± {100 * self.ci95:.2f}% "
            f"(95% CI, {self.num_tasks} tasks)"
        )


def confidence_interval(per_task):
    """Mean and 95% confidence half-width of per-task accuracies.

    Args:
        per_task: Accuracy of each task.

    Returns:
        `FewShotAccuracy` with the mean, `1.96 * std / sqrt(n)` (sample
        standard deviation, `ddof=1`; 0 for a single task) and the values.
    """
    per_task = np.asarray(per_task, dtype="float64").reshape(-1)
    if per_task.size == 0:
        raise ValueError("Expected at least one task. Received none.")
    std = per_task.std(ddof=1) if per_task.size > 1 else 0.0
    return FewShotAccuracy(
        mean=float(per_task.mean()),
        ci95=float(1.96 * std / math.sqrt(per_task.size)),
        per_task=per_task,
    )


def few_shot_accuracy(model, episodes, num_tasks=1000, *, transductive=None):
    """Evaluates a `ReptileModel` on held-out few-shot classification tasks.

    Each task adapts from the meta-weights on its support set exactly as
    `model.evaluate` does (`eval_inner_steps` steps of
    `eval_inner_batch_size` rows) and is scored by the accuracy on its query
    set. The mean over tasks equals `model.evaluate`'s `accuracy` on the same
    episodes (every task has the same number of query examples).

    Args:
        model: A compiled `keras_reptile.ReptileModel` whose wrapped model
            outputs one score per class.
        episodes: An episodic dataset (`keras_reptile.episodes`).
        num_tasks: Number of tasks to evaluate; rounded up to whole
            meta-batches.
        transductive: Overrides the model's `transductive` setting for this
            evaluation when not `None`.

    Returns:
        A `FewShotAccuracy` (mean, 95% CI half-width, per-task accuracies).

    Example:

    >>> import keras, numpy as np, keras_reptile
    >>> x = np.random.rand(60, 8, 8, 1).astype("float32")
    >>> y = np.repeat(np.arange(6), 10)
    >>> model = keras_reptile.ReptileModel(
    ...     keras_reptile.models.conv4((8, 8, 1), 3, filters=4, num_blocks=2),
    ...     eval_inner_steps=3)
    >>> model.compile(optimizer="sgd", loss=keras.losses.
    ...               SparseCategoricalCrossentropy(from_logits=True))
    >>> tasks = keras_reptile.episodes.from_arrays(
    ...     x, y, ways=3, shots=1, query_shots=2, meta_batch_size=4, seed=0)
    >>> result = few_shot_accuracy(model, tasks, num_tasks=8)
    >>> result.num_tasks
    8
    """
    num_tasks = check_positive_int("num_tasks", num_tasks)
    transductive = check_bool("transductive", transductive, allow_none=True)
    spec = getattr(episodes, "element_spec", None)
    if not isinstance(spec, dict) or "query_y" not in spec:
        raise ValueError(
            "Expected an episodic `tf.data.Dataset` (see "
            "`keras_reptile.episodes`) whose elements have `query_y`. "
            f"Received: episodes={episodes!r}"
        )
    meta_batch = spec["query_y"].shape[0]
    if meta_batch is None:
        raise ValueError(
            "Expected episodes with a static meta-batch size. Received "
            f"element spec {spec}"
        )
    one_hot = _check_classifier(model, spec["query_y"])
    num_batches = -(-num_tasks // meta_batch)
    # A dataset that says how long it is is checked before any work; one
    # that cannot (a filter, a generator) is checked when it runs out.
    cardinality = int(episodes.cardinality())
    if cardinality >= 0 and cardinality < num_batches:
        _raise_too_few_tasks(num_tasks, num_batches, meta_batch, cardinality)
    previous = model.transductive
    if transductive is not None:
        # The next step traces anew for a changed setting.
        model.transductive = transductive
    try:
        per_task = []
        for batch in episodes.take(num_batches):
            outputs = model.predict_on_batch(batch)
            labels = batch["query_y"].numpy()
            if one_hot:
                labels = labels.argmax(-1)
            per_task.append((outputs.argmax(-1) == labels).mean(axis=1))
    finally:
        model.transductive = previous
    if len(per_task) < num_batches:
        _raise_too_few_tasks(num_tasks, num_batches, meta_batch, len(per_task))
    return confidence_interval(np.concatenate(per_task))


def _check_classifier(model, query_y_spec):
    """Raises unless the model scores classes; returns whether labels are one-hot.

    Accuracy is the argmax of the outputs against the labels: meaningless
    for a regression model, whose targets are not classes.
    """
    kind, _ = loss_kind(getattr(model, "loss", None))
    if kind == "categorical":
        return True
    try:
        units = model.model.output_shape[-1]
    except (AttributeError, ValueError, TypeError):
        units = None  # not built yet, or several outputs: left to the loss
    if kind is None and (
        not query_y_spec.dtype.is_integer
        or query_y_spec.shape.rank != 2
        or (units is not None and units < 2)
    ):
        raise ValueError(
            "Expected a classifier for few-shot accuracy: a model with one "
            "output per class and integer class labels `query_y` of shape "
            "[meta_batch, Q] (or a model compiled with a cross-entropy loss). "
            f"Received: a model with {units} output(s), compiled with "
            f"loss={getattr(model, 'loss', None)!r}, and `query_y` of dtype "
            f"{query_y_spec.dtype.name} and shape {query_y_spec.shape}. "
            "Use `model.evaluate` for regression."
        )
    return False


def _raise_too_few_tasks(num_tasks, num_batches, meta_batch, batches):
    raise ValueError(
        f"Expected `episodes` to hold at least num_tasks={num_tasks} tasks "
        f"({num_batches} meta-batches of {meta_batch}). Received: a dataset "
        f"of {batches * meta_batch} tasks ({batches} meta-batches). Ask for "
        "fewer tasks, or use an endless episodic dataset (`keras_reptile."
        "episodes` builders repeat forever)."
    )
