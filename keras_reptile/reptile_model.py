"""`ReptileModel`: meta-learning (Reptile, FOMAML, MAML, ANIL, Meta-SGD) as a Keras model.

The model holds the settings, the config and Keras's hooks, runs the three
steps and applies the outer update. The work is done by collaborators that
never see the model, each testable on its own:

* `_task_adapter`: adapts θ to tasks (one by one or batched) and predicts
  their query sets, for the steps, `adapt()`, `adapt_and_predict()` and
  export; `algorithms` turns the adapted tasks into the outer gradient;
* `_inner_state`: where each task's inner optimizer starts, and the state
  carried across meta-steps;
* `_validation`: every check of episodes, arrays and arguments;
* `_distribution`: replica shares and cross-replica writes;
* `_step_functions`: trace keys, the XLA choice and fallback, cached
  `tf.function`s; `_finite_guard`: never applying a non-finite meta-step.
"""

import keras
import tensorflow as tf

from keras_reptile import _compat
from keras_reptile import _distribution
from keras_reptile import _inner_state
from keras_reptile import _step_functions
from keras_reptile import _task_adapter
from keras_reptile import _validation
from keras_reptile import algorithms
from keras_reptile import batched_tasks as batched_tasks_lib
from keras_reptile import export as export_lib
from keras_reptile import heads
from keras_reptile import inner_loop
from keras_reptile._finite_guard import NonFiniteGuard
from keras_reptile._finite_guard import check_adaptation
from keras_reptile._losses import loss_kind
from keras_reptile._validation import EPISODE_KEYS
from keras_reptile._validation import check_positive_int


def _fixed_at_construction(name):
    """A read-only property whose assignment is an error, not a no-op.

    (Keras's `__setattr__` would otherwise store the value beside the
    property, where nothing reads it.)
    """

    def get(self):
        return getattr(self, "_" + name)

    def refuse(self, value):
        raise AttributeError(
            f"`{name}` is fixed at construction: it shapes the compiled steps "
            f"and the model's variables. Build a new `ReptileModel` with "
            f"{name}={value!r} instead."
        )

    return property(get, refuse)


def _checked_setting(name, check):
    """A setting that may change after construction, checked on assignment."""

    def get(self):
        return getattr(self, "_" + name)

    def set(self, value):
        setattr(self, "_" + name, check(name, value))

    return property(get, set)


@keras.saving.register_keras_serializable(package="keras_reptile")
class ReptileModel(_compat.BuildBeforeTrace, keras.Model):
    """Meta-trains any Keras model with Reptile, FOMAML, MAML, ANIL or Meta-SGD.

    `fit` takes an episodic dataset (see `keras_reptile.episodes`): each
    element is a meta-batch of tasks with a support and a query set. One
    training step adapts a copy of the current meta-weights θ to each task's
    support set with `inner_steps` steps of `inner_optimizer` (fresh
    optimizer state per task; batches of `inner_batch_size` rows taken in
    order from the support set), giving adapted weights φ_b, and then hands
    the pseudo-gradient `θ - mean_b φ_b` to the optimizer given to
    `compile()`. With `SGD(learning_rate=ε)` that is Reptile's update
    θ ← θ + ε (mean φ − θ); any Keras optimizer or learning-rate schedule
    can be used instead. The query set never updates anything during
    training with Reptile; the step reports the compiled loss and metrics of
    the adapted weights on it, so `fit` shows few-shot progress.

    `algorithm` chooses how the outer gradient is made from the adapted
    tasks (see `keras_reptile.algorithms`): `"reptile"` (the above, Nichol
    et al., 2018), `"fomaml"` (the query loss's gradient at φ), `"maml"`
    (the query loss differentiated through the whole inner loop), `"anil"`
    (MAML with an inner loop adapting only the head) or `"metasgd"` (MAML
    with learned per-weight inner rates, variables of this model). With
    `head="prototype"` every task's inner loop starts from θ with the final
    Dense layer set from the support set's class-mean embeddings (see
    `keras_reptile.heads`), so tasks may have any number of ways up to that
    layer's size.

    `evaluate` (and `validation_data`) adapts from θ to each episode's
    support set with `eval_inner_steps` steps of `eval_inner_batch_size`
    rows and reports loss and metrics on its query set; θ is unchanged.
    For models built from the usual layers it adapts all tasks of a
    meta-batch in one batched computation (`batched_tasks`).
    `adapt()` returns an adapted copy of the wrapped model, and
    `adapt_and_predict()` the adapted model's query outputs.

    `compile(jit_compile="auto")` (Keras's default) compiles the meta-step
    with XLA also on machines without accelerators, where Keras would not
    (the meta-step is many small ops that XLA fuses). It stays off where XLA
    cannot compile the step: several replicas, layers without XLA support,
    or a second-order gradient through a `tf.while_loop` (MAML with more
    than `keras_reptile.inner_loop.MAX_UNROLLED_STEPS` inner steps); if XLA
    still fails on an op Keras cannot see (such as `tf.numpy_function`), the
    step falls back to the plain graph with a warning. Evaluation and
    prediction keep Keras's own choice. An explicit `jit_compile=True` or
    `False` applies to every step.

    Non-trainable state is handled as follows:

    * During adaptation the wrapped model runs in training mode, so
      BatchNormalization normalises each inner batch with its own
      statistics, as in the paper (also inside subclassed models whose
      `call` takes no `training` argument: Keras passes the mode down).
    * After a meta-step, the floating-point non-trainable variables (the
      BatchNormalization moving statistics) are set to the mean over tasks
      of their values after adaptation; integer state (random seeds) is
      threaded from task to task. The moving statistics are only used when
      the meta-weights themselves predict (`predict`, `call`).
    * After adaptation for evaluation, `transductive=False` (the default)
      sets every BatchNormalization layer's statistics to the mean and
      variance of the whole support set under the adapted weights and
      predicts the query set in inference mode: each query example is
      predicted on its own, no query example influences another, and the
      statistics match the adapted weights (stale moving averages would
      drive accuracy to chance). The models returned by `adapt()` carry
      these statistics, so their `predict` on one example at a time gives
      the same outputs. `transductive=True` normalises with the statistics
      of the query batch instead (the paper's transductive setting).
    * The query metrics reported during training are computed in training
      mode (query-batch statistics): one cheap pass, no extra pass over the
      support set.

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
            the query batch's statistics (see above).
        parallel_tasks: Whether the tasks of a meta-batch (of each replica's
            share, under `tf.distribute`) adapt concurrently or one after the
            other. Either way they are independent computations in one
            compiled step and give identical results. `True` lets TensorFlow's
            executor run the tasks' ops at the same time, which overlaps the
            per-op overhead of small ops on a multi-core CPU; `False` chains
            the tasks, so that only one task's activations are alive at a
            time. `"auto"` (the default) is `True` on machines without GPUs
            and TPUs, and `False` on those, where kernels run one at a time
            on the device anyway. Evaluation may instead run all tasks as one
            batched computation (`batched_tasks`). Fixed at construction.
        batched_tasks: Whether evaluation (`evaluate`, validation,
            `predict` and `few_shot_accuracy` on episodes) adapts all tasks
            of a meta-batch in one batched computation instead of one graph
            branch per task: every weight gets a task axis, convolutions
            become grouped convolutions with one group per task, dense
            layers batched matmuls (see `keras_reptile.batched_tasks`). The
            results are the per-task ones up to float rounding. It applies
            to chains of Conv2D, Dense, BatchNormalization, pooling,
            activation, Flatten and Reshape layers (the paper's conv4 among
            them) without regularisers or constraints, and inner
            optimizers that do not clip by norm. `"auto"` (the default) uses
            it where it applies, when evaluation is not compiled with XLA
            (whose CPU grouped convolutions ran 10x slower) and this
            machine's TensorFlow runs grouped convolutions; `True` also
            requires it, raising a `ValueError` saying why where it does not
            apply; `False` never uses it. The meta-step always adapts task
            by task: batching measured slower than its XLA-compiled
            per-task step at 5-way, and 1.16x faster at 20-way
            (benchmarks/batched_tasks.py). Fixed at construction.
        carry_inner_optimizer_state: If True, the inner optimizer's state
            (e.g. Adam's moment estimates and iteration count) is not reset
            for each task but carried over, as in the paper's code, where
            one Adam instance runs through all tasks. Every task of a
            meta-step starts from the carried state; afterwards it becomes
            the mean over tasks of their final states (the paper's code runs
            tasks one after another, so its state passes from task to task
            instead), with the iteration count advanced by `inner_steps`.
            Evaluation, `adapt()` and export start from the carried state
            and leave it unchanged. The state is saved with the model. Needs
            a built `model`; the state is tied to its trainable variables and
            the inner optimizer's type and options. Fixed at construction.
        algorithm: `"reptile"` (default), `"fomaml"`, `"maml"`, `"anil"`,
            `"metasgd"` or a
            `keras_reptile.algorithms.MetaAlgorithm` such as
            `MAML(first_order=True)`.
        head: None, or `"prototype"` (a `keras_reptile.heads.PrototypeHead`)
            to set the final Dense layer from each task's support set before
            adapting; needs a classification loss.
        **kwargs: Passed to `keras.Model` (e.g. `name`).

    The step and evaluation settings (`inner_steps`, `inner_batch_size`,
    `eval_inner_steps`, `eval_inner_batch_size`, `transductive`) may be
    changed after construction; the next `fit`, `evaluate`, `predict`,
    `adapt` or export uses the new values.

    Example:

    >>> import keras, numpy as np, keras_reptile
    >>> backbone = keras_reptile.models.conv4((28, 28, 1), num_classes=5,
    ...                                       filters=8)
    >>> model = keras_reptile.ReptileModel(backbone, inner_steps=2,
    ...                                    inner_batch_size=5,
    ...                                    eval_inner_steps=3)
    >>> model.compile(
    ...     optimizer=keras.optimizers.SGD(1.0),
    ...     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    ...     metrics=["accuracy"])
    >>> x = np.random.rand(100, 28, 28, 1).astype("float32")
    >>> y = np.repeat(np.arange(10), 10)
    >>> tasks = keras_reptile.episodes.from_arrays(
    ...     x, y, ways=5, shots=1, query_shots=1, meta_batch_size=2, seed=0)
    >>> history = model.fit(tasks, steps_per_epoch=2, verbose=0)
    >>> adapted = model.adapt(x[:5], np.arange(5))
    >>> adapted.predict(x[:5], verbose=0).shape
    (5, 5)
    """

    def __init__(
        self,
        model,
        inner_optimizer=None,
        inner_steps=5,
        inner_batch_size=10,
        eval_inner_steps=50,
        eval_inner_batch_size=None,
        transductive=False,
        parallel_tasks="auto",
        carry_inner_optimizer_state=False,
        algorithm="reptile",
        head=None,
        batched_tasks="auto",
        **kwargs,
    ):
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
            self.inner_batch_size
            if eval_inner_batch_size is None
            else eval_inner_batch_size
        )
        self.transductive = transductive
        self._parallel_tasks = parallel_tasks
        self._batched_tasks = batched_tasks
        self._carry_inner_optimizer_state = carry_inner_optimizer_state
        self._algorithm = algorithm
        self._head = head
        self._jit_request = "auto"
        self._step_keys = _step_functions.StepKeys()
        self._functions = _step_functions.FunctionCache()
        self._finite_guard = None
        # Made up front (again in `build` for a model built later), so that
        # they exist in every code path and in saved models.
        self._algorithm_variables = algorithm.build(
            model, self._keras_rule(), self.add_weight
        )
        self._carried = (
            _inner_state.CarriedInnerState(self.add_weight, self._inner_rule())
            if carry_inner_optimizer_state
            else None
        )
        if model.built:
            self.built = True
            self._check_batched_tasks()

    # ------------------------------------------------------------------
    # Settings

    # Fixed at construction: they shape the traced steps and the variables.
    parallel_tasks = _fixed_at_construction("parallel_tasks")
    batched_tasks = _fixed_at_construction("batched_tasks")
    carry_inner_optimizer_state = _fixed_at_construction("carry_inner_optimizer_state")
    algorithm = _fixed_at_construction("algorithm")
    head = _fixed_at_construction("head")

    # Read by the traced steps: a change makes the next call trace anew
    # (`_trace_settings` is part of every trace's key).
    inner_steps = _checked_setting("inner_steps", check_positive_int)
    inner_batch_size = _checked_setting("inner_batch_size", check_positive_int)
    eval_inner_steps = _checked_setting("eval_inner_steps", check_positive_int)
    eval_inner_batch_size = _checked_setting("eval_inner_batch_size", check_positive_int)
    transductive = _checked_setting("transductive", _validation.check_bool)

    def _trace_settings(self):
        # Everything a trace bakes in besides input shapes: a re-compile (new
        # loss) or a changed setting must not reuse an old trace.
        return (
            _compat.compiled_loss(self),
            self.inner_optimizer,
            self.inner_steps,
            self.inner_batch_size,
            self.eval_inner_steps,
            self.eval_inner_batch_size,
            self.transductive,
            self.algorithm,
            self.head,
            tuple(v.path for v in self.model.trainable_variables),
        )

    def _train_settings(self):
        # Training reports query metrics in training mode: one cheap pass.
        return _task_adapter.Settings(
            self.inner_steps, self.inner_batch_size, True,
            self.algorithm.recompute_inner_steps,
        )

    def _eval_settings(self, steps=None):
        steps = self.eval_inner_steps if steps is None else steps
        return _task_adapter.Settings(
            steps, self.eval_inner_batch_size, self.transductive
        )

    # ------------------------------------------------------------------
    # Keras model API

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
        if self.head is not None:
            self.head.check_model(self.model)
        if not self._algorithm_variables:
            self._algorithm_variables = self.algorithm.build(
                self.model, self._keras_rule(), self.add_weight
            )
        self.built = True

    def call(self, inputs, training=False):
        return self.model(inputs, training=training)

    def get_config(self):
        config = {"name": self.name, "trainable": self.trainable}
        config.update(
            model=keras.layers.serialize(self.model),
            inner_optimizer=keras.optimizers.serialize(self.inner_optimizer),
            inner_steps=self.inner_steps,
            inner_batch_size=self.inner_batch_size,
            eval_inner_steps=self.eval_inner_steps,
            eval_inner_batch_size=self.eval_inner_batch_size,
            transductive=self.transductive,
            parallel_tasks=self.parallel_tasks,
            batched_tasks=self.batched_tasks,
            carry_inner_optimizer_state=self.carry_inner_optimizer_state,
            algorithm=keras.saving.serialize_keras_object(self.algorithm),
            head=(
                None
                if self.head is None
                else keras.saving.serialize_keras_object(self.head)
            ),
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["model"] = keras.layers.deserialize(
            config["model"], custom_objects=custom_objects
        )
        config["inner_optimizer"] = keras.optimizers.deserialize(
            config["inner_optimizer"], custom_objects=custom_objects
        )
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

    def _train_jit_compile(self):
        """Whether the meta-step is compiled with XLA (see `_step_functions`)."""
        settings = self._train_settings()
        return _step_functions.meta_step_uses_xla(
            self._jit_request,
            self.jit_compile,
            self.run_eagerly,
            self.distribute_strategy.num_replicas_in_sync,
            all(layer.supports_jit for layer in _compat.flatten_layers(self)),
            self.algorithm.differentiates_inner_loop
            and not inner_loop.is_unrolled(settings.steps, settings.recompute),
        )

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        if self._finite_guard is None:
            self._finite_guard = NonFiniteGuard(self.distribute_strategy)
        guard = self._finite_guard
        train_function = _step_functions.with_xla_fallback(
            self._keras_train_function,
            self._train_jit_compile(),
            self._jit_request == "auto",
            # The variable list and message are built only after a failure:
            # this runs after every step.
            lambda: guard.check(self._step_variables, self._kept_description),
        )
        _compat.swap_train_function(self, train_function)
        return train_function

    def _keras_train_function(self, xla):
        """Keras's step function, compiled with XLA or not; `fit` keeps
        calling the current `train_function`."""
        current = self.train_function
        with _compat.jit_compile_as(self, xla):
            super().make_train_function(force=True)
        return _compat.swap_train_function(self, current)

    def _kept_description(self):
        kept = ["the meta-weights", "the outer optimizer's state"]
        if self.model.non_trainable_variables:
            kept.append("the non-trainable state (e.g. BatchNorm statistics)")
        if self._carried is not None:
            kept.append("the carried inner-optimizer state")
        text = ", ".join(kept[:-1]) + " and " + kept[-1]
        return text[0].upper() + text[1:]

    def _before(self, kind, x, is_batch=False, validation_data=None, callbacks=None):
        """Checks a call's data before Keras runs it; drops a step traced for other inputs.

        Args:
            kind: "train", "test" or "predict".
            x: The call's data (a dataset, or one batch if `is_batch`).
            is_batch: Whether `x` is one batch (`*_on_batch`).
            validation_data: `fit`'s validation data.
            callbacks: `fit`'s callbacks (None for `train_on_batch`).
        """
        validation = _validation.episode_element(validation_data)
        self._check_replica_split(_validation.meta_batch_size(validation))
        tasks = _validation.meta_batch_size(x, is_batch)
        self._check_replica_split(tasks)
        if kind == "train":
            self._check_algorithm_supported()
        if self._step_keys.changed(kind, tasks, self._trace_settings()):
            getattr(self, f"make_{kind}_function")(force=True)
        if kind == "test":
            self._check_episode_data("x", x, is_batch)
        elif kind == "train":
            self._check_episode_data("x", x, is_batch)
            _validation.check_trainable(self.model)
            if validation is not None:
                self._check_episode_data("validation_data", validation)
            if callbacks is not None:
                _validation.check_callbacks(
                    callbacks, _compat.raw_learning_rate(self.optimizer)
                )

    def _check_algorithm_supported(self):
        _validation.check_second_order_replicas(
            self.algorithm,
            self.algorithm.differentiates_inner_loop,
            self.distribute_strategy.num_replicas_in_sync,
        )

    def _check_replica_split(self, tasks):
        """Raises before any work if `tasks` cannot be split evenly."""
        _distribution.check_even_split(
            tasks, self.distribute_strategy.num_replicas_in_sync
        )

    def _build_from_data(self, data_batch):
        # Called before the first trace (see `_compat.BuildBeforeTrace`):
        # builds the compiled loss, metrics and optimizer from the flat query
        # batch an episode batch stands for, so meta-steps compile once.
        episodes = self._unpack_episodes(_distribution.first_replica_batch(
            _validation.episode_element(data_batch), self.distribute_strategy
        ))
        flat = tuple(
            keras.KerasTensor((None,) + tuple(v.shape[2:]), v.dtype.name)
            for v in (episodes["query_x"], episodes["query_y"])
        )
        with self.distribute_strategy.scope():
            _compat.symbolic_build(self, flat)

    # ------------------------------------------------------------------
    # Meta-training and evaluation steps

    def train_step(self, data):
        episodes = self._unpack_episodes(data)
        theta, state = self._meta_weights()
        engine = self._task_adapter(self._train_settings())
        results = engine.run(episodes, theta, state, self.algorithm)
        gradient = self.algorithm.outer_gradient(theta, results)
        self._finite_guard.run(
            self._step_variables(),
            self.optimizer.iterations,
            lambda: self._apply_meta_step(gradient, results),
        )
        return self._report(episodes, results)

    def test_step(self, data):
        episodes = self._unpack_episodes(data)
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
        data = dict(data)
        # Only the shape matters for the checks; no loss is computed.
        data["query_y"] = data["support_y"][:, :1]
        episodes = self._unpack_episodes(data, check_query_y=False)
        episodes["query_y"] = None
        return tf.stack([r.query_outputs for r in self._evaluate_tasks(episodes)])

    # ------------------------------------------------------------------
    # The meta-step's parts

    def _meta_weights(self):
        return (
            _values(self._outer_variables()),
            _values(self.model.non_trainable_variables),
        )

    def _outer_variables(self):
        """θ, then the algorithm's own meta-learned variables (Meta-SGD's α)."""
        return list(self.model.trainable_variables) + list(self._algorithm_variables)

    def _evaluate_tasks(self, episodes):
        """Adapts θ to every task and predicts its query set; `TaskResult`s."""
        theta, state = self._meta_weights()
        engine = self._task_adapter(self._eval_settings())
        return engine.run(episodes, theta, state, batched=self._evaluates_batched())

    def _task_adapter(self, settings):
        """The task engine for this model's network, inner optimizer, loss and head."""
        self._check_compiled()
        rule = self._inner_rule()
        return _task_adapter.TaskAdapter(
            self.model,
            rule,
            self._task_loss,
            settings,
            head=self.head,
            one_hot_targets=loss_kind(self.loss)[0] == "categorical",
            inner_start=(
                _inner_state.FRESH if self._carried is None else self._carried.read(rule)
            ),
            parallel=self._tasks_run_in_parallel(),
        )

    def _evaluates_batched(self):
        """Whether evaluation adapts the meta-batch's tasks in one computation."""
        if self.batched_tasks is False:
            return False
        if self.batched_tasks is True:
            self._check_batched_tasks()
            return True
        return not self.jit_compile and self._batched_tasks_reason() is None

    def _batched_tasks_reason(self):
        rule = self._inner_rule()
        if rule.parameters:
            return ("the inner loop's learning rates are meta-learned per "
                    "weight entry, which the batched weight layout does not carry")
        return batched_tasks_lib.unsupported_reason(self.model, rule)

    def _check_batched_tasks(self):
        if self.batched_tasks is True:
            _validation.check_batched_tasks_reason(self._batched_tasks_reason())

    def _apply_meta_step(self, gradient, results):
        """The outer update: θ, the non-trainable state, the carried inner state."""
        self.optimizer.apply(
            _distribution.replica_share(self.optimizer, gradient),
            self._outer_variables(),
        )
        _distribution.assign_summed(
            self.model.non_trainable_variables, _task_adapter.state_after(results)
        )
        if self._carried is not None:
            self._carried.assign(_inner_state.after_meta_step(
                self._carried.read(self._inner_rule()),
                [r.adaptation.optimizer_state for r in results],
                self.inner_steps,
            ))

    def _step_variables(self):
        """Every variable a meta-step writes (metrics aside)."""
        return list(self.weights) + list(self.optimizer.variables)

    def _report(self, episodes, results):
        query_y = episodes["query_y"]
        y_true = tf.reshape(query_y, [-1] + list(query_y.shape[2:]))
        y_pred = tf.concat([r.query_outputs for r in results], axis=0)
        loss = self._task_loss(y_true, y_pred)
        _compat.loss_tracker(self).update_state(
            loss, sample_weight=tf.shape(y_true)[0]
        )
        return _distribution.logs_for_workers(self.compute_metrics(None, y_true, y_pred))

    def _tasks_run_in_parallel(self):
        if self.parallel_tasks != "auto":
            return self.parallel_tasks
        accelerators = tf.config.list_logical_devices(
            "GPU"
        ) + tf.config.list_logical_devices("TPU")
        return not accelerators

    def _task_loss(self, y_true, y_pred):
        return _distribution.unscaled_loss(_compat.compiled_loss(self)(y_true, y_pred))

    def _keras_rule(self):
        return inner_loop.InnerOptimizer(
            self.inner_optimizer, self.model.trainable_variables
        )

    def _inner_rule(self):
        return self.algorithm.inner_rule(
            self.model, self._keras_rule(), self._algorithm_variables
        )

    # ------------------------------------------------------------------
    # Adaptation outside `fit`/`evaluate`

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

        Runs the same adaptation as `evaluate` (the head, if any, then
        `eval_inner_steps` steps of `eval_inner_batch_size` rows of the inner
        optimizer) from the current meta-weights, which are left untouched.
        BatchNormalization layers of the copy hold the support set's
        statistics under the adapted weights (see the class docstring), so
        the copy predicts one example at a time exactly as non-transductive
        evaluation does; call it with `training=True` on a query batch for
        transductive predictions.

        Args:
            support_x: Support inputs, `[S, *input_shape]`.
            support_y: Support targets, `[S]` (class ids `0..ways-1` for
                classification).
            steps: Number of adaptation steps; defaults to
                `eval_inner_steps`.

        Returns:
            A new `keras.Model` of the same architecture as the wrapped model.
        """
        support_x, support_y, _, _ = self._check_task(support_x, support_y)
        weights, state = self._compiled_adapt(
            support_x, support_y, self._check_steps(steps)
        )
        check_adaptation(lambda k: self._compiled_adapt(support_x, support_y, k)[0],
                         self._check_steps(steps), self.model.trainable_variables, weights=weights)
        return _task_adapter.adapted_copy(
            self.model, weights, state, support_x.shape[1:]
        )

    def meta_update(self, support_x, support_y, query_x=None, query_y=None):
        """Meta-trains on one new task: a single meta-step on that task alone.

        For tasks that keep arriving after deployment. The task updates the
        meta-weights θ as one `fit` step on a meta-batch of just this task
        would: it is adapted from θ with the training settings (`inner_steps`
        steps of `inner_batch_size` rows of the inner optimizer), the model's
        `algorithm` makes the outer gradient, and the optimizer given to
        `compile()` applies it. With Reptile and `SGD(learning_rate=ε)` that
        is θ ← θ + ε (φ − θ) for the task's adapted weights φ. The update
        runs through the same compiled train step as `fit` and
        `train_on_batch` (execution mode, distribution strategy and carried
        inner state included) and advances the outer optimizer's state as a
        `fit` step does: its `iterations`, its moments, a learning-rate
        schedule's position.

        Reptile's update needs the support set only; without a query set the
        returned loss and metrics are those of the adapted weights on the
        support set. FOMAML and MAML differentiate a query loss, so they need
        `query_x` and `query_y` (held-out examples of the same task), and
        raise without them: splitting the support set on the caller's behalf
        would quietly shrink the set the task adapts on.

        Inputs are checked as `adapt()` checks its support set (the query set
        the same way) before any work: a bad input raises and leaves the
        meta-weights and the optimizer untouched. Calls on tasks of the same
        shapes reuse one traced step; alternating with `fit` on a larger
        meta-batch traces the step anew at each switch.

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
        >>> net = keras.Sequential([keras.Input((1,)),
        ...                         keras.layers.Dense(16, activation="tanh"),
        ...                         keras.layers.Dense(1)])
        >>> model = keras_reptile.ReptileModel(
        ...     net, inner_optimizer=keras.optimizers.SGD(0.02), inner_steps=5,
        ...     inner_batch_size=10)
        >>> model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
        >>> tasks = keras_reptile.datasets.sine(shots=10, meta_batch_size=4,
        ...                                     seed=0)
        >>> history = model.fit(tasks, steps_per_epoch=10, verbose=0)
        >>> x = np.linspace(-5.0, 5.0, 10, dtype="float32")[:, None]
        >>> logs = model.meta_update(x, 2.0 * np.sin(x[:, 0] - 1.0))
        >>> sorted(logs)
        ['loss']
        """
        support_x, support_y, query_x, query_y = self._check_task(
            support_x, support_y, query_x, query_y, query_targets=True
        )
        if query_x is None:
            _validation.check_query_needed(
                self.algorithm, not isinstance(self.algorithm, algorithms.Reptile)
            )
            # Reptile's outer gradient never reads the query set: the support
            # set stands in for it and only shapes the returned logs.
            query_x, query_y = support_x, support_y
        task = dict(zip(EPISODE_KEYS, (support_x, support_y, query_x, query_y)))
        logs = self.train_on_batch(
            _distribution.one_task_per_replica(
                task, self.distribute_strategy.num_replicas_in_sync
            ),
            return_dict=True,
        )
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
        support_x, support_y, query_x, _ = self._check_task(
            support_x, support_y, query_x
        )
        steps = self._check_steps(steps)
        function = self._functions.get(
            "adapt_and_predict", self.call_adapted,
            [support_x, support_y, query_x], self._trace_settings(), scalars=1,
        )
        outputs = function(
            support_x, support_y, query_x, tf.constant(steps, tf.int32)
        )
        check_adaptation(lambda k: self._compiled_adapt(support_x, support_y, k)[0],
                         steps, self.model.trainable_variables, outputs=outputs)
        return keras.ops.convert_to_numpy(outputs)

    def export(
        self,
        filepath,
        format="tf_saved_model",
        verbose=True,
        input_signature=None,
        *,
        max_steps="auto",
        max_support="auto",
        max_query="auto",
        overwrite=False,
    ):
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
            max_steps: Upper bound on a request's `steps`: "auto" (10 x
                `eval_inner_steps`), a positive int, or None (unbounded).
            max_support: Upper bound on a request's support rows ("auto":
                1,000; None: unbounded).
            max_query: Upper bound on a request's query rows ("auto":
                10,000; None: unbounded).
            overwrite: Whether to replace an existing non-empty `filepath`.

        Returns:
            The path written, as a string.

        Example:

        >>> model.export("saved_models/omniglot/1")  # doctest: +SKIP
        """
        if format != "tf_saved_model":
            raise ValueError(
                "`ReptileModel.export` only supports "
                "format='tf_saved_model': the `adapt_and_predict` signature "
                "runs TensorFlow's inner loop. To export only the wrapped "
                "model at the meta-weights, call "
                "`model.model.export(filepath, format=...)`. Received: "
                f"format={format!r}"
            )
        return export_lib.export_saved_model(
            self,
            filepath,
            verbose=verbose,
            input_signature=input_signature,
            max_steps=max_steps,
            max_support=max_support,
            max_query=max_query,
            overwrite=overwrite,
        )

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

    # ------------------------------------------------------------------
    # Input checks

    def _check_compiled(self):
        _validation.check_compiled(
            self.compiled, _compat.compiled_loss(self), self.loss, self.head
        )

    def _ensure_built(self, example_shape):
        if not self.model.built:
            self.build((None,) + tuple(example_shape))
        elif not self.built:
            self.built = True

    def _unpack_episodes(self, data, check_query_y=True):
        episodes = _validation.check_episodes(data, check_query_y)
        self._ensure_built(episodes["support_x"].shape[2:])
        return episodes

    def _check_task(self, support_x, support_y, query_x=None, query_y=None,
                    query_targets=False):
        """A task's arrays as checked tensors (see `_validation.check_task`)."""
        self._check_compiled()
        return _validation.check_task(
            self.model, loss_kind(self.loss)[0], support_x, support_y, query_x,
            query_y, build=self._ensure_built, query_targets=query_targets,
        )

    def _output_shape(self, example_shape, dtype):
        """The wrapped model's output shape for one example, e.g. `(5,)`."""
        return _validation.output_shape(self.model, example_shape, dtype)

    def _check_episode_data(self, source, data, is_batch=False):
        """Checks the targets of the episodes a `fit`/`evaluate` call will read, up front.

        See `_validation.check_episode_targets`.
        """
        spec = _validation.episode_spec(data, is_batch)
        if spec is None:
            return  # Not episodes: the step's own checks name what is wrong.
        self._check_compiled()
        example = _validation.example_spec(spec)
        if example is None:
            return  # Shapes known only once the step runs.
        example_shape, x_dtype = example
        if not self.model.built:
            with self.distribute_strategy.scope():
                self._ensure_built(example_shape)
        _validation.check_episode_targets(
            source,
            data,
            spec,
            self._output_shape(example_shape, x_dtype),
            loss_kind(self.loss)[0],
        )

    def _check_steps(self, steps):
        if steps is None:
            return self.eval_inner_steps
        return check_positive_int("steps", steps)


def _values(variables):
    return [tf.convert_to_tensor(v) for v in variables]


