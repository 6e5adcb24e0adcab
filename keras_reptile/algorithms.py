"""Meta-learning algorithms: how a meta-step turns adapted tasks into a gradient.

`ReptileModel` owns the meta-step: it unpacks the episodes, adapts the
meta-weights θ to every task with the one functional inner loop, hands the
outer gradient to the compiled optimizer and reports metrics. An algorithm
differs from another only in two small hooks:

* `adapt_task(task, theta)`: runs one task. `task.adapt(theta)` returns
  the task's `Adaptation` (the task's initial weights, the adapted weights φ
  and the state after the inner loop); `task.query(weights, state)` returns
  the compiled loss and the outputs on the task's query set. The hook
  returns a `TaskResult`, with the task's gradient contribution if it has
  one. `task` comes from the task engine (`keras_reptile._task_adapter`),
  which runs the same adaptation for training, evaluation and serving.
* `outer_gradient(theta, results)`: the gradient, one tensor per trainable
  variable, that the outer optimizer applies (the mean over this replica's
  tasks; the model scales it for distribution).

Three algorithms are provided:

* `Reptile`: the pseudo-gradient θ − mean φ (Nichol et al., 2018). With
  `SGD(ε)` as the outer optimizer this is θ ← θ + ε (mean φ − θ). The query
  set only feeds the reported metrics.
* `MAML(first_order=False)`: the gradient of the query loss at φ with
  respect to θ, differentiated through the whole inner loop (Finn et al.,
  2017). Memory grows with the number of inner steps.
* FOMAML, `MAML(first_order=True)` (or `"fomaml"`): the inner loop counts as
  the identity, so the gradient is that of the query loss at φ, taken with
  respect to φ. When a task's initial weights are computed from θ (the
  prototype head of `keras_reptile.heads`), gradients still flow through that
  mapping, as in fo-Proto-MAML (Triantafillou et al., 2020).

Algorithms are plain serializable objects; `get("maml")` and friends resolve
the names `ReptileModel(algorithm=...)` accepts.
"""

from typing import Any
from typing import NamedTuple

import keras
import tensorflow as tf

__all__ = [
    "Adaptation",
    "MAML",
    "MetaAlgorithm",
    "Reptile",
    "TaskResult",
    "get",
    "names",
]


class Adaptation(NamedTuple):
    """One task's adaptation.

    Attributes:
        initial: The weights the inner loop started from (θ, or θ with the
            head set from the support set).
        weights: The adapted trainable weights φ.
        state: The non-trainable variables' values after adaptation.
        optimizer_state: The inner optimizer's final state when it is carried
            across tasks, else None.
    """

    initial: list
    weights: list
    state: list
    optimizer_state: Any = None


class TaskResult(NamedTuple):
    """What a meta-step keeps of one task.

    Attributes:
        adaptation: The task's `Adaptation`.
        query_outputs: The adapted model's outputs on the query set.
        gradient: The task's outer-gradient contribution (one tensor per
            trainable variable), or None for algorithms that compute the
            outer gradient from the adaptations alone.
    """

    adaptation: Adaptation
    query_outputs: Any
    gradient: Any = None


class MetaAlgorithm:
    """Base class: the two hooks a meta-learning algorithm defines."""

    # Whether the meta-step's inner loop recomputes each step's activations
    # when the outer gradient is taken through it (see `MAML`).
    recompute_inner_steps = False
    # Whether the outer gradient is taken through the inner loop.
    differentiates_inner_loop = False

    def adapt_task(self, task, theta):
        """Adapts to one task. See the module docstring.

        Args:
            task: The task: `task.adapt(theta) -> Adaptation` and
                `task.query(weights, state) -> (loss, outputs)` on its query
                set.
            theta: The meta-weights, a list of tensors.

        Returns:
            A `TaskResult`.
        """
        adaptation = task.adapt(theta)
        _, outputs = task.query(adaptation.weights, adaptation.state)
        return TaskResult(adaptation, outputs)

    def outer_gradient(self, theta, results):
        """Returns the outer gradient from this replica's `TaskResult`s."""
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({options})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.get_config().items()))))


@keras.saving.register_keras_serializable(package="keras_reptile")
class Reptile(MetaAlgorithm):
    """Reptile's outer gradient, θ − mean φ (Nichol et al., 2018).

    Example:

    >>> import keras, keras_reptile
    >>> net = keras_reptile.models.conv4((28, 28, 1), num_classes=5, filters=8)
    >>> model = keras_reptile.ReptileModel(net, algorithm=Reptile())
    >>> model.algorithm
    Reptile()
    """

    def outer_gradient(self, theta, results):
        phis = [r.adaptation.weights for r in results]
        return [t - tf.add_n(list(p)) / len(results) for t, p in zip(theta, zip(*phis))]


@keras.saving.register_keras_serializable(package="keras_reptile")
class MAML(MetaAlgorithm):
    """MAML's outer gradient: the query loss differentiated with respect to θ.

    Args:
        first_order: If False (the default), the query loss at φ is
            differentiated through the whole inner loop (second order). If
            True, the inner loop counts as the identity (FOMAML): the
            gradient at φ, plus whatever flows through a head computed from θ.
        recompute_inner_steps: Second order only. If True, the compiled
            meta-step keeps only each inner step's inputs (weights and
            optimizer state) for the backward pass and recomputes the step's
            activations there, so memory no longer grows with the inner
            steps' activations, for about one more forward and backward
            pass per inner step (see docs/performance.md). The inner
            loop is then unrolled whatever its length. Same gradient to
            float rounding.

    Example:

    >>> import keras, keras_reptile
    >>> net = keras_reptile.models.conv4((28, 28, 1), num_classes=5, filters=8)
    >>> model = keras_reptile.ReptileModel(net, algorithm=MAML(first_order=True))
    >>> model.algorithm
    MAML(first_order=True)
    """

    def __init__(self, first_order=False, recompute_inner_steps=False):
        for name, value in (("first_order", first_order),
                            ("recompute_inner_steps", recompute_inner_steps)):
            if not isinstance(value, bool):
                raise TypeError(
                    f"Expected `{name}` to be a bool. Received: {name}={value!r}"
                )
        if first_order and recompute_inner_steps:
            raise ValueError(
                "Expected `recompute_inner_steps=False` with `first_order=True`: "
                "first-order MAML keeps no inner-step activations for its "
                "gradient, so there is nothing to recompute. Received: "
                "first_order=True, recompute_inner_steps=True"
            )
        self.first_order = first_order
        self.recompute_inner_steps = recompute_inner_steps

    @property
    def differentiates_inner_loop(self):
        return not self.first_order

    def adapt_task(self, task, theta):
        with tf.GradientTape() as tape:
            tape.watch(theta)
            adaptation = task.adapt(theta)
            weights = adaptation.weights
            if self.first_order:
                # Straight through the inner loop: the value of φ, the
                # derivative of the task's initial weights.
                weights = [
                    i + tf.stop_gradient(w - i)
                    for i, w in zip(adaptation.initial, weights)
                ]
            loss, outputs = task.query(weights, adaptation.state)
        gradient = tape.gradient(
            loss, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return TaskResult(adaptation, outputs, gradient)

    def outer_gradient(self, theta, results):
        grads = [r.gradient for r in results]
        return [tf.add_n(list(g)) / len(results) for g in zip(*grads)]

    def get_config(self):
        config = {"first_order": self.first_order}
        if self.recompute_inner_steps:
            # Only when set: configs and repr stay as they were otherwise.
            config["recompute_inner_steps"] = True
        return config


_BY_NAME = {
    "reptile": Reptile,
    "maml": MAML,
    "fomaml": lambda: MAML(first_order=True),
}


def names():
    """The algorithm names `get` (and `ReptileModel(algorithm=...)`) accepts."""
    return sorted(_BY_NAME)


def get(identifier):
    """Returns an algorithm from a name, a serialized config or an instance.

    Args:
        identifier: `"reptile"`, `"fomaml"`, `"maml"`, a `MetaAlgorithm`, or
            a dict from `keras.saving.serialize_keras_object`.

    Returns:
        A `MetaAlgorithm`.
    """
    if isinstance(identifier, MetaAlgorithm):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in _BY_NAME:
        return _BY_NAME[identifier.lower()]()
    if isinstance(identifier, dict):
        algorithm = keras.saving.deserialize_keras_object(identifier)
        if isinstance(algorithm, MetaAlgorithm):
            return algorithm
    raise ValueError(
        f"Expected `algorithm` to be one of {names()} or a "
        "`keras_reptile.algorithms.MetaAlgorithm`. Received: "
        f"algorithm={identifier!r}"
    )
