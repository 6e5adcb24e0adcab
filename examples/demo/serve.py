"""Draw, adapt, classify: a browser demo of few-shot adaptation.

A person draws one to five examples of each of 2 to 5 symbols of their own
invention, presses "Learn", then draws a test symbol and sees the class
probabilities. The adaptation is done by the `adapt_and_predict` signature
of a SavedModel written by `keras_reptile.ReptileModel.export(...)`, loaded
here with plain `tf.saved_model.load`: this file never imports Keras or
`keras_reptile`, so the demo also shows that the served graph works alone.

    python examples/demo/serve.py --model saved_models/omniglot

then open http://127.0.0.1:8000/ . `--model` defaults to
`saved_models/omniglot` (the shipped Omniglot model, whose SavedModel is
in `saved_model/<version>/`); a directory of numbered TF Serving versions
serves the highest one. To make a model:
`python examples/omniglot.py --preset 5way1shot --meta-steps 2000
--export-dir saved_models/omniglot`.

Design (decided for issue #12): a plain page with a `<canvas>`
(`index.html`, `demo.js`) rather than Gradio, so nothing extra is installed,
served by the standard library's `http.server.ThreadingHTTPServer`, which
answers exactly the REST shape TF Serving uses:

* `GET /` and `GET /demo.js`: the page.
* `POST /v1/models/<name>:predict` (or `.../versions/<version>:predict`)
  with TF Serving's columnar body
  `{"signature_name": "adapt_and_predict", "inputs": {"support_x": ...,
  "support_y": ..., "query_x": ...}}` -> `{"outputs": {"outputs": ...,
  "probabilities": ...}}`. Any signature of the SavedModel can be called.
  A bad request gets HTTP 400 and `{"error": "<message>"}`, e.g. the
  signature's own `InvalidArgumentError` message for a NaN input or a
  support set over the export's `max_support`.
* `GET /v1/models/<name>` and `GET /v1/models/<name>/metadata`: TF
  Serving's model status and metadata (the page reads the number of output
  classes from the metadata's signature definitions).

So the page also works against a real TF Serving: open it with
`?server=http://host:8501&model=omniglot` (TF Serving sends no CORS
headers, so the page must then be served from the same origin as TF
Serving, e.g. behind one reverse proxy; that setup is the user's).

Images are prepared in the browser exactly as
`keras_reptile.datasets.omniglot` prepares Omniglot's drawings: strokes are
drawn on a 105x105 canvas (the size of Omniglot's drawings) with a stroke as
wide as Omniglot's, thresholded to 1-bit ink like Omniglot's PNGs, and
area-averaged (box filter) down to 28x28 with ink 1.0 on a 0.0 background.
"""

import argparse
import json
import os
import re
import sys
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer

import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import saved_model_pb2

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_MODEL = os.path.join(REPO, "saved_models", "omniglot")
ADAPT_SIGNATURE = "adapt_and_predict"
SERVING_SIGNATURE = "serving_default"
# What the page sends: Omniglot-sized images with one channel.
IMAGE_SHAPE = (28, 28, 1)
# Larger than any request the page makes (25 support images and one query
# are about 0.4 MB of JSON) and than a full `max_support` request of 1,000
# images, small enough that no request can exhaust the server's memory.
MAX_BODY_BYTES = 64 * 1024 * 1024
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/demo.js": ("demo.js", "text/javascript; charset=utf-8"),
}
EXPORT_HINT = (
    "Export one with `python examples/omniglot.py --preset 5way1shot "
    "--meta-steps 2000 --export-dir saved_models/my_omniglot` (or "
    "`model.export(path)` of any meta-trained `keras_reptile.ReptileModel` "
    "over 28x28x1 images) and pass its directory as --model."
)
_PREDICT_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?:predict$"
)
_MODEL_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?"
    r"(?P<metadata>/metadata)?$"
)
_ASSERTION = re.compile(r"assertion failed: \[(.*?)\]\s*(?:\n|\[\[|$)", re.S)


class RequestError(ValueError):
    """A request the server refuses, with its HTTP status (400 by default)."""

    def __init__(self, message, status=HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


def resolve_model_dir(path):
    """Returns the SavedModel directory to serve for `path`.

    Args:
        path: A SavedModel directory; a TF Serving model directory of
            numbered versions (`<path>/<version>/saved_model.pb`), of which
            the highest version is served; or a shipped model's directory
            (`<path>/saved_model/<version>/`, as `examples/ship_omniglot.py`
            writes `saved_models/omniglot/`).

    Returns:
        A tuple `(saved_model_dir, version)`, `version` an `int` (1 when
        `path` itself is a SavedModel not named by a number).

    Raises:
        FileNotFoundError: If `path` holds no SavedModel, with the command
            that exports one.
    """
    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        name = os.path.basename(path)
        return path, int(name) if name.isdigit() else 1
    shipped = os.path.join(path, "saved_model")
    if os.path.isdir(shipped) and not os.path.isfile(
        os.path.join(shipped, "saved_model.pb")
    ):
        # The layout of `keras_reptile.pretrained`: the model's `.keras`
        # file and card beside `saved_model/<version>/`.
        try:
            return resolve_model_dir(shipped)
        except FileNotFoundError:
            pass
    versions = []
    if os.path.isdir(path):
        versions = [
            int(entry)
            for entry in os.listdir(path)
            if entry.isdigit()
            and os.path.isfile(os.path.join(path, entry, "saved_model.pb"))
        ]
    if not versions:
        keras_files = sorted(
            entry for entry in (os.listdir(path) if os.path.isdir(path) else ())
            if entry.endswith(".keras")
        )
        if keras_files:
            # A saved Keras model needs Keras to run; the demo serves only
            # the exported graph, so it is exported once, here with Keras.
            source = os.path.join(path, keras_files[0])
            hint = (
                f"It holds {keras_files[0]}: export it once with `python -c "
                "\"import keras, keras_reptile; keras.saving.load_model("
                f"'{source}').export('{os.path.join(path, '1')}')\"`."
            )
        else:
            hint = EXPORT_HINT
        raise FileNotFoundError(
            "Expected `--model` to be a SavedModel directory (with a "
            "`saved_model.pb`) or a directory of numbered versions of one. "
            f"Received: --model={path}, which "
            + ("holds neither. " if os.path.isdir(path) else "does not exist. ")
            + hint
        )
    version = max(versions)
    return os.path.join(path, str(version)), version


class AdaptingModel:
    """A SavedModel from `ReptileModel.export`, called as TF Serving calls it.

    Args:
        path: A SavedModel directory, a directory of numbered versions or a
            shipped model's directory (see `resolve_model_dir`).
        name: The model name in request paths (`/v1/models/<name>:predict`);
            by default the model directory's name (that of the parent of a
            numbered version, and of a `saved_model` directory).

    Attributes:
        name: The model name.
        version: The served version number.
        path: The SavedModel directory.
        num_classes: The number of classes the model's outputs hold.

    Raises:
        FileNotFoundError: If `path` holds no SavedModel.
        ValueError: If the SavedModel lacks an `adapt_and_predict` signature
            with class probabilities, or does not take 28x28x1 images.
    """

    def __init__(self, path, name=None):
        self.path, self.version = resolve_model_dir(path)
        if name is None:
            # "omniglot" for saved_models/omniglot, .../omniglot/1 and
            # .../omniglot/saved_model/1 alike.
            base = os.path.abspath(path)
            if base == self.path and os.path.basename(base).isdigit():
                base = os.path.dirname(base)
            if os.path.basename(base) == "saved_model":
                base = os.path.dirname(base)
            name = os.path.basename(base)
        if not re.fullmatch(r"[^/:]+", name):
            raise ValueError(
                "Expected `name` to be a model name without '/' or ':'. "
                f"Received: name={name!r}"
            )
        self.name = name
        self._loaded = tf.saved_model.load(self.path)
        self._signatures = dict(self._loaded.signatures)
        self._signature_defs = _read_signature_defs(self.path)
        adapt = self._signatures.get(ADAPT_SIGNATURE)
        if adapt is None or "probabilities" not in adapt.structured_outputs:
            raise ValueError(
                f"Expected a SavedModel with an `{ADAPT_SIGNATURE}` signature "
                "that returns class `probabilities` (a classifier exported "
                "by `ReptileModel.export`). Received: signatures "
                f"{sorted(self._signatures)} in {self.path}. {EXPORT_HINT}"
            )
        self.num_classes = int(adapt.structured_outputs["outputs"].shape[-1])
        # One cheap call checks the image shape before the page is shown
        # (the signature names the shape it expects when it differs).
        try:
            self._signatures[SERVING_SIGNATURE](
                x=tf.zeros((1,) + IMAGE_SHAPE, tf.float32)
            )
        except tf.errors.InvalidArgumentError as error:
            raise ValueError(
                "Expected a model of 28x28x1 images, the size the page "
                f"draws. Received: {self.path}, which answers "
                f"{_error_message(error)}"
            ) from None

    def input_dtypes(self, signature_name):
        """Returns `{input name: tf.DType}` of a signature."""
        _, specs = self._signatures[signature_name].structured_input_signature
        return {name: spec.dtype for name, spec in specs.items()}

    def predict(self, body):
        """Answers a TF Serving REST Predict body.

        Args:
            body: The decoded JSON request, a dict with `"inputs"` (TF
                Serving's columnar format: a dict of input name to nested
                lists, or a bare value for a signature of one input) and
                optionally `"signature_name"` (default `serving_default`).

        Returns:
            The JSON-ready answer `{"outputs": {name: nested lists}}` (the
            value alone for a signature with a single output), as TF
            Serving answers columnar requests.

        Raises:
            RequestError: For a malformed request, an unknown signature or
                input, or a request the signature rejects (its
                `InvalidArgumentError` message).
        """
        if not isinstance(body, dict):
            raise RequestError(
                "Expected the request body to be a JSON object. Received: "
                f"a JSON {_json_type(body)}"
            )
        unknown = sorted(set(body) - {"signature_name", "inputs", "instances"})
        if unknown:
            raise RequestError(
                "Expected the request's keys to be `signature_name` and "
                f"`inputs`. Received unknown keys: {unknown}"
            )
        signature_name = body.get("signature_name", SERVING_SIGNATURE)
        if signature_name not in self._signatures:
            raise RequestError(
                "Expected `signature_name` to be one of "
                f"{sorted(self._signatures)}. "
                f"Received: signature_name={signature_name!r}"
            )
        if "instances" in body:
            raise RequestError(
                "Expected the columnar format, `inputs`: this server does not "
                "take TF Serving's row format (`instances`), which needs every "
                "input to have the same number of rows, unlike a support and "
                "a query set."
            )
        if "inputs" not in body:
            raise RequestError(
                "Expected the request to have `inputs`. Received keys: "
                f"{sorted(body)}"
            )
        dtypes = self.input_dtypes(signature_name)
        inputs = body["inputs"]
        if not isinstance(inputs, dict):
            if len(dtypes) != 1:
                raise RequestError(
                    f"Expected `inputs` to be an object with the inputs "
                    f"{sorted(dtypes)} of signature `{signature_name}`. "
                    f"Received: a JSON {_json_type(inputs)}"
                )
            inputs = {next(iter(dtypes)): inputs}
        missing = sorted(set(dtypes) - set(inputs))
        extra = sorted(set(inputs) - set(dtypes))
        if missing or extra:
            raise RequestError(
                f"Expected `inputs` to be exactly {sorted(dtypes)}, the inputs "
                f"of signature `{signature_name}`. Received: {sorted(inputs)}"
                + (f" (missing {missing})" if missing else "")
                + (f" (unknown {extra})" if extra else "")
            )
        tensors = {
            name: _to_tensor(name, inputs[name], dtypes[name]) for name in dtypes
        }
        try:
            outputs = self._signatures[signature_name](**tensors)
        except tf.errors.InvalidArgumentError as error:
            raise RequestError(_error_message(error)) from None
        outputs = {k: v.numpy().tolist() for k, v in outputs.items()}
        if len(outputs) == 1:
            return {"outputs": next(iter(outputs.values()))}
        return {"outputs": outputs}

    def status(self):
        """Returns TF Serving's `GET /v1/models/<name>` answer."""
        return {
            "model_version_status": [
                {
                    "version": str(self.version),
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        }

    def metadata(self):
        """Returns TF Serving's `GET /v1/models/<name>/metadata` answer."""
        return {
            "model_spec": {
                "name": self.name,
                "signature_name": "",
                "version": str(self.version),
            },
            "metadata": {"signature_def": {"signature_def": self._signature_defs}},
        }


def handle_request(model, method, path, body=b""):
    """Answers one HTTP request: the page, or TF Serving's REST API.

    Kept apart from the socket handling so that it can be tested directly.

    Args:
        model: The `AdaptingModel` to serve.
        method: `"GET"` or `"POST"`.
        path: The request path, possibly with a query string.
        body: The request body, `bytes`.

    Returns:
        A tuple `(status, content_type, body_bytes)`.
    """
    path = path.split("?", 1)[0].split("#", 1)[0]
    try:
        if method == "GET" and path in STATIC_FILES:
            return _static(model, path)
        predict = _PREDICT_PATH.match(path)
        if predict:
            if method != "POST":
                raise RequestError(
                    f"Expected a POST request to {path}. Received: {method}",
                    HTTPStatus.METHOD_NOT_ALLOWED,
                )
            _check_model(model, predict)
            return _json(HTTPStatus.OK, model.predict(_decode_json(body)))
        info = _MODEL_PATH.match(path)
        if info and method == "GET":
            _check_model(model, info)
            return _json(
                HTTPStatus.OK,
                model.metadata() if info.group("metadata") else model.status(),
            )
        raise RequestError(
            f"Expected one of `GET /`, `POST /v1/models/{model.name}:predict`, "
            f"`GET /v1/models/{model.name}[/metadata]`. "
            f"Received: {method} {path}",
            HTTPStatus.NOT_FOUND,
        )
    except RequestError as error:
        return _json(error.status, {"error": str(error)})
    except tf.errors.OpError as error:
        # Not the request's fault as far as the signature can tell (e.g.
        # out of memory): TF Serving answers these with a 5xx too.
        return _json(
            HTTPStatus.INTERNAL_SERVER_ERROR,
            {"error": f"{type(error).__name__}: {_error_message(error)}"},
        )


class DemoRequestHandler(BaseHTTPRequestHandler):
    """Serves `handle_request` over HTTP; `server.model` is the model."""

    server_version = "keras-reptile-demo"
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 (the http.server naming)
        self._answer(handle_request(self.server.model, "GET", self.path))

    def do_POST(self):  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            self._answer(_json(HTTPStatus.LENGTH_REQUIRED, {
                "error": "Expected a `Content-Length` header with the body size."
            }))
            return
        if length > MAX_BODY_BYTES:
            # The body is not read: the connection closes after the answer.
            self.close_connection = True
            self._answer(_json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {
                "error": f"Expected a request body of at most {MAX_BODY_BYTES} "
                f"bytes. Received: Content-Length={length}"
            }))
            return
        body = self.rfile.read(length)
        self._answer(handle_request(self.server.model, "POST", self.path, body))

    def _answer(self, answer):
        status, content_type, body = answer
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 (the base's name)
        if not self.server.quiet:
            super().log_message(format, *args)


def make_server(model, host="127.0.0.1", port=8000, quiet=False):
    """Returns a `ThreadingHTTPServer` serving `model` (not yet started).

    Args:
        model: An `AdaptingModel`.
        host: The address to listen on.
        port: The port; 0 picks a free one (see `server.server_address`).
        quiet: Whether to skip logging each request to stderr.
    """
    server = ThreadingHTTPServer((host, port), DemoRequestHandler)
    server.daemon_threads = True
    server.model = model
    server.quiet = quiet
    return server


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", default=DEFAULT_MODEL,
        help="SavedModel from ReptileModel.export, or a directory of "
        "numbered versions of one (the highest is served)",
    )
    parser.add_argument(
        "--name", default=None,
        help="model name in /v1/models/<name>:predict; None: the model "
        "directory's name",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: a free port")
    parser.add_argument("--quiet", action="store_true", help="no request log")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        model = AdaptingModel(args.model, name=args.name)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"error: {error}\n")
    server = make_server(model, args.host, args.port, quiet=args.quiet)
    host, port = server.server_address[:2]
    print(
        f"Serving {model.path} as model '{model.name}' (version "
        f"{model.version}, {model.num_classes} output classes), loaded in "
        f"{time.monotonic() - started:.1f} s.\n"
        f"Open http://{host}:{port}/ in a browser (Ctrl-C stops).",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _static(model, path):
    filename, content_type = STATIC_FILES[path]
    with open(os.path.join(HERE, filename), "rb") as f:
        body = f.read()
    if filename == "index.html":
        # The page calls this server's model unless `?model=` says otherwise.
        body = body.replace(
            b'<meta name="model-name" content="omniglot">',
            b'<meta name="model-name" content="'
            + _html_attribute(model.name).encode("utf-8") + b'">',
        )
    return HTTPStatus.OK, content_type, body


def _html_attribute(text):
    return (
        text.replace("&", "&amp;").replace('"', "&quot;")
        .replace("<", "&lt;").replace(">", "&gt;")
    )


def _check_model(model, match):
    if match.group("name") != model.name:
        raise RequestError(
            f"Expected the model name `{model.name}`, the only model this "
            f"server has. Received: {match.group('name')}",
            HTTPStatus.NOT_FOUND,
        )
    version = match.group("version")
    if version is not None and int(version) != model.version:
        raise RequestError(
            f"Expected version {model.version} of `{model.name}`, the only "
            f"version this server has. Received: {version}",
            HTTPStatus.NOT_FOUND,
        )


def _decode_json(body):
    try:
        # NaN and Infinity are accepted, as by TF Serving, so that the
        # signature's own finiteness check answers for them.
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise RequestError(
            f"Expected the request body to be JSON. Received: {error}"
        ) from None


def _to_tensor(name, value, dtype):
    """Converts one JSON input to the signature's dtype, as TF Serving does."""
    if isinstance(value, str) or _holds(value, (str, bool, dict, type(None))):
        raise RequestError(
            f"Expected `{name}` to be a number or nested lists of numbers "
            f"({dtype.name}). Received: a value holding strings, booleans, "
            "objects or nulls"
        )
    try:
        array = np.asarray(value, dtype="float64")
    except ValueError:
        raise RequestError(
            f"Expected `{name}` to be a number or nested lists of numbers "
            f"with the same length at each depth ({dtype.name}). Received: "
            "ragged lists"
        ) from None
    if dtype.is_integer:
        finite = array[np.isfinite(array)]
        if finite.size != array.size or np.any(finite != np.round(finite)):
            raise RequestError(
                f"Expected `{name}` to hold whole numbers ({dtype.name}). "
                f"Received: {_first_non_integer(array)}"
            )
        if array.size and (
            array.min() < dtype.min or array.max() > dtype.max
        ):
            raise RequestError(
                f"Expected `{name}` to hold {dtype.name} values, in "
                f"[{dtype.min}, {dtype.max}]. Received: a value of "
                f"{array.min() if array.min() < dtype.min else array.max():.0f}"
            )
    return tf.constant(array.astype(dtype.as_numpy_dtype))


def _holds(value, types):
    if isinstance(value, list):
        return any(_holds(v, types) for v in value)
    return isinstance(value, types)


def _first_non_integer(array):
    flat = array.reshape(-1)
    # Only called when there is one.
    bad = flat[~np.isfinite(flat) | (flat != np.round(flat))]
    return repr(float(bad[0]))


def _error_message(error):
    """The readable part of a signature's `InvalidArgumentError`."""
    message = error.message
    found = _ASSERTION.findall(message)
    if found:
        # The graph's assertion text, e.g. "Expected `support_x` with at
        # most 30 rows (the `max_support` of this export). Received: ...".
        return " ".join(m.strip() for m in found)
    # Another op's error: its own line, without TensorFlow's framing
    # ("Graph execution error:", "Detected at node ...", "[[{{node ...}}]]").
    lines = [
        line.strip()
        for line in message.splitlines()
        if line.strip()
        and not line.strip().startswith(
            ("Graph execution error", "Detected at node", "<stack traces", "[[")
        )
    ]
    return " ".join(lines) or repr(error)


def _read_signature_defs(path):
    """The SignatureDefs as TF Serving's metadata JSON spells them."""
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    signature_defs = proto.meta_graphs[0].signature_def
    return {
        name: json_format.MessageToDict(
            signature_defs[name], preserving_proto_field_name=True
        )
        for name in signature_defs
        if not name.startswith("__")
    }


def _json_type(value):
    return {
        dict: "object", list: "array", str: "string", bool: "boolean",
        type(None): "null",
    }.get(type(value), "number")


def _json(status, payload):
    body = json.dumps(payload, allow_nan=True).encode("utf-8")
    return status, "application/json", body


if __name__ == "__main__":
    sys.exit(main())
