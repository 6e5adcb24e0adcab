"""REST client for a `keras_reptile` model served by TF Serving.

Builds the JSON body TF Serving's REST API accepts for
`POST /v1/models/<name>:predict` in its columnar ("inputs") format and
sends it with the standard library only (`urllib`): no TensorFlow needed
on the client.

The exported SavedModel (`model.export(path)`) has three signatures:

* `serving_default`: `x` -> `outputs` (and `probabilities`);
* `adapt_and_predict`: `support_x`, `support_y`, `query_x` -> the query
  outputs after `eval_inner_steps` adaptation steps;
* `adapt_and_predict_steps`: the same plus a scalar `steps`.

TF Serving rejects inputs a signature does not declare, so a request with
`steps` goes to `adapt_and_predict_steps`; `build_adapt_request` picks the
signature from whether `steps` is given.

Usage (with TF Serving running, e.g.
`docker run -p 8501:8501 -v "$PWD/saved_models/omniglot:/models/omniglot"
-e MODEL_NAME=omniglot tensorflow/serving`):

```shell
python examples/serving/rest_client.py --model omniglot --episode episode.npz
python examples/serving/rest_client.py --model omniglot --episode episode.npz \
    --steps 20
```

where `episode.npz` holds `support_x`, `support_y` and `query_x` arrays
(e.g. `np.savez("episode.npz", support_x=..., support_y=..., query_x=...)`).
"""

import argparse
import json
import urllib.error
import urllib.request

import numpy as np

SERVING_SIGNATURE = "serving_default"
ADAPT_SIGNATURE = "adapt_and_predict"
ADAPT_STEPS_SIGNATURE = "adapt_and_predict_steps"


def build_adapt_request(support_x, support_y, query_x, steps=None):
    """Returns the JSON-ready body of an adaptation request.

    Args:
        support_x: Support examples, array-like `[S, *input_shape]`.
        support_y: Support targets, array-like: int class ids `[S]` for a
            `SparseCategoricalCrossentropy` classifier, float `[S, ways]`
            one-hot labels for `CategoricalCrossentropy`, float
            `[S, *output_shape]` (or `[S]`) for regression.
        query_x: Query examples, array-like `[Q, *input_shape]`.
        steps: Optional number of adaptation steps. `None` uses the model's
            `eval_inner_steps` (signature `adapt_and_predict`); an int uses
            signature `adapt_and_predict_steps`.

    Returns:
        A dict `{"signature_name": ..., "inputs": {...}}` of plain Python
        lists and numbers, for `json.dumps`.
    """
    inputs = {
        "support_x": _float_list(support_x),
        # Left as given: ints for class ids, floats for regression targets.
        # TF Serving widens JSON integers to a float input but refuses any
        # number with a fraction or a decimal point (0.9, 1.0) for an integer
        # input, so fractional labels never become class ids.
        "support_y": np.asarray(support_y).tolist(),
        "query_x": _float_list(query_x),
    }
    if steps is None:
        return {"signature_name": ADAPT_SIGNATURE, "inputs": inputs}
    if isinstance(steps, bool) or int(steps) != steps:
        raise ValueError(
            f"Expected `steps` to be an integer. Received: steps={steps!r}"
        )
    inputs["steps"] = int(steps)  # a JSON number is a scalar tensor
    return {"signature_name": ADAPT_STEPS_SIGNATURE, "inputs": inputs}


def build_serving_request(x):
    """Returns the JSON-ready body of a request to `serving_default`.

    Args:
        x: Examples, array-like `[batch, *input_shape]`.

    Returns:
        A dict `{"signature_name": "serving_default", "inputs": {"x": ...}}`.
    """
    return {"signature_name": SERVING_SIGNATURE, "inputs": {"x": _float_list(x)}}


def predict_url(model_name, host="localhost", port=8501, version=None):
    """Returns the REST Predict URL of a served model (optionally a version)."""
    path = f"/v1/models/{model_name}"
    if version is not None:
        path += f"/versions/{int(version)}"
    return f"http://{host}:{port}{path}:predict"


def predict(request, url, timeout=60.0):
    """Sends a request body to TF Serving and returns its outputs.

    Args:
        request: A body from `build_adapt_request` or
            `build_serving_request`.
        url: The Predict URL, e.g. from `predict_url("omniglot")`.
        timeout: Seconds to wait for the answer.

    Returns:
        A dict of output name (`"outputs"`, `"probabilities"`) to NumPy
        float32 array.

    Raises:
        RuntimeError: With TF Serving's error message (e.g. an
            `InvalidArgumentError` about a wrong shape) when it rejects the
            request.
    """
    body = json.dumps(request).encode("utf-8")
    http_request = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(http_request, timeout=timeout) as response:
            result = json.load(response)
    except urllib.error.HTTPError as error:
        # TF Serving answers a bad request with {"error": "<message>"}.
        detail = error.read().decode("utf-8", "replace")
        try:
            detail = json.loads(detail).get("error", detail)
        except ValueError:
            pass
        raise RuntimeError(
            f"TF Serving rejected the request ({error.code}): {detail}"
        ) from None
    outputs = result["outputs"]
    if not isinstance(outputs, dict):
        # A signature with a single output answers with its value alone.
        outputs = {"outputs": outputs}
    return {k: np.asarray(v, dtype="float32") for k, v in outputs.items()}


def _float_list(x):
    array = np.asarray(x)
    if array.dtype.kind in "USO":
        # Raw text for a model that takes strings: JSON strings, which TF
        # Serving turns into a `tf.string` tensor.
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v)
                for v in array.ravel()] if array.ndim == 1 else array.astype(str).tolist()
    return array.astype("float32").tolist()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="omniglot", help="MODEL_NAME")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=8501)
    parser.add_argument(
        "--episode", required=True,
        help=".npz file with support_x, support_y and query_x",
    )
    parser.add_argument(
        "--steps", type=int, default=None,
        help="adaptation steps (default: the model's eval_inner_steps)",
    )
    args = parser.parse_args()
    with np.load(args.episode) as episode:
        request = build_adapt_request(
            episode["support_x"], episode["support_y"], episode["query_x"],
            steps=args.steps,
        )
    outputs = predict(request, predict_url(args.model, args.host, args.port))
    for name, value in outputs.items():
        print(f"{name}: shape {value.shape}")
    if "probabilities" in outputs:
        print("predicted classes:", outputs["probabilities"].argmax(-1).tolist())
    else:
        print("outputs:", outputs["outputs"].tolist())


if __name__ == "__main__":
    main()
