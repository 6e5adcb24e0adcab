"""Meta-trained models shipped with the repository, loaded in one line.

`saved_models/<name>/` beside the package holds, for each shipped model, the
`.keras` file (`model.keras`, for `adapt()`, `evaluate` or further
meta-training), a SavedModel that adapts per request (`saved_model/1/`, the
TF Serving layout) and `MODEL_CARD.md` (data, command, accuracy, limits).
"""

import os
import zipfile

import keras

__all__ = ["load", "saved_model_path", "NAMES"]

NAMES = ("omniglot", "intents")
_DEFAULT_DIRECTORY = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "saved_models"
)


def _model_dir(name, directory):
    if not isinstance(name, str):
        raise TypeError(
            f"Expected `name` to be a string, one of {list(NAMES)}. "
            f"Received: name={name!r} of type {type(name).__name__}"
        )
    if name not in NAMES:
        raise ValueError(
            f"Expected `name` to be one of {list(NAMES)}. Received: name={name!r}"
        )
    if directory is not None and not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            "Expected `directory` to be None or a path (a string or "
            "`os.PathLike`) to a `saved_models` directory. Received: "
            f"directory={directory!r} of type {type(directory).__name__}"
        )
    if isinstance(directory, (str, os.PathLike)) and not os.fspath(directory):
        raise ValueError(
            "Expected `directory` to be None or a non-empty path to a "
            "`saved_models` directory. Received: directory=''"
        )
    path = os.path.join(os.fspath(directory) if directory is not None
                        else _DEFAULT_DIRECTORY, name)
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"No shipped model {name!r} in {path}: expected a directory with "
            "`model.keras` and `saved_model/`. The models are part of the "
            "repository (saved_models/); with a package installed elsewhere "
            "pass `directory=` pointing at a checkout's saved_models/. "
            f"Received: directory={directory!r}"
        )
    return path


def load(name="omniglot", directory=None):
    """Loads a shipped meta-trained `ReptileModel`, compiled and ready to adapt.

    Args:
        name: Which model: `"omniglot"` (conv4 with the prototype head,
            meta-trained on Omniglot's small1 alphabets; 28x28x1 drawings,
            strokes 1.0 on 0.0; any 2 to 20 ways; see its model card) or
            `"intents"` (raw English utterances, a string tensor `[N]`:
            TF-IDF inside the model plus a residual meta-trained on six
            CLINC150 domains, with the prototype head; any 2 to 20 intents).
        directory: The `saved_models` directory to read; default: the one
            beside the package in a checkout.

    Returns:
        The `keras_reptile.ReptileModel`.

    Raises:
        TypeError: if `name` is not a string.
        ValueError: if `name` is not one of `NAMES`.
        FileNotFoundError: if `directory` holds no such model.
        ValueError: if its `model.keras` is truncated or damaged (not a zip
            archive, or a member of it unreadable).

    Example:

    >>> import numpy as np, keras_reptile
    >>> model = keras_reptile.pretrained.load("omniglot")
    >>> x = np.random.rand(3, 28, 28, 1).astype("float32")
    >>> adapted = model.adapt(x, np.arange(3))
    >>> adapted.predict(x, verbose=0).shape
    (3, 20)
    >>> import tensorflow as tf
    >>> intents = keras_reptile.pretrained.load("intents")
    >>> support = tf.constant(["wake me up at 7", "set an alarm for noon",
    ...                        "what's the weather", "will it rain today"])
    >>> probabilities = intents.adapt_and_predict(
    ...     support, [0, 0, 1, 1], tf.constant(["is it sunny outside"]))
    >>> probabilities.shape
    TensorShape([1, 20])
    """
    path = os.path.join(_model_dir(name, directory), "model.keras")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No model.keras in {os.path.dirname(path)}.")
    if not zipfile.is_zipfile(path):
        # Keras would say "File not found" of a file that is there.
        raise ValueError(
            f"Expected {path} to be a `.keras` file (a zip archive). Received: a "
            f"file of {os.path.getsize(path)} bytes that is not one (truncated or "
            "damaged; restore it from the repository, e.g. `git checkout -- "
            f"{os.path.relpath(path)}`)."
        )
    # The package's classes are registered for deserialisation: this module
    # is imported with `keras_reptile`.
    try:
        return keras.saving.load_model(path)
    except (PermissionError, FileNotFoundError):
        raise
    except (OSError, zipfile.BadZipFile) as e:
        # A damaged member of an intact archive (e.g. a truncated weights
        # file) surfaces as h5py's or zipfile's error, without the path.
        raise ValueError(
            f"Expected {path} to be a readable `.keras` archive. Received: one "
            f"with a member that is truncated or damaged ({type(e).__name__}: "
            f"{e}). Restore it from the repository, e.g. `git checkout -- "
            f"{os.path.relpath(path)}`."
        ) from e


def saved_model_path(name="omniglot", directory=None):
    """The shipped SavedModel's version directory (for TF Serving or the demo).

    Args:
        name: Which model (see `load`).
        directory: The `saved_models` directory to read (see `load`).

    Returns:
        The path of `saved_models/<name>/saved_model/<version>` with the
        highest version.

    Raises:
        TypeError: if `name` is not a string.
        ValueError: if `name` is not one of `NAMES`.
        FileNotFoundError: if there is no SavedModel version to serve.
    """
    base = os.path.join(_model_dir(name, directory), "saved_model")
    versions = []
    if os.path.isdir(base):
        versions = sorted(int(v) for v in os.listdir(base) if v.isdigit())
    if not versions:
        raise FileNotFoundError(f"No SavedModel version under {base}.")
    path = os.path.join(base, str(versions[-1]))
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise FileNotFoundError(f"No saved_model.pb in {path}.")
    return path
