"""Argument and episode checks shared by the modules, with Keras-style messages.

The one copy of every rule an input is held to: `ReptileModel` (episodes in
`fit`/`evaluate`, arrays in `adapt`/`meta_update`), `episodes` (the arrays
and task functions it samples from) and `export` (the shapes its signatures
declare) all check against the functions here, so a rule and its message
change in one place.
"""

import keras
import numpy as np
import tensorflow as tf

from keras_reptile import _losses


def check_positive_int(name, value):
    """Returns `value` as an int, or raises if it is not a positive integer.

    Bools are rejected although Python counts them as ints: `shots=True` is
    a mistake, not 1.
    """
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or value < 1
    ):
        raise ValueError(
            f"Expected `{name}` to be a positive integer. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def check_bool(name, value, allow_none=False):
    """Returns `value` as a Python bool (or None, if allowed), else raises `TypeError`.

    The one rule for flags, everywhere: NumPy bools count (a flag read from
    an array is still a flag) and come back as Python bools (so a setting
    saved in a model's config stays JSON); strings, numbers and None do not:
    `overwrite="no"` is truthy, and a flag that guards a destructive action
    must not guess.
    """
    if allow_none and value is None:
        return None
    if not isinstance(value, (bool, np.bool_)):
        expected = "None or a bool" if allow_none else "a bool"
        raise TypeError(
            f"Expected `{name}` to be {expected}. Received: {name}={value!r} "
            f"of type {type(value).__name__}"
        )
    return bool(value)


def check_learning_rate(name, optimizer):
    """Raises a `ValueError` unless `optimizer`'s learning rate is finite.

    A NaN or Inf learning rate (a constant, or a schedule's first value)
    makes every adapted or meta-trained weight NaN, without an error.

    Args:
        name: How the message names the optimizer, e.g. "inner_optimizer".
        optimizer: A `keras.optimizers.Optimizer`, or None (nothing to check).
    """
    if optimizer is None:
        return
    rate = getattr(optimizer, "_learning_rate", None)
    if rate is None:
        return
    what = "learning rate"
    if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
        what = "learning-rate schedule's first value"
        rate = rate(0)
    elif callable(rate):
        what = "learning rate's first value"
        rate = rate()
    value = float(keras.ops.convert_to_numpy(rate))
    if not np.isfinite(value):
        raise ValueError(
            f"Expected `{name}` to have a finite learning rate: a NaN or Inf "
            "one makes every weight it updates NaN. Received: its "
            f"{what} is {value}"
        )


def dense_array(name, value):
    """`value` as a real-valued (or other non-complex) NumPy array, or raises.

    Ragged or sparse values would otherwise fail deep inside NumPy or a
    traced step, and complex ones lose their imaginary part with only a
    warning.

    Args:
        name: The argument's name, e.g. "x".
        value: An array-like, tensor or nested sequence.

    Raises:
        ValueError: If `value` is ragged (a `tf.RaggedTensor`, or nested
            sequences of unequal lengths).
        TypeError: If `value` is a `tf.SparseTensor` or holds complex numbers.
    """
    if isinstance(value, tf.RaggedTensor):
        raise ValueError(
            f"Expected `{name}` to be a dense array with rows of equal "
            f"length. Received: a `tf.RaggedTensor` with shape {value.shape} "
            "(convert it with `.to_tensor()` if padding is meant)"
        )
    if isinstance(value, tf.SparseTensor):
        raise TypeError(
            f"Expected `{name}` to be a dense array. Received: a "
            f"`tf.SparseTensor` with dense shape {value.shape} (convert it "
            "with `tf.sparse.to_dense`)"
        )
    try:
        array = np.asarray(value)
    except ValueError as error:
        raise ValueError(
            f"Expected `{name}` to be a dense array with rows of equal "
            f"length. Received: a ragged nested sequence ({error})"
        ) from error
    if array.dtype == object and any(
        isinstance(item, (list, tuple, np.ndarray)) for item in array.ravel()
    ):
        raise ValueError(
            f"Expected `{name}` to be a dense array with rows of equal "
            "length. Received: a ragged nested sequence of "
            f"{array.shape[0] if array.ndim else 0} rows"
        )
    if np.iscomplexobj(array):
        raise TypeError(
            f"Expected `{name}` to hold real numbers: the imaginary part "
            f"would be dropped. Received: {name}.dtype={array.dtype}"
        )
    return array


def dense_tensor(name, value):
    """`value` as a dense, non-complex tensor (see `dense_array`), or raises.

    Converted as `tf.convert_to_tensor` converts it (a Python list of floats
    stays float32), once `dense_array` has found nothing wrong with it.
    """
    if not tf.is_tensor(value) or isinstance(
        value, (tf.RaggedTensor, tf.SparseTensor)
    ):
        dense_array(name, value)
    value = tf.convert_to_tensor(value)
    if value.dtype.is_complex:
        raise TypeError(
            f"Expected `{name}` to hold real numbers: the imaginary part "
            f"would be dropped. Received: {name}.dtype={value.dtype.name}"
        )
    return value


def check_group_ids(name, groups):
    """`groups` as a NumPy array of ids of one kind: numbers or strings.

    NumPy turns a list mixing both into strings, where group 1 and group
    "1" become one; an object array of them cannot even be sorted.
    """
    items = groups
    if not isinstance(groups, (list, tuple)):
        items = dense_array(name, groups)
        if items.dtype != object:
            return items
        items = items.ravel().tolist()
    kinds = {}
    for item in items:
        if isinstance(item, (str, bytes, np.str_, np.bytes_)):
            kinds.setdefault("strings", type(item).__name__)
        elif isinstance(item, (bool, np.bool_)) or not isinstance(
            item, (int, float, np.integer, np.floating)
        ):
            kinds.setdefault(type(item).__name__, type(item).__name__)
        else:
            kinds.setdefault("numbers", type(item).__name__)
    if len(kinds) > 1 or (kinds and not set(kinds) <= {"strings", "numbers"}):
        raise TypeError(
            f"Expected `{name}` to hold ids of one kind: all numbers or all "
            f"strings. Received: ids of types {sorted(set(kinds.values()))}"
        )
    return dense_array(name, groups)


# Offending rows listed in an error message; the count is given in full.
_MAX_LISTED_ROWS = 10


def check_numeric(name, dtype):
    """Raises a `TypeError` unless `dtype` (NumPy or TensorFlow) is numeric.

    `name` is how the message refers to the values, e.g. "`support_y`". Bools
    count as numeric: binary targets may come as bools.
    """
    try:
        dtype = tf.as_dtype(dtype)
    except TypeError:
        dtype = np.dtype(dtype)
        numeric = False
    else:
        numeric = dtype.is_integer or dtype.is_floating or dtype.is_bool
    if not numeric:
        raise TypeError(
            f"Expected numeric labels in {name} (class ids or regression "
            f"targets). Received labels of dtype {dtype.name}."
        )


def check_finite_rows(name, x):
    """Raises a `ValueError` naming the rows of `x` with NaN or Inf values.

    A single NaN reaches every adapted weight, and from them every output.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        return
    bad = np.flatnonzero(~np.isfinite(x.reshape(x.shape[0], -1)).all(axis=1))
    if bad.size:
        shown = bad[:_MAX_LISTED_ROWS].tolist()
        more = ", ..." if bad.size > _MAX_LISTED_ROWS else ""
        raise ValueError(
            f"Expected `{name}` to contain only finite values. Received: "
            f"non-finite values (NaN or Inf) in {bad.size} examples, at rows "
            f"[{', '.join(map(str, shown))}{more}]"
        )


def check_class_labels(labels, num_classes, name, source=None):
    """Raises unless `labels` are whole numbers in `[0, num_classes)`.

    Float labels are accepted when they are whole numbers (0.0, 1.0); a
    sparse loss would truncate 0.9 to class 0 without a word.

    Args:
        labels: Array of class ids, any shape.
        num_classes: The model's number of outputs.
        name: The labels' argument or episode key, e.g. "support_y".
        source: Where the episodes come from ("x", "validation_data"), or
            None for an argument of its own.
    """
    labels = np.asarray(labels)
    where = f"`{name}`" if source is None else f"`{source}` `{name}`"
    check_numeric(where, labels.dtype)
    if labels.size == 0:
        return
    if np.issubdtype(labels.dtype, np.floating):
        bad = ~np.isfinite(labels) | (np.round(labels) != labels)
        if bad.any():
            index = np.unravel_index(np.flatnonzero(bad)[0], labels.shape)
            position = ", ".join(map(str, index))
            raise ValueError(
                f"Expected whole-number class ids in {where} for a sparse "
                "classification loss (a label such as 0.9 is not a class). "
                f"Received: {name}[{position}]={str(labels[index])} among "
                f"{int(bad.sum())} non-integer labels."
            )
    low, high = labels.min(), labels.max()
    if low < 0 or high >= num_classes:
        subject = where if source is None else "episode"
        suffix = "" if source is None else f" in {where}"
        raise ValueError(
            f"Expected {subject} labels in [0, {num_classes - 1}] (the model "
            f"has {num_classes} outputs). Received labels from "
            f"{_number(low)} to {_number(high)}{suffix}."
        )


def _number(value):
    value = value.item()
    return int(value) if float(value).is_integer() else value


# ----------------------------------------------------------------------
# Episodes and requests: the rules `ReptileModel`, `episodes` and `export`
# share.

EPISODE_KEYS = ("support_x", "support_y", "query_x", "query_y")


def episode_element(data):
    """The episode dict of a dataset element or of Keras's `(x, y, w)` triple."""
    if isinstance(data, (tuple, list)):
        data = [d for d in data if d is not None]
        if len(data) == 1:
            return data[0]
    return data


def is_episode(data):
    """Whether `data` (after `episode_element`) is an episode dict."""
    return isinstance(data, dict) and "support_x" in data


def meta_batch_size(data, is_batch=False):
    """Static task count of an episodic dataset (or batch), else None."""
    spec = episode_element(data if is_batch else getattr(data, "element_spec", None))
    if is_episode(spec):
        shape = getattr(spec["support_x"], "shape", None)
        if shape is not None and tf.TensorShape(shape).rank:
            return tf.TensorShape(shape)[0]
    return None


def first_episode(dataset):
    """The episode dict of a dataset's first element, or None if it is empty."""
    for element in dataset.take(1):
        return episode_element(element)
    return None


def check_episodes(data, check_query_y=True):
    """Checks one meta-batch of episodes; returns it as a dict of tensors.

    Args:
        data: A dataset element: a dict with `EPISODE_KEYS`, each
            `[meta_batch, rows, ...]` (or Keras's tuple holding one).
        check_query_y: Whether `query_y` must match `query_x` (`predict`
            ignores it).

    Returns:
        The episodes as a new dict of tensors.

    Raises:
        ValueError: If keys, ranks or shapes do not fit together.
    """
    data = episode_element(data)
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
    if sx.shape[0] is None:
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
    check_rows("support_x", sx.shape)
    check_rows("query_x", qx.shape)
    return data


def episode_spec(data, is_batch=False):
    """The element spec of episodes that `fit`/`evaluate` can check up front.

    Args:
        data: A `tf.data.Dataset` of episodes, or one batch of them.
        is_batch: Whether `data` is one batch (`*_on_batch`).

    Returns:
        The element's dict of specs (or arrays, for a batch) with every
        episode key, or None for anything else (the step's own checks name
        what is wrong with it).
    """
    is_dataset = isinstance(data, tf.data.Dataset)
    spec = episode_element(data.element_spec if is_dataset else data)
    if not isinstance(spec, dict) or any(k not in spec for k in EPISODE_KEYS):
        return None
    for key in ("support_x", "query_x"):
        check_rows(key, _shape_of(spec[key]))
    return spec


def check_rows(key, shape):
    """Raises a `ValueError` if episodes of `shape` hold no examples.

    An empty query set reports a loss and accuracy of 0.0 (and gives FOMAML
    and MAML a zero outer gradient); an empty support set fails inside the
    step with an integer division by zero.

    Args:
        key: The episode key, "support_x" or "query_x".
        shape: Its `tf.TensorShape`, `[meta_batch, rows, *input_shape]`.
    """
    if shape.rank is not None and shape.rank >= 2 and shape[1] == 0:
        raise ValueError(
            f"Expected `{key}` episodes with at least one example per task. "
            f"Received: {key}.shape={shape}"
        )


def example_spec(spec):
    """`(example_shape, x_dtype)` of an `episode_spec`, or None if not yet known.

    The inputs' dtype is the float one the model sees (non-float inputs are
    cast to float32).
    """
    support_shape = _shape_of(spec["support_x"])
    if support_shape.rank is None or support_shape.rank < 3:
        return None
    example_shape = support_shape[2:]
    if not example_shape.is_fully_defined():
        return None
    x_dtype = _dtype_of(spec["support_x"])
    return tuple(example_shape), x_dtype if x_dtype.is_floating else tf.float32


def check_episode_targets(source, data, spec, output_shape, kind):
    """Checks the targets of episodes against the model's outputs, up front.

    Target dtypes and shapes come from a dataset's `element_spec` (or the
    arrays of an in-memory batch). For a sparse loss the labels of the
    dataset's first element are read too: a label beyond the model's
    outputs fails inside the step as a bare `InvalidArgumentError`, and in
    `validation_data` only after a whole epoch of training. Later elements
    are not read, so a label out of range there still fails inside the step.

    Args:
        source: The argument the episodes came from ("x", "validation_data").
        data: The dataset or batch (read for its first element).
        spec: `episode_spec`'s spec of `data`.
        output_shape: The model's output shape for one example.
        kind: The loss's kind (`_losses.loss_kind`): "sparse",
            "categorical" or None.
    """
    for name in ("support_y", "query_y"):
        where = f"`{source}` `{name}`"
        check_numeric(where, _dtype_of(spec[name]))
        if kind != "sparse":
            check_target_shape(
                where, "shape", _shape_of(spec[name]), 2, output_shape, kind
            )
    if kind != "sparse" or not (output_shape and output_shape[-1]):
        return
    element = first_episode(data) if isinstance(data, tf.data.Dataset) else spec
    if element is None:
        return
    for name in ("support_y", "query_y"):
        check_class_labels(
            keras.ops.convert_to_numpy(element[name]), output_shape[-1], name,
            source,
        )


def check_examples(name, x, example_shape=None):
    """A non-empty, finite batch of examples of `example_shape`, as a float tensor.

    Args:
        name: The argument's name, e.g. "support_x".
        x: The examples, `[rows, *example_shape]`.
        example_shape: The expected shape of one example (`None` entries
            match any size), or None to accept any.
    """
    x = dense_tensor(name, x)
    # Raw text, for a model that vectorizes it (a TextVectorization layer),
    # stays text: no cast, nothing to be non-finite.
    is_text = x.dtype == tf.string
    if not x.dtype.is_floating and not is_text:
        x = tf.cast(x, "float32")
    if x.shape.rank is None or x.shape.rank < 1 or x.shape[0] == 0:
        raise ValueError(
            f"Expected `{name}` to be a non-empty batch of examples. "
            f"Received: {name}.shape={x.shape}"
        )
    if example_shape is not None and not shape_matches(x.shape[1:], example_shape):
        raise ValueError(
            f"Expected `{name}` of shape "
            f"[rows, {', '.join(map(str, example_shape))}]. "
            f"Received: {name}.shape={tuple(x.shape)}"
        )
    if not is_text:
        check_finite_rows(name, x.numpy())
    return x


def check_targets(role, x, y, output_shape, kind):
    """`y` as a tensor of valid targets for the inputs `x`.

    Args:
        role: "support" or "query": the arguments are `{role}_x`/`{role}_y`.
        x: The checked inputs.
        y: The targets, one per row of `x`.
        output_shape: The model's output shape for one example.
        kind: The loss's kind (`_losses.loss_kind`).
    """
    y = dense_tensor(f"{role}_y", y)
    if y.shape.rank is None or y.shape.rank < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"Expected `{role}_y` with one target per {role} example. "
            f"Received: {role}_x.shape={tuple(x.shape)}, "
            f"{role}_y.shape={tuple(y.shape)}"
        )
    check_numeric(f"`{role}_y`", y.dtype)
    if kind == "sparse":
        if output_shape and output_shape[-1]:
            check_class_labels(y.numpy(), output_shape[-1], f"{role}_y")
    else:
        check_target_shape(
            f"`{role}_y`", f"{role}_y.shape", y.shape, 1, output_shape, kind
        )
        check_finite_rows(f"{role}_y", y.numpy())
    return y


def check_both_or_neither(query_x, query_y):
    """Raises unless `query_x` and `query_y` are given together or not at all."""
    if (query_x is None) != (query_y is None):
        missing, given = (
            ("query_x", "query_y") if query_x is None else ("query_y", "query_x")
        )
        raise ValueError(
            "Expected `query_x` and `query_y` together, or neither. "
            f"Received: {missing}=None with a `{given}`."
        )


def target_shapes(kind, output_shape):
    """The shapes one example's target may take for a loss of `kind`.

    Sparse losses take a class id; categorical ones a row like the outputs;
    others the output shape, or a scalar for a model with one output
    (e.g. `keras_reptile.datasets.sine`).
    """
    output_shape = tuple(output_shape)
    if kind == "sparse":
        return [()]
    if kind is None and output_shape == (1,):
        return [output_shape, ()]
    return [output_shape]


def describe_shape(rows, suffix):
    """`[rows..., *suffix]` as the messages write shapes, e.g. "[rows, 5]"."""
    return "[" + ", ".join(list(rows) + [str(d) for d in suffix]) + "]"


def check_target_shape(name, label, shape, leading, output_shape, kind):
    """Raises unless targets are `[*rows, *output_shape]` (or `[*rows]` for one output).

    The expectations of the exported `adapt_and_predict` signature too: a
    loss would otherwise broadcast mismatched targets, e.g. train a
    one-output model on the mean of two target columns.

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
    allowed = target_shapes(kind, output_shape)
    received = tuple(shape)
    if len(received) >= leading and any(
        shape_matches(received[leading:], a) for a in allowed
    ):
        return
    rows = ("meta_batch", "rows")[-leading:]
    expected = " or ".join(describe_shape(rows, a) for a in allowed)
    raise ValueError(
        f"Expected {name} of shape {expected}, matching the model's outputs "
        f"{describe_shape(['rows'], output_shape)}. Received: {label}={received}"
    )


def shape_matches(shape, expected):
    """Whether `shape` fits `expected`, where None matches any size."""
    if len(shape) != len(expected):
        return False
    return all(e is None or s is None or s == e for s, e in zip(shape, expected))


def output_shape(net, example_shape, dtype="float32"):
    """The single output shape of `net` for one example, e.g. `(5,)`.

    Raises:
        ValueError: If `net` has several outputs.
    """
    outputs = getattr(net, "outputs", None)
    if outputs:
        if len(outputs) != 1:
            raise ValueError(
                "Expected the wrapped model to have a single output. "
                f"Received a model with {len(outputs)} outputs."
            )
        return tuple(outputs[0].shape[1:])
    # `compute_output_spec` also works for subclassed models without
    # `compute_output_shape`.
    spec = net.compute_output_spec(
        keras.KerasTensor((None,) + tuple(example_shape), tf.as_dtype(dtype).name)
    )
    if isinstance(spec, (list, tuple, dict)):
        raise ValueError(
            "Expected the wrapped model to have a single output. Received "
            f"outputs {spec}."
        )
    return tuple(spec.shape[1:])


def _shape_of(value):
    if not hasattr(value, "shape"):
        value = tf.convert_to_tensor(value)
    return tf.TensorShape(value.shape)


def _dtype_of(value):
    if not hasattr(value, "dtype"):
        value = tf.convert_to_tensor(value)
    return tf.as_dtype(value.dtype)


# ----------------------------------------------------------------------
# The meta-learner's arguments and state.


def check_auto_or_bool(name, value):
    """Returns "auto" or a Python bool, or raises unless `value` is one.

    NumPy bools count, as in `check_bool`.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if not (isinstance(value, str) and value == "auto"):
        raise ValueError(
            f'Expected `{name}` to be "auto", True or False. '
            f"Received: {name}={value!r}"
        )
    return value


def check_network(network, meta_learner_class):
    """Raises unless `network` is a single-output `keras.Model` to meta-train.

    Args:
        network: The model given to the meta-learner.
        meta_learner_class: The meta-learner's class, which must not wrap
            itself.
    """
    if not isinstance(network, keras.Model):
        raise TypeError(
            "Expected `model` to be a `keras.Model`. Received: "
            f"model={network!r} of type {type(network).__name__}"
        )
    if isinstance(network, meta_learner_class):
        raise TypeError(
            "Expected `model` to be the network to meta-train, not "
            f"another `{meta_learner_class.__name__}`. Received: model="
            + network.name
        )
    outputs = getattr(network, "outputs", None)
    if network.built and outputs is not None and len(outputs) != 1:
        raise ValueError(
            "Expected `model` to have a single output. Received a model "
            f"with {len(outputs)} outputs."
        )


def check_carry_inner_optimizer_state(carry, network):
    """Returns `carry` as a bool; raises unless it is one, True only for a built network."""
    carry = check_bool("carry_inner_optimizer_state", carry)
    if carry and not (network.built and network.trainable_variables):
        # The carried state is made from the model's variables, up front,
        # so that it exists in every code path and in saved models.
        raise ValueError(
            "Expected a built `model` with trainable variables when "
            "`carry_inner_optimizer_state=True`. Received a model with "
            f"built={network.built} and {len(network.trainable_variables)} "
            "trainable variables. Build it first, e.g. call it on a batch."
        )
    return carry


def check_compiled(compiled, compiled_loss, loss, head):
    """Raises unless the meta-learner was compiled with a loss its head can use.

    Args:
        compiled: Whether `compile()` was called.
        compiled_loss: The compiled loss object, or None.
        loss: The `loss` given to `compile()`.
        head: The meta-learner's head, or None.
    """
    if not compiled or compiled_loss is None:
        raise ValueError(
            "Call `compile()` with a `loss` before meta-training, "
            "evaluating or adapting: the inner loop minimises the "
            "compiled loss."
        )
    if head is not None and _losses.loss_kind(loss)[0] is None:
        raise ValueError(
            "Expected a classification loss (`SparseCategoricalCrossentropy` "
            "or `CategoricalCrossentropy`) with `head="
            f'"prototype"`: the head is made from class means. Received: '
            f"loss={loss!r}"
        )


def check_trainable(network):
    """Raises if a built `network` has no trainable weights to meta-train.

    Without them every meta-step would report a loss and change nothing. An
    unbuilt network has no weights yet; `fit` builds it first whenever the
    episodes' shapes are known.
    """
    if network.built and not network.trainable_variables:
        raise ValueError(
            "Expected the wrapped model to have trainable weights: there is "
            "nothing to meta-train. Received a model with no trainable "
            f"weights ({len(network.non_trainable_variables)} "
            "non-trainable). Set `trainable = True` on the layers to "
            "meta-train; `evaluate()`, `adapt()` and `predict()` need no "
            "trainable weights."
        )


def check_callbacks(callbacks, learning_rate):
    """Raises for callbacks that cannot work with the outer learning rate.

    Keras's `ReduceLROnPlateau` fails only at its first reduction, many
    epochs into the run, when the learning rate is a schedule.
    """
    for callback in callbacks or []:
        if isinstance(callback, keras.callbacks.ReduceLROnPlateau) and isinstance(
            learning_rate, keras.optimizers.schedules.LearningRateSchedule
        ):
            raise ValueError(
                "`ReduceLROnPlateau` cannot lower a learning-rate schedule: "
                "compile with a float outer learning rate to use it, or "
                "drop the callback to keep the schedule. Received: "
                f"learning_rate={learning_rate!r}"
            )


def check_second_order_replicas(algorithm, second_order, replicas):
    """Raises for a second-order meta-gradient (MAML, ANIL, Meta-SGD) under several replicas.

    Measured: under MirroredStrategy with 2 replicas the second-order
    meta-gradient differed from one device's by up to 0.37 (FOMAML's and
    Reptile's agree to 1e-5); until that is understood, it is refused.
    """
    if replicas > 1 and second_order:
        raise ValueError(
            "Second-order meta-gradients (MAML, ANIL, Meta-SGD) are not "
            "supported under a distribution strategy with several replicas "
            f"(this one has {replicas}). Use the algorithm with "
            'first_order=True (e.g. algorithm="fomaml", ANIL(first_order=True), '
            'MetaSGD(first_order=True)) or algorithm="reptile" there. '
            f"Received: algorithm={algorithm!r}"
        )


def check_export_format(format):
    """Raises unless `ReptileModel.export`'s `format` is "tf_saved_model"."""
    if format != "tf_saved_model":
        raise ValueError(
            "`ReptileModel.export` only supports "
            "format='tf_saved_model': the `adapt_and_predict` signature "
            "runs TensorFlow's inner loop. To export only the wrapped "
            "model at the meta-weights, call "
            "`model.model.export(filepath, format=...)`. Received: "
            f"format={format!r}"
        )


def check_batched_tasks_reason(reason):
    """Raises with `batched_tasks=True` when its batched computation does not apply."""
    if reason is not None:
        raise ValueError(
            "Expected a model and inner optimizer whose tasks can be "
            "adapted in one batched computation with `batched_tasks=True`, "
            f"but {reason}. Pass `batched_tasks=\"auto\"` to adapt such "
            "models task by task."
        )


def check_task(network, kind, support_x, support_y, query_x=None, query_y=None,
               *, build, query_targets=False):
    """One task's arrays for `adapt`, `adapt_and_predict` or `meta_update`.

    Everything is checked before any work, so a bad input raises and leaves
    the model untouched.

    Args:
        network: The wrapped model (its input shape, if known, and its
            output shape are what the arrays must fit).
        kind: The loss's kind (`_losses.loss_kind`).
        support_x, support_y: The support set.
        query_x, query_y: The query set, or None.
        build: `build(example_shape)`: builds the model once the example
            shape is known, before its output shape is read.
        query_targets: Whether `query_x` and `query_y` come as a pair
            (`meta_update`) rather than query inputs alone.

    Returns:
        `(support_x, support_y, query_x, query_y)` as tensors (None where
        not given).
    """
    expected = None
    if network.built and getattr(network, "inputs", None):
        expected = tuple(network.inputs[0].shape[1:])
    support_x = check_examples("support_x", support_x, expected)
    build(support_x.shape[1:])
    outputs = output_shape(network, support_x.shape[1:], support_x.dtype)
    support_y = check_targets("support", support_x, support_y, outputs, kind)
    if query_targets:
        check_both_or_neither(query_x, query_y)
    if query_x is not None:
        query_x = check_examples("query_x", query_x, support_x.shape[1:])
    if query_y is not None:
        query_y = check_targets("query", query_x, query_y, outputs, kind)
    return support_x, support_y, query_x, query_y


def check_query_needed(algorithm, needs_query):
    """Raises for a meta-update without a query set where the algorithm needs one."""
    if needs_query:
        raise ValueError(
            "Expected `query_x` and `query_y` for a meta-update with "
            f"algorithm={algorithm!r}: its outer gradient is the "
            "gradient of a query loss after adaptation, so it needs "
            "query examples besides the support set (hold out part "
            "of the task's examples). Reptile (algorithm=\"reptile\") "
            "updates from the support set alone. Received: "
            "query_x=None, query_y=None"
        )
