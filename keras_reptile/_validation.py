"""Argument checks shared by the modules, with Keras-style messages."""

import numpy as np
import tensorflow as tf


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
    """Returns `value` as a bool (or None, if allowed), else raises `TypeError`.

    NumPy bools count (a flag read from an array is still a flag); strings,
    numbers and None do not: `overwrite="no"` is truthy, and a flag that
    guards a destructive action must not guess.
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
