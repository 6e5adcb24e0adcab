"""The private Keras names the library uses still exist, each by name."""

import inspect

import keras
import pytest

from keras_reptile import _compat


@pytest.mark.parametrize(
    "owner, name", _compat.PRIVATE_NAMES, ids=[n for _, n in _compat.PRIVATE_NAMES]
)
def test_private_class_attribute_exists(owner, name):
    assert hasattr(owner, name), f"{owner.__name__}.{name} is gone"


@pytest.mark.parametrize("name", _compat.MODEL_ATTRIBUTES)
def test_private_model_attribute_exists(name):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.make_train_function()
    assert hasattr(model, name), f"keras.Model instances have no {name}"


@pytest.mark.parametrize("name", _compat.OPTIMIZER_ATTRIBUTES)
def test_private_optimizer_attribute_exists(name):
    assert hasattr(keras.optimizers.SGD(0.1), name)


@pytest.mark.parametrize("name", _compat.LAYER_ATTRIBUTES)
def test_private_layer_attribute_exists(name):
    layer = keras.layers.Dense(1)
    layer(keras.Input((2,)))
    assert hasattr(layer, name), f"keras.layers.Layer instances have no {name}"


def test_overridden_hook_keeps_its_signature():
    # `BuildBeforeTrace` overrides this hook; Keras must still call it with
    # these keywords.
    parameters = inspect.signature(keras.Model._maybe_symbolic_build).parameters
    assert list(parameters) == ["self", "iterator", "data_batch"]


def test_no_private_keras_name_outside_the_compat_module():
    import pathlib
    import re

    package = pathlib.Path(_compat.__file__).parent
    names = {n for _, n in _compat.PRIVATE_NAMES}
    names |= set(_compat.MODEL_ATTRIBUTES) | set(_compat.OPTIMIZER_ATTRIBUTES)
    names |= set(_compat.LAYER_ATTRIBUTES)
    names.discard("train_function")
    # Reading `model.train_function` is what Keras's own overridable
    # `make_train_function` does; replacing it goes through the compat module.
    pattern = re.compile(
        r"\.(" + "|".join(sorted(names)) + r")\b|\.train_function\s*=[^=]"
    )
    offenders = []
    # The library, and the repository's benchmarks and examples.
    for folder in (package, package.parent / "benchmarks", package.parent / "examples"):
        for path in folder.rglob("*.py"):
            if path.name == "_compat.py":
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_op_determinism_is_read_back():
    import tensorflow as tf
    # TensorFlow's public API can only switch determinism on.
    from tensorflow.python.framework import config

    assert _compat.op_determinism_enabled() is False
    tf.config.experimental.enable_op_determinism()
    try:
        assert _compat.op_determinism_enabled() is True
    finally:
        config.disable_op_determinism()
