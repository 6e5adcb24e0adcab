"""SavedModel export for TF Serving: `ReptileModel.export` and `adapt()` results.

The exported models are loaded in a fresh Python process in which Keras and
`keras_reptile` cannot be imported (as in TF Serving, only TensorFlow is
there), and compared with the in-process `predict` / `adapt` /
`adapt_and_predict`.
"""

import concurrent.futures
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import keras_reptile
from keras_reptile import ReptileModel
from keras_reptile import export as export_lib

SHAPE = (8, 8, 1)
WAYS = 3
EVAL_STEPS = 3
OTHER_STEPS = 6  # differs from EVAL_STEPS and from the unrolling threshold
TOL = dict(rtol=1e-5, atol=1e-5)
SAVED_MODEL_CLI = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")

# Runs in a fresh interpreter: blocks Keras and keras_reptile, loads each
# SavedModel, makes the requested calls and saves every output.
LOADER = r"""
import json, sys
for name in ("keras", "keras_reptile", "tf_keras"):
    sys.modules[name] = None  # `import name` now raises ImportError
import numpy as np
import tensorflow as tf

calls = json.load(open(sys.argv[1]))
arrays = np.load(sys.argv[2])
loaded, before, results = {}, {}, {}
for call in calls:
    if call["dir"] not in loaded:
        obj = tf.saved_model.load(call["dir"])
        loaded[call["dir"]] = obj
        before[call["dir"]] = [v.numpy() for v in obj.variables]
    obj = loaded[call["dir"]]
    if call["signature"]:
        fn = obj.signatures[call["endpoint"]]
    else:
        fn = getattr(obj, call["endpoint"])
    args = [arrays[k] for k in call.get("args", [])]
    kwargs = {k: arrays[v] for k, v in call.get("kwargs", {}).items()}
    outputs = fn(*args, **kwargs)
    if not isinstance(outputs, dict):
        outputs = {"output": outputs}
    for key, value in outputs.items():
        results[call["name"] + "::" + key] = value.numpy()
for path, values in before.items():
    after = [v.numpy() for v in loaded[path].variables]
    assert values and all(np.array_equal(a, b) for a, b in zip(values, after)), (
        "variables changed: " + path)
imported = sorted(m for m in sys.modules
                  if m.split(".")[0] in ("keras", "keras_reptile", "tf_keras")
                  and sys.modules[m] is not None)
assert not imported, imported
assert "keras_reptile" not in sys.modules or sys.modules["keras_reptile"] is None
np.savez(sys.argv[3], **results)
"""


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _classifier(transductive, seed=0):
    keras.utils.set_random_seed(seed)
    net = keras_reptile.models.conv4(
        SHAPE, num_classes=WAYS, filters=4, num_blocks=2
    )
    model = ReptileModel(
        net,
        inner_optimizer=keras.optimizers.SGD(0.1),
        inner_steps=2,
        inner_batch_size=3,
        eval_inner_steps=EVAL_STEPS,
        eval_inner_batch_size=4,
        transductive=transductive,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60,) + SHAPE).astype("float32")
    y = np.repeat(np.arange(12), 5)
    tasks = keras_reptile.episodes.from_arrays(
        x, y, ways=WAYS, shots=2, query_shots=1, meta_batch_size=2, seed=seed
    )
    model.fit(tasks, steps_per_epoch=3, verbose=0)
    return model


def _regressor(seed=0):
    keras.utils.set_random_seed(seed)
    net = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(16, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    model = ReptileModel(
        net,
        inner_optimizer=keras.optimizers.SGD(0.02),
        inner_steps=2,
        inner_batch_size=5,
        eval_inner_steps=EVAL_STEPS,
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    tasks = keras_reptile.datasets.sine(
        shots=5, query_shots=5, meta_batch_size=2, seed=seed
    )
    model.fit(tasks, steps_per_epoch=3, verbose=0)
    return model


def _classification_data(seed=1):
    rng = np.random.default_rng(seed)

    def images(n):
        return rng.normal(size=(n,) + SHAPE).astype("float32")

    return {
        "x5": images(5),
        "x2": images(2),
        # Set A: S=6, Q=4. Set B: S=5 (not a multiple of the batch), Q=3.
        "sx_a": images(6),
        "sy_a": rng.permutation(np.tile(np.arange(WAYS), 2)).astype("int32"),
        "qx_a": images(4),
        "sx_b": images(5),
        "sy_b": np.array([2, 0, 1, 1, 0], "int32"),
        "qx_b": images(3),
        "steps": np.array(OTHER_STEPS, "int32"),
    }


def _regression_data(seed=2):
    rng = np.random.default_rng(seed)

    def points(n):
        return rng.uniform(-5, 5, size=(n, 1)).astype("float32")

    sx_a, sx_b = points(5), points(8)
    return {
        "rx": points(4),
        "rsx_a": sx_a,
        "rsy_a": (2.0 * np.sin(sx_a[:, 0] - 0.5)).astype("float32"),  # [S]
        "rqx_a": points(6),
        "rsx_b": sx_b,
        "rsy_b": (1.5 * np.sin(sx_b - 1.0)).astype("float32"),  # [S, 1]
        "rqx_b": points(2),
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Exports the models, runs every call in a fresh process once."""
    root = tmp_path_factory.mktemp("export")
    models = {
        "clf": _classifier(transductive=False),
        "clf_t": _classifier(transductive=True),
        "reg": _regressor(),
    }
    data = {**_classification_data(), **_regression_data()}
    dirs = {}
    for name, model in models.items():
        dirs[name] = model.export(
            export_lib.next_version_path(root / name), verbose=False
        )
    adapted = models["clf"].adapt(data["sx_a"], data["sy_a"])
    dirs["adapted"] = str(root / "adapted" / "1")
    adapted.export(dirs["adapted"], verbose=False)

    set_a = dict(support_x="sx_a", support_y="sy_a", query_x="qx_a")
    set_b = dict(support_x="sx_b", support_y="sy_b", query_x="qx_b", steps="steps")
    calls = []
    for name in ("clf", "clf_t"):
        calls += [
            dict(name=f"{name}/serve5", endpoint="serving_default", kwargs={"x": "x5"}),
            dict(name=f"{name}/serve2", endpoint="serving_default", kwargs={"x": "x2"}),
            # The endpoint function, then the signature (issue #12: it
            # failed for want of `steps`).
            dict(name=f"{name}/adapt_a", endpoint="adapt_and_predict", kwargs=set_a,
                 signature=False),
            dict(name=f"{name}/adapt_a_sig", endpoint="adapt_and_predict",
                 kwargs=set_a),
            dict(name=f"{name}/adapt_b", endpoint="adapt_and_predict_steps",
                 kwargs=set_b),
            dict(name=f"{name}/adapt_b_fn", endpoint="adapt_and_predict_steps",
                 signature=False, args=["sx_b", "sy_b", "qx_b", "steps"]),
        ]
    calls += [
        dict(name="reg/serve", endpoint="serving_default", kwargs={"x": "rx"}),
        dict(name="reg/adapt_a", endpoint="adapt_and_predict", signature=False,
             kwargs=dict(support_x="rsx_a", support_y="rsy_a", query_x="rqx_a")),
        dict(name="reg/adapt_b", endpoint="adapt_and_predict_steps",
             kwargs=dict(support_x="rsx_b", support_y="rsy_b", query_x="rqx_b",
                         steps="steps")),
        dict(name="adapted/serve", endpoint="serve", args=["x5"], signature=False),
    ]
    for call in calls:
        call.setdefault("signature", True)
        call["dir"] = dirs[call["name"].split("/")[0]]
    calls_path, arrays_path, results_path = (
        root / "calls.json", root / "arrays.npz", root / "results.npz"
    )
    calls_path.write_text(json.dumps(calls))
    np.savez(arrays_path, **data)
    process = subprocess.run(
        [sys.executable, "-c", LOADER, str(calls_path), str(arrays_path),
         str(results_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    with np.load(results_path) as results:
        results = dict(results)
    return dict(
        models=models, data=data, dirs=dirs, adapted=adapted, results=results,
        root=root,
    )


def _result(served, name, key="outputs"):
    return served["results"][f"{name}::{key}"]


# ----------------------------------------------------------------------
# Outputs of the loaded SavedModels (fresh process, no keras_reptile)


@pytest.mark.parametrize("name", ["clf", "clf_t"])
@pytest.mark.parametrize("batch", ["x5", "x2"])
def test_serving_default_matches_predict(served, name, batch):
    model, x = served["models"][name], served["data"][batch]
    expected = model.predict(x, verbose=0)
    outputs = _result(served, f"{name}/serve{batch[1:]}")
    np.testing.assert_allclose(outputs, expected, **TOL)
    probabilities = _result(served, f"{name}/serve{batch[1:]}", "probabilities")
    np.testing.assert_allclose(probabilities, _softmax(expected), **TOL)


def test_adapt_and_predict_matches_adapt_non_transductive(served):
    model, d = served["models"]["clf"], served["data"]
    # Default steps (the endpoint's optional argument left out).
    expected = model.adapt(d["sx_a"], d["sy_a"]).predict(d["qx_a"], verbose=0)
    np.testing.assert_allclose(_result(served, "clf/adapt_a"), expected, **TOL)
    np.testing.assert_allclose(
        model.adapt_and_predict(d["sx_a"], d["sy_a"], d["qx_a"]), expected, **TOL
    )
    np.testing.assert_allclose(
        _result(served, "clf/adapt_a", "probabilities"), _softmax(expected), **TOL
    )
    # Another support and query size, `steps` given: no re-export needed.
    expected = model.adapt(d["sx_b"], d["sy_b"], steps=OTHER_STEPS).predict(
        d["qx_b"], verbose=0
    )
    np.testing.assert_allclose(_result(served, "clf/adapt_b"), expected, **TOL)
    np.testing.assert_allclose(_result(served, "clf/adapt_b_fn"), expected, **TOL)
    assert not np.allclose(
        expected, model.adapt(d["sx_b"], d["sy_b"]).predict(d["qx_b"], verbose=0)
    )


def test_adapt_signature_needs_no_steps(served):
    # Issue #12: `signatures["adapt_and_predict"](support_x=, support_y=,
    # query_x=)` raised "missing required argument: steps".
    for name in ("clf", "clf_t"):
        for key in ("outputs", "probabilities"):
            np.testing.assert_allclose(
                _result(served, f"{name}/adapt_a_sig", key),
                _result(served, f"{name}/adapt_a", key),
                **TOL,
            )


def test_adapt_and_predict_matches_adapt_transductive(served):
    model, d = served["models"]["clf_t"], served["data"]
    expected = model.adapt_and_predict(d["sx_a"], d["sy_a"], d["qx_a"])
    np.testing.assert_allclose(_result(served, "clf_t/adapt_a"), expected, **TOL)
    np.testing.assert_allclose(_result(served, "clf_t/adapt_a_sig"), expected, **TOL)
    adapted = model.adapt(d["sx_b"], d["sy_b"], steps=OTHER_STEPS)
    expected = keras.ops.convert_to_numpy(adapted(d["qx_b"], training=True))
    np.testing.assert_allclose(_result(served, "clf_t/adapt_b"), expected, **TOL)
    np.testing.assert_allclose(_result(served, "clf_t/adapt_b_fn"), expected, **TOL)
    np.testing.assert_allclose(
        model.adapt_and_predict(d["sx_b"], d["sy_b"], d["qx_b"], steps=OTHER_STEPS),
        expected,
        **TOL,
    )
    np.testing.assert_allclose(
        _result(served, "clf_t/adapt_b", "probabilities"), _softmax(expected), **TOL
    )


def test_regression_export(served):
    model, d = served["models"]["reg"], served["data"]
    assert "reg/serve::probabilities" not in served["results"]
    np.testing.assert_allclose(
        _result(served, "reg/serve"), model.predict(d["rx"], verbose=0), **TOL
    )
    # Targets `[S]` with the default steps.
    expected = model.adapt(d["rsx_a"], d["rsy_a"]).predict(d["rqx_a"], verbose=0)
    np.testing.assert_allclose(_result(served, "reg/adapt_a"), expected, **TOL)
    # Targets `[S, 1]` with `steps` given; the served graph reshapes them to
    # the same loss as `[S]`. (In process, the reference gets `[S]` targets:
    # `ReptileModel`'s cached adapt function cannot take targets of another
    # rank than on its first calls.)
    expected = model.adapt_and_predict(
        d["rsx_b"], d["rsy_b"][:, 0], d["rqx_b"], steps=OTHER_STEPS
    )
    np.testing.assert_allclose(_result(served, "reg/adapt_b"), expected, **TOL)


def test_adapted_model_exports_with_plain_keras(served):
    expected = served["adapted"].predict(served["data"]["x5"], verbose=0)
    actual = served["results"]["adapted/serve::output"]
    np.testing.assert_allclose(actual, expected, **TOL)
    # The adapted copy is the non-transductive adaptation of set A.
    np.testing.assert_allclose(
        served["adapted"].predict(served["data"]["qx_a"], verbose=0),
        _result(served, "clf/adapt_a"),
        **TOL,
    )


# ----------------------------------------------------------------------
# SavedModel structure


def _signature_defs(path):
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    (meta_graph,) = proto.meta_graphs
    return meta_graph.signature_def


def test_signature_defs(served):
    signatures = _signature_defs(served["dirs"]["clf"])
    assert set(signatures) - {"__saved_model_init_op"} == {
        "serving_default", "adapt_and_predict", "adapt_and_predict_steps",
    }
    serving, adapt = signatures["serving_default"], signatures["adapt_and_predict"]
    adapt_steps = signatures["adapt_and_predict_steps"]
    assert set(serving.inputs) == {"x"}
    assert set(serving.outputs) == {"outputs", "probabilities"}
    # Every input of every signature is required: no client has to know
    # about SignatureDef defaults (only TF Serving applies them).
    assert set(adapt.inputs) == {"support_x", "support_y", "query_x"}
    assert set(adapt_steps.inputs) == {"support_x", "support_y", "query_x", "steps"}
    for signature in (serving, adapt, adapt_steps):
        assert not signature.defaults
        assert signature.method_name == "tensorflow/serving/predict"
    for signature in (adapt, adapt_steps):
        assert set(signature.outputs) == {"outputs", "probabilities"}
        assert signature.inputs["support_y"].dtype == tf.int32.as_datatype_enum
        assert [d.size for d in signature.outputs["outputs"].tensor_shape.dim] == [
            -1, WAYS
        ]
    assert adapt_steps.inputs["steps"].dtype == tf.int32.as_datatype_enum
    reg = _signature_defs(served["dirs"]["reg"])
    for name in ("adapt_and_predict", "adapt_and_predict_steps"):
        assert set(reg[name].outputs) == {"outputs"}
        assert reg[name].inputs["support_y"].dtype == tf.float32.as_datatype_enum


def test_signatures_write_no_variables(served):
    loaded = tf.saved_model.load(served["dirs"]["clf_t"])
    for name in ("adapt_and_predict", "adapt_and_predict_steps"):
        graph_def = loaded.signatures[name].graph.as_graph_def()
        op_types = {node.op for node in graph_def.node}
        for function in graph_def.library.function:
            op_types.update(node.op for node in function.node_def)
        assert "While" in op_types or "StatelessWhile" in op_types
        writes = {op for op in op_types if op.startswith("Assign") or "Scatter" in op}
        assert not writes


def test_concurrent_requests(served):
    loaded = tf.saved_model.load(served["dirs"]["clf"])
    d = served["data"]
    requests = [
        ("adapt_and_predict",
         dict(support_x=d["sx_a"], support_y=d["sy_a"], query_x=d["qx_a"])),
        ("adapt_and_predict_steps",
         dict(support_x=d["sx_b"], support_y=d["sy_b"], query_x=d["qx_b"],
              steps=d["steps"])),
    ] * 3

    def call(request):
        name, inputs = request
        return loaded.signatures[name](**inputs)["outputs"].numpy()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outputs = list(pool.map(call, requests))
    for i, output in enumerate(outputs):
        expected = _result(served, "clf/adapt_a" if i % 2 == 0 else "clf/adapt_b")
        np.testing.assert_allclose(output, expected, **TOL)


# ----------------------------------------------------------------------
# saved_model_cli, the tool installed with TensorFlow


def test_saved_model_cli_run(served, tmp_path):
    d = served["data"]
    for key in ("x5", "sx_a", "sy_a", "qx_a"):
        np.save(tmp_path / f"{key}.npy", d[key])
    np.save(tmp_path / "bad_y.npy", d["sy_a"] + 1)
    model_dir = served["dirs"]["clf"]

    def run(signature, inputs, outdir=None, exprs=None):
        command = [
            SAVED_MODEL_CLI, "run", "--dir", model_dir, "--tag_set", "serve",
            "--signature_def", signature,
            "--inputs", ";".join(f"{k}={tmp_path / v}.npy" for k, v in inputs.items()),
        ]
        if exprs:
            command += ["--input_exprs", exprs]
        if outdir:
            command += ["--outdir", str(tmp_path / outdir), "--overwrite"]
        return subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    set_a = dict(support_x="sx_a", support_y="sy_a", query_x="qx_a")
    processes = [
        run("serving_default", {"x": "x5"}, "serve"),
        run("adapt_and_predict", set_a, "adapt"),  # `eval_inner_steps`
        run("adapt_and_predict_steps", set_a, "adapt_steps",
            exprs=f"steps={OTHER_STEPS}"),
        run("adapt_and_predict", {**set_a, "support_y": "bad_y"}),
    ]
    (ok1, ok2, ok3, bad) = [(p, *p.communicate(timeout=300)) for p in processes]
    for process, _, stderr in (ok1, ok2, ok3):
        assert process.returncode == 0, stderr[-3000:]
    np.testing.assert_allclose(
        np.load(tmp_path / "serve" / "outputs.npy"),
        _result(served, "clf/serve5"),
        **TOL,
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "adapt" / "probabilities.npy"),
        _result(served, "clf/adapt_a", "probabilities"),
        **TOL,
    )
    d = served["data"]
    expected = served["models"]["clf"].adapt_and_predict(
        d["sx_a"], d["sy_a"], d["qx_a"], steps=OTHER_STEPS
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "adapt_steps" / "outputs.npy"), expected, **TOL
    )
    process, stdout, stderr = bad
    assert process.returncode != 0
    assert "InvalidArgumentError" in stderr
    assert "Expected `support_y` labels in [0, 2]" in stderr


# ----------------------------------------------------------------------
# Bad requests: an InvalidArgumentError that says what was expected


def _bad_requests(d):
    good = dict(support_x=d["sx_a"], support_y=d["sy_a"], query_x=d["qx_a"])
    steps = "adapt_and_predict_steps"

    def non_finite(x, value, index):
        x = x.copy()
        x.flat[index] = value
        return x

    finite = "Expected `{0}` to hold only finite values. Received: {0} with {1} "
    x_shape = "Expected `{}` of shape [rows, 8, 8, 1]. Received: {}.shape="
    return {
        "x_rank": ("serving_default", dict(x=d["x5"][..., 0]),
                   x_shape.format("x", "x") + "[5 8 8]"),
        "x_size": ("serving_default", dict(x=np.zeros((2, 9, 9, 1), "float32")),
                   x_shape.format("x", "x") + "[2 9 9 1]"),
        "support_x_rank": ("adapt_and_predict", {**good, "support_x": d["sx_a"][0]},
                           x_shape.format("support_x", "support_x") + "[8 8 1]"),
        "query_x_size": ("adapt_and_predict", {**good, "query_x": d["qx_a"][:, :, :7]},
                         x_shape.format("query_x", "query_x") + "[4 8 7 1]"),
        "support_y_length": (
            "adapt_and_predict", {**good, "support_y": d["sy_a"][:5]},
            "Expected `support_y` with one target per support example. "
            "Received: support_x.shape=[6 8 8 1], support_y.shape=[5]"),
        "support_y_rank": (
            "adapt_and_predict", {**good, "support_y": d["sy_a"][:, None]},
            "Expected `support_y` of shape [rows]. Received: support_y.shape=[6 1]"),
        "label_too_large": (
            "adapt_and_predict", {**good, "support_y": d["sy_a"] + 1},
            "Expected `support_y` labels in [0, 2] (the model has 3 outputs). "
            "Received labels from 1 to 3."),
        "label_negative": (
            "adapt_and_predict", {**good, "support_y": d["sy_a"] - 1},
            "Expected `support_y` labels in [0, 2] (the model has 3 outputs). "
            "Received labels from -1 to 1."),
        "empty_support": (
            "adapt_and_predict",
            {**good, "support_x": d["sx_a"][:0], "support_y": d["sy_a"][:0]},
            "Expected `support_x` to be a non-empty batch of examples. "
            "Received: support_x.shape=[0 8 8 1]"),
        "empty_query": (
            "adapt_and_predict", {**good, "query_x": d["qx_a"][:0]},
            "Expected `query_x` to be a non-empty batch of examples. "
            "Received: query_x.shape=[0 8 8 1]"),
        "zero_steps": (steps, {**good, "steps": np.int32(0)},
                       "Expected `steps` to be a positive integer. Received: steps=0"),
        "negative_steps": (
            steps, {**good, "steps": np.int32(-3)},
            "Expected `steps` to be a positive integer. Received: steps=-3"),
        "vector_steps": (steps, {**good, "steps": np.array([2], "int32")},
                         "Expected `steps` to be a scalar. Received: steps.shape=[1]"),
        "bad_support_y_with_steps": (
            steps, {**good, "support_y": d["sy_a"] + 1, "steps": np.int32(2)},
            "Expected `support_y` labels in [0, 2] (the model has 3 outputs). "
            "Received labels from 1 to 3."),
        # NaN/Inf (issue #12): named, not NaN probabilities.
        "x_nan": ("serving_default", dict(x=non_finite(d["x5"], np.nan, 7)),
                  finite.format("x", 1) + "NaN or Inf values."),
        "support_x_inf": (
            "adapt_and_predict",
            {**good, "support_x": non_finite(d["sx_a"], np.inf, 3)},
            finite.format("support_x", 1) + "NaN or Inf values."),
        "query_x_nan_and_inf": (
            steps,
            {**good, "query_x": non_finite(non_finite(d["qx_a"], np.nan, 0),
                                           -np.inf, 70),
             "steps": np.int32(2)},
            finite.format("query_x", 2) + "NaN or Inf values."),
    }


BAD_REQUESTS = sorted(_bad_requests(_classification_data()))


@pytest.fixture(scope="module")
def loaded_classifier(served):
    return tf.saved_model.load(served["dirs"]["clf"])


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_invalid_argument(served, loaded_classifier, case):
    signature, inputs, message = _bad_requests(served["data"])[case]
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
        loaded_classifier.signatures[signature](**inputs)


def test_bad_regression_targets(served):
    loaded = tf.saved_model.load(served["dirs"]["reg"])
    d = served["data"]
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=re.escape(
            "Expected `support_y` of shape [rows, 1] or [rows]. "
            "Received: support_y.shape=[5 2]"
        ),
    ):
        loaded.adapt_and_predict(
            d["rsx_a"], np.zeros((5, 2), "float32"), d["rqx_a"]
        )
    support_y = d["rsy_a"].copy()
    support_y[2] = np.nan
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=re.escape(
            "Expected `support_y` to hold only finite values. Received: "
            "support_y with 1 NaN or Inf values."
        ),
    ):
        loaded.adapt_and_predict(d["rsx_a"], support_y, d["rqx_a"])


def _reg_request(d, support_rows=None, query_rows=None):
    """Set A of the regression data, tiled to the given numbers of rows."""

    def rows(x, n):
        return x if n is None else np.resize(x, (n,) + x.shape[1:])

    return dict(
        support_x=rows(d["rsx_a"], support_rows),
        support_y=rows(d["rsy_a"], support_rows),
        query_x=rows(d["rqx_a"], query_rows),
    )


def _rejects(message, fn, *args, **kwargs):
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)):
        fn(*args, **kwargs)


def test_max_steps(served, tmp_path):
    model, d = served["models"]["reg"], served["data"]
    path = model.export(tmp_path / "1", verbose=False, max_steps=5)
    loaded = tf.saved_model.load(path)
    request = _reg_request(d)
    loaded.adapt_and_predict_steps(**request, steps=tf.constant(5))
    _rejects(
        "Expected `steps` of at most 5 (the `max_steps` of this export). "
        "Received: steps=6",
        loaded.signatures["adapt_and_predict_steps"], **request, steps=np.int32(6),
    )
    with pytest.raises(ValueError, match="at least the default number of steps"):
        model.export(tmp_path / "2", max_steps=EVAL_STEPS - 1)


def test_default_max_steps_is_ten_times_eval_steps(served, tmp_path):
    model, d = served["models"]["reg"], served["data"]
    path = export_lib.export_saved_model(model, tmp_path / "1", verbose=False)
    steps_fn = tf.saved_model.load(path).signatures["adapt_and_predict_steps"]
    request = _reg_request(d)
    steps_fn(**request, steps=np.int32(10 * EVAL_STEPS))
    _rejects(
        f"Expected `steps` of at most {10 * EVAL_STEPS} (the `max_steps` of "
        f"this export). Received: steps={10 * EVAL_STEPS + 1}",
        steps_fn, **request, steps=np.int32(10 * EVAL_STEPS + 1),
    )
    # Issue #12: this ran for hours. Now rejected before the first step.
    _rejects("Received: steps=1000000000", steps_fn, **request,
             steps=np.int32(10**9))


def test_model_export_bounds_steps_by_default(served):
    loaded = tf.saved_model.load(served["dirs"]["reg"])
    _rejects(
        "Expected `steps` of at most", loaded.adapt_and_predict_steps,
        **_reg_request(served["data"]), steps=np.int32(10 * EVAL_STEPS + 1),
    )


def test_default_support_and_query_bounds(served):
    # `model.export` gets the defaults of `export_saved_model`.
    loaded = tf.saved_model.load(served["dirs"]["reg"])
    d = served["data"]
    adapt = loaded.signatures["adapt_and_predict"]
    support, query = export_lib.DEFAULT_MAX_SUPPORT, export_lib.DEFAULT_MAX_QUERY
    assert (support, query) == (1_000, 10_000)
    outputs = adapt(**_reg_request(d, support_rows=support, query_rows=query))
    assert outputs["outputs"].shape == (query, 1)
    _rejects(
        "Expected `support_x` with at most 1000 rows (the `max_support` of "
        "this export). Received: support_x.shape=[1001 1]",
        adapt, **_reg_request(d, support_rows=support + 1),
    )
    _rejects(
        "Expected `query_x` with at most 10000 rows (the `max_query` of this "
        "export). Received: query_x.shape=[10001 1]",
        loaded.adapt_and_predict_steps,
        **_reg_request(d, query_rows=query + 1), steps=np.int32(1),
    )


def test_custom_and_lifted_bounds(served, tmp_path):
    model, d = served["models"]["reg"], served["data"]
    small = tf.saved_model.load(export_lib.export_saved_model(
        model, tmp_path / "small", verbose=False, max_support=4, max_query=2,
        max_steps=None,
    ))
    _rejects(
        "Expected `support_x` with at most 4 rows (the `max_support` of this "
        "export). Received: support_x.shape=[5 1]",
        small.adapt_and_predict, **_reg_request(d, support_rows=5, query_rows=2),
    )
    _rejects(
        "Expected `query_x` with at most 2 rows (the `max_query` of this "
        "export). Received: query_x.shape=[3 1]",
        small.adapt_and_predict, **_reg_request(d, support_rows=4, query_rows=3),
    )
    # `max_steps=None`: more than 10 x `eval_inner_steps` is served.
    small.adapt_and_predict_steps(
        **_reg_request(d, support_rows=4, query_rows=2),
        steps=np.int32(10 * EVAL_STEPS + 1),
    )
    unbounded = tf.saved_model.load(export_lib.export_saved_model(
        model, tmp_path / "unbounded", verbose=False, max_support=None,
        max_query=None,
    ))
    request = _reg_request(
        d, support_rows=export_lib.DEFAULT_MAX_SUPPORT + 1,
        query_rows=export_lib.DEFAULT_MAX_QUERY + 1,
    )
    outputs = unbounded.signatures["adapt_and_predict"](**request)["outputs"]
    assert outputs.shape == (export_lib.DEFAULT_MAX_QUERY + 1, 1)


@pytest.mark.parametrize(
    "option, value",
    [("max_steps", 0), ("max_steps", True), ("max_steps", 2.5),
     ("max_support", 0), ("max_support", "big"), ("max_query", -1)],
)
def test_invalid_bounds(served, tmp_path, option, value):
    with pytest.raises(ValueError, match=re.escape(
        f"Expected `{option}` to be a positive integer, 'auto' or None"
    )):
        export_lib.export_saved_model(
            served["models"]["reg"], tmp_path / "1", **{option: value}
        )
    assert not os.path.exists(tmp_path / "1")


# ----------------------------------------------------------------------
# Other losses


def test_categorical_crossentropy_probabilities(tmp_path):
    keras.utils.set_random_seed(3)
    net = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(WAYS, activation="softmax")]
    )
    model = ReptileModel(
        net, inner_optimizer="sgd", eval_inner_steps=2, eval_inner_batch_size=3
    )
    model.compile(optimizer="sgd", loss="categorical_crossentropy")
    rng = np.random.default_rng(3)
    sx = rng.normal(size=(4, 4)).astype("float32")
    qx = rng.normal(size=(2, 4)).astype("float32")
    sy = np.eye(WAYS, dtype="float32")[[0, 1, 2, 0]]
    loaded = tf.saved_model.load(model.export(tmp_path / "1", verbose=False))
    result = loaded.adapt_and_predict(sx, sy, qx)
    expected = model.adapt(sx, sy).predict(qx, verbose=0)
    np.testing.assert_allclose(result["outputs"], expected, **TOL)
    # Outputs already are probabilities: passed through.
    np.testing.assert_allclose(result["probabilities"], expected, **TOL)
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=re.escape("Expected `support_y` of shape [rows, 3]"),
    ):
        loaded.adapt_and_predict(sx, sy[:, :2], qx)


def test_carried_inner_optimizer_state_is_served(tmp_path):
    # Adaptation in the served graph starts from the carried Adam state,
    # exactly as `adapt_and_predict` in process (checked against real Adams
    # in reptile_model_test).
    keras.utils.set_random_seed(4)
    net = keras_reptile.models.conv4(SHAPE, num_classes=WAYS, filters=4, num_blocks=2)
    model = ReptileModel(
        net, inner_optimizer=keras.optimizers.Adam(0.01, beta_1=0.0), inner_steps=2,
        inner_batch_size=3, eval_inner_steps=EVAL_STEPS, carry_inner_optimizer_state=True,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    data = _classification_data()
    sx, sy, qx = data["sx_a"], data["sy_a"], data["qx_a"]
    tasks = keras_reptile.episodes.from_arrays(
        np.concatenate([sx, qx]), np.arange(len(sx) + len(qx)) % WAYS,
        ways=WAYS, shots=2, query_shots=1, meta_batch_size=2, seed=4,
    )
    model.fit(tasks, steps_per_epoch=3, verbose=0)
    loaded = tf.saved_model.load(model.export(tmp_path / "1", verbose=False))
    result = loaded.adapt_and_predict(sx, sy, qx)
    expected = model.adapt_and_predict(sx, sy, qx)
    np.testing.assert_allclose(result["outputs"], expected, **TOL)
    # A fresh inner Adam would give other outputs, so the state mattered.
    fresh = ReptileModel(
        model.model, inner_optimizer=keras.optimizers.Adam(0.01, beta_1=0.0),
        eval_inner_steps=EVAL_STEPS, eval_inner_batch_size=3,
    )
    fresh.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    assert np.abs(fresh.adapt_and_predict(sx, sy, qx) - expected).max() > 1e-3


@pytest.mark.parametrize(
    "loss, kind, from_logits",
    [
        (keras.losses.SparseCategoricalCrossentropy(from_logits=True), "sparse", True),
        (keras.losses.SparseCategoricalCrossentropy(), "sparse", False),
        ("sparse_categorical_crossentropy", "sparse", False),
        (keras.losses.sparse_categorical_crossentropy, "sparse", False),
        (keras.losses.CategoricalCrossentropy(from_logits=True), "categorical", True),
        ("categorical_crossentropy", "categorical", False),
        (["sparse_categorical_crossentropy"], "sparse", False),
        ("mse", None, False),
        (keras.losses.BinaryCrossentropy(), None, False),
    ],
)
def test_the_served_signatures_follow_the_compiled_loss(loss, kind, from_logits, tmp_path):
    # The loss decides what the export serves: sparse labels (int32), one-hot
    # labels (floats) or regression targets (floats, no "probabilities");
    # probabilities are the softmax of logits, or the
    # outputs themselves. A linear head, so that softmax is not the identity.
    keras.utils.set_random_seed(5)
    net = keras.Sequential([keras.Input((4,)), keras.layers.Dense(WAYS)])
    model = ReptileModel(net, inner_optimizer="sgd", eval_inner_steps=1,
                         eval_inner_batch_size=2)
    model.compile(optimizer="sgd", loss=loss)
    path = model.export(str(tmp_path / "1"), verbose=False)
    adapt = _signature_defs(path)["adapt_and_predict"]
    support_y = adapt.inputs["support_y"]
    wanted = tf.int32 if kind == "sparse" else tf.float32
    assert support_y.dtype == wanted.as_datatype_enum
    x = np.random.default_rng(5).normal(size=(2, 4)).astype("float32")
    result = tf.saved_model.load(path).signatures["serving_default"](x=tf.constant(x))
    outputs = net.predict(x, verbose=0)
    np.testing.assert_allclose(result["outputs"], outputs, **TOL)
    if kind is None:
        assert set(adapt.outputs) == set(result) == {"outputs"}
    else:
        assert set(adapt.outputs) == set(result) == {"outputs", "probabilities"}
        expected = _softmax(outputs) if from_logits else outputs
        np.testing.assert_allclose(result["probabilities"], expected, **TOL)


# ----------------------------------------------------------------------
# Python-side errors and the version-directory helper


def test_export_errors(served, tmp_path):
    model = served["models"]["reg"]
    with pytest.raises(ValueError, match="only supports format='tf_saved_model'"):
        model.export(tmp_path / "x", format="onnx")
    with pytest.raises(TypeError, match="Expected `model` to be a"):
        export_lib.export_saved_model(model.model, tmp_path / "x")
    uncompiled = ReptileModel(
        keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    )
    with pytest.raises(ValueError, match=re.escape("Call `compile()` with a `loss`")):
        uncompiled.export(tmp_path / "x")
    # An existing version is never clobbered by accident.
    with pytest.raises(ValueError, match="already exists and is not empty"):
        model.export(served["dirs"]["reg"])
    (tmp_path / "v" / "1").mkdir(parents=True)
    (tmp_path / "v" / "1" / "stale.txt").write_text("old")
    path = model.export(tmp_path / "v" / "1", verbose=False, overwrite=True)
    assert "saved_model.pb" in os.listdir(path)
    assert "stale.txt" not in os.listdir(path)
    assert os.listdir(tmp_path / "v") == ["1"]  # no temporary directory left


def test_next_version_path(tmp_path):
    base = tmp_path / "omniglot"
    assert export_lib.next_version_path(base) == str(base / "1")
    for entry in ("1", "3", "notes", ".3.tmp-abc"):
        (base / entry).mkdir(parents=True)
    assert export_lib.next_version_path(base) == str(base / "4")


def test_verbose_reports_signatures(served, tmp_path, capsys):
    served["models"]["clf"].export(tmp_path / "1")
    out = capsys.readouterr().out
    assert "'serving_default': x float32 [batch, 8, 8, 1]" in out
    assert "'adapt_and_predict': support_x float32 [S, 8, 8, 1]" in out
    assert "after 3 adaptation steps; S <= 1000 (max_support), " in out
    assert "Q <= 10000 (max_query)" in out
    assert "'adapt_and_predict_steps':" in out
    assert "steps int32 scalar" in out
    export_lib.export_saved_model(served["models"]["clf"], tmp_path / "2")
    assert "steps <= 30 (max_steps)" in capsys.readouterr().out


class SubclassedNet(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(WAYS)

    def call(self, inputs, training=False):
        return self.out(self.hidden(inputs))

    def compute_output_shape(self, input_shape):  # used by `adapt()`'s checks
        return tuple(input_shape[:-1]) + (WAYS,)


def test_subclassed_model_needs_input_signature(tmp_path):
    keras.utils.set_random_seed(4)
    net = SubclassedNet()
    net(np.zeros((1, 5), "float32"))  # builds it: it has no `build()`
    model = ReptileModel(net, inner_optimizer="sgd", eval_inner_steps=2)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(4)
    sx, qx = (rng.normal(size=(n, 5)).astype("float32") for n in (6, 2))
    sy = np.array([0, 1, 2, 2, 1, 0], "int32")
    expected = model.adapt_and_predict(sx, sy, qx)
    with pytest.raises(ValueError, match="Pass `input_signature`"):
        model.export(tmp_path / "1")
    path = model.export(
        tmp_path / "1",
        verbose=False,
        input_signature=[tf.TensorSpec((None, 5), tf.float32)],
    )
    loaded = tf.saved_model.load(path)
    np.testing.assert_allclose(
        loaded.adapt_and_predict(sx, sy, qx)["outputs"], expected, **TOL
    )
    np.testing.assert_allclose(
        loaded.signatures["serving_default"](x=qx)["outputs"],
        model.predict(qx, verbose=0),
        **TOL,
    )


# ----------------------------------------------------------------------
# Issue 27: paths, flags and outputs that are not finite.


def _line_model():
    """y = 2 x, adapted by SGD(0.1) on the mean squared error, one step."""
    net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    net.set_weights([np.full((1, 1), 2.0, "float32"), np.zeros(1, "float32")])
    model = ReptileModel(
        net, inner_optimizer=keras.optimizers.SGD(0.1), eval_inner_steps=1
    )
    model.compile(optimizer="sgd", loss="mse")
    return model


@pytest.mark.parametrize(
    "filepath, error, match",
    [
        ("", ValueError,
         "Expected `filepath` to be a non-empty directory path. Received: "
         "filepath=''"),
        (None, TypeError,
         r"Expected `filepath` to be a directory path, a `str` or "
         r"`pathlib.Path`. Received: filepath=None of type NoneType"),
        (b"models/1", TypeError,
         r"Received: filepath=b'models/1' of type bytes \(decode bytes to a "
         r"`str`\)"),
    ],
)
def test_a_filepath_that_is_not_a_path_is_named(filepath, error, match):
    with pytest.raises(error, match=match):
        _line_model().export(filepath, verbose=False)


def test_overwrite_takes_a_real_bool(tmp_path):
    model = _line_model()
    path = model.export(str(tmp_path / "1"), verbose=False)
    before = sorted(os.listdir(path))
    with pytest.raises(
        TypeError,
        match="Expected `overwrite` to be a bool. Received: overwrite='no' "
        "of type str",
    ):
        model.export(path, verbose=False, overwrite="no")
    assert sorted(os.listdir(path)) == before
    assert os.listdir(tmp_path) == ["1"]


def test_a_filepath_under_a_file_is_named_before_any_work(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("data")
    target = str(blocker / "1")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Expected `filepath` to be a directory path that can be written. "
            f"Received: filepath='{target}', but '{blocker}' is a file"
        ),
    ):
        _line_model().export(target, verbose=False)
    assert blocker.read_text() == "data"


@pytest.mark.parametrize(
    "failure, error, match",
    [
        (OSError(28, "No space left on device"), OSError,
         "Could not export to filepath='{target}': no space left on {parent}. "
         "Nothing was written at '{target}'"),
        (PermissionError(13, "Permission denied"), ValueError,
         "Expected `filepath` to be a directory path that can be written. "
         "Received: filepath='{target}', which cannot be written (Permission "
         "denied)"),
    ],
)
def test_write_failures_name_the_users_path_and_leave_nothing(
    tmp_path, monkeypatch, failure, error, match
):
    target = str(tmp_path / "models" / "1")
    os.makedirs(os.path.dirname(target))
    # The class Keras makes for this backend (`ExportArchive()` is a factory).
    archive_class = type(keras.export.ExportArchive())
    write_out = archive_class.write_out

    def failing_write_out(archive, filepath, **kwargs):
        # Half a SavedModel in the temporary sibling, then the failure.
        write_out(archive, filepath, **kwargs)
        failure.filename = filepath
        raise failure

    monkeypatch.setattr(archive_class, "write_out", failing_write_out)
    with pytest.raises(error) as raised:
        _line_model().export(target, verbose=False)
    message = str(raised.value)
    assert match.format(target=target, parent=os.path.dirname(target)) in message
    assert ".tmp-" not in message
    assert os.listdir(os.path.dirname(target)) == []


def test_non_finite_outputs_are_invalid_argument_not_nan(tmp_path):
    path = _line_model().export(str(tmp_path / "1"), verbose=False)
    served = tf.saved_model.load(path)
    one = np.ones((1, 1), "float32")
    # 2 x 3e38 = 6e38: beyond float32, although the input is finite.
    with pytest.raises(
        tf.errors.InvalidArgumentError,
        match=r"Expected finite outputs. Received: 1 NaN or Inf values in the "
        r"outputs",
    ):
        served.signatures["serving_default"](x=np.array([[1.0], [3e38]], "float32"))
    # Support x = 1e19, y = 0: the kernel's gradient 2 (2e19) 1e19 = 4e38 is
    # beyond float32, so the adapted kernel is -Inf.
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="Expected finite outputs"
    ):
        served.signatures["adapt_and_predict"](
            support_x=np.array([[1e19]], "float32"),
            support_y=np.zeros(1, "float32"), query_x=one,
        )
    # Finite requests are served as before: x = 1, y = 2 leaves w = 2, b = 0
    # (residual 0), so the query 3 gives 6.
    outputs = served.signatures["adapt_and_predict"](
        support_x=one, support_y=np.full(1, 2.0, "float32"),
        query_x=np.full((1, 1), 3.0, "float32"),
    )["outputs"]
    np.testing.assert_array_equal(outputs, [[6.0]])
