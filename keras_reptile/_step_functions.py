"""Building and caching the meta-learner's compiled functions.

Keras wraps `train_step`/`test_step`/`predict_step` in `tf.function`s once
and reuses them; a meta-learner has to decide more than Keras does:

* when a step must be traced anew: the tasks of a meta-batch are unrolled
  in the graph, and the inner-loop settings are baked into it, so a new
  meta-batch size or setting needs a new trace (`StepKeys`);
* whether the meta-step is compiled with XLA (`meta_step_uses_xla`), and
  what happens when XLA turns out not to compile it (`with_xla_fallback`);
  `train_function` puts both together for `fit`;
* the `tf.function`s of `adapt()` and `adapt_and_predict()`, traced once
  per example shape and setting (`FunctionCache`).

Nothing here knows `ReptileModel`: each decision is given what it reads,
and `train_function` and `build_for_episodes` use only the `keras.Model`
API (and `_compat`'s private hooks).
"""

import inspect
import warnings

import keras
import tensorflow as tf

from keras_reptile import _compat


def bound_arguments(method, instance, args, kwargs):
    """The arguments of `method(instance, *args, **kwargs)` by parameter name.

    The model's overrides of `fit`, `evaluate`, `predict` and `compile` read
    a few arguments (data, callbacks, `jit_compile`) however they were given,
    then pass the call on to Keras unchanged.
    """
    return inspect.signature(method).bind(instance, *args, **kwargs).arguments


class StepKeys:
    """What each step function (`"train"`, `"test"`, `"predict"`) was traced for.

    A trace bakes in the meta-batch size (its tasks are unrolled) and the
    settings; a step function is rebuilt when either changes. Keras traces
    with `reduce_retracing=True`, which would otherwise trace a second
    meta-batch size as `None`.
    """

    def __init__(self):
        self._keys = {}

    def changed(self, kind, tasks, settings):
        """Records the key of the next `kind` call; whether its step must be rebuilt.

        Args:
            kind: "train", "test" or "predict".
            tasks: The static meta-batch size of the data, or None if it is
                not known (the previous one is assumed).
            settings: Everything else the trace depends on (hashable).
        """
        previous = self._keys.get(kind)
        if tasks is None and previous is not None:
            tasks = previous[0]
        key = (tasks, settings)
        self._keys[kind] = key
        return previous is not None and previous != key


def meta_step_uses_xla(
    requested, keras_choice, run_eagerly, replicas, layers_support_jit,
    differentiates_through_while_loop,
):
    """Whether the meta-step is compiled with XLA.

    An explicit `compile(jit_compile=...)` decides. On `"auto"` Keras turns
    XLA off on machines without accelerators; the meta-step is many small
    ops that XLA fuses, and on a 2-core CPU it ran 1.6-2.3x faster with XLA
    at 5-way and no slower at 20-way (benchmarks/meta_step.py), so `"auto"`
    compiles it with XLA wherever XLA can: one replica, layers that support
    it, op determinism off, and no second-order gradient through a
    `tf.while_loop`. Evaluation keeps Keras's choice: its longer inner loop
    is a `tf.while_loop`, which ran slower under XLA there.

    Args:
        requested: `compile`'s `jit_compile` argument as given.
        keras_choice: The model's resolved `jit_compile`.
        run_eagerly: Whether the model runs eagerly.
        replicas: The number of replicas.
        layers_support_jit: Whether every layer has `supports_jit`.
        differentiates_through_while_loop: Whether the algorithm
            differentiates through an inner loop that is not unrolled.
    """
    if requested != "auto" or run_eagerly:
        return keras_choice
    return keras_choice or (
        replicas == 1
        and layers_support_jit
        and not _compat.op_determinism_enabled()
        and not differentiates_through_while_loop
    )


def train_function(model, make_keras_function, requested, through_while_loop, after_step):
    """Installs and returns `fit`'s train function for a meta-learner.

    Keras's step function, compiled with XLA where `meta_step_uses_xla`
    says so, falling back to the plain graph where XLA chosen by "auto"
    cannot compile it (`with_xla_fallback`), with `after_step` after every
    step.

    Args:
        model: The meta-learner (a `keras.Model`).
        make_keras_function: Keras's own `make_train_function` of `model`
            (bound), which sets `model.train_function`.
        requested: `compile`'s `jit_compile` argument as given.
        through_while_loop: Whether the algorithm differentiates through an
            inner loop that is not unrolled.
        after_step: Called after every step (the finite guard's check).

    Returns:
        The train function, also set as `model.train_function`.
    """

    def build(xla):
        current = model.train_function
        with _compat.jit_compile_as(model, xla):
            make_keras_function(force=True)
        return _compat.swap_train_function(model, current)

    xla = meta_step_uses_xla(
        requested,
        model.jit_compile,
        model.run_eagerly,
        model.distribute_strategy.num_replicas_in_sync,
        all(layer.supports_jit for layer in _compat.flatten_layers(model)),
        through_while_loop,
    )
    function = with_xla_fallback(build, xla, requested == "auto", after_step)
    _compat.swap_train_function(model, function)
    return function


def build_for_episodes(model, episodes):
    """Builds `model`'s compiled loss, metrics and optimizer before a first trace.

    From the flat query batch an episode batch stands for, so meta-steps
    compile once (see `_compat.BuildBeforeTrace`).

    Args:
        model: The meta-learner (a compiled `keras.Model`).
        episodes: A checked episode batch (dict of `[tasks, rows, ...]`).
    """
    flat = tuple(
        keras.KerasTensor((None,) + tuple(v.shape[2:]), v.dtype.name)
        for v in (episodes["query_x"], episodes["query_y"])
    )
    with model.distribute_strategy.scope():
        _compat.symbolic_build(model, flat)


def with_xla_fallback(build, xla, may_fall_back, after_step):
    """A train function that gives up XLA once if XLA cannot compile the step.

    Keras's `supports_jit` cannot see every op a layer runs (e.g.
    `tf.numpy_function`): an XLA chosen by "auto" that cannot compile the
    step gives way to the plain graph, with a warning.

    Args:
        build: `build(xla) -> step`: Keras's step function, with or without
            XLA.
        xla: Whether to start with XLA.
        may_fall_back: Whether XLA was chosen by "auto" (an explicit request
            is never overridden).
        after_step: Called after every step (the finite guard's check).

    Returns:
        `train_function(iterator) -> logs`, for `fit` to call.
    """
    step = build(xla)

    def train_function(iterator):
        nonlocal step, xla
        try:
            logs = step(iterator)
        except tf.errors.InvalidArgumentError as error:
            if not (xla and may_fall_back and _compat.is_xla_conversion_error(error)):
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
            step = build(False)
            logs = step(iterator)
        after_step()
        return logs

    return train_function


class FunctionCache:
    """`tf.function`s traced once per example shape, dtype and setting.

    The number of rows and of steps are tensors in the signatures, so any
    support size or step count reuses a trace.
    """

    def __init__(self):
        self._functions = {}

    def get(self, name, function, arrays, settings, scalars=0):
        """The cached `tf.function` of `function` for `arrays` of these shapes.

        Args:
            name: Distinguishes functions sharing the cache.
            function: The Python function, taking the arrays and then the
                scalars.
            arrays: Example tensors, one per array argument (`[rows, ...]`).
            settings: The model's trace settings (hashable).
            scalars: Number of trailing scalar int32 arguments.
        """
        key = (name, tuple(_spec_key(x) for x in arrays), settings)
        if key not in self._functions:
            signature = [tf.TensorSpec((None,) + tuple(x.shape[1:]), x.dtype) for x in arrays]
            signature += [tf.TensorSpec([], tf.int32)] * scalars
            self._functions[key] = tf.function(function, input_signature=signature)
        return self._functions[key]


def _spec_key(x):
    return (tuple(x.shape[1:]), x.dtype.name)
