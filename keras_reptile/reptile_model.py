"""`ReptileModel`: meta-learning (Reptile, FOMAML, MAML) as a Keras model."""

import inspect
import warnings
from typing import Any
from typing import NamedTuple

import keras
import tensorflow as tf

from keras_reptile import _compat
from keras_reptile import algorithms
from keras_reptile import batched_tasks as batched_tasks_lib
from keras_reptile import export as export_lib
from keras_reptile import heads
from keras_reptile import inner_loop
from keras_reptile._finite_guard import NonFiniteGuard
from keras_reptile._losses import loss_kind
from keras_reptile._validation import check_class_labels
from keras_reptile._validation import check_finite_rows
from keras_reptile._validation import check_numeric
from keras_reptile._validation import check_positive_int

EPISODE_KEYS = ("support_x", "support_y", "query_x", "query_y")


class _Settings(NamedTuple):
    """How one kind of call adapts: training, or evaluation and adaptation."""

    steps: Any
    batch_size: int
    transductive: bool
    # Recompute each inner step's activations in the backward pass (memory
    # for time, for algorithms that differentiate through the inner loop).
    recompute: bool = False


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


@keras.saving.register_keras_serializable(package="keras_reptile")
class ReptileModel(_compat.BuildBeforeTrace, keras.Model):
    """Meta-trains any Keras model with Reptile, FOMAML or MAML.

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
    et al., 2018), `"fomaml"` (the query loss's gradient at φ) or `"maml"`
    (the query loss differentiated through the whole inner loop). With
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
    with XLA also on machines without accelerators, where Keras would not:
    the meta-step is many small ops that XLA fuses: 1.6-2.3x faster at the
    paper's 5-way settings on a 2-core CPU, as fast at 20-way, where the
    inner batches are larger (see the README's speed table). It stays off
    where XLA cannot compile the step: several replicas, layers without XLA
    support, or a second-order gradient through a `tf.while_loop` (MAML
    with more than `keras_reptile.inner_loop.MAX_UNROLLED_STEPS` inner
    steps); if XLA still fails on an op Keras cannot see (such as
    `tf.numpy_function`), the step falls back to the plain graph with a
    warning.
    Evaluation and prediction keep Keras's own choice. An explicit
    `jit_compile=True` or `False` applies to every step.

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

    The step and evaluation settings (`inner_steps`, `inner_batch_size`,
    `eval_inner_steps`, `eval_inner_batch_size`, `transductive`) may be
    changed after construction; the next `fit`, `evaluate`, `predict`,
    `adapt` or export uses the new values.
        algorithm: `"reptile"` (default), `"fomaml"`, `"maml"` or a
            `keras_reptile.algorithms.MetaAlgorithm` such as
            `MAML(first_order=True)`.
        head: None, or `"prototype"` (a `keras_reptile.heads.PrototypeHead`)
            to set the final Dense layer from each task's support set before
            adapting; needs a classification loss.
        **kwargs: Passed to `keras.Model` (e.g. `name`).

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
        if not isinstance(model, keras.Model):
            raise TypeError(
                "Expected `model` to be a `keras.Model`. Received: "
                f"model={model!r} of type {type(model).__name__}"
            )
        if isinstance(model, ReptileModel):
            raise TypeError(
                "Expected `model` to be the network to meta-train, not "
                "another `ReptileModel`. Received: model=" + model.name
            )
        outputs = getattr(model, "outputs", None)
        if model.built and outputs is not None and len(outputs) != 1:
            raise ValueError(
                "Expected `model` to have a single output. Received a model "
                f"with {len(outputs)} outputs."
            )
        if parallel_tasks != "auto" and not isinstance(parallel_tasks, bool):
            raise ValueError(
                'Expected `parallel_tasks` to be "auto", True or False. '
                f"Received: parallel_tasks={parallel_tasks!r}"
            )
        if batched_tasks != "auto" and not isinstance(batched_tasks, bool):
            raise ValueError(
                'Expected `batched_tasks` to be "auto", True or False. '
                f"Received: batched_tasks={batched_tasks!r}"
            )
        if not isinstance(carry_inner_optimizer_state, bool):
            raise TypeError(
                "Expected `carry_inner_optimizer_state` to be a bool. Received: "
                f"carry_inner_optimizer_state={carry_inner_optimizer_state!r}"
            )
        if carry_inner_optimizer_state and not (
            model.built and model.trainable_variables
        ):
            # The carried state is made from the model's variables, up front,
            # so that it exists in every code path and in saved models.
            raise ValueError(
                "Expected a built `model` with trainable variables when "
                "`carry_inner_optimizer_state=True`. Received a model with "
                f"built={model.built} and {len(model.trainable_variables)} "
                "trainable variables. Build it first, e.g. call it on a batch."
            )
        algorithm = algorithms.get(algorithm)
        head = heads.get(head)
        if head is not None and model.built:
            head.check_model(model)
        inner_optimizer = inner_loop.get_optimizer(inner_optimizer)

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
        self._adapt_functions = {}
        self._jit_request = "auto"
        self._step_keys = {}
        self._inner_state = None
        self._finite_guard = None
        self._create_inner_state()
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
    @property
    def inner_steps(self):
        return self._inner_steps

    @inner_steps.setter
    def inner_steps(self, value):
        self._inner_steps = check_positive_int("inner_steps", value)

    @property
    def inner_batch_size(self):
        return self._inner_batch_size

    @inner_batch_size.setter
    def inner_batch_size(self, value):
        self._inner_batch_size = check_positive_int("inner_batch_size", value)

    @property
    def eval_inner_steps(self):
        return self._eval_inner_steps

    @eval_inner_steps.setter
    def eval_inner_steps(self, value):
        self._eval_inner_steps = check_positive_int("eval_inner_steps", value)

    @property
    def eval_inner_batch_size(self):
        return self._eval_inner_batch_size

    @eval_inner_batch_size.setter
    def eval_inner_batch_size(self, value):
        self._eval_inner_batch_size = check_positive_int(
            "eval_inner_batch_size", value
        )

    @property
    def transductive(self):
        return self._transductive

    @transductive.setter
    def transductive(self, value):
        if not isinstance(value, bool):
            raise TypeError(
                "Expected `transductive` to be a bool. Received: "
                f"transductive={value!r}"
            )
        self._transductive = value

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
        return _Settings(self.inner_steps, self.inner_batch_size, True,
                         self.algorithm.recompute_inner_steps)

    def _eval_settings(self, steps=None):
        steps = self.eval_inner_steps if steps is None else steps
        return _Settings(steps, self.eval_inner_batch_size, self.transductive)

    # ------------------------------------------------------------------
    # Keras model API

    def build(self, input_shape):
        if not self.model.built:
            self.model.build(input_shape)
        if self.head is not None:
            self.head.check_model(self.model)
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

    # Keras traces its step functions with `reduce_retracing=True`: a second
    # meta-batch size would be traced as `None`, and the tasks of a meta-batch
    # are unrolled, so each entry point retraces for a new meta-batch size,
    # and for changed settings.
    def fit(self, *args, **kwargs):
        bound = inspect.signature(keras.Model.fit).bind(self, *args, **kwargs)
        validation = _episode_element(bound.arguments.get("validation_data"))
        self._check_replica_split(_meta_batch_size(validation))
        self._prepare_step("train", bound.arguments.get("x"))
        self._check_training_data(bound.arguments.get("x"), validation)
        self._check_callbacks(bound.arguments.get("callbacks"))
        return super().fit(*args, **kwargs)

    def _check_callbacks(self, callbacks):
        # Keras's ReduceLROnPlateau fails only at its first reduction, many
        # epochs into the run, when the learning rate is a schedule.
        schedule = _compat.raw_learning_rate(self.optimizer)
        for callback in callbacks or []:
            if isinstance(callback, keras.callbacks.ReduceLROnPlateau) and isinstance(
                schedule, keras.optimizers.schedules.LearningRateSchedule
            ):
                raise ValueError(
                    "`ReduceLROnPlateau` cannot lower a learning-rate schedule: "
                    "compile with a float outer learning rate to use it, or "
                    "drop the callback to keep the schedule. Received: "
                    f"learning_rate={schedule!r}"
                )

    def evaluate(self, *args, **kwargs):
        bound = inspect.signature(keras.Model.evaluate).bind(self, *args, **kwargs)
        self._prepare_step("test", bound.arguments.get("x"))
        self._check_episode_data("x", bound.arguments.get("x"))
        return super().evaluate(*args, **kwargs)

    def predict(self, *args, **kwargs):
        bound = inspect.signature(keras.Model.predict).bind(self, *args, **kwargs)
        self._prepare_step("predict", bound.arguments.get("x"))
        return super().predict(*args, **kwargs)

    def train_on_batch(self, x, *args, **kwargs):
        self._prepare_step("train", x, is_batch=True)
        self._check_training_data(x, is_batch=True)
        return super().train_on_batch(x, *args, **kwargs)

    def test_on_batch(self, x, *args, **kwargs):
        self._prepare_step("test", x, is_batch=True)
        self._check_episode_data("x", x, is_batch=True)
        return super().test_on_batch(x, *args, **kwargs)

    def predict_on_batch(self, x):
        self._prepare_step("predict", x, is_batch=True)
        return super().predict_on_batch(x)

    def compile(self, *args, **kwargs):
        bound = inspect.signature(keras.Model.compile).bind(self, *args, **kwargs)
        self._jit_request = bound.arguments.get("jit_compile", "auto")
        super().compile(*args, **kwargs)
        # Saved as asked, so a loaded model resolves "auto" again.
        _compat.record_compile_argument(self, "jit_compile", self._jit_request)

    compile.__doc__ = keras.Model.compile.__doc__

    def compile_from_config(self, config):
        # Keras's own skips models that override `compile`.
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def _train_jit_compile(self):
        """Whether the meta-step is compiled with XLA.

        An explicit `compile(jit_compile=...)` decides. On `"auto"` Keras
        turns XLA off on machines without accelerators; the meta-step is
        many small ops that XLA fuses, and on a 2-core CPU it ran 1.6-2.3x
        faster with XLA at 5-way and no slower at 20-way
        (benchmarks/meta_step.py), so `"auto"` compiles it
        with XLA wherever XLA can: one replica, layers that support it, and
        no second-order gradient through a `tf.while_loop`. Evaluation keeps
        Keras's choice: its longer inner loop is a `tf.while_loop`, which
        ran slower under XLA there.
        """
        if self._jit_request != "auto" or self.run_eagerly:
            return self.jit_compile
        settings = self._train_settings()
        return self.jit_compile or (
            self.distribute_strategy.num_replicas_in_sync == 1
            and all(layer.supports_jit for layer in _compat.flatten_layers(self))
            and not _compat.op_determinism_enabled()
            and not (
                self.algorithm.differentiates_inner_loop
                and not inner_loop.is_unrolled(settings.steps, settings.recompute)
            )
        )

    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        xla = self._train_jit_compile()
        step = self._keras_train_function(xla)
        if self._finite_guard is None:
            self._finite_guard = NonFiniteGuard(self.distribute_strategy)
        guard = self._finite_guard

        def train_function(iterator):
            nonlocal step, xla
            try:
                logs = step(iterator)
            except tf.errors.InvalidArgumentError as error:
                # Keras's `supports_jit` cannot see every op a layer runs
                # (e.g. `tf.numpy_function`): an XLA chosen by "auto" that
                # cannot compile the step gives way to the plain graph.
                if not (xla and self._jit_request == "auto"
                        and _compat.is_xla_conversion_error(error)):
                    raise
                warnings.warn(
                    "The meta-step could not be compiled with XLA, which "
                    '`jit_compile="auto"` chose: '
                    f"{str(error).strip().splitlines()[0][:300]} Running it without "
                    "XLA; the meta-batch of the failed attempt was skipped. Pass "
                    "`compile(jit_compile=False)`, or set `supports_jit = False` "
                    "on the layer with that op, to skip the attempt.",
                    stacklevel=2,
                )
                xla = False
                step = self._keras_train_function(False)
                logs = step(iterator)
            # The variable list and message are built only after a failure:
            # this runs after every step.
            guard.check(self._step_variables, self._kept_description)
            return logs

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
        if self._inner_state is not None:
            kept.append("the carried inner-optimizer state")
        text = ", ".join(kept[:-1]) + " and " + kept[-1]
        return text[0].upper() + text[1:]

    def _prepare_step(self, kind, data, is_batch=False):
        """Checks the replica split; drops a step traced for other inputs or settings."""
        tasks = _meta_batch_size(data, is_batch)
        self._check_replica_split(tasks)
        if kind == "train":
            self._check_algorithm_supported()
        previous = self._step_keys.get(kind)
        if tasks is None and previous is not None:
            tasks = previous[0]
        key = (tasks, self._trace_settings())
        if previous is not None and previous != key:
            getattr(self, f"make_{kind}_function")(force=True)
        self._step_keys[kind] = key

    def _check_algorithm_supported(self):
        # Measured: under MirroredStrategy with 2 replicas the second-order
        # meta-gradient differed from one device's by up to 0.37 (FOMAML's
        # and Reptile's agree to 1e-5); until that is understood, refuse it.
        replicas = self.distribute_strategy.num_replicas_in_sync
        if (
            replicas > 1
            and isinstance(self.algorithm, algorithms.MAML)
            and not self.algorithm.first_order
        ):
            raise ValueError(
                "Second-order MAML is not supported under a distribution "
                f"strategy with several replicas (this one has {replicas}). "
                'Use algorithm="fomaml" (MAML(first_order=True)) or "reptile" '
                f"there. Received: algorithm={self.algorithm!r}"
            )

    def _check_replica_split(self, tasks):
        """Raises before any work if `tasks` cannot be split evenly."""
        replicas = self.distribute_strategy.num_replicas_in_sync
        if tasks is not None and tasks % replicas:
            # tf.data splits a batch into near-equal parts, larger ones first.
            sizes = [tasks // replicas + (i < tasks % replicas) for i in range(replicas)]
            _raise_uneven_split(sizes)

    def _build_from_data(self, data_batch):
        # Called before the first trace (see `_compat.BuildBeforeTrace`):
        # builds the compiled loss, metrics and optimizer from the flat query
        # batch an episode batch stands for, so meta-steps compile once.
        data_batch = _episode_element(data_batch)
        strategy = self.distribute_strategy
        if isinstance(data_batch, dict) and "support_x" in data_batch:
            sizes = [
                int(v.shape[0])
                for v in strategy.experimental_local_results(data_batch["support_x"])
            ]
            if len(set(sizes)) > 1:
                _raise_uneven_split(sizes)
        data_batch = tf.nest.map_structure(
            lambda v: tf.convert_to_tensor(strategy.experimental_local_results(v)[0]),
            data_batch,
        )
        episodes = self._unpack_episodes(data_batch)
        flat = tuple(
            keras.KerasTensor((None,) + tuple(v.shape[2:]), v.dtype.name)
            for v in (episodes["query_x"], episodes["query_y"])
        )
        with strategy.scope():
            _compat.symbolic_build(self, flat)

    # ------------------------------------------------------------------
    # Meta-training and evaluation steps

    def train_step(self, data):
        episodes = self._unpack_episodes(data)
        theta, state = self._meta_weights()
        results = self._run_tasks(
            episodes, theta, state, self._train_settings(), self.algorithm
        )
        gradient = self.algorithm.outer_gradient(theta, results)
        self._finite_guard.run(
            self._step_variables(),
            self.optimizer.iterations,
            lambda: self._apply_meta_step(gradient, results),
        )
        return self._report(episodes, results)

    def test_step(self, data):
        episodes = self._unpack_episodes(data)
        theta, state = self._meta_weights()
        results = self._run_tasks(episodes, theta, state, self._eval_settings())
        return self._report(episodes, results)

    def predict_step(self, data):
        """Outputs at the meta-weights, or query outputs after adaptation.

        `predict` on plain inputs returns the wrapped model's outputs at the
        meta-weights. On episodes (dicts with `support_x`, `support_y` and
        `query_x`; `query_y` is ignored) it adapts to each task as
        `evaluate` does and returns the query outputs, shaped
        `[meta_batch, Q, ...]` per batch.
        """
        data = _episode_element(data)
        if not (isinstance(data, dict) and "support_x" in data):
            return super().predict_step(data)
        data = dict(data)
        # Only the shape matters for the checks; no loss is computed.
        data["query_y"] = data["support_y"][:, :1]
        episodes = self._unpack_episodes(data, check_query_y=False)
        episodes["query_y"] = None
        theta, state = self._meta_weights()
        results = self._run_tasks(episodes, theta, state, self._eval_settings())
        return tf.stack([r.query_outputs for r in results])

    # ------------------------------------------------------------------
    # The meta-step's parts

    def _meta_weights(self):
        return (
            _values(self.model.trainable_variables),
            _values(self.model.non_trainable_variables),
        )

    def _run_tasks(self, episodes, theta, state, settings, algorithm=None):
        """Adapts θ to every task of a meta-batch; a `TaskResult` per task.

        The meta-step runs each task through its algorithm's `adapt_task`
        hook; evaluation (`algorithm=None`) adapts and predicts.
        """
        self._check_compiled()
        if algorithm is None:
            if self._evaluates_batched():
                return self._run_tasks_batched(episodes, theta, state, settings)
            algorithm = _ADAPT_AND_PREDICT
        query_y = episodes["query_y"]
        results = []
        # Integer state (seed generators) is threaded from task to task so
        # that tasks draw different random numbers.
        running = list(state)
        sequential = not self._tasks_run_in_parallel()
        for b in range(episodes["support_x"].shape[0]):
            task = [episodes["support_x"][b], episodes["support_y"][b], episodes["query_x"][b]]
            if sequential and results:
                # Nothing of task b can start before task b-1 has finished.
                done = [t for t in tf.nest.flatten(results[-1]) if t is not None]
                with tf.control_dependencies(done):
                    task = [tf.identity(t) for t in task]
            support_x, support_y, query_x = task
            start = [s if _is_float(s) else r for s, r in zip(state, running)]
            result = algorithm.adapt_task(
                lambda th: self._adapt(th, start, support_x, support_y, settings),
                lambda w, s: self._query(
                    w, s, query_x, None if query_y is None else query_y[b], settings
                ),
                theta,
            )
            results.append(result)
            running = result.adaptation.state
        return results

    def _adapt(self, theta, state, support_x, support_y, settings):
        """The one adaptation: head from the support set, inner loop, statistics.

        Used by the meta-step, `evaluate`, `predict`, `adapt()`,
        `adapt_and_predict()` and the exported signatures.
        """
        initial = self._task_start(theta, state, support_x, support_y)
        weights, state, optimizer_state = inner_loop.adapt(
            self.model,
            initial,
            state,
            support_x,
            support_y,
            return_optimizer_state=True,
            recompute=settings.recompute,
            **self._inner_loop_arguments(settings),
        )
        if not settings.transductive:
            state = self._support_statistics(weights, state, support_x)
        if self._inner_state is None:
            optimizer_state = None
        return algorithms.Adaptation(initial, weights, state, optimizer_state)

    def _inner_loop_arguments(self, settings):
        """The inner loop's loss, rule, length, and where its optimizer starts.

        A fresh optimizer, or the carried inner-optimizer state with its
        iteration count.
        """
        optimizer_state, first_iteration = None, 0
        if self._inner_state is not None:
            optimizer_state, first_iteration = self._carried_inner_state()
        return dict(
            loss_fn=self._task_loss,
            optimizer=self._inner_rule(),
            steps=settings.steps,
            batch_size=settings.batch_size,
            optimizer_state=optimizer_state,
            first_iteration=first_iteration,
        )

    def _task_start(self, theta, state, support_x, support_y):
        """The weights a task's inner loop starts from: θ, or θ with the head set."""
        if self.head is None:
            return theta
        return self.head.initial_weights(
            self.model, theta, state, support_x, self._head_labels(support_y)
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
        return batched_tasks_lib.unsupported_reason(self.model, self._inner_rule())

    def _check_batched_tasks(self):
        reason = self._batched_tasks_reason() if self.batched_tasks is True else None
        if reason is not None:
            raise ValueError(
                "Expected a model and inner optimizer whose tasks can be "
                "adapted in one batched computation with `batched_tasks=True`, "
                f"but {reason}. Pass `batched_tasks=\"auto\"` to adapt such "
                "models task by task."
            )

    def _run_tasks_batched(self, episodes, theta, state, settings):
        """`_run_tasks` for evaluation, the inner loops as one computation.

        The head, the support statistics and the query pass are one forward
        pass each and stay per task; the inner loop, where the time goes,
        runs for all tasks at once.
        """
        support_x, support_y = episodes["support_x"], episodes["support_y"]
        tasks = support_x.shape[0]
        initial = [
            self._task_start(theta, state, support_x[b], support_y[b])
            for b in range(tasks)
        ]

        def tiled(value):
            return tf.tile(value[None], [tasks] + [1] * value.shape.rank)

        arguments = self._inner_loop_arguments(settings)
        if arguments["optimizer_state"] is not None:
            arguments["optimizer_state"] = tf.nest.map_structure(
                tiled, arguments["optimizer_state"]
            )
        weights, new_state, _ = batched_tasks_lib.adapt(
            self.model,
            [tf.stack(values) for values in zip(*initial)],
            [tiled(value) for value in state],
            support_x,
            support_y,
            **arguments,
        )
        results = []
        for b in range(tasks):
            task_weights = [value[b] for value in weights]
            task_state = [value[b] for value in new_state]
            if not settings.transductive:
                task_state = self._support_statistics(
                    task_weights, task_state, support_x[b]
                )
            _, outputs = self._query(
                task_weights, task_state, episodes["query_x"][b], None, settings
            )
            adaptation = algorithms.Adaptation(initial[b], task_weights, task_state)
            results.append(algorithms.TaskResult(adaptation, outputs))
        return results

    def _query(self, weights, state, query_x, query_y, settings):
        """`(loss, outputs)` of adapted weights on a query set.

        Transductive: training mode, BatchNormalization with the query
        batch's statistics. Otherwise inference mode with the support
        statistics `_adapt` set, so query examples are predicted
        independently of each other. The loss is None without targets.
        """
        outputs, _ = inner_loop.stateless_call(
            self.model, weights, state, query_x, training=settings.transductive
        )
        loss = None if query_y is None else self._task_loss(query_y, outputs)
        return loss, outputs

    def _replica_share(self, gradient):
        # Under tf.distribute each replica adapts an equal share of the tasks
        # and the optimizer sums gradients across replicas, so each replica
        # contributes 1/replicas of its local mean. `scale_loss` is the
        # identity for a plain optimizer; a `LossScaleOptimizer` (mixed
        # precision) or `loss_scale_factor` divides gradients by the scale,
        # which these gradients never had.
        share = 1.0 / tf.distribute.get_strategy().num_replicas_in_sync
        return [self.optimizer.scale_loss(g * share) for g in gradient]

    def _apply_meta_step(self, gradient, results):
        self.optimizer.apply(self._replica_share(gradient), self.model.trainable_variables)
        self._update_meta_state(results)

    def _step_variables(self):
        """Every variable a meta-step writes (metrics aside)."""
        return list(self.weights) + list(self.optimizer.variables)

    def _update_meta_state(self, results):
        """Non-trainable variables and carried inner state after a meta-step."""
        local_tasks = len(results)
        share = 1.0 / tf.distribute.get_strategy().num_replicas_in_sync
        states = [r.adaptation.state for r in results]
        new_state = []
        for values in zip(*states):
            if _is_float(values[0]):
                new_state.append(tf.add_n(list(values)) / local_tasks * share)
            else:
                # Seed state advanced by the same number of tasks on every
                # replica, so it is the same everywhere.
                new_state.append(values[-1])
        _assign_across_replicas(self.model.non_trainable_variables, new_state)
        if self._inner_state is not None:
            # Every task started from the carried state; carry on from the
            # mean of where they ended, `inner_steps` iterations later.
            slots, iterations = self._inner_state
            variables, values = [iterations], [iterations + self.inner_steps]
            for key, slot_list in slots.items():
                for i, slot in enumerate(slot_list):
                    ends = [r.adaptation.optimizer_state[key][i] for r in results]
                    variables.append(slot)
                    values.append(tf.add_n(ends) / local_tasks * share)
            _assign_across_replicas(variables, values)

    def _report(self, episodes, results):
        query_y = episodes["query_y"]
        y_true = tf.reshape(query_y, [-1] + list(query_y.shape[2:]))
        y_pred = tf.concat([r.query_outputs for r in results], axis=0)
        loss = self._task_loss(y_true, y_pred)
        _compat.loss_tracker(self).update_state(
            loss, sample_weight=tf.shape(y_true)[0]
        )
        logs = self.compute_metrics(None, y_true, y_pred)
        if _compat.in_multi_worker_mode(tf.distribute.get_strategy()):
            # Keras reduces step outputs across workers with
            # `strategy.reduce("MEAN", value, axis=0)`, which fails on scalars
            # (tensorflow/tensorflow#72388); over a length-1 axis it is the
            # mean over replicas, as on one worker.
            logs = {
                k: tf.reshape(v, [1]) if v.shape.rank == 0 else v
                for k, v in logs.items()
            }
        return logs

    def _tasks_run_in_parallel(self):
        if self.parallel_tasks != "auto":
            return self.parallel_tasks
        accelerators = tf.config.list_logical_devices(
            "GPU"
        ) + tf.config.list_logical_devices("TPU")
        return not accelerators

    def _task_loss(self, y_true, y_pred):
        # Keras losses divide by the number of replicas under tf.distribute,
        # for gradients that are summed across replicas; a task's loss and
        # its inner loop are local to one replica, so undo that.
        loss = _compat.compiled_loss(self)(y_true, y_pred)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return loss * replicas if replicas > 1 else loss

    def _head_labels(self, support_y):
        """Support targets as the one-hot labels a head is computed from."""
        if loss_kind(self.loss)[0] == "categorical":
            return support_y
        labels = tf.cast(tf.reshape(support_y, [-1]), tf.int32)
        return tf.one_hot(labels, self.head.units(self.model))

    def _support_statistics(self, weights, state, support_x):
        """Sets BatchNormalization statistics to the support set's.

        One forward pass in training mode over the whole support set with the
        layers' momentum at 0, so each layer's moving mean and variance
        become exactly the batch mean and variance it normalised with.
        """
        layers = self._batch_norm_layers()
        if not layers:
            return state
        momenta = [layer.momentum for layer in layers]
        try:
            for layer in layers:
                layer.momentum = 0.0
            _, state = inner_loop.stateless_call(
                self.model, weights, state, support_x, training=True
            )
        finally:
            for layer, momentum in zip(layers, momenta):
                layer.momentum = momentum
        return list(state)

    def _batch_norm_layers(self):
        return [
            layer
            for layer in _compat.flatten_layers(self.model)
            if isinstance(layer, keras.layers.BatchNormalization)
            and layer.trainable
        ]

    def _inner_rule(self):
        return inner_loop.InnerOptimizer(
            self.inner_optimizer, self.model.trainable_variables
        )

    def _create_inner_state(self):
        """Variables for the carried inner-optimizer state, if it is carried."""
        if not self.carry_inner_optimizer_state or self._inner_state is not None:
            return
        variables = self.model.trainable_variables
        initial = self._inner_rule().init([v.value for v in variables])
        slots = {}
        for key, values in initial.items():
            slots[key] = []
            for variable, value in zip(variables, values):
                slot = self.add_weight(
                    shape=variable.shape,
                    dtype=variable.dtype,
                    initializer="zeros",
                    trainable=False,
                    name=f"inner_{key}_" + variable.path.replace("/", "_"),
                )
                slot.assign(value)
                slots[key].append(slot)
        iterations = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False,
            name="inner_iterations",
        )
        self._inner_state = (slots, iterations)
        self._inner_state_for = self._inner_state_key()

    def _inner_state_key(self):
        # Variables and slot layout; a new learning rate keeps the state valid.
        return (
            tuple(v.path for v in self.model.trainable_variables),
            type(self.inner_optimizer).__name__,
            tuple(sorted(self._inner_rule().init([]))),
        )

    def _carried_inner_state(self):
        """The carried state's tensors, after checking it still fits."""
        expected, received = self._inner_state_for, self._inner_state_key()
        if expected != received:
            raise ValueError(
                "Expected the trainable variables and the inner optimizer to "
                "be the ones the carried inner-optimizer state was made for "
                "(`carry_inner_optimizer_state=True`): variables "
                f"{list(expected[0])}, {expected[1]} with slots "
                f"{list(expected[2])}. Received variables {list(received[0])}, "
                f"{received[1]} with slots {list(received[2])}. Build a new "
                "`ReptileModel` after freezing layers or changing the optimizer."
            )
        slots, iterations = self._inner_state
        return {k: _values(v) for k, v in slots.items()}, iterations.value

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
        theta, state = self._meta_weights()
        settings = self._eval_settings(steps)
        adaptation = self._adapt(theta, state, support_x, support_y, settings)
        _, outputs = self._query(
            adaptation.weights, adaptation.state, query_x, None, settings
        )
        return outputs

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
        support_x, support_y = self._check_support(support_x, support_y)
        steps = self._check_steps(steps)
        weights, state = self._compiled_adapt(support_x, support_y, steps)
        try:
            adapted = keras.models.clone_model(self.model)
        except Exception as error:  # Keras raises several types here.
            raise TypeError(
                "`adapt()` returns a copy of the wrapped model made with "
                "`keras.models.clone_model`, which failed for "
                f"{type(self.model).__name__}: {error}. Subclassed models need "
                "`get_config()`/`from_config()` to be copied; "
                "`adapt_and_predict()` works without a copy."
            ) from error
        if not adapted.built:
            adapted.build((None,) + tuple(support_x.shape[1:]))
        for variable, value in zip(adapted.trainable_variables, weights):
            variable.assign(value)
        for variable, value in zip(adapted.non_trainable_variables, state):
            variable.assign(value)
        return adapted

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
        support_x, support_y = self._check_support(support_x, support_y)
        if query_x is None and query_y is None:
            if not isinstance(self.algorithm, algorithms.Reptile):
                raise ValueError(
                    "Expected `query_x` and `query_y` for a meta-update with "
                    f"algorithm={self.algorithm!r}: its outer gradient is the "
                    "gradient of a query loss after adaptation, so it needs "
                    "query examples besides the support set (hold out part "
                    "of the task's examples). Reptile (algorithm=\"reptile\") "
                    "updates from the support set alone. Received: "
                    "query_x=None, query_y=None"
                )
            # Reptile's outer gradient never reads the query set: the support
            # set stands in for it and only shapes the returned logs.
            query_x, query_y = support_x, support_y
        else:
            query_x, query_y = self._check_query(support_x, query_x, query_y)
        # Under tf.distribute each replica adapts its share of a meta-batch:
        # one copy of the task per replica, and identical copies average to
        # the task's own update.
        replicas = self.distribute_strategy.num_replicas_in_sync
        task = (support_x, support_y, query_x, query_y)
        episode = {
            key: tf.stack([value] * replicas) for key, value in zip(EPISODE_KEYS, task)
        }
        logs = self.train_on_batch(episode, return_dict=True)
        return {key: float(value) for key, value in logs.items()}

    def _check_query(self, support_x, query_x, query_y):
        """`meta_update`'s query set, checked as `_check_support` checks a support set."""
        if query_x is None or query_y is None:
            missing, given = (
                ("query_x", "query_y") if query_x is None else ("query_y", "query_x")
            )
            raise ValueError(
                "Expected `query_x` and `query_y` together, or neither. "
                f"Received: {missing}=None with a `{given}`."
            )
        query_x = self._check_inputs("query_x", query_x, support_x.shape[1:])
        query_y = self._check_targets("query", query_x, query_y)
        return query_x, query_y

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
        support_x, support_y = self._check_support(support_x, support_y)
        query_x = self._check_inputs("query_x", query_x, support_x.shape[1:])
        steps = self._check_steps(steps)
        key = ("adapt_and_predict", _spec_key(support_x), _spec_key(support_y),
               _spec_key(query_x), self._trace_settings())
        if key not in self._adapt_functions:
            self._adapt_functions[key] = tf.function(
                self.call_adapted,
                input_signature=[
                    _rows_spec(support_x),
                    _rows_spec(support_y),
                    _rows_spec(query_x),
                    tf.TensorSpec([], tf.int32),
                ],
            )
        outputs = self._adapt_functions[key](
            support_x, support_y, query_x, tf.constant(steps, tf.int32)
        )
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
        # One trace per example shape and setting; the number of rows and
        # of steps are tensors, so any support size or step count reuses it.
        key = ("adapt", _spec_key(support_x), _spec_key(support_y), self._trace_settings())
        if key not in self._adapt_functions:

            def adapt_fn(support_x, support_y, steps):
                theta, state = self._meta_weights()
                # `adapt()`'s copy predicts one example at a time: always the
                # support statistics.
                settings = self._eval_settings(steps)._replace(transductive=False)
                adaptation = self._adapt(theta, state, support_x, support_y, settings)
                return adaptation.weights, adaptation.state

            self._adapt_functions[key] = tf.function(
                adapt_fn,
                input_signature=[
                    _rows_spec(support_x),
                    _rows_spec(support_y),
                    tf.TensorSpec([], tf.int32),
                ],
            )
        return self._adapt_functions[key](
            support_x, support_y, tf.constant(steps, tf.int32)
        )

    # ------------------------------------------------------------------
    # Input checks

    def _check_compiled(self):
        if not self.compiled or _compat.compiled_loss(self) is None:
            raise ValueError(
                "Call `compile()` with a `loss` before meta-training, "
                "evaluating or adapting: the inner loop minimises the "
                "compiled loss."
            )
        if self.head is not None and loss_kind(self.loss)[0] is None:
            raise ValueError(
                "Expected a classification loss (`SparseCategoricalCrossentropy` "
                "or `CategoricalCrossentropy`) with `head="
                f'"prototype"`: the head is made from class means. Received: '
                f"loss={self.loss!r}"
            )

    def _ensure_built(self, example_shape):
        if not self.model.built:
            self.build((None,) + tuple(example_shape))
        elif not self.built:
            self.built = True

    def _unpack_episodes(self, data, check_query_y=True):
        data = _episode_element(data)
        if not isinstance(data, dict):
            raise ValueError(
                "Expected each element of the dataset to be an episode dict "
                f"with keys {list(EPISODE_KEYS)} (see `keras_reptile.episodes`)."
                f" Received an element of type {type(data).__name__}."
            )
        missing = [k for k in EPISODE_KEYS if k not in data]
        extra = [k for k in data if k not in EPISODE_KEYS]
        if missing or extra:
            raise ValueError(
                f"Expected episode keys {list(EPISODE_KEYS)}. Received keys "
                f"{sorted(data)} (missing: {missing}, unexpected: {extra})."
            )
        # NumPy arrays reach an eagerly run step unconverted.
        data = {k: tf.convert_to_tensor(v) for k, v in data.items()}
        sx, sy, qx, qy = (data[k] for k in EPISODE_KEYS)
        if sx.shape.rank is None or sx.shape.rank < 2 or qx.shape.rank != sx.shape.rank:
            raise ValueError(
                "Expected `support_x` [meta_batch, S, *input_shape] and "
                "`query_x` [meta_batch, Q, *input_shape] of the same rank. "
                f"Received: support_x.shape={sx.shape}, query_x.shape={qx.shape}"
            )
        meta_batch = sx.shape[0]
        if meta_batch is None:
            raise ValueError(
                "Expected episodes with a static meta-batch size (batch the "
                "tasks with `drop_remainder=True`). Received: "
                f"support_x.shape={sx.shape}"
            )
        targets = [("support_y", sy, sx)]
        if check_query_y:
            targets.append(("query_y", qy, qx))
        for name, y, x in targets:
            if y.shape.rank is None or y.shape.rank < 2 or y.shape[:2] != x.shape[:2]:
                raise ValueError(
                    f"Expected `{name}` to have shape [meta_batch, rows, ...] "
                    "matching its inputs. Received: "
                    f"{name}.shape={y.shape} for inputs of shape {x.shape}"
                )
        if sx.shape[2:] != qx.shape[2:]:
            raise ValueError(
                "Expected support and query examples of the same shape. "
                f"Received: support_x.shape={sx.shape}, query_x.shape={qx.shape}"
            )
        self._ensure_built(sx.shape[2:])
        return dict(data)

    def _check_inputs(self, name, x, example_shape=None):
        x = tf.convert_to_tensor(x)
        if not x.dtype.is_floating:
            x = tf.cast(x, "float32")
        expected = example_shape
        if expected is None and self.model.built and getattr(self.model, "inputs", None):
            expected = tuple(self.model.inputs[0].shape[1:])
        if x.shape.rank is None or x.shape.rank < 1 or x.shape[0] == 0:
            raise ValueError(
                f"Expected `{name}` to be a non-empty batch of examples. "
                f"Received: {name}.shape={x.shape}"
            )
        if expected is not None and not _shape_matches(x.shape[1:], expected):
            raise ValueError(
                f"Expected `{name}` of shape [rows, {', '.join(map(str, expected))}]. "
                f"Received: {name}.shape={tuple(x.shape)}"
            )
        check_finite_rows(name, x.numpy())
        return x

    def _check_support(self, support_x, support_y):
        self._check_compiled()
        support_x = self._check_inputs("support_x", support_x)
        self._ensure_built(support_x.shape[1:])
        support_y = self._check_targets("support", support_x, support_y)
        return support_x, support_y

    def _check_targets(self, role, x, y):
        """`y` as a tensor of valid targets for the inputs `x` (role: "support"/"query")."""
        y = tf.convert_to_tensor(y)
        if y.shape.rank is None or y.shape.rank < 1 or y.shape[0] != x.shape[0]:
            raise ValueError(
                f"Expected `{role}_y` with one target per {role} example. "
                f"Received: {role}_x.shape={tuple(x.shape)}, "
                f"{role}_y.shape={tuple(y.shape)}"
            )
        check_numeric(f"`{role}_y`", y.dtype)
        output_shape = self._output_shape(x.shape[1:], x.dtype)
        kind = loss_kind(self.loss)[0]
        if kind == "sparse":
            if output_shape and output_shape[-1]:
                check_class_labels(y.numpy(), output_shape[-1], f"{role}_y")
        else:
            _check_target_shape(
                f"`{role}_y`", f"{role}_y.shape", y.shape, 1, output_shape, kind
            )
            check_finite_rows(f"{role}_y", y.numpy())
        return y

    def _output_shape(self, example_shape, dtype):
        """The wrapped model's output shape for one example, e.g. `(5,)`."""
        # `compute_output_spec` also works for subclassed models without
        # `compute_output_shape`.
        spec = self.model.compute_output_spec(
            keras.KerasTensor((None,) + tuple(example_shape), tf.as_dtype(dtype).name)
        )
        return tuple(spec.shape[1:])

    def _check_trainable(self):
        # Without trainable weights every meta-step would report a loss and
        # change nothing. An unbuilt model has no weights yet; `fit` builds
        # it first whenever the episodes' shapes are known.
        if self.model.built and not self.model.trainable_variables:
            raise ValueError(
                "Expected the wrapped model to have trainable weights: there is "
                "nothing to meta-train. Received a model with no trainable "
                f"weights ({len(self.model.non_trainable_variables)} "
                "non-trainable). Set `trainable = True` on the layers to "
                "meta-train; `evaluate()`, `adapt()` and `predict()` need no "
                "trainable weights."
            )

    def _check_training_data(self, x, validation_data=None, is_batch=False):
        self._check_episode_data("x", x, is_batch)
        self._check_trainable()
        if validation_data is not None:
            self._check_episode_data("validation_data", validation_data)

    def _check_episode_data(self, source, data, is_batch=False):
        """Checks the episodes a `fit`/`evaluate` call will read, up front.

        Target dtypes and shapes come from a dataset's `element_spec` (or the
        arrays of an in-memory batch). For a sparse loss the labels of the
        dataset's first element are read too: a label beyond the model's
        outputs fails inside the step as a bare `InvalidArgumentError`, and
        in `validation_data` only after a whole epoch of training. Later
        elements are not read, so a label out of range there still fails
        inside the step.
        """
        is_dataset = isinstance(data, tf.data.Dataset)
        spec = _episode_element(data.element_spec if is_dataset else data)
        if not (is_dataset or is_batch or isinstance(spec, dict)):
            return
        if not isinstance(spec, dict) or any(k not in spec for k in EPISODE_KEYS):
            return  # `_unpack_episodes` names what is wrong with the element.
        self._check_compiled()
        support_shape = _shape_of(spec["support_x"])
        if support_shape.rank is None or support_shape.rank < 3:
            return
        example_shape = support_shape[2:]
        if not example_shape.is_fully_defined():
            return
        if not self.model.built:
            with self.distribute_strategy.scope():
                self._ensure_built(tuple(example_shape))
        x_dtype = _dtype_of(spec["support_x"])
        if not x_dtype.is_floating:
            x_dtype = tf.float32
        output_shape = self._output_shape(tuple(example_shape), x_dtype)
        kind = loss_kind(self.loss)[0]
        for name in ("support_y", "query_y"):
            where = f"`{source}` `{name}`"
            check_numeric(where, _dtype_of(spec[name]))
            if kind != "sparse":
                _check_target_shape(
                    where, "shape", _shape_of(spec[name]), 2, output_shape, kind
                )
        if kind != "sparse" or not (output_shape and output_shape[-1]):
            return
        element = _first_element(data) if is_dataset else spec
        if element is None:
            return
        for name in ("support_y", "query_y"):
            check_class_labels(
                keras.ops.convert_to_numpy(element[name]),
                output_shape[-1],
                name,
                source,
            )

    def _check_steps(self, steps):
        if steps is None:
            return self.eval_inner_steps
        return check_positive_int("steps", steps)


def _assign_across_replicas(variables, values):
    """Assigns `values` (replica-local sums of shares) to mirrored variables."""
    context = tf.distribute.get_replica_context()
    strategy = tf.distribute.get_strategy()
    if context is None or strategy.num_replicas_in_sync == 1:
        for variable, value in zip(variables, values):
            variable.assign(value)
        return
    if not variables:
        return
    floats = [i for i, v in enumerate(values) if _is_float(v)]
    # `all_reduce` of an empty list fails under MirroredStrategy.
    reduced = context.all_reduce(
        tf.distribute.ReduceOp.SUM, [values[i] for i in floats]
    ) if floats else []
    values = list(values)
    for i, value in zip(floats, reduced):
        values[i] = value

    def update(strategy, *values):
        for variable, value in zip(variables, values):
            strategy.extended.update(
                variable.value, lambda v, x: v.assign(x), args=(value,), group=False
            )

    # Keras creates BatchNormalization statistics with aggregation "none",
    # which cannot be assigned in a replica context: update every copy.
    context.merge_call(update, args=tuple(values))


def _values(variables):
    return [tf.convert_to_tensor(v) for v in variables]


def _episode_element(data):
    """The episode dict of a dataset element or of Keras's `(x, y, w)` triple."""
    if isinstance(data, (tuple, list)):
        data = [d for d in data if d is not None]
        if len(data) == 1:
            return data[0]
    return data


def _meta_batch_size(data, is_batch=False):
    """Static task count of an episodic dataset (or batch), else None."""
    spec = _episode_element(data if is_batch else getattr(data, "element_spec", None))
    if isinstance(spec, dict) and "support_x" in spec:
        shape = getattr(spec["support_x"], "shape", None)
        if shape is not None and tf.TensorShape(shape).rank:
            return tf.TensorShape(shape)[0]
    return None


def _spec_key(x):
    return (tuple(x.shape[1:]), x.dtype.name)


def _rows_spec(x):
    return tf.TensorSpec((None,) + tuple(x.shape[1:]), x.dtype)


def _raise_uneven_split(sizes):
    raise ValueError(
        "Expected the meta-batch to divide evenly across the "
        f"{len(sizes)} replicas (each replica adapts its share of "
        f"the tasks). Received a meta-batch of {sum(sizes)} tasks, "
        f"split as {sizes}. Use a `meta_batch_size` that is a "
        f"multiple of {len(sizes)}."
    )


def _is_float(x):
    return x.dtype.is_floating


def _shape_of(value):
    if not hasattr(value, "shape"):
        value = tf.convert_to_tensor(value)
    return tf.TensorShape(value.shape)


def _dtype_of(value):
    if not hasattr(value, "dtype"):
        value = tf.convert_to_tensor(value)
    return tf.as_dtype(value.dtype)


def _first_element(dataset):
    """The episode dict of a dataset's first element, or None if it is empty."""
    for element in dataset.take(1):
        return _episode_element(element)
    return None


def _check_target_shape(name, label, shape, leading, output_shape, kind):
    """Raises unless targets are `[*rows, *output_shape]` (or `[*rows]` for one output).

    The expectations of the exported `adapt_and_predict` signature: a loss
    would otherwise broadcast mismatched targets, e.g. train a one-output
    model on the mean of two target columns.

    Args:
        name: How the message names the targets, e.g. "`support_y`".
        label: How it names their shape, e.g. "support_y.shape".
        shape: The targets' `tf.TensorShape`.
        leading: Number of leading axes before the per-example shape: 1 for
            `[rows, ...]`, 2 for episodes `[meta_batch, rows, ...]`.
        output_shape: The model's output shape for one example.
        kind: `loss_kind`'s kind: "categorical" or None.
    """
    if shape.rank is None:
        return
    allowed = [tuple(output_shape)]
    if kind is None and tuple(output_shape) == (1,):
        allowed.append(())
    received = tuple(shape)
    if len(received) >= leading and any(
        _shape_matches(received[leading:], a) for a in allowed
    ):
        return
    def describe(suffix, rows=("meta_batch", "rows")[-leading:]):
        return "[" + ", ".join(list(rows) + [str(d) for d in suffix]) + "]"

    expected = " or ".join(describe(a) for a in allowed)
    raise ValueError(
        f"Expected {name} of shape {expected}, matching the model's outputs "
        f"{describe(output_shape, ['rows'])}. Received: {label}={received}"
    )


def _shape_matches(shape, expected):
    if len(shape) != len(expected):
        return False
    return all(e is None or s is None or s == e for s, e in zip(shape, expected))


# Evaluation adapts and predicts; only the meta-step needs an algorithm.
_ADAPT_AND_PREDICT = algorithms.MetaAlgorithm()
