"""Every private Keras or TensorFlow name the library relies on, in one place.

A meta-learner has to reach a little below Keras's public API: it builds the
compiled loss and metrics before the first trace (so a meta-step compiles
once), calls the compiled loss on per-task tensors, restates optimizer rules
functionally, and restores the epoch counter on resume. Each such use is a
small function here, and `tests/_compat_test.py` fails by name when a Keras
release removes one, so an upgrade breaks loudly in one file instead of
quietly somewhere in the library.
"""

import keras
import tensorflow as tf

# (owner, attribute) pairs this module uses; the compat test checks each.
PRIVATE_NAMES = (
    (keras.Model, "_maybe_symbolic_build"),
    (keras.Model, "_symbolic_build"),
    (keras.Model, "_flatten_layers"),
    (keras.optimizers.Optimizer, "_use_weight_decay"),
    (tf.distribute.StrategyExtended, "_in_multi_worker_mode"),
)
# Attributes set on instances only (checked on a compiled model or a built
# optimizer by the test).
MODEL_ATTRIBUTES = (
    "_compile_loss", "_loss_tracker", "_initial_epoch", "train_function",
    "_jit_compile", "_compile_config",
)
OPTIMIZER_ATTRIBUTES = ("_learning_rate",)
# Set on every layer instance (checked on a called layer by the test).
LAYER_ATTRIBUTES = ("_inbound_nodes",)


class BuildBeforeTrace:
    """Model mixin: builds metrics and optimizer before the first trace.

    Keras's TensorFlow trainer defers building the compiled metrics and the
    optimizer to the first trace of the step function unless a distribution
    strategy is set, and a `tf.function` that creates variables while tracing
    is traced a second time. The mixin overrides the private hook Keras calls
    at the start of `fit`/`evaluate`/`*_on_batch` and hands the first data
    batch to the model's `_build_from_data(data_batch)`.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = next(batches)
                break
        if data_batch is not None:
            self._build_from_data(data_batch)


def symbolic_build(model, data_batch):
    """Builds `model`'s compiled loss, metrics and optimizer from a batch."""
    model._symbolic_build(data_batch=data_batch)


def compiled_loss(model):
    """The `CompileLoss` object `compile(loss=...)` made, or None."""
    return getattr(model, "_compile_loss", None)


def loss_tracker(model):
    """The `Mean` metric behind the `loss` entry of `fit`'s logs."""
    return model._loss_tracker


def flatten_layers(model):
    """Every layer inside `model` (nested models and sublayers), and itself."""
    return model._flatten_layers(include_self=True)


def set_initial_epoch(model, epoch):
    """Sets the epoch `fit` resumes from (as `BackupAndRestore` does)."""
    model._initial_epoch = epoch


def initial_epoch(model):
    return model._initial_epoch


def swap_train_function(model, function):
    """Makes `fit` call `function` for its next steps; returns the old one.

    Keras's `fit` calls `model.train_function(iterator)` once per step (or
    per `steps_per_execution` steps) after `make_train_function()`.
    """
    previous = model.train_function
    model.train_function = function
    return previous


class jit_compile_as:
    """Context: `model.jit_compile` reads `value` while Keras builds a step.

    Keras reads `jit_compile` once, when `make_*_function` wraps the step in
    `tf.function`; setting the private field (not the property, whose setter
    warns) chooses XLA for that one function.
    """

    def __init__(self, model, value):
        self.model, self.value = model, value

    def __enter__(self):
        self.previous = self.model._jit_compile
        self.model._jit_compile = self.value

    def __exit__(self, *exc_info):
        self.model._jit_compile = self.previous


def is_xla_conversion_error(error):
    """Whether TensorFlow raised `error` because XLA cannot compile a graph."""
    text = str(error)
    return ("when trying to compile graph" in text
            or "tf2xla conversion failed" in text)


def op_determinism_enabled():
    """Whether `tf.config.experimental.enable_op_determinism()` is in effect.

    TensorFlow has no public getter; Keras reads the same private one before
    choosing XLA.
    """
    from tensorflow.python.framework import config

    return config.is_op_determinism_enabled()


def record_compile_argument(model, name, value):
    """Stores `value` as `compile`'s `name` in the config `.keras` files keep.

    Keras records `jit_compile` after resolving `"auto"`, so a model saved
    on a CPU would come back with an explicit `False`.
    """
    config = getattr(model, "_compile_config", None)
    if config is not None and name in config.config:
        config.config[name] = value


def raw_learning_rate(optimizer):
    """The optimizer's learning rate as given: a float, schedule or variable."""
    return optimizer._learning_rate


def uses_weight_decay(optimizer, variable):
    """Whether `optimizer` applies weight decay to `variable`."""
    return optimizer._use_weight_decay(variable)


def in_multi_worker_mode(strategy):
    """Keras's own test for the cross-worker reduction of step outputs."""
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.extended._in_multi_worker_mode()


def call_inputs(layer, output):
    """The input tensors of the call of `layer` that returned `output`, or None.

    `layer.input` is that of the layer's first call only. A Sequential model
    whose `build()` runs again calls its layers again, so its output is then
    that of a later call, and the embedding feeding it is that call's input.
    """
    for node in layer._inbound_nodes:
        if any(tensor is output for tensor in node.output_tensors):
            return node.input_tensors
    return None
