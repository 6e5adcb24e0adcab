"""The shipped Omniglot model loads in one line and still reaches its card's accuracy."""

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import keras_reptile
from keras_reptile.evaluation import few_shot_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "saved_models", "omniglot")
DATA = os.path.join(REPO, "..", "shared", "data", "omniglot")
ZIPS = ("images_evaluation.zip",)


@pytest.fixture
def ship_omniglot(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "examples"))
    import ship_omniglot

    return ship_omniglot


def _card():
    path = os.path.join(SHIPPED, "card.json")
    if not os.path.isfile(path):
        pytest.fail(f"The shipped model's card {path} is missing: ship a model with "
                    "`python examples/ship_omniglot.py <examples/omniglot.py run dir>`.")
    with open(path) as f:
        return json.load(f)


def test_the_shipped_model_reaches_its_cards_accuracy_on_the_fixed_tasks(ship_omniglot):
    check = _card()["check"]
    missing = [z for z in ZIPS if not os.path.isfile(os.path.join(DATA, z))]
    if missing:
        pytest.skip(f"the Omniglot zips {missing} are not in {DATA}")
    # The card was measured on exactly the tasks the script builds now.
    assert {k: check[k] for k in ship_omniglot.CHECK} == ship_omniglot.CHECK
    model = keras_reptile.pretrained.load("omniglot")
    accuracy = few_shot_accuracy(model, ship_omniglot.check_tasks(DATA), check["tasks"],
                                 transductive=False)
    assert accuracy.num_tasks == check["tasks"]
    # The same tasks and weights: only floating-point differences between
    # machines may move it, by a few of the 1,500 queries at most (1% is 15).
    assert abs(accuracy.mean - check["accuracy"]) <= 0.01
    # Far above chance (1 / ways), so a broken model cannot pass.
    assert accuracy.mean > 2.0 / check["ways"]


def test_the_shipped_saved_model_adapts_without_keras_or_keras_reptile():
    _card()  # a clear failure when the model is not shipped
    # A fresh process in which `import keras` / `import keras_reptile` fail:
    # what TF Serving or the demo's server have.
    script = """
import sys
for name in ("keras", "keras_reptile", "tf_keras"):
    sys.modules[name] = None
import numpy as np
import tensorflow as tf

served = tf.saved_model.load(sys.argv[1])
signature = served.signatures["adapt_and_predict"]
# Two made-up symbols, a vertical and a horizontal bar, 2 drawings each.
x = np.zeros((4, 28, 28, 1), "float32")
x[0, 4:24, 12:15] = x[1, 5:23, 13:16] = 1.0
x[2, 12:15, 4:24] = x[3, 13:16, 5:23] = 1.0
query = np.zeros((2, 28, 28, 1), "float32")
query[0, 6:22, 11:14] = 1.0
query[1, 11:14, 6:22] = 1.0
outputs = signature(support_x=tf.constant(x), support_y=tf.constant([0, 0, 1, 1]),
                    query_x=tf.constant(query))
np.save(sys.stdout.buffer, outputs["probabilities"].numpy())
"""
    path = keras_reptile.pretrained.saved_model_path("omniglot")
    result = subprocess.run([sys.executable, "-c", script, path], capture_output=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    probabilities = np.load(io.BytesIO(result.stdout))
    assert probabilities.shape == (2, 20)
    # Only the task's two classes get probability: the prototype head gives
    # unused outputs a bias of -1e4.
    np.testing.assert_allclose(probabilities[:, :2].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(-1), [0, 1])


def test_bad_names_or_a_missing_directory_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Expected `name` to be one of"):
        keras_reptile.pretrained.load("mnist")
    with pytest.raises(TypeError, match="Expected `name` to be a string"):
        keras_reptile.pretrained.load(3)
    with pytest.raises(FileNotFoundError, match="No shipped model 'omniglot'"):
        keras_reptile.pretrained.load("omniglot", directory=str(tmp_path))
    (tmp_path / "omniglot" / "saved_model" / "1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="No model.keras in"):
        keras_reptile.pretrained.load("omniglot", directory=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="No saved_model.pb in"):
        keras_reptile.pretrained.saved_model_path("omniglot", directory=str(tmp_path))


@pytest.mark.parametrize("entry", ["load", "saved_model_path"])
def test_a_directory_that_is_not_a_path_is_named(entry, tmp_path):
    function = getattr(keras_reptile.pretrained, entry)
    # 123 used to reach os.path.join's TypeError, which names no argument;
    # "" silently meant the current directory.
    with pytest.raises(TypeError, match=r"Expected `directory` to be None or a path .* "
                                        r"Received: directory=123 of type int"):
        function("omniglot", directory=123)
    with pytest.raises(ValueError, match=r"Expected `directory` to be None or a non-empty "
                                         r"path .* Received: directory=''"):
        function("omniglot", directory="")
    # A pathlib.Path is a path.
    with pytest.raises(FileNotFoundError, match="No shipped model 'omniglot'"):
        function("omniglot", directory=tmp_path)


def test_a_damaged_model_file_is_named_not_reported_missing(tmp_path):
    # Keras says "File not found" of a `.keras` file that is there but is no
    # zip archive; the shipped model's loader names the file and the fault.
    (tmp_path / "omniglot").mkdir()
    path = tmp_path / "omniglot" / "model.keras"
    with open(os.path.join(SHIPPED, "model.keras"), "rb") as f:
        path.write_bytes(f.read(1000))  # truncated
    with pytest.raises(ValueError) as raised:
        keras_reptile.pretrained.load("omniglot", directory=str(tmp_path))
    message = str(raised.value)
    assert f"Expected {path} to be a `.keras` file (a zip archive)" in message
    assert "a file of 1000 bytes" in message


def test_a_damaged_member_of_the_model_archive_is_named(tmp_path):
    # An intact zip whose weights file is cut in half: Keras passes on
    # h5py's OSError ("truncated file: eof = ..."), which names no path.
    (tmp_path / "omniglot").mkdir()
    path = tmp_path / "omniglot" / "model.keras"
    with zipfile.ZipFile(os.path.join(SHIPPED, "model.keras")) as shipped:
        members = {name: shipped.read(name) for name in shipped.namelist()}
    assert "model.weights.h5" in members
    with zipfile.ZipFile(path, "w") as damaged:
        for name, data in members.items():
            damaged.writestr(name, data[: len(data) // 2] if name.endswith(".h5") else data)
    with pytest.raises(ValueError) as raised:
        keras_reptile.pretrained.load("omniglot", directory=str(tmp_path))
    message = str(raised.value)
    assert f"Expected {path} to be a readable `.keras` archive. Received: one with a member " \
        "that is truncated or damaged (OSError" in message
    assert isinstance(raised.value.__cause__, OSError)
