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
* `ANIL(first_order=False)` (or `"anil"`): MAML whose inner loop adapts only
  the head, the final layer or the layers named (Raghu et al., 2020); the
  body is shared by all tasks and learned by the outer gradient alone.
* `MetaSGD(first_order=False)` (or `"metasgd"`): MAML whose inner update is
  φ ← φ − α ⊙ ∇L_support(φ), with α (one rate per weight entry) meta-learned
  with θ (Li et al., 2017).

Two more hooks let an algorithm change the inner loop, both called by the
model with its network and the inner optimizer's rule
(`keras_reptile.inner_loop.InnerOptimizer`):

* `build(network, rule, add_weight)`: checks the model and makes the
  algorithm's own meta-learned variables with the model's `add_weight` (so
  they are saved, restored and exported with it); returns them. The outer
  gradient has one more entry per variable, after θ's, and the compiled
  optimizer applies it to them.
* `inner_rule(network, rule, variables)`: the rule the inner loop applies.

Algorithms are plain serializable objects; `get("maml")` and friends resolve
the names `ReptileModel(algorithm=...)` accepts.
"""

import copy
from typing import Any
from typing import NamedTuple

import keras
import tensorflow as tf

from keras_reptile import _compat
from keras_reptile._validation import check_bool

__all__ = [
    "ANIL",
    "Adaptation",
    "MAML",
    "MetaSGD",
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

    def build(self, network, rule, add_weight):
        """Checks the model; makes the algorithm's meta-learned variables.

        Args:
            network: The wrapped model (its variables exist once it is
                built; `build` is called again then).
            rule: The `inner_loop.InnerOptimizer` of the inner optimizer,
                over the network's trainable variables.
            add_weight: The model's `add_weight`, which tracks and saves
                the variables as the model's own.

        Returns:
            The list of variables learned beside θ (none by default).
        """
        del network, rule, add_weight
        return []

    def inner_rule(self, network, rule, variables):
        """The rule the inner loop applies (`rule` itself by default).

        Args:
            network: The wrapped model.
            rule: The `inner_loop.InnerOptimizer` of the inner optimizer.
            variables: What `build` returned.
        """
        del network, variables
        return rule

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
        # `repr`: config values may be lists (ANIL's layer names).
        return hash((type(self), repr(sorted(self.get_config().items()))))


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
        first_order = check_bool("first_order", first_order)
        recompute_inner_steps = check_bool("recompute_inner_steps", recompute_inner_steps)
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
        return _query_gradient(task, theta, straight_through=self.first_order)

    def outer_gradient(self, theta, results):
        return _mean_gradient(results)

    def get_config(self):
        config = {"first_order": self.first_order}
        if self.recompute_inner_steps:
            # Only when set: configs and repr stay as they were otherwise.
            config["recompute_inner_steps"] = True
        return config


def _query_gradient(task, theta, straight_through):
    """The task's `TaskResult` with the query loss's gradient for θ."""
    with tf.GradientTape() as tape:
        tape.watch(theta)
        adaptation = task.adapt(theta)
        weights = adaptation.weights
        if straight_through:
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


def _mean_gradient(results):
    grads = [r.gradient for r in results]
    return [tf.add_n(list(g)) / len(results) for g in zip(*grads)]


@keras.saving.register_keras_serializable(package="keras_reptile")
class ANIL(MAML):
    """MAML with an inner loop that adapts only the head (Raghu et al., 2020).

    "Almost No Inner Loop": each task adapts only the head's weights, from
    θ's; the body (every other layer) is the same for all tasks and is
    learned by the outer gradient alone, MAML's query-loss gradient taken
    through the head's adaptation. The inner loop takes no gradient below
    the head, and the second-order terms are the head's only, so a
    meta-step costs less than MAML's (measured: half its CPU time; docs/algorithms.md).

    Args:
        first_order: If False (the default), the query loss is
            differentiated through the head's inner loop; if True, the inner
            loop counts as the identity (as for FOMAML).
        head_layers: Names of the layers the inner loop adapts, or None (the
            default) for the wrapped model's last layer with trainable
            weights. Nested layers may be named.
        recompute_inner_steps: As for `MAML`.

    Example:

    >>> import keras, keras_reptile
    >>> net = keras_reptile.models.conv4((28, 28, 1), num_classes=5, filters=8)
    >>> model = keras_reptile.ReptileModel(net, algorithm="anil")
    >>> model.algorithm
    ANIL(first_order=False)
    """

    def __init__(self, first_order=False, head_layers=None,
                 recompute_inner_steps=False):
        super().__init__(first_order, recompute_inner_steps)
        if head_layers is not None:
            if isinstance(head_layers, str):
                head_layers = [head_layers]
            if (not isinstance(head_layers, (list, tuple)) or not head_layers
                    or not all(isinstance(n, str) for n in head_layers)):
                raise TypeError(
                    "Expected `head_layers` to be None or a non-empty list of "
                    f"layer names. Received: head_layers={head_layers!r}"
                )
            head_layers = list(head_layers)
        self.head_layers = head_layers

    def build(self, network, rule, add_weight):
        if network.built:
            self._head_indices(network, rule)
        return []

    def inner_rule(self, network, rule, variables):
        rule = copy.copy(rule)
        rule.adapted = self._head_indices(network, rule)
        return rule

    def _head_indices(self, network, rule):
        """The indices in `rule.variables` of the head's trainable variables."""
        layers = [
            layer for layer in _compat.flatten_layers(network)
            if layer is not network and not _has_sublayers(layer)
            and not isinstance(layer, keras.layers.InputLayer)
        ]
        if self.head_layers is None:
            head = [layer for layer in layers if layer.trainable_variables][-1:]
        else:
            by_name = {layer.name: layer for layer in layers}
            missing = [n for n in self.head_layers if n not in by_name]
            if missing:
                raise ValueError(
                    "Expected `head_layers` to name layers of the wrapped model "
                    f"{network.name!r}, among {sorted(by_name)}. Received: "
                    f"head_layers={self.head_layers!r}, unknown {missing!r}"
                )
            head = [by_name[n] for n in self.head_layers]
        ids = {id(v) for layer in head for v in layer.trainable_variables}
        indices = [i for i, v in enumerate(rule.variables) if id(v) in ids]
        if not indices:
            raise ValueError(
                "Expected the ANIL head to have trainable weights for the "
                "inner loop to adapt. Received: head layers "
                f"{[layer.name for layer in head]!r} of model {network.name!r} "
                "without trainable weights"
            )
        return indices

    def get_config(self):
        config = super().get_config()
        if self.head_layers is not None:
            config["head_layers"] = list(self.head_layers)
        return config


def _has_sublayers(layer):
    return any(sub is not layer for sub in _compat.flatten_layers(layer))


@keras.saving.register_keras_serializable(package="keras_reptile")
class MetaSGD(MetaAlgorithm):
    """MAML with meta-learned per-weight learning rates (Li et al., 2017).

    The inner update is φ ← φ − α ⊙ ∇L_support(φ), with α one rate per
    entry of every trainable weight, initialised to the inner optimizer's
    learning rate, which must be a plain `SGD` (no momentum, weight decay,
    clipping or schedule). α is a trainable variable of the model, learned
    with θ by the optimizer given to `compile()` from MAML's query-loss
    gradient, and saved, restored and exported with the model. Evaluation,
    `adapt()` and the served adaptation use the learned α.

    Args:
        first_order: If False (the default), the query loss is
            differentiated through the whole inner loop. If True, the inner
            loop's support gradients count as constants: θ gets the query
            gradient at φ (as with FOMAML) and α gets it times
            −Σ_t ∇L_support(φ_t).

    Example:

    >>> import keras, keras_reptile
    >>> net = keras_reptile.models.conv4((28, 28, 1), num_classes=5, filters=8)
    >>> model = keras_reptile.ReptileModel(
    ...     net, inner_optimizer=keras.optimizers.SGD(0.1), algorithm="metasgd")
    >>> len(model.trainable_variables) - len(net.trainable_variables)
    18
    """

    # The outer gradient reaches α only through the inner loop.
    differentiates_inner_loop = True

    def __init__(self, first_order=False):
        self.first_order = check_bool("first_order", first_order)

    def build(self, network, rule, add_weight):
        optimizer = rule.optimizer
        plain = (
            type(optimizer) is keras.optimizers.SGD
            and not optimizer.momentum
            and not optimizer.weight_decay
            and not (optimizer.clipnorm or optimizer.clipvalue
                     or optimizer.global_clipnorm)
            and not isinstance(_compat.raw_learning_rate(optimizer),
                               keras.optimizers.schedules.LearningRateSchedule)
        )
        if not plain:
            raise ValueError(
                "Expected a plain `SGD` inner optimizer (no momentum, weight "
                "decay, clipping or learning-rate schedule) with Meta-SGD, "
                "whose learned rates replace its update. Received: "
                f"inner_optimizer={keras.optimizers.serialize(optimizer)['config']!r}"
            )
        rate = float(keras.ops.convert_to_numpy(rule.learning_rate(0)))
        return [
            add_weight(
                shape=variable.shape,
                dtype=variable.dtype,
                initializer=keras.initializers.Constant(rate),
                trainable=True,
                name="meta_sgd_rate_" + variable.path.replace("/", "_"),
            )
            for variable in rule.variables
        ]

    def inner_rule(self, network, rule, variables):
        return _LearnedRates(rule, variables, self.first_order)

    def adapt_task(self, task, theta):
        return _query_gradient(task, theta, straight_through=False)

    def outer_gradient(self, theta, results):
        return _mean_gradient(results)

    def get_config(self):
        return {"first_order": self.first_order}


class _LearnedRates:
    """Meta-SGD's inner rule, φ ← φ − α ⊙ g (an `InnerOptimizer` in use)."""

    adapted = None

    def __init__(self, rule, rates, first_order, values=None):
        self.optimizer = rule.optimizer
        self.kind = rule.kind
        self.variables = rule.variables
        self.parameters = list(rates)
        self.first_order = first_order
        self._values = values

    def with_parameters(self, values):
        return _LearnedRates(self, self.parameters, self.first_order, list(values))

    def init(self, params):
        return {}

    def update(self, grads, params, state, step):
        rates = self._values
        if rates is None:
            rates = [tf.convert_to_tensor(v) for v in self.parameters]
        new_params = list(params)
        for i, (g, p, rate) in enumerate(zip(grads, params, rates)):
            if g is None:
                continue
            g = tf.cast(tf.convert_to_tensor(g), p.dtype)
            if self.first_order:
                g = tf.stop_gradient(g)
            new_params[i] = p - tf.cast(rate, p.dtype) * g
        return new_params, state


_BY_NAME = {
    "reptile": Reptile,
    "maml": MAML,
    "fomaml": lambda: MAML(first_order=True),
    "anil": ANIL,
    "metasgd": MetaSGD,
}


def names():
    """The algorithm names `get` (and `ReptileModel(algorithm=...)`) accepts."""
    return sorted(_BY_NAME)


def get(identifier):
    """Returns an algorithm from a name, a serialized config or an instance.

    Args:
        identifier: `"reptile"`, `"fomaml"`, `"maml"`, `"anil"`,
            `"metasgd"`, a `MetaAlgorithm`, or
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
