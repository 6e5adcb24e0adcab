"""SavedModel export of a meta-trained `ReptileModel`, for TF Serving.

TF Serving loads a SavedModel and nothing else: no Python, no Keras, no
`keras_reptile`. `export_saved_model` (also available as
`ReptileModel.export`) writes one with three signatures:

* `serving_default`: input `x` `[batch, *input_shape]` (the wrapped
  model's input dtype, usually float32; `batch` may be 0); output
  `outputs`, the wrapped model's outputs at the meta-weights in inference
  mode (what `model.predict(x)` returns), and for classifiers
  `probabilities`.
* `adapt_and_predict`: inputs `support_x` `[S, *input_shape]`, `support_y`
  (`[S]` int32 class ids for a `SparseCategoricalCrossentropy` classifier)
  and `query_x` `[Q, *input_shape]`; outputs `outputs` (and for classifiers
  `probabilities`) of the query set after adapting the meta-weights to the
  support set with the model's `eval_inner_steps` steps, computed per
  request with the same inner loop as `ReptileModel.adapt_and_predict()`.
* `adapt_and_predict_steps`: the same with a fourth, required input
  `steps` (scalar int32), the number of adaptation steps.

Nothing is written to any variable, so concurrent requests are independent.

The number of steps has its own signature rather than an optional input
because only TF Serving fills in a SignatureDef's default values:
`tf.saved_model.load(path).signatures[...]`, like every concrete function,
needs all of its inputs. With two signatures every client calls them the
same way: TF Serving's Predict API (REST and gRPC), `saved_model_cli run`,
`loaded.signatures["adapt_and_predict"](support_x=..., support_y=...,
query_x=...)` and `loaded.adapt_and_predict(support_x, support_y,
query_x)` (and `loaded.adapt_and_predict_steps(..., steps)`).

Classifiers are recognised from the compiled loss: with a
`SparseCategoricalCrossentropy` or `CategoricalCrossentropy` loss (instance,
function or string name) the last output axis holds the classes (`ways`);
`probabilities` is the softmax of the outputs for `from_logits=True` and a
copy of the outputs otherwise. Any other loss is treated as regression: no
`probabilities`, float targets.

Targets (`support_y`) take the form the compiled loss takes:

* `SparseCategoricalCrossentropy`: int32 class ids `[S]` in `0..ways-1`;
* `CategoricalCrossentropy`: float32 one-hot (or soft) labels `[S, ways]`;
* other losses: float32 `[S, *output_shape]`, or `[S]` when each example
  has a single output (e.g. `keras_reptile.datasets.sine`).

Every request is bounded, so that no request can hold a server for hours:
`steps` is at most `max_steps` (by default 10 times `eval_inner_steps`),
the support set at most `max_support` rows (by default 1,000) and the query
set at most `max_query` rows (by default 10,000). The exporter sets them
(`None` lifts a bound); they are fixed in the exported graph.

The signatures declare their inputs with unknown shapes and check them in
the graph, so every malformed request (wrong rank or example shape,
`support_y` not matching `support_x`, labels outside `0..ways-1`, an empty
or too large support or query set, `steps` outside `1..max_steps`, NaN or
Inf in `x`, `support_x`, `query_x` or float targets) fails with an
`InvalidArgumentError` whose message names the input and states what was
expected, whatever the client: TF Serving feeds request tensors as they
come (it checks input names and dtypes, not shapes), and a statically
shaped signature would make Python callers hit a `TypeError` from argument
binding instead. The expected shapes are documented above and in the error
messages.

Example:

```python
model.export(keras_reptile.export.next_version_path("saved_models/omniglot"))
```

```shell
docker run -p 8501:8501 \\
    -v "$PWD/saved_models/omniglot:/models/omniglot" \\
    -e MODEL_NAME=omniglot tensorflow/serving
curl -d '{"signature_name": "adapt_and_predict", "inputs": {
          "support_x": [...], "support_y": [...], "query_x": [...]}}' \\
    localhost:8501/v1/models/omniglot:predict
curl -d '{"signature_name": "adapt_and_predict_steps", "inputs": {
          "support_x": [...], "support_y": [...], "query_x": [...],
          "steps": 20}}' \\
    localhost:8501/v1/models/omniglot:predict
```

`examples/serving/` has REST and gRPC clients that build these requests.
"""

import errno
import logging
import os
import re
import socket
import sys
import uuid

import keras
import tensorflow as tf

from keras_reptile import _durable
from keras_reptile import _validation
from keras_reptile._losses import loss_kind as _loss_kind
from keras_reptile._validation import check_positive_int

__all__ = [
    "ADAPT_SIGNATURE",
    "ADAPT_STEPS_SIGNATURE",
    "DEFAULT_MAX_QUERY",
    "DEFAULT_MAX_STEPS_FACTOR",
    "DEFAULT_MAX_SUPPORT",
    "SERVING_SIGNATURE",
    "export_saved_model",
    "next_version_path",
]

SERVING_SIGNATURE = "serving_default"
ADAPT_SIGNATURE = "adapt_and_predict"
ADAPT_STEPS_SIGNATURE = "adapt_and_predict_steps"

# Defaults of the request bounds, generous for few-shot tasks (a 20-way
# 50-shot support set has 1,000 rows) and small enough that one request
# takes seconds to minutes on a CPU, not hours.
DEFAULT_MAX_STEPS_FACTOR = 10
DEFAULT_MAX_SUPPORT = 1_000
DEFAULT_MAX_QUERY = 10_000

_logger = logging.getLogger(__name__)


def export_saved_model(
    model,
    filepath,
    *,
    verbose=True,
    input_signature=None,
    max_steps="auto",
    max_support="auto",
    max_query="auto",
    overwrite=False,
):
    """Writes a `ReptileModel` as a SavedModel for TF Serving.

    The SavedModel has the signatures `serving_default` (predictions of the
    meta-weights), `adapt_and_predict` (few-shot adaptation to a support set
    with `eval_inner_steps` steps and predictions on a query set, per
    request) and `adapt_and_predict_steps` (the same with a required `steps`
    input); see the module docstring for their inputs and outputs. It needs
    only TensorFlow to load and run.

    Requests are bounded by `max_steps`, `max_support` and `max_query`:
    larger ones fail with an `InvalidArgumentError` before any computation,
    so no request can keep a server busy for hours.

    The SavedModel is written to a temporary sibling directory, flushed to
    disk and then renamed to `filepath`, so a TF Serving instance watching
    the parent directory never sees a partly written version, even if the
    process is killed (on local and POSIX file systems; object stores have
    no atomic rename). With `overwrite=True` the previous version is moved
    aside before the new one is renamed in, and deleted after: never
    part-deleted in place. The next export to the same parent directory
    removes what a killed export left behind.

    Args:
        model: A compiled and built `keras_reptile.ReptileModel`.
        filepath: `str` or `pathlib.Path`, the directory to write, e.g.
            `saved_models/<name>/<version>` for TF Serving (see
            `next_version_path`).
        verbose: Whether to report the written signatures (through Keras's
            interactive logging, or the `logging` module when that is
            disabled).
        input_signature: Optional shape and dtype of the wrapped model's
            input, as for `keras.Model.export`: a `tf.TensorSpec`,
            `keras.InputSpec` or `keras.KerasTensor` with a leading batch
            dimension, or a list holding one. Needed only when the wrapped
            model has no `inputs` (a subclassed model).
        max_steps: The largest `steps` a request to
            `adapt_and_predict_steps` may ask for, at least
            `eval_inner_steps`. `"auto"` (the default) is
            `DEFAULT_MAX_STEPS_FACTOR` (10) times `eval_inner_steps`;
            `None` sets no bound.
        max_support: The most rows a request's `support_x` may have.
            `"auto"` (the default) is `DEFAULT_MAX_SUPPORT` (1,000); `None`
            sets no bound.
        max_query: The most rows a request's `query_x` may have. `"auto"`
            (the default) is `DEFAULT_MAX_QUERY` (10,000); `None` sets no
            bound.
        overwrite: Whether to replace an existing non-empty `filepath`.

    Returns:
        The path written, as a string.

    Raises:
        ValueError: If the model is not compiled with a loss or not built,
            has several inputs or outputs, `input_signature`, `max_steps`,
            `max_support` or `max_query` is invalid, `filepath` is empty or
            cannot be written, or `filepath` exists, is not empty and
            `overwrite` is `False`.
        TypeError: If `model` is not a `ReptileModel`, `filepath` is not a
            `str` or `os.PathLike` (bytes included), or `overwrite` is not a
            bool.
        OSError: If the disk fills up while writing (`ENOSPC`, "no space
            left on <directory>"); nothing is left at `filepath`.

    Example:

    ```python
    path = keras_reptile.export.next_version_path("saved_models/omniglot")
    keras_reptile.export.export_saved_model(model, path)  # or model.export(path)

    # Anywhere with TensorFlow (no Keras or keras_reptile needed):
    served = tf.saved_model.load(path)
    probabilities = served.signatures["serving_default"](x=x)["probabilities"]
    outputs = served.signatures["adapt_and_predict"](
        support_x=support_x, support_y=support_y, query_x=query_x)["outputs"]
    outputs = served.signatures["adapt_and_predict_steps"](
        support_x=support_x, support_y=support_y, query_x=query_x,
        steps=tf.constant(10))["outputs"]
    outputs = served.adapt_and_predict(support_x, support_y, query_x)["outputs"]
    ```
    """
    filepath = _check_filepath(filepath)
    overwrite = _validation.check_bool("overwrite", overwrite)
    if not (
        isinstance(model, keras.Model) and callable(getattr(model, "call_adapted", None))
    ):
        raise TypeError(
            "Expected `model` to be a `keras_reptile.ReptileModel`. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )
    if not model.compiled or model.loss is None:
        raise ValueError(
            "Call `compile()` with a `loss` before exporting: the "
            "`adapt_and_predict` signature minimises the compiled loss."
        )
    net = model.model
    if not net.built:
        raise ValueError(
            "The model has not been built yet. Train it, or call "
            "`build(input_shape)`, before exporting."
        )
    eval_steps = model.eval_inner_steps
    max_steps = _bound(
        "max_steps", max_steps, DEFAULT_MAX_STEPS_FACTOR * eval_steps
    )
    if max_steps is not None and max_steps < eval_steps:
        raise ValueError(
            "Expected `max_steps` to be at least the default number of "
            f"steps, `eval_inner_steps`={eval_steps}. "
            f"Received: max_steps={max_steps}"
        )
    max_support = _bound("max_support", max_support, DEFAULT_MAX_SUPPORT)
    max_query = _bound("max_query", max_query, DEFAULT_MAX_QUERY)
    example_shape, x_dtype = _example_spec(net, input_signature)
    output_shape = _validation.output_shape(net, example_shape, x_dtype)
    loss_kind, from_logits = _loss_kind(model.loss)
    if loss_kind is not None and output_shape[-1:] in ((), (None,)):
        raise ValueError(
            "Expected a classifier's outputs to have a known number of "
            "classes on their last axis. Received: output shape "
            f"{(None,) + output_shape}"
        )
    y_spec = _target_spec(loss_kind, output_shape)
    _check_writable(filepath)

    def outputs_dict(outputs, checks):
        # Finite inputs can still overflow (values near the float32 limit)
        # or diverge during adaptation: an error, never NaN probabilities.
        checks.check(
            lambda: tf.reduce_all(tf.math.is_finite(outputs)),
            "Expected finite outputs. Received: {} NaN or Inf values in the "
            "outputs: the inputs are too large for the model, or the "
            "adaptation diverged (e.g. an inner learning rate too large for "
            "these inputs).",
            [tf.math.count_nonzero(tf.logical_not(tf.math.is_finite(outputs)))],
        )
        outputs = checks.guard(outputs)
        result = {"outputs": outputs}
        if loss_kind is not None:
            result["probabilities"] = (
                tf.nn.softmax(outputs, axis=-1)
                if from_logits
                else tf.identity(outputs)
            )
        return result

    def serve(x):
        checks = _Checks()
        x = checks.examples("x", x, example_shape, allow_empty=True)
        x = _as_model_input(checks.guard(x), example_shape)
        return outputs_dict(net(x, training=False), checks)

    def adapt(support_x, support_y, query_x, steps=None):
        checks = _Checks()
        support_x = checks.examples(
            "support_x", support_x, example_shape, max_rows=max_support,
            bound_name="max_support",
        )
        support_y = checks.targets(
            support_y, support_x, loss_kind, output_shape
        )
        query_x = checks.examples(
            "query_x", query_x, example_shape, max_rows=max_query,
            bound_name="max_query",
        )
        if steps is None:
            # A tensor, not a Python int: the same `while` loop as for any
            # other number of steps (and as `ReptileModel.adapt_and_predict`).
            steps = tf.constant(eval_steps, tf.int32)
        else:
            steps = checks.steps(steps, max_steps)
        support_x, support_y, query_x, steps = (
            checks.guard(t) for t in (support_x, support_y, query_x, steps)
        )
        support_x = _as_model_input(support_x, example_shape)
        query_x = _as_model_input(query_x, example_shape)
        if y_spec.shape[1:].is_fully_defined():
            # E.g. regression targets `[S]` for outputs `[S, 1]`.
            support_y = tf.reshape(support_y, [-1] + y_spec.shape[1:].as_list())
        else:
            support_y = tf.ensure_shape(support_y, y_spec.shape)
        return outputs_dict(
            model.call_adapted(support_x, support_y, query_x, steps), checks
        )

    def adapt_and_predict(support_x, support_y, query_x):
        return adapt(support_x, support_y, query_x)

    def adapt_and_predict_steps(support_x, support_y, query_x, steps):
        return adapt(support_x, support_y, query_x, steps)

    adapt_specs = [
        tf.TensorSpec(None, x_dtype, name="support_x"),
        tf.TensorSpec(None, y_spec.dtype, name="support_y"),
        tf.TensorSpec(None, x_dtype, name="query_x"),
    ]
    archive = keras.export.ExportArchive()
    archive.track(net)
    archive.add_endpoint(
        SERVING_SIGNATURE, serve, [tf.TensorSpec(None, x_dtype, name="x")]
    )
    archive.add_endpoint(ADAPT_SIGNATURE, adapt_and_predict, adapt_specs)
    archive.add_endpoint(
        ADAPT_STEPS_SIGNATURE,
        adapt_and_predict_steps,
        adapt_specs + [tf.TensorSpec(None, tf.int32, name="steps")],
    )
    filepath = _write_atomically(archive, filepath, overwrite)
    if verbose:
        adapt_inputs = (
            f"support_x {_describe(example_shape, x_dtype, 'S')}, "
            f"support_y {_describe(y_spec.shape[1:], y_spec.dtype, 'S')}, "
            f"query_x {_describe(example_shape, x_dtype, 'Q')}"
        )
        adapt_outputs = _describe_outputs(loss_kind, output_shape, "Q")
        bounds = (
            f"S {_at_most(max_support, 'max_support')}, "
            f"Q {_at_most(max_query, 'max_query')}"
        )
        _report(
            f"Saved SavedModel for TF Serving at '{filepath}'. Signatures:\n"
            f"  '{SERVING_SIGNATURE}': x {_describe(example_shape, x_dtype)} "
            f"-> {_describe_outputs(loss_kind, output_shape)} at the "
            "meta-weights\n"
            f"  '{ADAPT_SIGNATURE}': {adapt_inputs} -> {adapt_outputs} after "
            f"{eval_steps} adaptation steps; {bounds}\n"
            f"  '{ADAPT_STEPS_SIGNATURE}': {adapt_inputs}, steps int32 "
            f"scalar -> {adapt_outputs} after `steps` adaptation steps; "
            f"{bounds}, steps {_at_most(max_steps, 'max_steps')}"
        )
    return filepath


def _bound(name, value, default):
    """Resolves a request bound: `"auto"`, `None` (no bound) or a count."""
    if isinstance(value, str) and value == "auto":
        return default
    if value is None:
        return None
    try:
        return check_positive_int(name, value)
    except ValueError:
        raise ValueError(
            f"Expected `{name}` to be a positive integer, 'auto' or None (no "
            f"bound). Received: {name}={value!r}"
        ) from None


def next_version_path(model_dir):
    """Returns the next TF Serving version directory under `model_dir`.

    TF Serving watches `model_dir` (its `--model_base_path`) for
    subdirectories named by positive integers and serves the highest one.
    This returns `model_dir/<n + 1>` where `n` is the highest existing
    version (`model_dir/1` when there is none, including when `model_dir`
    does not exist yet). Entries that are not integers are ignored, except
    a version that a killed `export_saved_model(..., overwrite=True)` left
    moved aside, which the next export restores.

    Args:
        model_dir: `str` or `pathlib.Path`, the model's base directory, e.g.
            `saved_models/omniglot`.

    Returns:
        The version directory path, as a string. It is not created.

    Example:

    ```python
    path = next_version_path("saved_models/omniglot")  # ".../omniglot/1"
    model.export(path)
    next_version_path("saved_models/omniglot")  # ".../omniglot/2"
    ```
    """
    model_dir = os.fspath(model_dir)
    versions = []
    if tf.io.gfile.isdir(model_dir):
        for entry in tf.io.gfile.listdir(model_dir):
            entry = entry.rstrip("/")
            if entry.isdigit():
                versions.append(int(entry))
            # A version that an export with `overwrite=True`, killed at the
            # wrong moment, had moved aside: the next export puts it back.
            aside = _SIBLING.match(entry)
            if aside and aside["kind"] == "old" and aside["name"].isdigit():
                versions.append(int(aside["name"]))
    return os.path.join(model_dir, str(max(versions, default=0) + 1))


class _Checks:
    """Runtime input checks that run one after another, before any use.

    Each assertion depends on the previous one, so a request is reported
    against the first check it fails (later checks may assume earlier ones
    hold), and `guard` makes a tensor depend on all assertions so far.
    """

    def __init__(self):
        self._deps = []

    def check(self, condition_fn, template, values=()):
        with tf.control_dependencies(self._deps):
            message = (
                tf.strings.format(template, values, summarize=-1)
                if values
                else template
            )
            self._deps = [tf.debugging.Assert(condition_fn(), [message])]

    def guard(self, tensor):
        with tf.control_dependencies(self._deps):
            return tf.identity(tensor)

    def examples(
        self, name, x, example_shape, allow_empty=False, max_rows=None,
        bound_name=None,
    ):
        expected = ", ".join(["rows"] + [str(d) for d in example_shape])
        self.check(
            lambda: _has_shape(x, (None,) + example_shape),
            f"Expected `{name}` of shape [{expected}]. "
            f"Received: {name}.shape={{}}",
            [tf.shape(x)],
        )
        if not allow_empty:
            self.check(
                lambda: tf.shape(x)[0] > 0,
                f"Expected `{name}` to be a non-empty batch of examples. "
                f"Received: {name}.shape={{}}",
                [tf.shape(x)],
            )
        if max_rows is not None:
            self.check(
                lambda: tf.shape(x)[0] <= max_rows,
                f"Expected `{name}` with at most {max_rows} rows (the "
                f"`{bound_name}` of this export). Received: "
                f"{name}.shape={{}}",
                [tf.shape(x)],
            )
        self.finite(name, x)
        return x

    def finite(self, name, x):
        # Without it NaN/Inf inputs come back as NaN outputs, with no hint
        # which input was at fault.
        if not x.dtype.is_floating:
            return
        self.check(
            lambda: tf.reduce_all(tf.math.is_finite(x)),
            f"Expected `{name}` to hold only finite values. Received: "
            f"{name} with {{}} NaN or Inf values.",
            [tf.math.count_nonzero(tf.logical_not(tf.math.is_finite(x)))],
        )

    def targets(self, y, support_x, loss_kind, output_shape):
        allowed = _validation.target_shapes(loss_kind, output_shape)
        shapes = [(None,) + s for s in allowed]
        expected = " or ".join(_validation.describe_shape(["rows"], s) for s in allowed)
        self.check(
            lambda: tf.reduce_any(tf.stack([_has_shape(y, s) for s in shapes])),
            f"Expected `support_y` of shape {expected}. "
            "Received: support_y.shape={}",
            [tf.shape(y)],
        )
        self.check(
            lambda: tf.equal(tf.shape(y)[0], tf.shape(support_x)[0]),
            "Expected `support_y` with one target per support example. "
            "Received: support_x.shape={}, support_y.shape={}",
            [tf.shape(support_x), tf.shape(y)],
        )
        if loss_kind == "sparse":
            ways = output_shape[-1]
            self.check(
                lambda: tf.logical_and(
                    tf.reduce_all(y >= 0), tf.reduce_all(y < ways)
                ),
                f"Expected `support_y` labels in [0, {ways - 1}] (the model "
                f"has {ways} outputs). Received labels from {{}} to {{}}.",
                [tf.reduce_min(y), tf.reduce_max(y)],
            )
        self.finite("support_y", y)
        return y

    def steps(self, steps, max_steps):
        self.check(
            lambda: tf.equal(tf.rank(steps), 0),
            "Expected `steps` to be a scalar. Received: steps.shape={}",
            [tf.shape(steps)],
        )
        self.check(
            lambda: steps >= 1,
            "Expected `steps` to be a positive integer. Received: steps={}",
            [steps],
        )
        if max_steps is not None:
            self.check(
                lambda: steps <= max_steps,
                f"Expected `steps` of at most {max_steps} (the `max_steps` "
                "of this export). Received: steps={}",
                [steps],
            )
        return steps


def _has_shape(x, dims):
    """Whether `x` has rank `len(dims)` and the non-`None` sizes of `dims`.

    Safe to evaluate on a tensor of any rank.
    """
    shape = tf.shape(x, out_type=tf.int64)
    padded = tf.concat([shape, tf.zeros([len(dims)], tf.int64)], axis=0)
    conditions = [tf.equal(tf.size(shape), len(dims))]
    conditions += [
        tf.equal(padded[i], d) for i, d in enumerate(dims) if d is not None
    ]
    return tf.reduce_all(tf.stack(conditions))


def _as_model_input(x, example_shape):
    x = tf.ensure_shape(x, (None,) + example_shape)
    if not x.dtype.is_floating and not _is_text(x):
        # As `ReptileModel.adapt` does with non-float inputs.
        x = tf.cast(x, "float32")
    return x


def _is_text(x):
    """Whether `x` is raw text for a model that vectorizes it itself.

    A model whose input is `tf.string` (e.g. a `TextVectorization` layer
    first) is served strings as they come: TF Serving's REST API turns a
    JSON list of strings into such a tensor.
    """
    return x.dtype == tf.string


def _example_spec(net, input_signature):
    """Returns the shape (without batch) and dtype of one example."""
    if input_signature is not None:
        spec = input_signature
        if isinstance(spec, (list, tuple)) and len(spec) == 1:
            spec = spec[0]
        shape = getattr(spec, "shape", None)
        dtype = getattr(spec, "dtype", None)
        if isinstance(spec, (list, tuple, dict)) or shape is None or dtype is None:
            raise ValueError(
                "Expected `input_signature` to be a `tf.TensorSpec`, "
                "`keras.InputSpec` or `keras.KerasTensor` with a known rank "
                "and dtype (or a list holding one): the exported signatures "
                f"take a single input. Received: input_signature={input_signature!r}"
            )
        shape = tuple(tf.TensorShape(shape).as_list())
        if not shape:
            raise ValueError(
                "Expected `input_signature` with a leading batch dimension. "
                f"Received: input_signature={input_signature!r}"
            )
        return shape[1:], tf.as_dtype(dtype)
    inputs = getattr(net, "inputs", None)
    if not inputs:
        raise ValueError(
            "Cannot infer the input shape of the wrapped model (it has no "
            "`inputs`, e.g. a subclassed model). Pass `input_signature`, "
            "e.g. `input_signature=[tf.TensorSpec((None, 28, 28, 1), "
            "'float32')]`."
        )
    if len(inputs) != 1:
        raise ValueError(
            "Expected the wrapped model to have a single input. Received a "
            f"model with {len(inputs)} inputs."
        )
    return tuple(inputs[0].shape[1:]), tf.as_dtype(inputs[0].dtype)


def _target_spec(loss_kind, output_shape):
    if loss_kind == "sparse":
        return tf.TensorSpec((None,), tf.int32)
    return tf.TensorSpec((None,) + output_shape, tf.float32)


def _write_atomically(archive, filepath, overwrite):
    """Writes the SavedModel so that `filepath` appears complete or not at all.

    TF Serving loads any integer-named directory under its base path as
    soon as it sees it, so the SavedModel is written to a dot-prefixed,
    non-numeric sibling (which TF Serving ignores), made durable, and
    renamed. Killing the process at any moment leaves `filepath` absent,
    as it was, or complete; never part-written. Rename is atomic on local
    and POSIX file systems; on object stores (`gs://`, `s3://`) it is a copy
    and gives no such guarantee.
    """
    filepath = filepath.rstrip("/\\") or filepath
    parent, name = os.path.split(filepath)
    # First, so that a version an interrupted overwrite had moved aside is
    # back before `filepath` is checked.
    _remove_stale_siblings(parent)
    if tf.io.gfile.exists(filepath):
        if not tf.io.gfile.isdir(filepath):
            raise ValueError(
                f"Expected `filepath` to be a directory path. Received: "
                f"filepath='{filepath}', which is an existing file."
            )
        if tf.io.gfile.listdir(filepath) and not overwrite:
            raise _exists_error(filepath)
    if parent:
        tf.io.gfile.makedirs(parent)
    tmp = os.path.join(parent or ".", _sibling_name(name, "tmp"))
    old = None
    try:
        _write_out(archive, tmp, filepath)
        # Without it, a power cut after the rename could leave the version
        # directory with empty files (file systems may write the rename
        # before the data).
        _durable.fsync_tree(tmp)
        if tf.io.gfile.exists(filepath):
            # Checked again: another export may have taken the path since.
            if tf.io.gfile.listdir(filepath) and not overwrite:
                raise _exists_error(filepath)
            # Moved aside rather than deleted in place: a kill during a
            # recursive delete would leave a part-deleted version, which TF
            # Serving would try to load.
            old = os.path.join(parent or ".", _sibling_name(name, "old"))
            tf.io.gfile.rename(filepath, old)
        try:
            tf.io.gfile.rename(tmp, filepath)
        except Exception:
            if old is not None:
                try:
                    tf.io.gfile.rename(old, filepath)
                except Exception:  # Keep it for the user, never delete it.
                    _logger.warning(
                        "Could not put the previous SavedModel back at %s: it "
                        "is kept at %s.", filepath, old,
                    )
                old = None
            raise
        _durable.fsync_dir(parent or ".")
    finally:
        for leftover in (tmp, old):
            if leftover is not None and tf.io.gfile.exists(leftover):
                tf.io.gfile.rmtree(leftover)
    return filepath


def _check_filepath(filepath):
    """`filepath` as a non-empty `str`, or raises naming it."""
    path = filepath
    if isinstance(filepath, os.PathLike):
        path = os.fspath(filepath)
    if not isinstance(path, str):
        hint = " (decode bytes to a `str`)" if isinstance(path, bytes) else ""
        raise TypeError(
            "Expected `filepath` to be a directory path, a `str` or "
            f"`pathlib.Path`. Received: filepath={filepath!r} of type "
            f"{type(filepath).__name__}{hint}"
        )
    if not path.strip():
        raise ValueError(
            "Expected `filepath` to be a non-empty directory path. Received: "
            f"filepath={filepath!r}"
        )
    return path


def _check_writable(filepath):
    """Raises before any work if a local `filepath` cannot be created.

    Checks the nearest existing ancestor: a file there, or a directory this
    process may not write (when the system says so; root may write
    anywhere), fails now rather than after tracing the signatures.
    """
    if not _durable.is_local(filepath):
        return
    ancestor = os.path.dirname(os.path.abspath(filepath))
    while not os.path.exists(ancestor) and os.path.dirname(ancestor) != ancestor:
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        reason = f"'{ancestor}' is a file"
    elif not os.access(ancestor, os.W_OK | os.X_OK):
        reason = f"'{ancestor}' is not writable"
    else:
        return
    raise ValueError(
        "Expected `filepath` to be a directory path that can be written. "
        f"Received: filepath='{filepath}', but {reason}"
    )


def _write_out(archive, tmp, filepath):
    """`archive.write_out(tmp)`, with errors that name `filepath`, not `tmp`."""
    try:
        archive.write_out(tmp, verbose=False)
    except (OSError, tf.errors.OpError) as error:
        directory = os.path.dirname(filepath) or "."
        if _durable.is_no_space(error) or isinstance(
            error, tf.errors.ResourceExhaustedError
        ):
            raise OSError(
                errno.ENOSPC,
                f"Could not export to filepath='{filepath}': no space left on "
                f"{directory}. Nothing was written at '{filepath}' (the "
                "partial SavedModel was removed).",
            ) from error
        reason = getattr(error, "strerror", None) or getattr(
            error, "message", str(error)
        )
        raise ValueError(
            "Expected `filepath` to be a directory path that can be written. "
            f"Received: filepath='{filepath}', which cannot be written "
            f"({str(reason).replace(tmp, filepath)}). Nothing was written there."
        ) from error


# Siblings written by `_write_atomically`, `.<name>.<kind>-<host>-<pid>-<hex>`:
# `tmp` is a SavedModel being written, `old` the version it replaces, moved
# aside. Dot-prefixed and non-numeric, so TF Serving never takes them for
# versions.
_SIBLING = re.compile(
    r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[A-Za-z0-9_.-]*)"
    r"-(?P<pid>[0-9]+)-[0-9a-f]{32}$"
)


def _host():
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())


def _sibling_name(name, kind):
    return f".{name}.{kind}-{_host()}-{os.getpid()}-{uuid.uuid4().hex}"


def _remove_stale_siblings(parent):
    """Cleans up after exports to `parent` that were killed on this host.

    Only siblings whose process is gone are touched: another process on
    this host, or any process on another host sharing the directory, may be
    writing its own. A stale `tmp` is deleted. A stale `old` is the version
    an overwrite had moved aside when it was killed: deleted if the new
    version is in place, else moved back (the interrupted overwrite is
    rolled back, the version reappearing whole).
    """
    directory = parent or "."
    try:
        entries = [e.rstrip("/") for e in tf.io.gfile.listdir(directory)]
    except tf.errors.NotFoundError:
        return
    host = _host()
    for entry in entries:
        match = _SIBLING.match(entry)
        if not match or match["host"] != host or _is_running(int(match["pid"])):
            continue
        path = os.path.join(directory, entry)
        target = os.path.join(directory, match["name"])
        try:
            if match["kind"] == "old" and not tf.io.gfile.exists(target):
                tf.io.gfile.rename(path, target)
                _logger.warning(
                    "Restored %s, which an interrupted export with "
                    "`overwrite=True` had moved aside.", target,
                )
            else:
                tf.io.gfile.rmtree(path)
                _logger.info("Removed %s, left by an interrupted export.", path)
        except tf.errors.OpError:
            pass  # Handled by a concurrent export, or left for the next.


def _is_running(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # Exists, owned by another user (or cannot be told).
    return True


def _exists_error(filepath):
    return ValueError(
        f"The directory '{filepath}' already exists and is not empty (TF "
        "Serving may be serving it). Export to a new version directory, "
        "e.g. `keras_reptile.export.next_version_path(...)`, or pass "
        "`overwrite=True`."
    )


def _describe(shape, dtype, rows="batch"):
    dims = ", ".join([rows] + [str(d) for d in shape])
    return f"{tf.as_dtype(dtype).name} [{dims}]"


def _at_most(bound, name):
    if bound is None:
        # Said out loud: an unbounded export is a choice to double-check.
        return f"unbounded ({name}=None)"
    return f"<= {bound} ({name})"


def _describe_outputs(loss_kind, output_shape, rows="batch"):
    text = "outputs " + _describe(output_shape, tf.float32, rows)
    if loss_kind is not None:
        text += ", probabilities " + _describe(output_shape, tf.float32, rows)
    return text


def _report(message):
    # Keras's own convention: stdout when interactive logging is on,
    # the logging module otherwise.
    if keras.config.is_interactive_logging_enabled():
        sys.stdout.write(message + "\n")
        sys.stdout.flush()
    else:
        _logger.info(message)
