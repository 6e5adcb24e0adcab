"""`ReptileModel`: meta-learning (Reptile, FOMAML, MAML, ANIL, Meta-SGD) as a Keras model.

The model holds the settings, the config and Keras's hooks, checks each
call's data, runs the three steps and applies the outer update. The rest is
done by collaborators that never see the model: `_task_adapter` (adapting
and predicting tasks), `algorithms` (the outer gradient), `_inner_state`,
`_entry_checks` and `_validation` (input checks), `_distribution`,
`_step_functions` (traces, XLA, cached functions) and `_finite_guard`.
"""

import keras
import tensorflow as tf

from keras_reptile import _compat
from keras_reptile import _distribution
from keras_reptile import _entry_checks
from keras_reptile import _finite_guard
from keras_reptile import _inner_state
from keras_reptile import _step_functions
from keras_reptile import _task_adapter
from keras_reptile import _validation
from keras_reptile import algorithms
from keras_reptile import batched_tasks as batched_tasks_lib
from keras_reptile import export as export_lib
from keras_reptile import heads
from keras_reptile import inner_loop
from keras_reptile._losses import loss_kind
from keras_reptile._settings import checked_setting
from keras_reptile._settings import fixed_at_construction
from keras_reptile._validation import check_positive_int

# Settings saved in the config as they are.
_PLAIN_SETTINGS = (
    "inner_steps", "inner_batch_size", "eval_inner_steps", "eval_inner_batch_size",
    "transductive", "parallel_tasks", "batched_tasks", "carry_inner_optimizer_state",
)


@keras.saving.register_keras_serializable(package="keras_reptile")
class ReptileModel(_compat.BuildBeforeTrace, keras.Model):
    """Meta-trains any Keras model with Reptile, FOMAML, MAML, ANIL or Meta-SGD.

    `fit` takes an episodic dataset (see `keras_reptile.episodes`): each
    element is a meta-batch of tasks with a support and a query set. One
    training step adapts a copy of the meta-weights θ to each task's support
    set with `inner_steps` steps of `inner_optimizer` (fresh optimizer state
    per task; batches of `inner_batch_size` rows in order), giving adapted
    weights φ_b; `algorithm` turns them into the outer gradient, which the
    optimizer given to `compile()` applies: with Reptile and
    `SGD(learning_rate=ε)`, θ ← θ + ε (mean φ − θ). The step reports the
    compiled loss and metrics of the adapted weights on the query sets.

    `evaluate` (and `validation_data`) adapts from θ to each episode's
    support set with `eval_inner_steps` steps of `eval_inner_batch_size`
    rows and reports loss and metrics on its query set; θ is unchanged.
    `adapt()` returns an adapted copy of the wrapped model, and
    `adapt_and_predict()` the adapted model's query outputs. BatchNorm
    statistics, `compile(jit_compile="auto")` and how tasks are executed:
    docs/training.md#how-a-meta-step-runs.

    Args:
        model: The `keras.Model` to meta-train. Single output; for
            classification it returns logits or probabilities matching the
            compiled loss.
        inner_optimizer: Keras optimizer (instance, string name or config)
            used to adapt to each task. Defaults to the paper's
            `Adam(learning_rate=1e-3, beta_1=0.0)`. Supported types:
            `keras_reptile.inner_loop.supported_optimizers()`.
        inner_steps: Adaptation steps per task during meta-training.
        inner_batch_size: Support rows per adaptation step during
            meta-training.
        eval_inner_steps: Adaptation steps in `evaluate`, `adapt` and
            `adapt_and_predict`.
        eval_inner_batch_size: Support rows per step there; defaults to
            `inner_batch_size`.
        transductive: Whether evaluation normalises BatchNormalization with
            the query batch's statistics instead of the support set's.
        parallel_tasks: Whether a meta-batch's tasks adapt concurrently or
            one after the other (same results); `"auto"`: concurrently on
            machines without GPUs and TPUs. Fixed at construction.
        batched_tasks: Whether evaluation adapts a meta-batch's tasks in one
            batched computation (`keras_reptile.batched_tasks`). `"auto"`:
            where it applies, without XLA; `True`: always, raising a
            `ValueError` where it does not apply. Fixed at construction.
        carry_inner_optimizer_state: If True, the inner optimizer's state
            is carried across meta-steps instead of reset for each task, as
            in the paper's code; needs a built `model`. Fixed at
            construction.
        algorithm: `"reptile"` (default), `"fomaml"`, `"maml"`, `"anil"`,
            `"metasgd"` or a `keras_reptile.algorithms.MetaAlgorithm` such
            as `MAML(first_order=True)`. Fixed at construction.
        head: None, or `"prototype"` (a `keras_reptile.heads.PrototypeHead`)
            to set the final Dense layer from each task's support set before
            adapting; needs a classification loss. Fixed at construction.
        **kwargs: Passed to `keras.Model` (e.g. `name`).

    The step and evaluation settings (`inner_steps`, `inner_batch_size`,
    `eval_inner_steps`, `eval_inner_batch_size`, `transductive`) may be
    changed after construction; the next call uses the new values.

    Example:

    >>> import keras, numpy as np, keras_reptile
    >>> backbone = keras_reptile.models.conv4((28, 28, 1), num_classes=5, filters=8)
    >>> model = keras_reptile.ReptileModel(backbone, inner_steps=2, inner_batch_size=5,
    ...                                    eval_inner_steps=3)
    >>> model.compile(optimizer=keras.optimizers.SGD(1.0), metrics=["accuracy"],
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> x = np.random.rand(100, 28, 28, 1).astype("float32")
    >>> y = np.repeat(np.arange(10), 10)
    >>> tasks = keras_reptile.episodes.from_arrays(
    ...     x, y, ways=5, shots=1, query_shots=1, meta_batch_size=2, seed=0)
    >>> history = model.fit(tasks, steps_per_epoch=2, verbose=0)
    >>> adapted = model.adapt(x[:5], np.arange(5))
    >>> adapted.predict(x[:5], verbose=0).shape
    (5, 5)
    """

    def __init__(self, model, inner_optimizer=None, inner_steps=5, inner_batch_size=10,
                 eval_inner_steps=50, eval_inner_batch_size=None, transductive=False,
                 parallel_tasks="auto", carry_inner_optimizer_state=False,
                 algorithm="reptile", head=None, batched_tasks="auto", **kwargs):
        _validation.check_network(model, ReptileModel)
        parallel_tasks = _validation.check_auto_or_bool("parallel_tasks", parallel_tasks)
        batched_tasks = _validation.check_auto_or_bool("batched_tasks", batched_tasks)
        carry_inner_optimizer_state = _validation.check_carry_inner_optimizer_state(
            carry_inner_optimizer_state, model)
        algorithm = algorithms.get(algorithm)
        head = heads.get(head)
        if head is not None and model.built:
            head.check_model(model)
        inner_optimizer = inner_loop.get_optimizer(inner_optimizer)
        _validation.check_learning_rate("inner_optimizer", inner_optimizer)

        super().__init__(**kwargs)
        self.model = model
        self.inner_optimizer = inner_optimizer
        # Validated by the property setters below.
        self.inner_steps = inner_steps
        self.inner_batch_size = inner_batch_size
        self.eval_inner_steps = eval_inner_steps
        self.eval_inner_batch_size = (
            self.inner_batch_size if eval_inner_batch_size is None else eval_inner_batch_size
        )
        self.transductive = transductive
        # Fixed at construction (read-only properties below).
        self._parallel_tasks, self._batched_tasks = parallel_tasks, batched_tasks
        self._carry_inner_optimizer_state = carry_inner_optimizer_state
        self._algorithm, self._head = algorithm, head
        self._jit_request = "auto"
        self._step_keys = _step_functions.StepKeys()
        self._functions = _step_functions.FunctionCache()
        self._finite_guard = None
        # Made up front (again in `build` for a model built later), so that
        # they exist in every code path and in saved models.
        self._algorithm_variables = algorithm.build(model, self._keras_rule(), self.add_weight)
        self._carried = _inner_state.CarriedInnerState(
            self.add_weight, self._inner_rule()) if carry_inner_optimizer_state else None
        if model.built:
            self.built = True
            if batched_tasks is True:  # Refuses a model it cannot batch, up front.
                batched_tasks_lib.evaluates_batched(True, False, model, self._inner_rule())

    # Settings ---------------------------------------------------------

    # Fixed at construction: they shape the traced steps and the variables.
    parallel_tasks = fixed_at_construction("parallel_tasks")
    batched_tasks = fixed_at_construction("batched_tasks")
    carry_inner_optimizer_state = fixed_at_construction("carry_inner_optimizer_state")
    algorithm = fixed_at_construction("algorithm")
    head = fixed_at_construction("head")

    # Read by the traced steps: a change makes the next call trace anew
    # (`_trace_settings` is part of every trace's key).
    inner_steps = checked_setting("inner_steps", check_positive_int)
    inner_batch_size = checked_setting("inner_batch_size", check_positive_int)
    eval_inner_steps = checked_setting("eval_inner_steps", check_positive_int)
    eval_inner_batch_size = checked_setting("eval_inner_batch_size", check_positive_int)
    transductive = checked_setting("transductive", _validation.check_bool)

    def _trace_settings(self):
        # Everything a trace bakes in besides input shapes: a re-compile (new
        # loss) or a changed setting must not reuse an old trace.
        return (
            _compat.compiled_loss(self), self.inner_optimizer, self.inner_steps,
            self.inner_batch_size, self.eval_inner_steps, self.eval_inner_batch_size,
            self.transductive, self.algorithm, self.head,
            tuple(v.path for v in self.model.trainable_variables),
        )

    def _train_settings(self):
        # Training reports query metrics in training mode: one cheap pass.
        return _task_adapter.Settings(self.inner_steps, self.inner_batch_size, True,
                                      self.algorithm.recompute_inner_steps)

    def _eval_settings(self, steps=None):
        steps = self.eval_inner_steps if steps is None else steps
        return _task_adapter.Settings(steps, self.eval_inner_batch_size, self.transductive)

    # Keras model API --------------------------------------------------

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
        if self.head is not None:
            self.head.check_model(self.model)
        if not self._algorithm_variables:
            self._algorithm_variables = self.algorithm.build(
                self.model, self._keras_rule(), self.add_weight)
        self.built = True

    def call(self, inputs, training=False):
        return self.model(inputs, training=training)

    def get_config(self):
        config = {"name": self.name, "trainable": self.trainable}
        config.update(
            model=keras.layers.serialize(self.model),
            inner_optimizer=keras.optimizers.serialize(self.inner_optimizer),
            **{name: getattr(self, name) for name in _PLAIN_SETTINGS},
            algorithm=keras.saving.serialize_keras_object(self.algorithm),
            head=None if self.head is None else keras.saving.serialize_keras_object(self.head),
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.layers.deserialize(config["model"], custom_objects=custom_objects)
        config["inner_optimizer"] = keras.optimizers.deserialize(
            config["inner_optimizer"], custom_objects=custom_objects)
        return cls(**config)

    # Each entry point checks its data and drops a step traced for another
    # meta-batch size or settings (`_before`), then runs Keras's own.
    def fit(self, *args, **kwargs):
        arguments = _step_functions.bound_arguments(keras.Model.fit, self, args, kwargs)
        self._before("train", arguments.get("x"), validation_data=arguments.get(
            "validation_data"), callbacks=arguments.get("callbacks", ()))
        return super().fit(*args, **kwargs)

    def evaluate(self, *args, **kwargs):
        self._before("test", _step_functions.bound_arguments(
            keras.Model.evaluate, self, args, kwargs).get("x"))
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        self._before("predict", _step_functions.bound_arguments(
            keras.Model.predict, self, args, kwargs).get("x"))
        return super().predict(*args, **kwargs)

    def train_on_batch(self, x, *args, **kwargs):
        self._before("train", x, is_batch=True)
        return super().train_on_batch(x, *args, **kwargs)

    def test_on_batch(self, x, *args, **kwargs):
        self._before("test", x, is_batch=True)
        return super().test_on_batch(x, *args, **kwargs)

    def predict_on_batch(self, x):
        self._before("predict", x, is_batch=True)
        return super().predict_on_batch(x)

    def _before(self, kind, x, is_batch=False, **fit_arguments):
        optimizer = getattr(self, "optimizer", None)  # Unset before `compile`.
        self._checks().call(kind, x, is_batch, optimizer=optimizer, **fit_arguments)
        tasks = _validation.meta_batch_size(x, is_batch)
        if self._step_keys.changed(kind, tasks, self._trace_settings()):
            getattr(self, f"make_{kind}_function")(force=True)

    def compile(self, *args, **kwargs):
        self._jit_request = _step_functions.bound_arguments(
            keras.Model.compile, self, args, kwargs).get("jit_compile", "auto")
        super().compile(*args, **kwargs)
        _validation.check_learning_rate("optimizer", self.optimizer)
        # Saved as asked, so a loaded model resolves "auto" again.
        _compat.record_compile_argument(self, "jit_compile", self._jit_request)

    compile.__doc__ = keras.Model.compile.__doc__

    def compile_from_config(self, config):
        # Keras's own skips models that override `compile`.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        self._finite_guard = self._finite_guard or _finite_guard.NonFiniteGuard(
            self.distribute_strategy)
        guard, settings = self._finite_guard, self._train_settings()
        return _step_functions.train_function(
            self, super().make_train_function, self._jit_request,
            self.algorithm.differentiates_inner_loop
            and not inner_loop.is_unrolled(settings.steps, settings.recompute),
            # The variable list and message are built only after a failure:
            # this runs after every step.
            lambda: guard.check(self._step_variables, lambda: _finite_guard.kept_description(
                bool(self.model.non_trainable_variables), self._carried is not None)),
        )

    def _build_from_data(self, data_batch):
        # Called before the first trace (see `_compat.BuildBeforeTrace`).
        _step_functions.build_for_episodes(self, self._checks().episodes(
            _distribution.first_replica_batch(
                _validation.episode_element(data_batch), self.distribute_strategy)))

    # Meta-training and evaluation steps -------------------------------

    def train_step(self, data):
        episodes = self._checks().episodes(data)
        theta, state = self._meta_weights()
        engine = self._task_adapter(self._train_settings())
        results = engine.run(episodes, theta, state, self.algorithm)
        gradient = self.algorithm.outer_gradient(theta, results)
        self._finite_guard.run(self._step_variables(), self.optimizer.iterations,
                               lambda: self._apply_meta_step(gradient, results))
        return self._report(episodes, results)

    def test_step(self, data):
        episodes = self._checks().episodes(data)
        return self._report(episodes, self._evaluate_tasks(episodes))

    def predict_step(self, data):
        """Outputs at the meta-weights, or query outputs after adaptation.

        `predict` on plain inputs returns the wrapped model's outputs at the
        meta-weights. On episodes (dicts with `support_x`, `support_y` and
        `query_x`; `query_y` is ignored) it adapts to each task as
        `evaluate` does and returns the query outputs, shaped
        `[meta_batch, Q, ...]` per batch.
        """
        data = _validation.episode_element(data)
        if not (isinstance(data, dict) and "support_x" in data):
            return super().predict_step(data)
        episodes = self._checks().prediction_episodes(data)
        return tf.stack([r.query_outputs for r in self._evaluate_tasks(episodes)])

    # The meta-step's parts --------------------------------------------

    def _meta_weights(self):
        """θ (with the algorithm's variables) and the non-trainable state, as tensors."""
        return tuple([tf.convert_to_tensor(v) for v in variables] for variables in (
            self._outer_variables(), self.model.non_trainable_variables))

    def _outer_variables(self):
        """θ, then the algorithm's own meta-learned variables (Meta-SGD's α)."""
        return list(self.model.trainable_variables) + list(self._algorithm_variables)

    def _step_variables(self):
        """Every variable a meta-step writes (metrics aside)."""
        return list(self.weights) + list(self.optimizer.variables)

    def _evaluate_tasks(self, episodes):
        """Adapts θ to every task and predicts its query set; `TaskResult`s."""
        theta, state = self._meta_weights()
        engine = self._task_adapter(self._eval_settings())
        return engine.run(episodes, theta, state, batched=batched_tasks_lib.evaluates_batched(
            self.batched_tasks, self.jit_compile, self.model, self._inner_rule()))

    def _task_adapter(self, settings):
        """The task engine for this model's network, inner optimizer, loss and head."""
        self._checks().compiled()
        rule = self._inner_rule()
        return _task_adapter.TaskAdapter(
            self.model, rule, self._task_loss, settings, head=self.head,
            one_hot_targets=loss_kind(self.loss)[0] == "categorical",
            inner_start=_inner_state.FRESH if self._carried is None else self._carried.read(rule),
            parallel=_distribution.tasks_run_in_parallel(self.parallel_tasks),
        )

    def _apply_meta_step(self, gradient, results):
        """The outer update: θ, the non-trainable state, the carried inner state."""
        self.optimizer.apply(
            _distribution.replica_share(self.optimizer, gradient), self._outer_variables())
        _distribution.assign_summed(
            self.model.non_trainable_variables, _task_adapter.state_after(results))
        if self._carried is not None:
            self._carried.assign(_inner_state.after_meta_step(
                self._carried.read(self._inner_rule()),
                [r.adaptation.optimizer_state for r in results], self.inner_steps))

    def _report(self, episodes, results):
        query_y = episodes["query_y"]
        y_true = tf.reshape(query_y, [-1] + list(query_y.shape[2:]))
        y_pred = tf.concat([r.query_outputs for r in results], axis=0)
        loss = self._task_loss(y_true, y_pred)
        _compat.loss_tracker(self).update_state(loss, sample_weight=tf.shape(y_true)[0])
        return _distribution.logs_for_workers(self.compute_metrics(None, y_true, y_pred))

    def _task_loss(self, y_true, y_pred):
        return _distribution.unscaled_loss(_compat.compiled_loss(self)(y_true, y_pred))

    def _keras_rule(self):
        return inner_loop.InnerOptimizer(self.inner_optimizer, self.model.trainable_variables)

    def _inner_rule(self):
        return self.algorithm.inner_rule(self.model, self._keras_rule(), self._algorithm_variables)

    def _checks(self):
        """What each entry point checks its data against (`_entry_checks`)."""
        return _entry_checks.EntryChecks(
            self.model, self.algorithm, self.distribute_strategy, self._ensure_built,
            compiled=self.compiled, compiled_loss=_compat.compiled_loss(self),
            loss=self.loss, head=self.head,
        )

    def _ensure_built(self, example_shape):
        if not self.model.built:
            self.build((None,) + tuple(example_shape))
        elif not self.built:
            self.built = True

    # Adaptation outside `fit`/`evaluate` ------------------------------

    def call_adapted(self, support_x, support_y, query_x, steps=None):
        """Adapts to a support set and returns the query outputs, as tensors.

        The computation behind `adapt_and_predict()` and the exported
        `adapt_and_predict` signature, for use inside a `tf.function` or an
        exported graph: no input checks, nothing converted to NumPy, nothing
        written to any variable.

        Args:
            support_x: Support inputs, `[S, *input_shape]`.
            support_y: Support targets, `[S, ...]`.
            query_x: Query inputs, `[Q, *input_shape]`.
            steps: Adaptation steps (a Python int or a scalar int32 tensor);
                defaults to `eval_inner_steps`.

        Returns:
            The query outputs, a tensor.
        """
        engine = self._task_adapter(self._eval_settings(steps))
        adaptation = engine.adapt(*self._meta_weights(), support_x, support_y)
        return engine.query(adaptation.weights, adaptation.state, query_x)[1]

    def adapt(self, support_x, support_y, *, steps=None):
        """Returns a copy of the wrapped model adapted to one task.

        Runs the same adaptation as `evaluate` from the current meta-weights,
        which are left untouched. The copy's BatchNormalization layers hold
        the support set's statistics under the adapted weights, so it
        predicts one example at a time as non-transductive evaluation does
        (docs/training.md#non-trainable-state); call it with `training=True`
        on a query batch for transductive predictions.

        Args:
            support_x: Support inputs, `[S, *input_shape]`.
            support_y: Support targets, `[S]` (class ids `0..ways-1` for
                classification).
            steps: Number of adaptation steps; defaults to
                `eval_inner_steps`.

        Returns:
            A new `keras.Model` of the same architecture as the wrapped model.
        """
        support_x, support_y, _, _ = self._checks().task(support_x, support_y)
        steps = _entry_checks.steps(steps, self.eval_inner_steps)
        weights, state = self._compiled_adapt(support_x, support_y, steps)
        self._check_adaptation(support_x, support_y, steps, weights=weights)
        return _task_adapter.adapted_copy(self.model, weights, state, support_x.shape[1:])

    def meta_update(self, support_x, support_y, query_x=None, query_y=None):
        """Meta-trains on one new task: a single meta-step on that task alone.

        The task updates the meta-weights θ as one `fit` step on a meta-batch
        of just this task would, through the same compiled train step (see
        docs/training.md#tasks-that-keep-arriving). With Reptile and
        `SGD(learning_rate=ε)` that is θ ← θ + ε (φ − θ). Inputs are checked
        as `adapt()` checks them, before any work.

        Args:
            support_x: Support inputs, `[S, *input_shape]`.
            support_y: Support targets, `[S, ...]` (class ids `0..ways-1` for
                a sparse classification loss).
            query_x: Query inputs, `[Q, *input_shape]`. Required with FOMAML
                and MAML; optional with Reptile, where they only feed the
                returned logs.
            query_y: Query targets, `[Q, ...]`, given with `query_x`.

        Returns:
            A dict of floats: the compiled loss and metrics of the task's
            adapted weights on the query set (the support set if there is
            none), computed in training mode as `fit` reports them.

        Raises:
            ValueError: If an input has the wrong shape, holds NaN or Inf
                values or labels outside the model's outputs, if only one of
                `query_x` and `query_y` is given, or if the algorithm needs a
                query set and none is given.

        Example:

        >>> import keras, numpy as np, keras_reptile
        >>> net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(
        ...     16, activation="tanh"), keras.layers.Dense(1)])
        >>> model = keras_reptile.ReptileModel(net, inner_steps=5, inner_batch_size=10,
        ...     inner_optimizer=keras.optimizers.SGD(0.02))
        >>> model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        >>> tasks = keras_reptile.datasets.sine(shots=10, meta_batch_size=4, seed=0)
        >>> history = model.fit(tasks, steps_per_epoch=10, verbose=0)
        >>> x = np.linspace(-5.0, 5.0, 10, dtype="float32")[:, None]
        >>> logs = model.meta_update(x, 2.0 * np.sin(x[:, 0] - 1.0))
        >>> sorted(logs)
        ['loss']
        """
        task = self._checks().meta_update_task(support_x, support_y, query_x, query_y)
        logs = self.train_on_batch(_distribution.one_task_per_replica(
            task, self.distribute_strategy.num_replicas_in_sync), return_dict=True)
        return {key: float(value) for key, value in logs.items()}

    def adapt_and_predict(self, support_x, support_y, query_x, *, steps=None):
        """Adapts to a support set and returns the adapted model's query outputs.

        The same computation as `adapt(support_x, support_y).predict(query_x)`
        (or, with `transductive=True`, its `training=True` call on the query
        batch), without building a model. The meta-weights are untouched.

        Args:
            support_x: Support inputs, `[S, *input_shape]`.
            support_y: Support targets, `[S]`.
            query_x: Query inputs, `[Q, *input_shape]`.
            steps: Number of adaptation steps; defaults to
                `eval_inner_steps`.

        Returns:
            The query outputs as a NumPy array.
        """
        support_x, support_y, query_x, _ = self._checks().task(support_x, support_y, query_x)
        steps = _entry_checks.steps(steps, self.eval_inner_steps)
        function = self._functions.get(
            "adapt_and_predict", self.call_adapted,
            [support_x, support_y, query_x], self._trace_settings(), scalars=1,
        )
        outputs = function(support_x, support_y, query_x, tf.constant(steps, tf.int32))
        self._check_adaptation(support_x, support_y, steps, outputs=outputs)
        return keras.ops.convert_to_numpy(outputs)

    def _compiled_adapt(self, support_x, support_y, steps):
        def adapt_fn(support_x, support_y, steps):
            # `adapt()`'s copy predicts one example at a time: always the
            # support statistics.
            settings = self._eval_settings(steps)._replace(transductive=False)
            adaptation = self._task_adapter(settings).adapt(
                *self._meta_weights(), support_x, support_y
            )
            return adaptation.weights, adaptation.state

        function = self._functions.get(
            "adapt", adapt_fn, [support_x, support_y], self._trace_settings(), scalars=1
        )
        return function(support_x, support_y, tf.constant(steps, tf.int32))

    def _check_adaptation(self, support_x, support_y, steps, **result):
        """Raises if the adaptation made `result` non-finite (`_finite_guard`)."""
        _finite_guard.check_adaptation(
            lambda k: self._compiled_adapt(support_x, support_y, k)[0], steps,
            self.model.trainable_variables, **result)

    def export(self, filepath, format="tf_saved_model", verbose=True, input_signature=None,
               *, max_steps="auto", max_support="auto", max_query="auto", overwrite=False):
        """Exports a SavedModel for TF Serving that adapts per request.

        Signatures: `serving_default` (`x` -> the wrapped model's outputs at
        the meta-weights, plus `probabilities` for classifiers),
        `adapt_and_predict` (`support_x`, `support_y`, `query_x` -> query
        outputs after `adapt_and_predict()`'s adaptation) and
        `adapt_and_predict_steps` (the same plus a required `steps`).
        See `keras_reptile.export.export_saved_model` for details. To freeze
        one adapted task model instead, export `adapt()`'s result.

        Args:
            filepath: Directory to write, e.g. `saved_models/<name>/<version>`
                (see `keras_reptile.export.next_version_path`).
            format: Only `"tf_saved_model"` is supported.
            verbose: Whether to report the written signatures.
            input_signature: Optional input spec of the wrapped model, as for
                `keras.Model.export`; needed only for subclassed models.
            max_steps: Bound on a request's `steps`: "auto" (10 x
                `eval_inner_steps`), a positive int, or None (unbounded).
            max_support: Bound on a request's support rows ("auto": 1,000).
            max_query: Bound on a request's query rows ("auto": 10,000).
            overwrite: Whether to replace an existing non-empty `filepath`.

        Returns:
            The path written, as a string.

        Example:

        >>> model.export("saved_models/omniglot/1")  # doctest: +SKIP
        """
        _validation.check_export_format(format)
        return export_lib.export_saved_model(
            self, filepath, verbose=verbose, input_signature=input_signature,
            max_steps=max_steps, max_support=max_support, max_query=max_query,
            overwrite=overwrite,
        )
