"""The draw-and-adapt browser demo in `examples/demo/`.

Two parts:

* `serve.py`'s REST handler, called directly and over HTTP, on a small
  classifier exported here: valid requests answer what
  `ReptileModel.adapt_and_predict` computes in-process, bad ones get HTTP
  400 with the reason; the served model runs in a process where Keras and
  `keras_reptile` cannot be imported.
* The page in headless Chromium (Debian's `/usr/bin/chromium` driven by
  Playwright; skipped, saying why, without them): strokes drawn with mouse
  events become the same 28x28 images as the Omniglot loader makes of them,
  with Omniglot's stroke width, and a person's three invented symbols
  (vertical bars, horizontal bars, circles; three examples each) are
  learned and a new horizontal bar is classified as one. An untrained
  network does not separate them reliably from three examples (its
  features are not shift-tolerant), so the browser test uses the shipped
  Omniglot model (`saved_models/omniglot`) when there is one, and otherwise
  one meta-trained here for a few hundred meta-steps on
  `../shared/data/omniglot` (skipped when that is absent too).
"""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import threading
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_reptile

# The module (the package's `omniglot` attribute is the loader function).
omniglot_lib = importlib.import_module("keras_reptile.datasets.omniglot")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(ROOT, "examples", "demo")
DATA_DIR = os.path.join(os.path.dirname(ROOT), "shared", "data", "omniglot")
SMALL1_ZIP = os.path.join(DATA_DIR, "images_background_small1.zip")
SHIPPED_MODEL = os.path.join(ROOT, "saved_models", "omniglot")
SHAPE = (28, 28, 1)
WAYS = 5
EVAL_STEPS = 3
MAX_SUPPORT = 12
TOL = dict(rtol=1e-5, atol=1e-5)
META_STEPS = 200  # for the browser test's model when none is shipped


def _load(name, filename):
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(DEMO_DIR, filename)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


serve = _load("demo_serve", "serve.py")
driver = _load("demo_screenshot", "screenshot.py")
rest_client = importlib.util.module_from_spec(
    importlib.util.spec_from_file_location(
        "demo_rest_client", os.path.join(ROOT, "examples", "serving", "rest_client.py")
    )
)
rest_client.__spec__.loader.exec_module(rest_client)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# ----------------------------------------------------------------------------
# The REST handler.


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small classifier over 28x28x1 images, its export and an episode."""
    keras.utils.set_random_seed(3)
    net = keras_reptile.models.conv4(SHAPE, num_classes=WAYS, filters=4, num_blocks=2)
    model = keras_reptile.ReptileModel(
        net,
        inner_optimizer=keras.optimizers.SGD(0.1),
        eval_inner_steps=EVAL_STEPS,
        eval_inner_batch_size=4,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(1.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.build((None,) + SHAPE)
    path = model.export(
        tmp_path_factory.mktemp("demo_export") / "tiny" / "1",
        verbose=False, max_support=MAX_SUPPORT,
    )
    rng = np.random.default_rng(0)
    episode = {
        "support_x": rng.uniform(size=(6,) + SHAPE).astype("float32"),
        "support_y": np.array([0, 1, 2, 0, 1, 2], "int32"),
        "query_x": rng.uniform(size=(4,) + SHAPE).astype("float32"),
    }
    expected = np.asarray(
        model.adapt_and_predict(
            episode["support_x"], episode["support_y"], episode["query_x"]
        )
    )
    return {"path": path, "episode": episode, "expected": expected}


@pytest.fixture(scope="module")
def served(tiny):
    # The parent of the version: the server picks the version and names
    # the model after the directory, as TF Serving does.
    return serve.AdaptingModel(os.path.dirname(tiny["path"]))


def _body(episode, signature="adapt_and_predict"):
    return {
        "signature_name": signature,
        "inputs": {k: np.asarray(v).tolist() for k, v in episode.items()},
    }


def _post(model, body, path="/v1/models/tiny:predict"):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode("utf-8")
    status, content_type, answer = serve.handle_request(model, "POST", path, raw)
    assert content_type == "application/json"
    return int(status), json.loads(answer)


def test_model_directory_resolution(tiny, served, tmp_path):
    assert served.name == "tiny" and served.version == 1
    assert served.path == tiny["path"] and served.num_classes == WAYS
    # A version directory given directly is named after its parent too.
    direct = serve.AdaptingModel(tiny["path"])
    assert direct.name == "tiny" and direct.version == 1
    shipped = tmp_path / "omniglot" / "saved_model"
    shipped.mkdir(parents=True)
    os.symlink(tiny["path"], shipped / "1")
    model = serve.AdaptingModel(tmp_path / "omniglot")
    assert (model.name, model.version) == ("omniglot", 1)
    with pytest.raises(FileNotFoundError, match=r"--model=.*does not exist.*examples/omniglot\.py"):
        serve.resolve_model_dir(tmp_path / "missing")
    (tmp_path / "empty" / "notaversion").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="holds neither"):
        serve.resolve_model_dir(tmp_path / "empty")
    # A saved Keras model: the error says how to export it.
    (tmp_path / "empty" / "model.keras").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as raised:
        serve.resolve_model_dir(tmp_path / "empty")
    assert str(raised.value).endswith(
        "It holds model.keras: export it once with `python -c \"import keras, "
        f"keras_reptile; keras.saving.load_model('{tmp_path / 'empty' / 'model.keras'}')"
        f".export('{tmp_path / 'empty' / '1'}')\"`."
    )
    # The highest numbered version is served.
    for version in ("2", "10"):
        (tmp_path / "versions" / version).mkdir(parents=True)
        (tmp_path / "versions" / version / "saved_model.pb").write_bytes(b"")
    (tmp_path / "versions" / "11").mkdir()  # no SavedModel in it
    assert serve.resolve_model_dir(tmp_path / "versions") == (
        str(tmp_path / "versions" / "10"), 10
    )
    # The shipped layout (keras_reptile.pretrained): saved_model/<version>/.
    shipped = tmp_path / "shipped" / "saved_model" / "3"
    shipped.mkdir(parents=True)
    (shipped / "saved_model.pb").write_bytes(b"")
    (tmp_path / "shipped" / "model.keras").write_bytes(b"")
    assert serve.resolve_model_dir(tmp_path / "shipped") == (str(shipped), 3)


def test_predict_answers_the_in_process_adaptation(tiny, served):
    status, answer = _post(served, _body(tiny["episode"]))
    assert status == 200, answer
    outputs = np.asarray(answer["outputs"]["outputs"], "float32")
    probabilities = np.asarray(answer["outputs"]["probabilities"], "float32")
    assert outputs.shape == probabilities.shape == (4, WAYS)
    # The signature returns logits (compiled from_logits=True) and their
    # softmax; both match the in-process adaptation.
    np.testing.assert_allclose(outputs, tiny["expected"], **TOL)
    np.testing.assert_allclose(_softmax(outputs), probabilities, **TOL)
    np.testing.assert_allclose(probabilities.sum(-1), np.ones(4), rtol=0, atol=1e-6)
    # The versioned path answers the same.
    status, again = _post(served, _body(tiny["episode"]), "/v1/models/tiny/versions/1:predict")
    assert status == 200 and again == answer


def test_predict_over_http_with_the_repositorys_rest_client(tiny, served):
    server = serve.make_server(served, port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        episode = tiny["episode"]
        request = rest_client.build_adapt_request(
            episode["support_x"], episode["support_y"], episode["query_x"]
        )
        outputs = rest_client.predict(
            request, rest_client.predict_url("tiny", host, port)
        )
        np.testing.assert_allclose(outputs["outputs"], tiny["expected"], **TOL)
        with pytest.raises(RuntimeError, match=r"\(400\).*max_support"):
            rest_client.predict(
                rest_client.build_adapt_request(
                    np.zeros((MAX_SUPPORT + 1,) + SHAPE), np.zeros(MAX_SUPPORT + 1),
                    episode["query_x"],
                ),
                rest_client.predict_url("tiny", host, port),
            )
    finally:
        server.shutdown()
        server.server_close()


def test_nan_input_is_a_400_naming_the_input(tiny, served):
    body = _body(tiny["episode"])
    body["inputs"]["query_x"][1][5][7][0] = float("nan")
    status, answer = _post(served, body)  # json.dumps writes NaN, as JS cannot
    assert status == 400
    assert answer["error"] == (
        "Expected `query_x` to hold only finite values. "
        "Received: query_x with 1 NaN or Inf values."
    )


def test_oversized_support_set_is_a_400(tiny, served):
    rows = MAX_SUPPORT + 1
    body = _body({
        "support_x": np.zeros((rows,) + SHAPE),
        "support_y": np.arange(rows) % 3,
        "query_x": tiny["episode"]["query_x"],
    })
    status, answer = _post(served, body)
    assert status == 400
    assert answer["error"] == (
        f"Expected `support_x` with at most {MAX_SUPPORT} rows (the "
        f"`max_support` of this export). Received: "
        f"support_x.shape=[{rows} 28 28 1]"
    )


def test_wrong_signature_name_is_a_400(tiny, served):
    status, answer = _post(served, _body(tiny["episode"], "adapt"))
    assert status == 400
    assert answer["error"] == (
        "Expected `signature_name` to be one of ['adapt_and_predict', "
        "'adapt_and_predict_steps', 'serving_default']. "
        "Received: signature_name='adapt'"
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda b: b["inputs"].pop("query_x"),
            "Expected `inputs` to be exactly ['query_x', 'support_x', "
            "'support_y'], the inputs of signature `adapt_and_predict`. "
            "Received: ['support_x', 'support_y'] (missing ['query_x'])",
        ),
        (
            lambda b: b["inputs"].update(steps=3),
            "Expected `inputs` to be exactly ['query_x', 'support_x', "
            "'support_y'], the inputs of signature `adapt_and_predict`. "
            "Received: ['query_x', 'steps', 'support_x', 'support_y'] "
            "(unknown ['steps'])",
        ),
        (
            lambda b: b["inputs"]["support_x"][0].pop(),
            "Expected `support_x` to be a number or nested lists of numbers "
            "with the same length at each depth (float32). Received: ragged "
            "lists",
        ),
        (
            lambda b: b["inputs"].update(support_y=[0, 1, 2.5, 0, 1, 2]),
            "Expected `support_y` to hold whole numbers (int32). Received: 2.5",
        ),
        (
            lambda b: b["inputs"].update(support_y=[0, 1, "2", 0, 1, 2]),
            "Expected `support_y` to be a number or nested lists of numbers "
            "(int32). Received: a value holding strings, booleans, objects or "
            "nulls",
        ),
        (
            lambda b: b["inputs"].update(support_y=[0, 1, 2**40, 0, 1, 2]),
            "Expected `support_y` to hold int32 values, in [-2147483648, "
            "2147483647]. Received: a value of 1099511627776",
        ),
        # The signature's own checks, passed on.
        (
            lambda b: b["inputs"].update(support_y=[0, 1, 7, 0, 1, 2]),
            "Expected `support_y` labels in [0, 4] (the model has 5 "
            "outputs). Received labels from 0 to 7.",
        ),
        (
            lambda b: b["inputs"].update(query_x=np.zeros((2, 28, 28, 2)).tolist()),
            "Expected `query_x` of shape [rows, 28, 28, 1]. Received: "
            "query_x.shape=[2 28 28 2]",
        ),
        (
            lambda b: b.update(instances=[{}]),
            "Expected the columnar format, `inputs`: this server does not "
            "take TF Serving's row format (`instances`), which needs every "
            "input to have the same number of rows, unlike a support and a "
            "query set.",
        ),
        (
            lambda b: b.pop("inputs"),
            "Expected the request to have `inputs`. Received keys: "
            "['signature_name']",
        ),
        (
            lambda b: b.update(extra=1),
            "Expected the request's keys to be `signature_name` and `inputs`. "
            "Received unknown keys: ['extra']",
        ),
    ],
)
def test_bad_requests_are_400s_with_the_reason(tiny, served, change, message):
    body = _body(tiny["episode"])
    change(body)
    status, answer = _post(served, body)
    assert status == 400
    assert answer["error"] == message


def test_error_messages_drop_tensorflows_framing():
    # The form of an op's error that is not one of the signature's
    # assertions (as a wrong-rank input can raise from a reduction).
    error = tf.errors.InvalidArgumentError(
        None, None,
        "Graph execution error:\n\nDetected at node Sum defined at (most "
        "recent call last):\n<stack traces unavailable>\nInvalid reduction "
        "dimension (3 for input with 3 dimension(s)\n\t [[{{node Sum}}]] "
        "[Op:__inference_signature_wrapper_adapt_and_predict_2728]",
    )
    assert serve._error_message(error) == (
        "Invalid reduction dimension (3 for input with 3 dimension(s)"
    )


def test_not_json_unknown_model_and_paths(served):
    status, answer = _post(served, b"{not json")
    assert status == 400 and answer["error"].startswith("Expected the request body to be JSON")
    status, answer = _post(served, [1, 2])
    assert status == 400 and "a JSON array" in answer["error"]
    status, answer = _post(served, {"inputs": {}}, "/v1/models/other:predict")
    assert status == 404 and "Received: other" in answer["error"]
    status, answer = _post(served, {"inputs": {}}, "/v1/models/tiny/versions/2:predict")
    assert status == 404 and "Expected version 1" in answer["error"]
    status, _, answer = serve.handle_request(served, "GET", "/v1/models/tiny:predict")
    assert int(status) == 405
    status, _, answer = serve.handle_request(served, "GET", "/nothing")
    assert int(status) == 404 and b"POST /v1/models/tiny:predict" in answer


def test_page_status_and_metadata(served):
    status, content_type, page = serve.handle_request(served, "GET", "/?server=x")
    assert int(status) == 200 and content_type.startswith("text/html")
    assert b'<meta name="model-name" content="tiny">' in page
    status, content_type, script = serve.handle_request(served, "GET", "/demo.js")
    assert int(status) == 200 and b"adapt_and_predict" in script
    status, _, answer = serve.handle_request(served, "GET", "/v1/models/tiny")
    assert json.loads(answer)["model_version_status"][0] == {
        "version": "1", "state": "AVAILABLE",
        "status": {"error_code": "OK", "error_message": ""},
    }
    status, _, answer = serve.handle_request(served, "GET", "/v1/models/tiny/metadata")
    metadata = json.loads(answer)
    assert metadata["model_spec"] == {"name": "tiny", "signature_name": "", "version": "1"}
    signatures = metadata["metadata"]["signature_def"]["signature_def"]
    assert sorted(signatures) == [
        "adapt_and_predict", "adapt_and_predict_steps", "serving_default"
    ]
    adapt = signatures["adapt_and_predict"]
    assert {k: v["dtype"] for k, v in adapt["inputs"].items()} == {
        "support_x": "DT_FLOAT", "support_y": "DT_INT32", "query_x": "DT_FLOAT"
    }
    # What the page reads for the number of classes (int64 as strings, as
    # protobuf's JSON and TF Serving write them).
    assert adapt["outputs"]["outputs"]["tensor_shape"]["dim"] == [
        {"size": "-1"}, {"size": str(WAYS)}
    ]


def test_server_runs_without_keras_or_keras_reptile(tiny):
    script = (
        "import importlib.util, json, sys\n"
        "for name in ('keras', 'keras_reptile', 'tf_keras'):\n"
        "    sys.modules[name] = None  # `import name` now raises ImportError\n"
        f"spec = importlib.util.spec_from_file_location('s', {os.path.join(DEMO_DIR, 'serve.py')!r})\n"
        "serve = importlib.util.module_from_spec(spec); spec.loader.exec_module(serve)\n"
        "model = serve.AdaptingModel(sys.argv[1])\n"
        "answer = model.predict(json.load(sys.stdin))\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('keras', 'keras_reptile', 'tf_keras') and sys.modules[m] is not None)\n"
        "assert not loaded, loaded\n"
        "json.dump(answer, sys.stdout)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, tiny["path"]],
        input=json.dumps(_body(tiny["episode"])), capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outputs = json.loads(result.stdout)["outputs"]["outputs"]
    np.testing.assert_allclose(outputs, tiny["expected"], **TOL)


def test_server_refuses_a_model_of_other_images(tmp_path):
    keras.utils.set_random_seed(0)
    net = keras_reptile.models.conv4((8, 8, 1), num_classes=3, filters=2, num_blocks=1)
    model = keras_reptile.ReptileModel(net, eval_inner_steps=1)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.build((None, 8, 8, 1))
    path = model.export(tmp_path / "small" / "1", verbose=False)
    with pytest.raises(ValueError, match=r"Expected a model of 28x28x1 images.*(\[8, 8, 1\]|8, 8, 1)"):
        serve.AdaptingModel(path)


# ----------------------------------------------------------------------------
# The page in a browser.


def _stroke_width(ink):
    """A stroke width estimate that does not depend on stroke direction:
    twice the median, over the ridge of the ink (local maxima of the
    distance to the background), of the distance to the background."""
    from scipy import ndimage
    ink = np.asarray(ink, bool)
    distance = ndimage.distance_transform_edt(ink)
    ridge = (distance == ndimage.maximum_filter(distance, size=3)) & ink
    return 2.0 * np.median(distance[ridge])


def _png(ink):
    """A 105x105 ink image as Omniglot stores it: black (0) ink on white."""
    pixels = (255 * (1 - np.asarray(ink, "uint8"))).astype("uint8")
    return tf.io.encode_png(pixels.reshape(105, 105, 1)).numpy()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the `playwright` package is not installed (`pip install -e .[test]`)",
    )
    if not os.access(driver.CHROMIUM, os.X_OK):
        pytest.skip(
            f"no Chromium at {driver.CHROMIUM}: `apt-get install -y chromium` "
            "(.ci/run does; Playwright drives Debian's build as it is)"
        )
    with sync_api.sync_playwright() as playwright:
        try:
            browser = driver.launch_browser(playwright)
        except sync_api.Error as error:  # e.g. a Chromium too old for Playwright
            pytest.skip(f"Playwright cannot launch {driver.CHROMIUM}: {error}")
        yield browser
        browser.close()


def _meta_train(export_path, cache_dir):
    """A conv4 meta-trained briefly on Omniglot small1 (the page's images).

    FOMAML with the prototype head: after 200 meta-steps its margin on the
    test symbol was 0.97-0.98 for seeds 0-2 (Reptile's was 0.4-1.0).
    """
    data = omniglot_lib.omniglot(DATA_DIR, splits=("small1",), cache_dir=cache_dir)
    keras.utils.set_random_seed(0)
    net = keras_reptile.models.conv4(SHAPE, num_classes=5, filters=16)
    model = keras_reptile.ReptileModel(
        net,
        algorithm="fomaml",
        head="prototype",
        inner_optimizer=keras.optimizers.Adam(1e-3, beta_1=0.0),
        inner_steps=5,
        inner_batch_size=10,
        eval_inner_steps=30,
        eval_inner_batch_size=10,
        carry_inner_optimizer_state=True,
    )
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.PolynomialDecay(1e-3, META_STEPS, 0.0)
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    tasks = data.episodes(
        ways=5, shots=5, query_shots=1, meta_batch_size=5, seed=0, rotations=True
    )
    model.fit(tasks, steps_per_epoch=META_STEPS, epochs=1, shuffle=False, verbose=0)
    return model.export(export_path, verbose=False)


@pytest.fixture(scope="module")
def omniglot_server(tmp_path_factory):
    try:
        model_dir, _ = serve.resolve_model_dir(SHIPPED_MODEL)
    except FileNotFoundError:
        if not os.path.isfile(SMALL1_ZIP):
            pytest.skip(
                f"needs the shipped model {SHIPPED_MODEL} or the Omniglot data "
                f"{SMALL1_ZIP} to meta-train one"
            )
        root = tmp_path_factory.mktemp("demo_omniglot")
        model_dir = _meta_train(root / "omniglot" / "1", root / "cache")
    process, url = driver.start_server(model_dir)
    yield url
    driver.stop_server(process)


@pytest.fixture
def page(browser, omniglot_server):
    page = driver.open_page(browser, omniglot_server)
    yield page
    page.close()


def test_drawn_symbols_are_learned_and_a_new_one_classified(page):
    driver.teach(page, driver.CLASSES)
    names = page.eval_on_selector_all(
        "#classes .class-row input", "inputs => inputs.map(i => i.value)"
    )
    assert names == [name for name, _ in driver.CLASSES]
    fit = driver.learn(page)
    labels = [c for c, (_, examples) in enumerate(driver.CLASSES) for _ in examples]
    # The request the page sent: TF Serving's body for the signature.
    request = page.evaluate("window.demo.state.lastRequest")
    assert request["signature_name"] == "adapt_and_predict"
    assert request["inputs"]["support_y"] == labels
    assert np.asarray(request["inputs"]["support_x"]).shape == (9, 28, 28, 1)
    assert np.argmax(fit["probabilities"], axis=1).tolist() == labels

    result = driver.classify(page, driver.TEST_SYMBOL)
    p = np.asarray(result["probabilities"])
    assert p.shape == (3,)
    np.testing.assert_allclose(p.sum(), 1.0, atol=1e-9)
    assert np.argmax(p) == driver.TEST_CLASS, p
    # Well clear of the runner-up (see `_meta_train` for the margins
    # measured), so the test does not rest on a coin flip.
    assert p[driver.TEST_CLASS] - np.sort(p)[-2] > 0.5, p

    # The page shows what it computed.
    bars = page.eval_on_selector_all(
        "#bars .bar-row",
        "rows => rows.map(r => [r.querySelector('.bar-name').textContent, "
        "Number(r.dataset.probability), r.classList.contains('top')])",
    )
    assert [b[0] for b in bars] == names
    np.testing.assert_allclose([b[1] for b in bars], p, rtol=0, atol=0)
    assert [b[2] for b in bars] == [c == driver.TEST_CLASS for c in range(3)]
    assert page.text_content("#prediction").startswith("Looks like Dash")
    request = page.evaluate("window.demo.state.lastRequest")
    assert len(request["inputs"]["query_x"]) == 1
    np.testing.assert_array_equal(
        np.asarray(request["inputs"]["query_x"]).reshape(-1), result["query"]
    )


def test_strokes_become_the_images_the_omniglot_loader_makes(page):
    drawn = driver.CLASSES[2][1][0] + driver.vertical_bar(30, 40, 70)
    driver.draw(page, drawn)
    ink, image = page.evaluate(
        "() => { const ink = demo.strokesToInk(demo.state.strokes); "
        "return [Array.from(ink), Array.from(demo.inkToImage(ink))]; }"
    )
    ink = np.asarray(ink).reshape(105, 105)
    assert set(np.unique(ink)) == {0, 1}
    # The loader's own path: PNG decoding, inversion, area resize.
    expected = omniglot_lib._decode_pngs([_png(ink)], 28)[0, ..., 0]
    np.testing.assert_allclose(np.asarray(image).reshape(28, 28), expected, rtol=0, atol=1e-6)
    assert expected.max() > 0.9 and (expected > 0).mean() > 0.1  # real strokes

    # The examples "Add example" stores are the same conversion.
    page.click("#add-example")
    stored = page.evaluate(
        "() => { const e = demo.state.classes[0].examples[0]; "
        "return [Array.from(e.ink), Array.from(e.image)]; }"
    )
    np.testing.assert_array_equal(np.asarray(stored[0]).reshape(105, 105), ink)
    np.testing.assert_array_equal(stored[1], image)

    # Real Omniglot drawings through the page's resize, against the loader.
    if not os.path.isfile(SMALL1_ZIP):
        return
    with zipfile.ZipFile(SMALL1_ZIP) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".png"))[::700]
        pngs = [archive.read(n) for n in names]
    expected = omniglot_lib._decode_pngs(pngs, 28)[..., 0]
    for png, want in zip(pngs, expected):
        pixels = tf.io.decode_png(png, channels=1).numpy()[..., 0]
        assert set(np.unique(pixels)) <= {0, 255}  # 1-bit drawings
        got = page.evaluate(
            "ink => Array.from(demo.inkToImage(ink))", (pixels == 0).astype(int).reshape(-1).tolist()
        )
        np.testing.assert_allclose(np.asarray(got).reshape(28, 28), want, rtol=0, atol=1e-6)


def test_strokes_are_as_wide_as_omniglots(page):
    widths = []
    for _, examples in driver.CLASSES:
        for strokes in examples:
            if page.is_enabled("#clear"):
                page.click("#clear")
            driver.draw(page, strokes)
            ink = page.evaluate("Array.from(demo.strokesToInk(demo.state.strokes))")
            widths.append(_stroke_width(np.asarray(ink).reshape(105, 105)))
    if os.path.isfile(SMALL1_ZIP):
        with zipfile.ZipFile(SMALL1_ZIP) as archive:
            names = sorted(n for n in archive.namelist() if n.endswith(".png"))[::9]
            reference = [
                _stroke_width(
                    tf.io.decode_png(archive.read(n), channels=1).numpy()[..., 0] == 0
                )
                for n in names
            ]
        low, high = np.percentile(reference, [5, 95])
    else:
        # The same measure on those 303 drawings of small1.
        low, high = np.sqrt(32.0), 6.0
    assert low <= np.median(widths) <= high, (widths, low, high)


def test_page_shows_the_servers_error(page):
    message = "Expected `support_x` with at most 4 rows (the `max_support` of this export)."
    page.route(
        "**/v1/models/*:predict",
        lambda route: route.fulfill(
            status=400, content_type="application/json",
            body=json.dumps({"error": message}),
        ),
    )
    driver.teach(page, driver.CLASSES[:2])
    with pytest.raises(RuntimeError, match="max_support"):
        driver.learn(page)
    status = page.text_content("#status")
    assert status == f"Could not learn: the server answered 400: {message}"
    # Still drawing examples: nothing was learned.
    assert page.is_visible("#add-example") and not page.is_visible("#classify")


def test_symbol_controls(page):
    rows = "#classes .class-row"
    assert page.locator(rows).count() == 2  # the fewest symbols
    assert page.is_disabled("#learn") and page.is_disabled("#remove-class")
    for _ in range(3):
        page.click("#add-class")
    assert page.locator(rows).count() == 5  # the most, for a 5-class model
    assert page.is_disabled("#add-class")
    # "− Symbol" removes the selected one (the last added).
    page.locator(rows).nth(4).locator("input").fill("Gone")
    page.click("#remove-class")
    names = page.eval_on_selector_all(f"{rows} input", "e => e.map(i => i.value)")
    assert names == ["Symbol 1", "Symbol 2", "Symbol 3", "Symbol 4"]
    for _ in range(2):
        page.click("#remove-class")
    assert page.is_disabled("#remove-class")
    # Learn waits for an example of every symbol; Enter adds the drawing.
    page.locator(rows).nth(0).locator(".swatch").click()
    driver.draw(page, driver.vertical_bar(50))
    page.keyboard.press("Enter")
    assert page.is_disabled("#learn")
    page.locator(rows).nth(1).locator(".swatch").click()
    for _ in range(6):
        driver.draw(page, driver.horizontal_bar(50))
        if page.is_enabled("#add-example"):
            page.click("#add-example")
        else:
            page.click("#clear")
    counts = page.evaluate("demo.state.classes.map(c => c.examples.length)")
    assert counts == [1, 5]  # at most five examples of a symbol
    # Removing an example and undoing a stroke.
    page.locator(rows).nth(1).locator(".thumb").nth(0).hover()
    page.locator(rows).nth(1).locator(".thumb .remove").nth(0).click()
    assert page.evaluate("demo.state.classes[1].examples.length") == 4
    driver.draw(page, driver.vertical_bar(40) + driver.vertical_bar(60))
    page.click("#undo")
    assert page.evaluate("demo.state.strokes.length") == 1
    page.click("#clear")
    # Learn, then Edit goes back to drawing examples with nothing learned.
    assert page.is_enabled("#learn")
    driver.learn(page)
    assert page.is_visible("#classify") and not page.is_visible("#add-example")
    page.click("#edit")
    assert page.is_visible("#add-example") and not page.is_visible("#classify")
    assert page.evaluate("demo.state.learned") is None
