"""`_step_functions`: the XLA choice and the train function, on plain Keras models."""

import keras
import numpy as np
import pytest

from keras_reptile import _step_functions


@pytest.mark.parametrize("requested, keras_choice, eager, replicas, jit_layers, while_loop, xla", [
    # An explicit request (or eager execution) keeps Keras's resolved choice.
    (False, False, False, 1, True, False, False),
    (True, True, False, 1, True, False, True),
    ("auto", False, True, 1, True, False, False),
    # "auto" compiles wherever XLA can, also where Keras would not.
    ("auto", False, False, 1, True, False, True),
    ("auto", True, False, 1, True, False, True),
    ("auto", False, False, 2, True, False, False),
    ("auto", False, False, 1, False, False, False),
    ("auto", False, False, 1, True, True, False),
])
def test_meta_step_uses_xla(requested, keras_choice, eager, replicas, jit_layers,
                            while_loop, xla):
    assert _step_functions.meta_step_uses_xla(
        requested, keras_choice, eager, replicas, jit_layers, while_loop) is xla


def _dense():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=False)
    return model


def test_the_train_function_runs_keras_step_then_the_check():
    x = np.arange(12, dtype="float32").reshape(6, 2) / 10
    y = x.sum(axis=1, keepdims=True)
    reference, model = _dense(), _dense()
    reference.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    checks = []
    function = _step_functions.train_function(
        model, model.make_train_function, False, False, lambda: checks.append(1))
    assert model.train_function is function
    model.fit(x, y, batch_size=2, epochs=1, shuffle=False, verbose=0)
    assert len(checks) == 3  # One check after each of the 3 steps.
    for got, want in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-6)
