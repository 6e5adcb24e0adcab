"""The task engine: adapts meta-weights to tasks and predicts their query sets.

`TaskAdapter` is the one place a task is adapted, for every caller: the
meta-step, `evaluate` and `predict`, `adapt()`, `adapt_and_predict()` and
the exported serving signatures. It takes what adaptation needs as explicit
inputs (the network, the inner optimizer's rule, the task loss, the head,
where the inner optimizer starts, and the settings of this kind of call)
and never the `ReptileModel`, so it can be built and tested on its own.

A task's life, the same whether the tasks of a meta-batch run one by one or
as one batched computation (`keras_reptile.batched_tasks`):

1. start: θ, or θ with the head set from the support set;
2. the inner loop (`keras_reptile.inner_loop`), per task or batched;
3. finish (`_finish`): BatchNormalization statistics set from the support
   set (unless transductive), giving the task's `Adaptation`;
4. the query pass, in the algorithm's `adapt_task(task, theta)` hook: it
   gets steps 1-3 from `task.adapt(theta)` (under its own gradient tape,
   for MAML; already done, for the batched inner loops) and the query
   outputs and loss from `task.query(weights, state)`, and returns the
   task's `TaskResult`.

Example:

>>> import keras, tensorflow as tf
>>> from keras_reptile import _task_adapter, inner_loop
>>> net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
>>> rule = inner_loop.InnerOptimizer(keras.optimizers.SGD(0.1),
...                                  net.trainable_variables)
>>> engine = _task_adapter.TaskAdapter(
...     net, rule, keras.losses.MeanSquaredError(),
...     _task_adapter.Settings(steps=3, batch_size=2))
>>> x = tf.constant([[1.0], [2.0]]); y = tf.constant([[2.0], [4.0]])
>>> theta = [tf.convert_to_tensor(v) for v in net.trainable_variables]
>>> adaptation = engine.adapt(theta, [], x, y)
>>> len(adaptation.weights)
2
"""

from typing import Any
from typing import NamedTuple

import keras
import tensorflow as tf

from keras_reptile import _compat
from keras_reptile import _distribution
from keras_reptile import _inner_state
from keras_reptile import algorithms
from keras_reptile import batched_tasks as batched_tasks_lib
from keras_reptile import inner_loop

__all__ = ["Settings", "Task", "TaskAdapter"]


class Settings(NamedTuple):
    """How one kind of call adapts: training, or evaluation and adaptation.

    Attributes:
        steps: Inner steps (a Python int or a scalar int32 tensor).
        batch_size: Support rows per inner step.
        transductive: Whether the query set is predicted in training mode
            (BatchNormalization with the query batch's statistics) instead
            of with the support set's statistics.
        recompute: Whether each inner step's activations are recomputed in
            the backward pass (memory for time, for algorithms that
            differentiate through the inner loop).
    """

    steps: Any
    batch_size: int
    transductive: bool = False
    recompute: bool = False


class Task:
    """One task of a meta-batch, as an algorithm's `adapt_task` sees it.

    Args:
        engine: The `TaskAdapter` that runs it.
        state: The non-trainable values the task starts from.
        support_x, support_y: The support set.
        query_x, query_y: The query set (`query_y` None without targets).
        adaptation: The task's `Adaptation` when it was already computed
            (evaluation's batched inner loops), else None.
    """

    def __init__(self, engine, state, support_x, support_y, query_x, query_y,
                 adaptation=None):
        self._engine = engine
        self._state = state
        self._support = (support_x, support_y)
        self._query = (query_x, query_y)
        self._adaptation = adaptation

    def adapt(self, theta):
        """The task's `Adaptation` from the meta-weights `theta`."""
        if self._adaptation is not None:
            return self._adaptation
        return self._engine.adapt(theta, self._state, *self._support)

    def query(self, weights, state):
        """`(loss, outputs)` of `weights` and `state` on the task's query set."""
        return self._engine.query(weights, state, *self._query)


class TaskAdapter:
    """Adapts meta-weights to tasks; see the module docstring.

    Args:
        network: The built `keras.Model` being meta-trained (only its
            structure is used: its variables are replaced by tensors).
        rule: The `inner_loop.InnerOptimizer` of the inner loop.
        loss_fn: `loss_fn(y_true, y_pred)`: a task's scalar loss.
        settings: The `Settings` of this kind of call.
        head: None or a `keras_reptile.heads` head setting the final layer
            from the support set.
        one_hot_targets: Whether targets are already one-hot rows (a
            categorical loss) rather than class ids, for the head.
        inner_start: The `_inner_state.InnerOptimizerState` every task's
            inner optimizer starts from (fresh by default).
        parallel: Whether the per-task computations may run concurrently;
            if False, each task waits for the previous one to finish.
    """

    def __init__(
        self,
        network,
        rule,
        loss_fn,
        settings,
        *,
        head=None,
        one_hot_targets=False,
        inner_start=_inner_state.FRESH,
        parallel=True,
    ):
        self.network = network
        self.rule = rule
        self.loss_fn = loss_fn
        self.settings = settings
        self.head = head
        self.one_hot_targets = one_hot_targets
        self.inner_start = inner_start
        self.parallel = parallel

    # ------------------------------------------------------------------
    # One task

    def adapt(self, theta, state, support_x, support_y):
        """One task's `Adaptation`: head, inner loop, support statistics.

        `theta` holds the network's trainable weights, then the values of
        the rule's meta-learned `parameters` if it has any (Meta-SGD's
        learning rates), so that an outer gradient taken with respect to
        `theta` reaches them too.
        """
        theta, rule = self._split(theta)
        initial = self.start(theta, state, support_x, support_y)
        weights, state, optimizer_state = inner_loop.adapt(
            self.network,
            initial,
            state,
            support_x,
            support_y,
            return_optimizer_state=True,
            recompute=self.settings.recompute,
            **self._inner_loop_arguments(rule),
        )
        return self._finish(initial, weights, state, optimizer_state, support_x)

    def query(self, weights, state, query_x, query_y=None):
        """`(loss, outputs)` of adapted weights on a query set.

        Transductive: training mode, BatchNormalization with the query
        batch's statistics. Otherwise inference mode with the support
        statistics `adapt` set, so query examples are predicted
        independently of each other. The loss is None without targets.
        """
        outputs, _ = inner_loop.stateless_call(
            self.network, weights, state, query_x,
            training=self.settings.transductive,
        )
        loss = None if query_y is None else self.loss_fn(query_y, outputs)
        return loss, outputs

    def start(self, theta, state, support_x, support_y):
        """The weights a task's inner loop starts from: θ, or θ with the head set."""
        if self.head is None:
            return theta
        if not self.one_hot_targets:
            labels = tf.cast(tf.reshape(support_y, [-1]), tf.int32)
            support_y = tf.one_hot(labels, self.head.units(self.network))
        return self.head.initial_weights(
            self.network, theta, state, support_x, support_y
        )

    # ------------------------------------------------------------------
    # A meta-batch

    def run(self, episodes, theta, state, algorithm=None, batched=False):
        """Adapts θ to every task of a meta-batch; a `TaskResult` per task.

        Args:
            episodes: Dict of `[tasks, rows, ...]` tensors; `query_y` may be
                None (prediction).
            theta: The meta-weights, a list of tensors (then the rule's
                parameters' values, if it has any: see `adapt`).
            state: The non-trainable variables' values. Integer state (seed
                generators) is threaded from task to task so that tasks draw
                different random numbers.
            algorithm: The `MetaAlgorithm` whose `adapt_task` runs each task;
                None to adapt and predict (evaluation).
            batched: Whether the inner loops run as one batched computation
                (evaluation only; see `batched_tasks.unsupported_reason`).

        Returns:
            A list of `TaskResult`s.
        """
        if batched and algorithm is not None:
            raise ValueError(
                "Expected `algorithm=None` with `batched=True`: the batched "
                "inner loops serve evaluation, which takes no outer gradient. "
                f"Received: algorithm={algorithm!r}"
            )
        algorithm = algorithm or _ADAPT_AND_PREDICT
        adaptations = self._adapt_batched(episodes, theta, state) if batched else None
        results = []
        running = list(state)
        for b in range(episodes["support_x"].shape[0]):
            task = [episodes[k][b] for k in ("support_x", "support_y", "query_x")]
            if not (self.parallel or batched) and results:
                # Nothing of task b can start before task b-1 has finished.
                done = [t for t in tf.nest.flatten(results[-1]) if t is not None]
                with tf.control_dependencies(done):
                    task = [tf.identity(t) for t in task]
            # (The batched path only predicts: no query loss to compute.)
            query_y = None
            if episodes["query_y"] is not None and not batched:
                query_y = episodes["query_y"][b]
            start = [s if s.dtype.is_floating else r for s, r in zip(state, running)]
            task = Task(
                self, start, *task, query_y,
                adaptation=None if adaptations is None else adaptations[b],
            )
            results.append(algorithm.adapt_task(task, theta))
            running = results[-1].adaptation.state
        return results

    def _adapt_batched(self, episodes, theta, state):
        """Every task's `Adaptation`, the inner loops as one computation.

        The head and the support statistics are one forward pass each and
        stay per task; the inner loop, where the time goes, runs for all
        tasks at once.
        """
        support_x, support_y = episodes["support_x"], episodes["support_y"]
        tasks = support_x.shape[0]
        theta, rule = self._split(theta)
        initial = [
            self.start(theta, state, support_x[b], support_y[b]) for b in range(tasks)
        ]

        def tiled(value):
            return tf.tile(value[None], [tasks] + [1] * value.shape.rank)

        arguments = self._inner_loop_arguments(rule)
        if arguments["optimizer_state"] is not None:
            arguments["optimizer_state"] = tf.nest.map_structure(
                tiled, arguments["optimizer_state"]
            )
        weights, new_state, _ = batched_tasks_lib.adapt(
            self.network,
            [tf.stack(values) for values in zip(*initial)],
            [tiled(value) for value in state],
            support_x,
            support_y,
            **arguments,
        )
        return [
            self._finish(
                initial[b],
                [value[b] for value in weights],
                [value[b] for value in new_state],
                None,
                support_x[b],
            )
            for b in range(tasks)
        ]

    # ------------------------------------------------------------------
    # The parts

    def _split(self, theta):
        """`theta`'s network weights, and the rule reading its parameters from the rest."""
        count = len(self.network.trainable_variables)
        if len(theta) == count:
            return theta, self.rule
        return theta[:count], self.rule.with_parameters(theta[count:])

    def _inner_loop_arguments(self, rule):
        """The inner loop's loss, rule, length, and where its optimizer starts."""
        return dict(
            loss_fn=self.loss_fn,
            optimizer=rule,
            steps=self.settings.steps,
            batch_size=self.settings.batch_size,
            optimizer_state=self.inner_start.slots,
            first_iteration=self.inner_start.iteration,
        )

    def _finish(self, initial, weights, state, optimizer_state, support_x):
        """A task's `Adaptation` once its inner loop has run.

        The optimizer's final state is kept only when it is carried across
        tasks.
        """
        if not self.settings.transductive:
            state = self.support_statistics(weights, state, support_x)
        if self.inner_start.is_fresh:
            optimizer_state = None
        return algorithms.Adaptation(initial, weights, state, optimizer_state)

    def support_statistics(self, weights, state, support_x):
        """Sets BatchNormalization statistics to the support set's.

        One forward pass in training mode over the whole support set with the
        layers' momentum at 0, so each layer's moving mean and variance
        become exactly the batch mean and variance it normalised with.
        """
        layers = [
            layer
            for layer in _compat.flatten_layers(self.network)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
        ]
        if not layers:
            return state
        momenta = [layer.momentum for layer in layers]
        try:
            for layer in layers:
                layer.momentum = 0.0
            _, state = inner_loop.stateless_call(
                self.network, weights, state, support_x, training=True
            )
        finally:
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum
        return list(state)



def state_after(results):
    """The non-trainable state after a meta-step, as this replica's share.

    Floating-point state (BatchNormalization's moving statistics) becomes
    the mean over tasks of its values after adaptation (summed across
    replicas by `_distribution.assign_summed`); integer state (seed
    generators), threaded from task to task, is the last task's, which every
    replica reaches after the same number of tasks.
    """
    states = [r.adaptation.state for r in results]
    return [
        _distribution.replica_mean(values) if values[0].dtype.is_floating
        else values[-1]
        for values in zip(*states)
    ]



def adapted_copy(network, weights, state, example_shape):
    """A new copy of `network` holding one task's adapted weights and state.

    Args:
        network: The wrapped model.
        weights: The adapted trainable weights φ.
        state: The non-trainable values after adaptation (the support
            statistics, for a copy that predicts one example at a time).
        example_shape: One example's shape, to build a copy that is not
            built by cloning.

    Raises:
        TypeError: If `keras.models.clone_model` cannot copy `network`.
    """
    try:
        adapted = keras.models.clone_model(network)
    except Exception as error:  # Keras raises several types here.
        raise TypeError(
            "`adapt()` returns a copy of the wrapped model made with "
            "`keras.models.clone_model`, which failed for "
            f"{type(network).__name__}: {error}. Subclassed models need "
            "`get_config()`/`from_config()` to be copied; "
            "`adapt_and_predict()` works without a copy."
        ) from error
    if not adapted.built:
        adapted.build((None,) + tuple(example_shape))
    for variable, value in zip(adapted.trainable_variables, weights):
        variable.assign(value)
    for variable, value in zip(adapted.non_trainable_variables, state):
        variable.assign(value)
    return adapted

# Evaluation adapts and predicts; only the meta-step needs an algorithm.
_ADAPT_AND_PREDICT = algorithms.MetaAlgorithm()
