"""The example TF Serving clients in `examples/serving/`, without TF Serving.

The request builders are checked against the exported SignatureDefs (input
names, dtypes, shapes), and their requests, decoded as TF Serving decodes
them, are fed to the loaded signatures and compared with
`ReptileModel.adapt_and_predict`. The REST client's transport runs against
a local stand-in server that answers like TF Serving's Predict API.
"""

import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import keras_reptile
from keras_reptile import ReptileModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVING_DIR = os.path.join(ROOT, "examples", "serving")
SHAPE = (8, 8, 1)
WAYS = 3
EVAL_STEPS = 2
TOL = dict(rtol=1e-5, atol=1e-5)


def _load_example(name):
    spec = importlib.util.spec_from_file_location(
        f"serving_{name}", os.path.join(SERVING_DIR, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rest_client = _load_example("rest_client")
grpc_client = _load_example("grpc_client")

try:
    import tensorflow_serving.apis  # noqa: F401

    HAVE_SERVING_API = True
except ImportError:
    HAVE_SERVING_API = False


def _classifier():
    keras.utils.set_random_seed(5)
    net = keras_reptile.models.conv4(SHAPE, num_classes=WAYS, filters=4, num_blocks=2)
    model = ReptileModel(
        net, inner_optimizer=keras.optimizers.SGD(0.1),
        eval_inner_steps=EVAL_STEPS, eval_inner_batch_size=4,
    )
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def _regressor():
    keras.utils.set_random_seed(6)
    net = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(8, activation="tanh"),
         keras.layers.Dense(1)]
    )
    model = ReptileModel(
        net, inner_optimizer=keras.optimizers.SGD(0.02), eval_inner_steps=EVAL_STEPS
    )
    model.compile(loss="mse")
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("serving_clients")
    rng = np.random.default_rng(7)
    models = {"clf": _classifier(), "reg": _regressor()}
    dirs = {
        name: model.export(root / name / "1", verbose=False)
        for name, model in models.items()
    }
    sx = rng.normal(size=(6,) + SHAPE).astype("float32")
    data = {
        "clf": dict(
            support_x=sx,
            support_y=np.array([0, 1, 2, 2, 1, 0], "int32"),
            query_x=rng.normal(size=(4,) + SHAPE).astype("float32"),
        ),
        "reg": dict(
            support_x=rng.uniform(-5, 5, (5, 1)).astype("float32"),
            support_y=rng.uniform(-2, 2, (5,)).astype("float32"),
            query_x=rng.uniform(-5, 5, (3, 1)).astype("float32"),
        ),
    }
    loaded = {name: tf.saved_model.load(path) for name, path in dirs.items()}
    return dict(models=models, dirs=dirs, data=data, loaded=loaded)


def _signature_def(path, name):
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    return proto.meta_graphs[0].signature_def[name]


def _expected(exported, name, steps=None):
    d = exported["data"][name]
    return exported["models"][name].adapt_and_predict(
        d["support_x"], d["support_y"], d["query_x"], steps=steps
    )


def _decode_like_tf_serving(signature, json_inputs):
    """JSON columnar inputs -> tensors of the signature's dtypes.

    As TF Serving's `AddValueToTensor` (tensorflow_serving/util/json_tensor.cc)
    does: an integer input takes JSON integers only; a float input any number.
    """
    specs = signature.structured_input_signature[1]
    tensors = {}
    for name, value in json_inputs.items():
        dtype = specs[name].dtype
        if dtype.is_integer:
            for v in np.asarray(value, dtype=object).ravel():
                if not isinstance(v, int):
                    raise tf.errors.InvalidArgumentError(
                        None, None, f"JSON Value: {v} Type: Number is not of expected "
                        f"type: {dtype.name}")
        tensors[name] = tf.constant(np.asarray(value, dtype=dtype.as_numpy_dtype))
    return tensors


# ----------------------------------------------------------------------
# REST


@pytest.mark.parametrize("name", ["clf", "reg"])
@pytest.mark.parametrize("steps", [None, 3])
def test_rest_request_matches_signature(exported, name, steps):
    d = exported["data"][name]
    request = rest_client.build_adapt_request(
        d["support_x"], d["support_y"], d["query_x"], steps=steps
    )
    # The body must survive JSON, as sent.
    body = json.loads(json.dumps(request))
    assert set(body) == {"signature_name", "inputs"}
    signature_name = body["signature_name"]
    assert signature_name == (
        "adapt_and_predict" if steps is None else "adapt_and_predict_steps"
    )
    signature_def = _signature_def(exported["dirs"][name], signature_name)
    # TF Serving rejects inputs a signature lacks and needs all it has.
    assert set(body["inputs"]) == set(signature_def.inputs)
    signature = exported["loaded"][name].signatures[signature_name]
    assert set(body["inputs"]) == set(signature.structured_input_signature[1])
    for key in ("support_x", "query_x"):
        assert np.asarray(body["inputs"][key]).shape == d[key].shape
    if steps is not None:
        assert body["inputs"]["steps"] == steps  # a JSON number: a scalar
    # Class ids stay JSON integers (exact for int32), targets floats.
    support_y = np.asarray(body["inputs"]["support_y"])
    assert support_y.dtype.kind == ("i" if name == "clf" else "f")
    outputs = signature(**_decode_like_tf_serving(signature, body["inputs"]))
    np.testing.assert_allclose(
        outputs["outputs"], _expected(exported, name, steps), **TOL
    )


def test_rest_serving_request(exported):
    d = exported["data"]["clf"]
    body = json.loads(json.dumps(rest_client.build_serving_request(d["query_x"])))
    assert body["signature_name"] == "serving_default"
    signature = exported["loaded"]["clf"].signatures["serving_default"]
    outputs = signature(**_decode_like_tf_serving(signature, body["inputs"]))
    np.testing.assert_allclose(
        outputs["outputs"],
        exported["models"]["clf"].predict(d["query_x"], verbose=0),
        **TOL,
    )


def test_rest_request_rejects_non_integer_steps():
    with pytest.raises(ValueError, match="Expected `steps` to be an integer"):
        rest_client.build_adapt_request([[0.0]], [0.0], [[0.0]], steps=2.5)


class _FakeServing(http.server.BaseHTTPRequestHandler):
    """Answers `:predict` POSTs like TF Serving, from a loaded SavedModel."""

    loaded = None

    def do_POST(self):
        match = re.fullmatch(r"/v1/models/(\w+)(/versions/\d+)?:predict", self.path)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        try:
            assert match and self.headers["Content-Type"] == "application/json"
            signature = self.loaded.signatures[body["signature_name"]]
            outputs = signature(**_decode_like_tf_serving(signature, body["inputs"]))
            status, answer = 200, {
                "outputs": {k: v.numpy().tolist() for k, v in outputs.items()}
            }
        except tf.errors.InvalidArgumentError as error:
            status, answer = 400, {"error": error.message}
        payload = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_server(exported):
    _FakeServing.loaded = exported["loaded"]["clf"]
    server = http.server.HTTPServer(("127.0.0.1", 0), _FakeServing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_rest_predict_round_trip(exported, fake_server):
    d = exported["data"]["clf"]
    url = rest_client.predict_url("omniglot", "127.0.0.1", fake_server, version=1)
    assert url.endswith("/v1/models/omniglot/versions/1:predict")
    outputs = rest_client.predict(
        rest_client.build_adapt_request(d["support_x"], d["support_y"], d["query_x"]),
        url,
    )
    assert set(outputs) == {"outputs", "probabilities"}
    np.testing.assert_allclose(outputs["outputs"], _expected(exported, "clf"), **TOL)
    bad = rest_client.build_adapt_request(
        d["support_x"], d["support_y"] + 1, d["query_x"]
    )
    with pytest.raises(RuntimeError, match=r"(?s)" + re.escape(
        "TF Serving rejected the request (400): "
    ) + ".*" + re.escape("Expected `support_y` labels in [0, 2]")):
        rest_client.predict(bad, url)
    # Fractional labels reach TF Serving as JSON floats, which it refuses
    # for an integer input: the client must not round them into class ids.
    fractional = rest_client.build_adapt_request(
        d["support_x"], d["support_y"] + 0.5, d["query_x"]
    )
    with pytest.raises(RuntimeError, match=r"\(400\): .*is not of expected type: int"):
        rest_client.predict(fractional, url)


# ----------------------------------------------------------------------
# gRPC


def _check_tensor_protos(exported, name, signature_name, inputs, steps):
    d = exported["data"][name]
    signature_def = _signature_def(exported["dirs"][name], signature_name)
    assert set(inputs) == set(signature_def.inputs)
    for key, tensor in inputs.items():
        # Over gRPC the dtype must be the signature's exactly.
        assert tensor.dtype == signature_def.inputs[key].dtype, key
        shape = [dim.size for dim in tensor.tensor_shape.dim]
        assert shape == (list(d[key].shape) if key != "steps" else []), key
    signature = exported["loaded"][name].signatures[signature_name]
    outputs = signature(**{k: tf.make_ndarray(v) for k, v in inputs.items()})
    np.testing.assert_allclose(
        outputs["outputs"], _expected(exported, name, steps), **TOL
    )


@pytest.mark.parametrize("name", ["clf", "reg"])
@pytest.mark.parametrize("steps", [None, 3])
def test_grpc_tensor_protos_match_signature(exported, name, steps):
    # Needs only TensorFlow: runs whether or not the stubs are installed.
    d = exported["data"][name]
    signature_name, inputs = grpc_client.build_adapt_inputs(
        d["support_x"], d["support_y"], d["query_x"], steps,
        support_y_dtype="int32" if name == "clf" else "float32",
    )
    assert signature_name == (
        "adapt_and_predict" if steps is None else "adapt_and_predict_steps"
    )
    _check_tensor_protos(exported, name, signature_name, inputs, steps)


@pytest.mark.parametrize("labels", [[0.9, 1.7, 2.2], [0.0, 1.0, float("nan")]])
def test_grpc_client_never_truncates_fractional_class_ids(labels):
    # NumPy's cast would send [0, 1, 2]: classes merged without a word.
    with pytest.raises(ValueError, match="Expected `support_y` to hold whole-number "
                       "class ids for support_y_dtype='int32'"):
        grpc_client.build_adapt_inputs([[0.0]] * 3, labels, [[0.0]])
    # Whole-number floats are class ids; float targets stay as given.
    _, inputs = grpc_client.build_adapt_inputs([[0.0]] * 2, [0.0, 1.0], [[0.0]])
    assert tf.make_ndarray(inputs["support_y"]).tolist() == [0, 1]
    _, inputs = grpc_client.build_adapt_inputs(
        [[0.0]] * 2, [0.5, 1.5], [[0.0]], support_y_dtype="float32")
    assert tf.make_ndarray(inputs["support_y"]).tolist() == [0.5, 1.5]


@pytest.mark.skipif(
    not HAVE_SERVING_API,
    reason="tensorflow-serving-api (the PredictRequest stubs) is not installed; "
    "`pip install 'tensorflow-serving-api==2.21.*'`",
)
@pytest.mark.parametrize("steps", [None, 3])
def test_grpc_predict_request(exported, steps):
    from tensorflow_serving.apis import predict_pb2

    d = exported["data"]["clf"]
    request = grpc_client.build_predict_request(
        "omniglot", d["support_x"], d["support_y"], d["query_x"], steps, version=1
    )
    # What the server receives: the serialized message.
    request = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert request.model_spec.name == "omniglot"
    assert request.model_spec.version.value == 1
    _check_tensor_protos(
        exported, "clf", request.model_spec.signature_name, dict(request.inputs), steps
    )


def test_grpc_client_without_serving_api():
    # The module imports without the package; using the stubs says what
    # to install.
    script = (
        "import sys, importlib.util\n"
        "sys.modules['tensorflow_serving'] = None\n"
        f"spec = importlib.util.spec_from_file_location('g', {os.path.join(SERVING_DIR, 'grpc_client.py')!r})\n"
        "g = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)\n"
        "g.build_adapt_inputs([[0.0]], [0], [[0.0]])\n"
        "try:\n"
        "    g.build_predict_request('m', [[0.0]], [0], [[0.0]])\n"
        "except ImportError as e:\n"
        "    sys.stdout.write(str(e))\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert "needs the `tensorflow-serving-api` package" in process.stdout
    assert "tensorflow-serving-api==2.21.*" in process.stdout


# ----------------------------------------------------------------------
# The serving guide's snippets (docs/serving.md), as written


def _serving_guide():
    with open(os.path.join(ROOT, "docs", "serving.md"), encoding="utf-8") as f:
        return f.read()


def test_serving_guide_rest_bodies_run_against_an_exported_sine_model(tmp_path):
    section = _serving_guide()
    bodies = [json.loads(b) for b in re.findall(r"curl -d '(.*?)'", section, re.S)]
    urls = re.findall(r"localhost:8501(/v1/models/[^:\s]+:predict)", section)
    assert len(bodies) == len(urls) == 2, (bodies, urls)
    # A model like `examples/sine_regression.py` exports (1 input, 1 output,
    # 32 evaluation steps, so the guide's `steps: 32` is within the default
    # bound of 10 x 32), served under the guide's URL.
    keras.utils.set_random_seed(3)
    net = keras.Sequential([keras.Input((1,)), keras.layers.Dense(8, activation="tanh"),
                            keras.layers.Dense(1)])
    model = ReptileModel(net, inner_optimizer=keras.optimizers.SGD(0.02),
                         eval_inner_steps=32)
    model.compile(loss="mse")
    loaded = tf.saved_model.load(model.export(tmp_path / "sine" / "1", verbose=False))
    for body, url in zip(bodies, urls):
        assert url == "/v1/models/sine:predict"
        signature = loaded.signatures[body["signature_name"]]
        outputs = signature(**_decode_like_tf_serving(signature, body["inputs"]))
        inputs = body["inputs"]
        if "support_x" in inputs:
            expected = model.adapt_and_predict(
                np.asarray(inputs["support_x"], "float32"),
                np.asarray(inputs["support_y"], "float32"),
                np.asarray(inputs["query_x"], "float32"), steps=inputs.get("steps"))
        else:
            expected = model.predict(np.asarray(inputs["x"], "float32"), verbose=0)
        np.testing.assert_allclose(outputs["outputs"].numpy(), expected, **TOL)


def test_serving_guide_python_signature_call_runs_as_written(exported):
    section = _serving_guide()
    call = re.search(r"`(tf\.saved_model\.load\(path\)\.signatures\[.*?\))`", section, re.S)
    assert call, "the serving guide's Python call is gone"
    # The guide elides the arguments' values with `...`: fill them in.
    source = " ".join(call.group(1).split())
    assert source == ('tf.saved_model.load(path).signatures["adapt_and_predict"]'
                      '(support_x=..., support_y=..., query_x=...)'), source
    d = exported["data"]["clf"]
    filled = source.replace("support_x=...", "support_x=tf.constant(d['support_x'])")
    filled = filled.replace("support_y=...", "support_y=tf.constant(d['support_y'])")
    filled = filled.replace("query_x=...", "query_x=tf.constant(d['query_x'])")
    outputs = eval(filled, {"tf": tf, "path": exported["dirs"]["clf"], "d": d})
    np.testing.assert_allclose(outputs["outputs"].numpy(), _expected(exported, "clf"), **TOL)
