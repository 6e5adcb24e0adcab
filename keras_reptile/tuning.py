"""Keras Tuner search over Reptile's meta-learning hyperparameters.

Needs the `tuning` extra: `pip install keras-reptile[tuning]`.

Example:

```python
import keras_reptile
import keras_tuner
from keras_reptile.tuning import ReptileHyperModel

hypermodel = ReptileHyperModel(
    lambda hp: keras_reptile.models.conv4((28, 28, 1), num_classes=5),
    lambda meta_batch_size: train_data.episodes(
        ways=5, shots=5, meta_batch_size=meta_batch_size, seed=0),
    meta_steps=epochs * steps_per_epoch,
)
tuner = keras_tuner.RandomSearch(
    hypermodel, objective="val_accuracy", max_trials=20, directory="runs")
tuner.search(epochs=epochs, steps_per_epoch=steps_per_epoch,
             validation_data=val_episodes, validation_steps=20)
best = tuner.get_best_models()[0]  # A `ReptileModel`.
```
"""

import numbers

import keras

try:
    import keras_tuner
    # Keras Tuner imports this in every trial on the TensorFlow backend;
    # without it each trial fails and the search ends with a misleading
    # missing-checkpoint error.
    from tensorboard.plugins.hparams import api as _hparams_api  # noqa: F401
except ImportError as e:
    raise ImportError(
        "`keras_reptile.tuning` needs the `keras-tuner` and `tensorboard` "
        "packages. Install them with `pip install keras-reptile[tuning]`. "
        f"(Import failed with: {e})"
    ) from e

from keras_reptile import algorithms
from keras_reptile import callbacks as callbacks_lib
from keras_reptile import inner_loop
from keras_reptile._validation import check_bool
from keras_reptile._validation import check_positive_int
from keras_reptile.reptile_model import ReptileModel

__all__ = ["ReptileHyperModel"]

SCHEDULES = ("constant", "linear")
# Keras Tuner's choices are numbers, strings or bools: "none" stands for None.
HEADS = ("none", "prototype")

# Hyperparameter names, as they appear in `hp.values` and the tuner's logs.
INNER_LEARNING_RATE = "inner_learning_rate"
INNER_STEPS = "inner_steps"
INNER_BATCH_SIZE = "inner_batch_size"
META_STEP_SIZE = "meta_step_size"
META_STEP_SIZE_SCHEDULE = "meta_step_size_schedule"
META_BATCH_SIZE = "meta_batch_size"
ALGORITHM = "algorithm"
HEAD = "head"
CARRY_INNER_STATE = "carry_inner_optimizer_state"


class ReptileHyperModel(keras_tuner.HyperModel):
    """Searches Reptile's hyperparameters (and optionally the backbone's).

    Each trial builds a `ReptileModel` from hyperparameters drawn from these
    search spaces:

    * `inner_learning_rate`: learning rate of the inner optimizer;
    * `inner_steps`, `inner_batch_size`: adaptation steps per task and rows
      per step during meta-training;
    * `meta_step_size` (ε) and `meta_step_size_schedule`: the outer SGD's
      learning rate, `"constant"` or `"linear"` (decaying linearly from ε to
      0 over `meta_steps` meta-steps, as in the paper);
    * `meta_batch_size`: tasks per meta-step. It is a property of the
      episodic dataset, so `fit` builds each trial's training episodes by
      calling `make_train_episodes(meta_batch_size)`;
    * `algorithm` (`"reptile"`, `"fomaml"`, `"maml"`), `head` (`"none"` or
      `"prototype"`) and `carry_inner_optimizer_state` (bool): see
      `ReptileModel`. Fixed by default (Reptile, no head, fresh state).

    A search space is given as a `(min, max)` tuple (a range: sampled
    log-uniformly for learning rates and ε, uniformly for integers), a list
    (a choice) or a single value (fixed). Everything else (the evaluation
    protocol `eval_inner_steps`, `eval_inner_batch_size`, `transductive`,
    and the loss and metrics) is fixed, so that trials are compared on the
    same few-shot task. The backbone may draw its own hyperparameters from
    the `hp` passed to `build_backbone`.

    Use the few-shot accuracy after adaptation on held-out tasks as the
    objective: `objective="val_accuracy"` (maximised), with episodic
    `validation_data` and `validation_steps` passed to `tuner.search`. Works
    with `RandomSearch`, `BayesianOptimization` and `Hyperband` (for
    `Hyperband`, set `meta_steps=max_epochs * steps_per_epoch`; a trial
    continued from an earlier one skips the episodes that one consumed).
    The meta-learning hyperparameters live in the `ReptileModel`, so a
    tuner given `optimizer`, `loss` or `metrics` can re-compile the model
    without losing them. `get_best_models()` returns compiled
    `ReptileModel`s with the weights of their best epoch.

    Pass a `keras_reptile.callbacks.GracefulShutdown` in the `callbacks` of
    `tuner.search` to make SIGTERM/SIGINT stop the running trial after its
    current meta-step; `fit` then raises `keras_tuner.errors.FatalError`, so
    the stopped trial is not recorded, and a rerun with the same
    `directory` and `project_name` runs it again from its start.

    Args:
        build_backbone: Callable `build_backbone(hp)` returning a new
            `keras.Model` (the network to meta-train, built, returning
            logits for the default loss). It is called for every trial.
        make_train_episodes: Callable `make_train_episodes(meta_batch_size)`
            returning an infinite episodic `tf.data.Dataset` (see
            `keras_reptile.episodes`) with that many tasks per element, e.g.
            `lambda n: data.episodes(ways=5, shots=5, meta_batch_size=n,
            seed=0)`.
        meta_steps: Planned number of meta-steps of a trial
            (`epochs * steps_per_epoch`), over which the `"linear"` schedule
            decays ε to 0. Required if that schedule can be drawn.
        inner_learning_rate: Search space of the inner learning rate.
            Defaults to the range `(1e-4, 1e-2)`.
        inner_steps: Search space of the inner steps during meta-training.
            Defaults to the range `(1, 10)`.
        inner_batch_size: Search space of the inner batch size. Defaults to
            the choices `[5, 10, 20]`.
        meta_step_size: Search space of ε. Defaults to the range
            `(0.1, 1.0)`.
        meta_step_size_schedule: Search space of the ε schedule, among
            `"constant"` and `"linear"`. Defaults to both.
        meta_batch_size: Search space of the meta-batch size. Defaults to
            the choices `[1, 2, 5, 10]`.
        algorithm: Search space of the algorithm: a name or a list of
            names among `keras_reptile.algorithms.names()`. Defaults to
            `"reptile"`.
        head: Search space of the head, `"none"`, `"prototype"` or a list
            of both. Defaults to `"none"`.
        carry_inner_optimizer_state: Search space of that option, a bool or
            `[False, True]`. Defaults to False.
        inner_optimizer: Template of the inner optimizer: a
            `keras.optimizers.Optimizer` (or its name) whose learning rate
            is replaced by `inner_learning_rate`. Defaults to the paper's
            `Adam(beta_1=0.0)`.
        eval_inner_steps: Adaptation steps when evaluating (fixed, part of
            the objective).
        eval_inner_batch_size: Support rows per adaptation step when
            evaluating (fixed, part of the objective).
        transductive: See `ReptileModel`.
        loss: Loss to compile with. Defaults to
            `SparseCategoricalCrossentropy(from_logits=True)`.
        metrics: Metrics to compile with; the objective's metric must be
            among them.
        name: Optional name of the hypermodel.
        tunable: Whether the hyperparameters it defines may be tuned (see
            `keras_tuner.HyperModel`).

    Example:

    >>> import keras, keras_tuner, numpy as np, keras_reptile
    >>> from keras_reptile.tuning import ReptileHyperModel
    >>> x = np.random.rand(60, 8, 8, 1).astype("float32")
    >>> y = np.repeat(np.arange(10), 6)
    >>> def make_train_episodes(meta_batch_size):
    ...     return keras_reptile.episodes.from_arrays(
    ...         x, y, ways=3, shots=2, meta_batch_size=meta_batch_size, seed=0)
    >>> hypermodel = ReptileHyperModel(
    ...     lambda hp: keras_reptile.models.conv4(
    ...         (8, 8, 1), num_classes=3, filters=4, num_blocks=2),
    ...     make_train_episodes, meta_steps=4, inner_steps=[1, 2],
    ...     meta_batch_size=[1, 2], eval_inner_steps=2)
    >>> tuner = keras_tuner.RandomSearch(
    ...     hypermodel, objective="val_accuracy", max_trials=1,
    ...     directory="/tmp/reptile_tuning_doctest", overwrite=True)
    >>> tuner.search(epochs=2, steps_per_epoch=2, verbose=0,
    ...              validation_data=make_train_episodes(2),
    ...              validation_steps=1)
    >>> type(tuner.get_best_models()[0]).__name__
    'ReptileModel'
    """

    def __init__(
        self,
        build_backbone,
        make_train_episodes,
        *,
        meta_steps=None,
        inner_learning_rate=(1e-4, 1e-2),
        inner_steps=(1, 10),
        inner_batch_size=None,
        meta_step_size=(0.1, 1.0),
        meta_step_size_schedule=None,
        meta_batch_size=None,
        algorithm="reptile",
        head="none",
        carry_inner_optimizer_state=False,
        inner_optimizer=None,
        eval_inner_steps=50,
        eval_inner_batch_size=10,
        transductive=False,
        loss=None,
        metrics=("accuracy",),
        name=None,
        tunable=True,
    ):
        for arg_name, value in (
            ("build_backbone", build_backbone),
            ("make_train_episodes", make_train_episodes),
        ):
            if not callable(value):
                raise TypeError(
                    f"Expected `{arg_name}` to be callable. Received: "
                    f"{arg_name}={value!r} of type {type(value).__name__}"
                )
        # Lists are choices, so the list defaults are filled in here rather
        # than shared between instances.
        if inner_batch_size is None:
            inner_batch_size = [5, 10, 20]
        if meta_step_size_schedule is None:
            meta_step_size_schedule = list(SCHEDULES)
        if meta_batch_size is None:
            meta_batch_size = [1, 2, 5, 10]
        self._spaces = {
            INNER_LEARNING_RATE: _check_space(
                INNER_LEARNING_RATE, inner_learning_rate, "float"
            ),
            INNER_STEPS: _check_space(INNER_STEPS, inner_steps, "int"),
            INNER_BATCH_SIZE: _check_space(
                INNER_BATCH_SIZE, inner_batch_size, "int"
            ),
            META_STEP_SIZE: _check_space(
                META_STEP_SIZE, meta_step_size, "float"
            ),
            META_STEP_SIZE_SCHEDULE: _check_space(
                META_STEP_SIZE_SCHEDULE, meta_step_size_schedule, "schedule"
            ),
            META_BATCH_SIZE: _check_space(
                META_BATCH_SIZE, meta_batch_size, "int"
            ),
            ALGORITHM: _check_space(ALGORITHM, algorithm, "algorithm"),
            HEAD: _check_space(HEAD, head, "head"),
            CARRY_INNER_STATE: _check_space(
                CARRY_INNER_STATE, carry_inner_optimizer_state, "bool"
            ),
        }
        schedules, _ = self._spaces[META_STEP_SIZE_SCHEDULE]
        if meta_steps is None:
            if "linear" in _values(schedules):
                raise ValueError(
                    "Expected `meta_steps` (the planned meta-steps of a "
                    "trial, `epochs * steps_per_epoch`) when "
                    "`meta_step_size_schedule` can be 'linear': ε decays to "
                    "0 over them. Received: meta_steps=None, "
                    f"meta_step_size_schedule={meta_step_size_schedule!r}"
                )
        elif not _positive_int(meta_steps):
            raise ValueError(
                "Expected `meta_steps` to be a positive integer. "
                f"Received: meta_steps={meta_steps!r}"
            )
        # Reject what `ReptileModel` would reject now, not in the first trial.
        inner_optimizer = inner_loop.get_optimizer(inner_optimizer)
        check_positive_int("eval_inner_steps", eval_inner_steps)
        check_positive_int("eval_inner_batch_size", eval_inner_batch_size)
        transductive = check_bool("transductive", transductive)
        if loss is None:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        super().__init__(name=name, tunable=tunable)
        self.build_backbone = build_backbone
        self.make_train_episodes = make_train_episodes
        self.meta_steps = None if meta_steps is None else int(meta_steps)
        self.inner_optimizer = inner_optimizer
        self.eval_inner_steps = eval_inner_steps
        self.eval_inner_batch_size = eval_inner_batch_size
        self.transductive = transductive
        self.loss = loss
        self.metrics = list(metrics) if metrics is not None else None

    def build(self, hp):
        """Builds and compiles the `ReptileModel` of one trial.

        Args:
            hp: A `keras_tuner.HyperParameters`.

        Returns:
            A compiled `ReptileModel` whose outer optimizer is built, so
            that Keras Tuner can load a trial's checkpoint into it with the
            optimizer state.
        """
        values = {
            name: _declare(hp, name, space, kind)
            for name, (space, kind) in self._spaces.items()
        }
        backbone = self.build_backbone(hp)
        if not isinstance(backbone, keras.Model):
            raise TypeError(
                "Expected `build_backbone(hp)` to return a `keras.Model`. "
                f"Received: {backbone!r} of type {type(backbone).__name__}"
            )
        inner_config = dict(self.inner_optimizer.get_config())
        inner_config["learning_rate"] = values[INNER_LEARNING_RATE]
        model = ReptileModel(
            backbone,
            inner_optimizer=type(self.inner_optimizer).from_config(inner_config),
            inner_steps=values[INNER_STEPS],
            inner_batch_size=values[INNER_BATCH_SIZE],
            eval_inner_steps=self.eval_inner_steps,
            eval_inner_batch_size=self.eval_inner_batch_size,
            transductive=self.transductive,
            algorithm=values[ALGORITHM],
            head=None if values[HEAD] == "none" else values[HEAD],
            carry_inner_optimizer_state=values[CARRY_INNER_STATE],
        )
        epsilon = values[META_STEP_SIZE]
        if values[META_STEP_SIZE_SCHEDULE] == "linear":
            epsilon = keras.optimizers.schedules.PolynomialDecay(
                epsilon, decay_steps=self.meta_steps, end_learning_rate=0.0
            )
        model.compile(
            optimizer=keras.optimizers.SGD(epsilon),
            # Fresh objects per trial: metric objects hold state.
            loss=_copy(self.loss),
            metrics=[_copy(m) for m in self.metrics] if self.metrics else None,
        )
        if model.built:
            model.optimizer.build(model.trainable_variables)
        return model

    def fit(self, hp, model, *args, **kwargs):
        """Meta-trains a trial's model on episodes with its meta-batch size.

        Takes the arguments of `tuner.search` (those of `ReptileModel.fit`)
        except the training data, which it builds with
        `make_train_episodes(hp["meta_batch_size"])`.

        Args:
            hp: The trial's `keras_tuner.HyperParameters`.
            model: The model returned by `build(hp)`.
            *args: Must be empty (no positional training data).
            **kwargs: Arguments of `ReptileModel.fit`; `steps_per_epoch`
                and `validation_data` are required.

        Returns:
            The `History` of `model.fit`.
        """
        if args or kwargs.get("x") is not None:
            received = args[0] if args else kwargs["x"]
            raise ValueError(
                "`ReptileHyperModel` builds each trial's training episodes "
                "with `make_train_episodes(meta_batch_size)`; do not pass "
                f"training data to `tuner.search`. Received: x={received!r}"
            )
        kwargs.pop("x", None)
        steps_per_epoch = kwargs.get("steps_per_epoch")
        if not _positive_int(steps_per_epoch):
            raise ValueError(
                "Expected `steps_per_epoch` (meta-steps per epoch) in "
                "`tuner.search`: the episodic training data is infinite. "
                f"Received: steps_per_epoch={steps_per_epoch!r}"
            )
        if kwargs.get("validation_data") is None:
            raise ValueError(
                "Expected `validation_data` (an episodic dataset of held-out "
                "tasks) and `validation_steps` in `tuner.search`: the "
                "objective is the few-shot accuracy after adaptation on it. "
                "Received: validation_data=None"
            )
        epochs = kwargs.get("epochs", 1)
        if (
            hp.get(META_STEP_SIZE_SCHEDULE) == "linear"
            and epochs * steps_per_epoch > self.meta_steps
        ):
            raise ValueError(
                "Expected at most `meta_steps` meta-steps per trial: the "
                "linear schedule would hold ε at 0 after them. Received: "
                f"epochs * steps_per_epoch = {epochs} * {steps_per_epoch} > "
                f"meta_steps = {self.meta_steps}"
            )
        meta_batch_size = hp.get(META_BATCH_SIZE)
        episodes = self.make_train_episodes(meta_batch_size)
        spec = getattr(episodes, "element_spec", None)
        if not isinstance(spec, dict) or "support_x" not in spec:
            raise TypeError(
                "Expected `make_train_episodes(meta_batch_size)` to return an "
                "episodic `tf.data.Dataset` (see `keras_reptile.episodes`). "
                f"Received: {episodes!r}"
            )
        if spec["support_x"].shape[0] != meta_batch_size:
            raise ValueError(
                "Expected `make_train_episodes(meta_batch_size)` to return "
                f"{meta_batch_size} tasks per element. Received: an element "
                f"with support_x shape {spec['support_x'].shape}"
            )
        initial_epoch = kwargs.get("initial_epoch", 0)
        if initial_epoch:
            # Hyperband continues a trial from an earlier one's checkpoint:
            # skip the episodes that one has seen.
            episodes = episodes.skip(initial_epoch * steps_per_epoch)
        # Episodes are drawn at random already; Keras would warn that it
        # ignores `shuffle=True` for a dataset.
        kwargs.setdefault("shuffle", False)
        history = model.fit(episodes, **kwargs)
        for callback in kwargs.get("callbacks") or []:
            if (
                isinstance(callback, callbacks_lib.GracefulShutdown)
                and callback.received_signal is not None
            ):
                raise keras_tuner.errors.FatalError(
                    f"Search stopped by signal {callback.received_signal} "
                    "during a trial. Run the search again with the same "
                    "`directory` and `project_name` to resume it; the "
                    "stopped trial starts over."
                )
        return history


def _positive_int(value):
    return (
        isinstance(value, numbers.Integral)
        and not isinstance(value, bool)
        and value >= 1
    )


def _positive_float(value):
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and value > 0
    )


_KINDS = {
    "int": (_positive_int, "a positive integer"),
    "float": (_positive_float, "a positive number"),
    "schedule": (lambda v: v in SCHEDULES, f"one of {list(SCHEDULES)}"),
    "algorithm": (
        lambda v: v in algorithms.names(), f"one of {algorithms.names()}"
    ),
    "head": (lambda v: v in HEADS, f"one of {list(HEADS)}"),
    "bool": (lambda v: isinstance(v, bool), "a bool"),
}
# Kinds whose values are names or flags: lists of choices, never ranges.
_CHOICE_KINDS = ("schedule", "algorithm", "head", "bool")


def _check_space(name, space, kind):
    """Validates a search space: `(min, max)`, a list of choices, or a value.

    Returns:
        `(space, kind)`.
    """
    valid, description = _KINDS[kind]
    if isinstance(space, tuple):
        ok = (
            kind not in _CHOICE_KINDS
            and len(space) == 2
            and all(valid(v) for v in space)
            and space[0] <= space[1]
        )
    elif isinstance(space, list):
        ok = bool(space) and all(valid(v) for v in space)
        space = list(space)
    else:
        ok = valid(space)
    if not ok:
        forms = "a list of them" if kind in _CHOICE_KINDS else (
            "a `(min, max)` range of them with min <= max, or a list of "
            "choices"
        )
        raise ValueError(
            f"Expected `{name}` to be {description}, {forms}. "
            f"Received: {name}={space!r}"
        )
    return space, kind


def _values(space):
    if isinstance(space, (list, tuple)):
        return list(space)
    return [space]


def _declare(hp, name, space, kind):
    if isinstance(space, list) and kind == "bool":
        return hp.Boolean(name) if len(set(space)) > 1 else hp.Fixed(name, space[0])
    if isinstance(space, list):
        return hp.Choice(name, space)
    if isinstance(space, tuple) and space[0] != space[1]:
        low, high = space
        if kind == "int":
            return hp.Int(name, int(low), int(high))
        # Learning rates and step sizes vary over orders of magnitude.
        return hp.Float(name, float(low), float(high), sampling="log")
    if isinstance(space, tuple):
        space = space[0]
    return hp.Fixed(name, int(space) if kind == "int" else space)


def _copy(obj):
    if isinstance(obj, (keras.losses.Loss, keras.metrics.Metric)):
        return type(obj).from_config(obj.get_config())
    return obj
