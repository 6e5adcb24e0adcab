"""A meta-batch's tasks adapted in one batched computation.

`ReptileModel` adapts each task of a meta-batch in its own branch of the
step: `inner_loop.adapt` once per task, so every op of the inner loop runs
once per task and step, on a handful of images. For models built from the
layers the field's conv4 is made of, this module runs the inner loops of all
T tasks as one computation instead. Every weight gets a leading task axis;
a convolution becomes one grouped convolution (the tasks' feature maps side
by side on the channel axis, one group per task, so each task's kernel
sees only its own maps), a dense layer one batched matmul, and batch
normalisation normalises each task's channels with that task's statistics.
Each op then runs once per inner step for the whole meta-batch.

The numbers are those of the per-task loop up to float rounding: the loss
differentiated is the sum of the tasks' losses, so each task's weights get
exactly their own task's gradient, and every supported optimizer rule is
elementwise. Where a model, layer or option would break that (layers that
mix examples or tasks, regularisers and constraints, which see a weight as a
whole, gradient clipping by norm), `unsupported_reason` says so and the
per-task loop is used.
"""

import functools
import weakref

import keras
import numpy as np
import tensorflow as tf

from keras_reptile import _validation
from keras_reptile import inner_loop

__all__ = ["adapt", "grouped_convolutions_work", "unsupported_reason"]

# Activations that act on each value alone, so they may run on the tasks'
# maps side by side; softmax-like ones need the per-task layout.
_ELEMENTWISE = {
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "sigmoid",
    "hard_sigmoid", "tanh", "softplus", "softsign", "swish", "silu",
    "hard_swish", "hard_silu", "mish", "exponential",
}
_PER_EXAMPLE = _ELEMENTWISE | {"softmax", "log_softmax"}

# Weightless layers that act on each value, or each channel's map, alone:
# they run on the tasks' maps side by side.
_CHANNELWISE = (
    keras.layers.ReLU,
    keras.layers.LeakyReLU,
    keras.layers.ELU,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
)
# Weightless layers that act on each example alone: they run on the tasks'
# examples stacked into one batch.
_PER_EXAMPLE_LAYERS = (
    keras.layers.Flatten,
    keras.layers.Reshape,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.ZeroPadding2D,
    keras.layers.Softmax,
)

_PLANS = weakref.WeakKeyDictionary()


def unsupported_reason(model, optimizer):
    """Why `model`'s tasks cannot be adapted in one computation, or None.

    Args:
        model: A built Keras model.
        optimizer: The `InnerOptimizer` of the inner loop.

    Returns:
        None if `adapt` supports the model and optimizer, else a sentence
        saying what does not fit.
    """
    if optimizer.parameters:
        return ("the inner loop's learning rates are meta-learned per weight "
                "entry, which the batched weight layout does not carry")
    plan = _plan(model)
    if isinstance(plan, str):
        return plan
    opt = optimizer.optimizer
    if (opt.clipnorm and opt.clipnorm > 0) or (
        opt.global_clipnorm and opt.global_clipnorm > 0
    ):
        return (
            "the inner optimizer clips gradients by norm, which would take "
            "the norm over all tasks' gradients at once"
        )
    convolves = any(type(op.layer) is keras.layers.Conv2D for op in plan)
    if convolves and not grouped_convolutions_work():
        return (
            "this TensorFlow cannot run grouped convolutions and their "
            "gradients on this device (its CPU kernels for them come from "
            "oneDNN: is TF_ENABLE_ONEDNN_OPTS=0 set?)"
        )
    return None


def evaluates_batched(setting, jit_compile, model, optimizer):
    """Whether a meta-learner's evaluation adapts its tasks with `adapt`.

    Args:
        setting: The meta-learner's `batched_tasks`: `"auto"`, True or False.
        jit_compile: Whether evaluation is compiled with XLA, whose CPU
            grouped convolutions ran 10x slower: `"auto"` then declines.
        model: The wrapped, built Keras model.
        optimizer: The inner loop's rule (an `InnerOptimizer`, or an
            algorithm's rule with meta-learned `parameters`).

    Returns:
        True where `setting` is True, or `"auto"` and batching applies.

    Raises:
        ValueError: If `setting` is True and batching does not apply
            (`unsupported_reason` says why).
    """
    if setting is False or (setting == "auto" and jit_compile):
        return False
    reason = unsupported_reason(model, optimizer)
    if setting is True:
        _validation.check_batched_tasks_reason(reason)
    return reason is None


def adapt(
    model,
    trainable,
    non_trainable,
    x,
    y,
    *,
    loss_fn,
    optimizer,
    steps,
    batch_size,
    optimizer_state=None,
    first_iteration=0,
):
    """Adapts weights to T tasks at once; `inner_loop.adapt` for each task.

    Step `t` trains every task on its support rows
    `(t * batch_size + j) mod S`, as `inner_loop.adapt` does.

    Args:
        model: A built Keras model for which `unsupported_reason` is None.
        trainable: Tensors for `model.trainable_variables`, each with a
            leading task axis of static size T.
        non_trainable: Tensors for `model.non_trainable_variables`, each
            with the leading task axis.
        x: Support inputs `[T, S, *input_shape]`.
        y: Support targets `[T, S, ...]`.
        loss_fn: `loss_fn(y_true, y_pred)` returning a task's scalar loss.
        optimizer: An `InnerOptimizer`.
        steps: Number of steps; unrolled or looped as in `inner_loop.adapt`.
        batch_size: Rows per step, Python int.
        optimizer_state: The optimizer state to start from (with the task
            axis), or None for a fresh optimizer.
        first_iteration: The optimizer's iteration count at the start.

    Returns:
        `(trainable, non_trainable, optimizer_state)` after adaptation, each
        tensor with the leading task axis.
    """
    plan = _plan(model)
    if isinstance(plan, str):
        raise ValueError(
            "Expected a model whose tasks can be adapted in one batched "
            f"computation. Received model {model.name!r}, but {plan}."
        )
    tasks = int(x.shape[0])
    # Convolution kernels stay in the grouped layout for the whole loop (the
    # optimizer's update is elementwise, so the layout does not matter to
    # it): transposing them in every step, forward and backward, cost 9% of
    # an evaluation's op time.
    grouped, stacked = _layout_changes(plan, tasks)
    trainable = grouped(trainable, "trainable")
    non_trainable = grouped(non_trainable, "non_trainable")
    if optimizer_state is not None:
        optimizer_state = {k: grouped(v, "trainable") for k, v in optimizer_state.items()}

    def loss_of_all_tasks(params, non_trainable, x_batch, y_batch):
        # The sum: each task's weights get their own task's gradient.
        y_pred, new_state = _forward(
            plan, params, non_trainable, x_batch, tasks, training=True
        )
        loss = tf.add_n([loss_fn(y_batch[i], y_pred[i]) for i in range(tasks)])
        return loss, new_state

    params, state, optimizer_state = inner_loop.minimize(
        loss_of_all_tasks,
        trainable,
        non_trainable,
        x,
        y,
        optimizer=optimizer,
        steps=steps,
        batch_size=batch_size,
        optimizer_state=optimizer_state,
        first_iteration=first_iteration,
        rows_axis=1,
    )
    return (
        stacked(params, "trainable"),
        stacked(state, "non_trainable"),
        {k: stacked(v, "trainable") for k, v in optimizer_state.items()},
    )


@functools.cache
def grouped_convolutions_work():
    """Whether grouped convolutions and their gradients run correctly here.

    TensorFlow's CPU kernels for grouped convolutions come from oneDNN
    (`TF_ENABLE_ONEDNN_OPTS`); without it they fail. A small grouped
    convolution is checked against one convolution per group, in a graph
    as the steps run, once per process.
    """

    # The kernels are called directly: a gradient tape would not record
    # under `tf.init_scope`.
    def run(x, kernel, upstream):
        strides, padding = [1, 2, 2, 1], "SAME"
        return (
            tf.raw_ops.Conv2D(input=x, filter=kernel, strides=strides, padding=padding),
            tf.raw_ops.Conv2DBackpropInput(
                input_sizes=tf.shape(x), filter=kernel, out_backprop=upstream,
                strides=strides, padding=padding),
            tf.raw_ops.Conv2DBackpropFilter(
                input=x, filter_sizes=tf.shape(kernel), out_backprop=upstream,
                strides=strides, padding=padding),
        )

    @tf.function(jit_compile=False, autograph=False)
    def difference(x, kernel, upstream):
        grouped = run(x, kernel, upstream)
        groups = [
            run(x[..., g : g + 1], kernel[..., g : g + 1], upstream[..., g : g + 1])
            for g in range(2)
        ]
        split = [tf.concat(parts, axis=-1) for parts in zip(*groups)]
        return tf.reduce_max(
            tf.stack([tf.reduce_max(tf.abs(a - b)) for a, b in zip(grouped, split)])
        )

    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=s).astype("float32")
              for s in ((2, 5, 5, 2), (3, 3, 1, 2), (2, 3, 3, 2))]
    with tf.init_scope():  # runs now, also when asked while tracing a step
        try:
            return bool(difference(*arrays) < 1e-4)
        except (tf.errors.OpError, ValueError):
            return False


# ----------------------------------------------------------------------
# The model as a list of batched operations


class _Op:
    """One layer, run for all tasks, and where its weights are."""

    def __init__(self, layer, refs):
        self.layer = layer
        # {"kernel": ("trainable", i), "moving_mean": ("non_trainable", j)}:
        # indices into the weight lists the forward pass receives.
        self.refs = refs

    def value(self, name, params, state):
        kind, index = self.refs[name]
        return (params if kind == "trainable" else state)[index]


def _plan(model):
    """The model's layers as `_Op`s, or a string saying why not (cached)."""
    # Freezing a layer moves its weights between the lists: plan again.
    key = tuple(id(v) for v in model.trainable_variables), len(model.variables)
    cached = _PLANS.get(model)
    if cached is None or cached[0] != key:
        cached = _PLANS[model] = (key, _make_plan(model))
    return cached[1]


def _make_plan(model):
    if not isinstance(model, keras.Sequential) and not _is_functional(model):
        return f"the model is a subclassed {type(model).__name__}, not Sequential or functional"
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not inputs or len(inputs) != 1 or not outputs or len(outputs) != 1:
        return "the model does not have exactly one input and one output"
    layers = [
        layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)
    ]
    trainable = {id(v): i for i, v in enumerate(model.trainable_variables)}
    non_trainable = {id(v): i for i, v in enumerate(model.non_trainable_variables)}
    previous, ops, covered = inputs[0], [], set()
    for layer in layers:
        try:
            chained = layer.input is previous
        except (AttributeError, ValueError):
            chained = False
        if not chained:
            return (
                f"layer {layer.name!r} is not fed by the previous layer alone "
                "(only a chain of layers is batched)"
            )
        reason = _layer_reason(layer)
        if reason:
            return f"layer {layer.name!r} ({type(layer).__name__}) {reason}"
        refs = {}
        for name in ("kernel", "bias", "gamma", "beta", "moving_mean", "moving_variance"):
            variable = getattr(layer, name, None)
            if variable is None or not isinstance(variable, keras.Variable):
                continue
            key = id(variable)
            refs[name] = ("trainable", trainable[key]) if key in trainable else (
                "non_trainable", non_trainable[key])
            covered.add(key)
        ops.append(_Op(layer, refs))
        previous = layer.output
    if previous is not outputs[0]:
        return "the model's output is not its last layer's output"
    if covered != {id(v) for v in model.variables}:
        return "the model has variables outside its layers' weights"
    return ops


def _is_functional(model):
    return type(model) is keras.Model or type(model).__name__ == "Functional"


def _layer_reason(layer):
    """Why `layer` cannot be batched, or None."""
    if layer.dtype_policy.name != "float32":
        return f"has dtype policy {layer.dtype_policy.name!r}; only float32 is batched"
    for name in ("kernel_regularizer", "bias_regularizer", "beta_regularizer",
                 "gamma_regularizer", "activity_regularizer", "kernel_constraint",
                 "bias_constraint", "beta_constraint", "gamma_constraint"):
        if getattr(layer, name, None) is not None:
            return f"has a {name.replace('_', ' ')}"
    if type(layer) is keras.layers.Conv2D:
        if layer.groups != 1 or layer.data_format != "channels_last":
            return "is grouped or channels-first"
        if getattr(layer, "lora_enabled", False):
            return "has LoRA enabled"
        return _activation_reason(layer, _ELEMENTWISE)
    if type(layer) is keras.layers.Dense:
        if getattr(layer, "lora_enabled", False):
            return "has LoRA enabled"
        return _activation_reason(layer, _PER_EXAMPLE)
    if type(layer) is keras.layers.BatchNormalization:
        rank = len(layer.input.shape)
        if layer.axis not in (-1, rank - 1):
            return "does not normalise the last axis"
        if layer.synchronized or layer.renorm:
            return "is synchronized or uses renorm"
        return None
    if type(layer) is keras.layers.Activation:
        return _activation_reason(layer, _PER_EXAMPLE)
    if isinstance(layer, _CHANNELWISE + _PER_EXAMPLE_LAYERS) and not layer.variables:
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return "is channels-first"
        return None
    return "is not one of the layers batched (Conv2D, Dense, BatchNormalization, activations, pooling, Flatten, Reshape)"


def _activation_name(layer):
    name = keras.activations.serialize(layer.activation)
    if isinstance(name, dict):
        name = name.get("config", {}).get("name", name)
    return name if isinstance(name, str) else None


def _activation_reason(layer, allowed):
    name = _activation_name(layer)
    if name not in allowed:
        return f"has activation {name!r}, not one that acts on each example alone"
    return None


def _layout_changes(plan, tasks):
    """Functions between stacked kernels `[T, kh, kw, C, F]` and grouped ones.

    A grouped kernel `[kh, kw, C, T * F]` is what a grouped convolution
    over the tasks' maps side by side takes: task t's filters at
    t * F .. t * F + F - 1.
    """
    kernels = {op.refs["kernel"] for op in plan if type(op.layer) is keras.layers.Conv2D}

    def to_grouped(k):
        kh, kw, c, f = k.shape[1:]
        return tf.reshape(tf.transpose(k, [1, 2, 3, 0, 4]), [kh, kw, c, tasks * f])

    def to_stacked(k):
        kh, kw, c, all_filters = k.shape
        k = tf.reshape(k, [kh, kw, c, tasks, all_filters // tasks])
        return tf.transpose(k, [3, 0, 1, 2, 4])

    def change(convert):
        def apply(values, kind):
            return [convert(v) if (kind, i) in kernels else v for i, v in enumerate(values)]
        return apply

    return change(to_grouped), change(to_stacked)


# ----------------------------------------------------------------------
# The forward pass. Activations are kept in one of two layouts:
#   tasks:    [T, N, *shape]           (per-task batches)
#   channels: [N, *spatial, T * C]     (task t's channels at t*C .. t*C+C-1)


def _to_channels(x, tasks):
    shape = x.shape[2:]
    rank = len(shape) + 2
    perm = list(range(1, rank - 1)) + [0, rank - 1]
    x = tf.transpose(x, perm)  # [N, *spatial, T, C]
    return tf.reshape(x, [-1, *shape[:-1], tasks * shape[-1]])


def _to_tasks(x, tasks):
    shape = x.shape[1:]
    x = tf.reshape(x, [-1, *shape[:-1], tasks, shape[-1] // tasks])
    rank = len(shape) + 2
    perm = [rank - 2, 0] + list(range(1, rank - 2)) + [rank - 1]
    return tf.transpose(x, perm)  # [T, N, *spatial, C]


def _forward(plan, params, state, x, tasks, training):
    """Outputs `[T, N, ...]` of every task's weights on its own inputs."""
    state = list(state)
    layout = "tasks"
    for op in plan:
        layer = op.layer
        if type(layer) is keras.layers.Conv2D:
            if layout == "tasks":
                x, layout = _to_channels(x, tasks), "channels"
            kernel = op.value("kernel", params, state)  # grouped: [kh, kw, C, T * F]
            x = tf.nn.convolution(
                x, kernel, layer.strides, layer.padding.upper(),
                dilations=layer.dilation_rate,
            )
            if layer.use_bias:
                x = x + tf.reshape(op.value("bias", params, state), [kernel.shape[-1]])
            x = layer.activation(x)
        elif type(layer) is keras.layers.Dense:
            if layout == "channels":
                x, layout = _to_tasks(x, tasks), "tasks"
            kernel = op.value("kernel", params, state)  # [T, D, O]
            shape = tf.shape(x)
            flat = tf.reshape(x, [tasks, -1, x.shape[-1]])
            out = tf.matmul(flat, kernel)
            if layer.use_bias:
                out = out + op.value("bias", params, state)[:, None, :]
            x = tf.reshape(out, tf.concat([shape[:-1], [kernel.shape[-1]]], 0))
            x = layer.activation(x)
        elif type(layer) is keras.layers.BatchNormalization:
            x = _batch_norm(op, params, state, x, tasks, layout, training)
        elif isinstance(layer, _CHANNELWISE) or (
            type(layer) is keras.layers.Activation and _activation_name(layer) in _ELEMENTWISE
        ):
            x = layer(x)  # weightless, per value or per channel: any layout
        else:  # weightless, per example
            if layout == "channels":
                x, layout = _to_tasks(x, tasks), "tasks"
            merged = tf.reshape(x, [-1, *x.shape[2:]])
            merged = layer(merged)
            x = tf.reshape(merged, [tasks, -1, *merged.shape[1:]])
    if layout == "channels":
        x = _to_tasks(x, tasks)
    return x, state


def _batch_norm(op, params, state, x, tasks, layout, training):
    """Keras's BatchNormalization, with each task's own statistics and weights."""
    layer = op.layer
    channels = layer.moving_mean.shape[0]

    def per_channel(value):  # [T, C] -> broadcastable against x
        if layout == "channels":
            return tf.reshape(value, [tasks * channels])
        return tf.reshape(value, [tasks] + [1] * (len(x.shape) - 2) + [channels])

    def per_task(value):  # the moments' layout -> [T, C]
        return tf.reshape(value, [tasks, channels])

    gamma = per_channel(op.value("gamma", params, state)) if layer.scale else None
    beta = per_channel(op.value("beta", params, state)) if layer.center else None
    moving_mean = op.value("moving_mean", params, state)
    moving_variance = op.value("moving_variance", params, state)
    if training and layer.trainable:
        if layout == "channels":
            axes = list(range(len(x.shape) - 1))
        else:
            axes = list(range(1, len(x.shape) - 1))
        mean, variance = keras.ops.moments(x, axes=axes, keepdims=layout == "tasks")
        momentum = layer.momentum
        for name, old, new in (
            ("moving_mean", moving_mean, mean),
            ("moving_variance", moving_variance, variance),
        ):
            state[op.refs[name][1]] = old * momentum + per_task(new) * (1.0 - momentum)
    else:
        mean, variance = per_channel(moving_mean), per_channel(moving_variance)
    return keras.ops.batch_normalization(
        x, mean, variance, axis=-1, offset=beta, scale=gamma, epsilon=layer.epsilon
    )
