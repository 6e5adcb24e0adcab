"""gRPC client for a `keras_reptile` model served by TF Serving.

Builds a `tensorflow.serving.PredictRequest` with the stubs of the
`tensorflow-serving-api` package (`pip install "tensorflow-serving-api==2.21.*"`,
the version matching your TensorFlow) and sends it to TF Serving's gRPC
port (8500 by default).

The exported SavedModel (`model.export(path)`) has the signatures
`serving_default` (`x`), `adapt_and_predict` (`support_x`, `support_y`,
`query_x`; `eval_inner_steps` adaptation steps) and
`adapt_and_predict_steps` (the same plus a scalar int32 `steps`). Over gRPC
the tensors' dtypes must match the signature exactly: float32 examples,
int32 class ids for a `SparseCategoricalCrossentropy` classifier, float32
targets otherwise (`support_y_dtype`), int32 `steps`.

Usage (with TF Serving running, e.g.
`docker run -p 8500:8500 -v "$PWD/saved_models/omniglot:/models/omniglot"
-e MODEL_NAME=omniglot tensorflow/serving`):

```shell
python examples/serving/grpc_client.py --model omniglot --episode episode.npz
```

where `episode.npz` holds `support_x`, `support_y` and `query_x` arrays.
"""

import argparse

import numpy as np
import tensorflow as tf

try:
    import grpc
    from tensorflow_serving.apis import predict_pb2
    from tensorflow_serving.apis import prediction_service_pb2_grpc
except ImportError as error:  # Only the request/stub parts need them.
    grpc = predict_pb2 = prediction_service_pb2_grpc = None
    _IMPORT_ERROR = error
else:
    _IMPORT_ERROR = None

SERVING_SIGNATURE = "serving_default"
ADAPT_SIGNATURE = "adapt_and_predict"
ADAPT_STEPS_SIGNATURE = "adapt_and_predict_steps"

# TF Serving accepts large messages; gRPC clients default to 4 MiB, less
# than a 1,000-image support set of 105x105 floats.
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def _class_ids_or_targets(support_y, dtype):
    """`support_y` as `dtype`; fractional values never become class ids.

    NumPy's cast to an integer dtype truncates (0.9 -> 0, 1.7 -> 1), which
    would merge classes without a word; TF Serving's REST API refuses such
    numbers for an integer input, and this client does too.
    """
    y = np.asarray(support_y)
    if np.issubdtype(np.dtype(dtype), np.integer) and not np.issubdtype(y.dtype, np.integer):
        numeric = y.dtype.kind in "fb" or y.dtype == object
        whole = numeric and np.all(np.isfinite(y.astype("float64"))) and np.array_equal(
            y.astype("float64"), np.round(y.astype("float64")))
        if not whole:
            raise ValueError(
                f"Expected `support_y` to hold whole-number class ids for "
                f"support_y_dtype={dtype!r}. Received: support_y of dtype {y.dtype} "
                f"with values {y.ravel()[:5].tolist()}{'...' if y.size > 5 else ''}"
            )
    return y.astype(dtype)


def build_adapt_inputs(
    support_x, support_y, query_x, steps=None, *, x_dtype="float32",
    support_y_dtype="int32",
):
    """Returns the signature name and input `TensorProto`s of a request.

    Needs only TensorFlow (no `tensorflow-serving-api`).

    Args:
        support_x: Support examples, array-like `[S, *input_shape]`.
        support_y: Support targets, array-like `[S, ...]`.
        query_x: Query examples, array-like `[Q, *input_shape]`.
        steps: Optional number of adaptation steps. `None` uses the model's
            `eval_inner_steps` (signature `adapt_and_predict`); an int uses
            `adapt_and_predict_steps`.
        x_dtype: The dtype of the signature's example inputs.
        support_y_dtype: `"int32"` for class ids
            (`SparseCategoricalCrossentropy`), `"float32"` for one-hot
            labels or regression targets.

    Returns:
        A tuple `(signature_name, inputs)`, `inputs` a dict of input name
        to `tensorflow.TensorProto`.
    """
    inputs = {
        "support_x": np.asarray(support_x, dtype=x_dtype),
        "support_y": _class_ids_or_targets(support_y, support_y_dtype),
        "query_x": np.asarray(query_x, dtype=x_dtype),
    }
    signature_name = ADAPT_SIGNATURE
    if steps is not None:
        if isinstance(steps, bool) or int(steps) != steps:
            raise ValueError(
                f"Expected `steps` to be an integer. Received: steps={steps!r}"
            )
        inputs["steps"] = np.asarray(steps, dtype="int32")  # a scalar
        signature_name = ADAPT_STEPS_SIGNATURE
    return signature_name, {k: tf.make_tensor_proto(v) for k, v in inputs.items()}


def build_predict_request(
    model_name, support_x, support_y, query_x, steps=None, *, version=None,
    x_dtype="float32", support_y_dtype="int32",
):
    """Returns a `PredictRequest` for `adapt_and_predict(_steps)`.

    Args:
        model_name: The served model's name (TF Serving's `MODEL_NAME`).
        support_x: Support examples, array-like `[S, *input_shape]`.
        support_y: Support targets, array-like `[S, ...]`.
        query_x: Query examples, array-like `[Q, *input_shape]`.
        steps: Optional number of adaptation steps (see
            `build_adapt_inputs`).
        version: Optional model version to address; the newest otherwise.
        x_dtype: The dtype of the signature's example inputs.
        support_y_dtype: `"int32"` for class ids, `"float32"` otherwise.

    Returns:
        A `tensorflow.serving.PredictRequest`.

    Raises:
        ImportError: If `tensorflow-serving-api` is not installed.
    """
    _require_serving_api()
    signature_name, inputs = build_adapt_inputs(
        support_x, support_y, query_x, steps, x_dtype=x_dtype,
        support_y_dtype=support_y_dtype,
    )
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, tensor in inputs.items():
        request.inputs[name].CopyFrom(tensor)
    return request


def predict(request, target="localhost:8500", timeout=60.0):
    """Sends a `PredictRequest` and returns the outputs as NumPy arrays.

    Args:
        request: A request from `build_predict_request`.
        target: TF Serving's gRPC address, `host:port`.
        timeout: Seconds to wait for the answer.

    Returns:
        A dict of output name (`"outputs"`, `"probabilities"`) to array.

    Raises:
        ImportError: If `tensorflow-serving-api` is not installed.
        grpc.RpcError: If TF Serving rejects the request; its `details()`
            hold the `InvalidArgumentError` message (e.g. a wrong shape).
    """
    _require_serving_api()
    options = [
        ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(request, timeout=timeout)
    return {k: tf.make_ndarray(v) for k, v in response.outputs.items()}


def _require_serving_api():
    if _IMPORT_ERROR is not None:
        raise ImportError(
            "The gRPC client needs the `tensorflow-serving-api` package, "
            "which provides the PredictionService stubs. Install the version "
            "matching your TensorFlow, e.g. "
            '`pip install "tensorflow-serving-api==2.21.*"`. '
            f"Import failed with: {_IMPORT_ERROR}"
        ) from _IMPORT_ERROR


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="omniglot", help="MODEL_NAME")
    parser.add_argument("--target", default="localhost:8500")
    parser.add_argument(
        "--episode", required=True,
        help=".npz file with support_x, support_y and query_x",
    )
    parser.add_argument(
        "--steps", type=int, default=None,
        help="adaptation steps (default: the model's eval_inner_steps)",
    )
    parser.add_argument(
        "--support-y-dtype", default="int32", choices=["int32", "float32"],
        help="int32 class ids (classifiers) or float32 targets (regression)",
    )
    args = parser.parse_args()
    with np.load(args.episode) as episode:
        request = build_predict_request(
            args.model, episode["support_x"], episode["support_y"],
            episode["query_x"], steps=args.steps,
            support_y_dtype=args.support_y_dtype,
        )
    outputs = predict(request, args.target)
    for name, value in outputs.items():
        print(f"{name}: shape {value.shape}")
    if "probabilities" in outputs:
        print("predicted classes:", outputs["probabilities"].argmax(-1).tolist())
    else:
        print("outputs:", outputs["outputs"].tolist())


if __name__ == "__main__":
    main()
