"""What kind of targets the compiled loss takes."""

import keras


def loss_kind(loss):
    """Returns `(kind, from_logits)`, kind "sparse", "categorical" or None.

    `loss` is what `compile(loss=...)` received: an instance, a function, a
    string name, or a one-element list or dict of those. None means anything
    that is not a cross-entropy classifier loss (regression).
    """
    if isinstance(loss, (list, tuple)) and len(loss) == 1:
        loss = loss[0]
    if isinstance(loss, dict) and len(loss) == 1:
        loss = next(iter(loss.values()))
    if isinstance(loss, str):
        try:
            loss = keras.losses.get(loss)
        except ValueError:
            return None, False
    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return "sparse", bool(loss.get_config().get("from_logits", False))
    if isinstance(loss, keras.losses.CategoricalCrossentropy):
        return "categorical", bool(loss.get_config().get("from_logits", False))
    if loss is keras.losses.sparse_categorical_crossentropy:
        return "sparse", False
    if loss is keras.losses.categorical_crossentropy:
        return "categorical", False
    return None, False
