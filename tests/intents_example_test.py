"""examples/intents.py: its baseline and out-of-scope measures, and the shipped intent model."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_reptile
from keras_reptile.evaluation import few_shot_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(REPO, "saved_models", "intents")
DATA = os.path.join(REPO, "..", "shared", "data", "clinc150")


@pytest.fixture
def intents(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "examples"))
    import intents

    return intents


@pytest.fixture
def rest_client(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(REPO, "examples", "serving"))
    import rest_client

    return rest_client


def test_auroc_and_recall_at_95_percent_on_hand_values(intents):
    # Pairs (in, out): 0.9 and 0.8 beat both out-of-scope scores, 0.7 beats
    # only 0.1: 5 of 6 pairs.
    assert intents.auroc(np.array([0.9, 0.8, 0.7]), np.array([0.75, 0.1])) == pytest.approx(5 / 6)
    # A tie counts one half.
    assert intents.auroc(np.array([0.5, 0.9]), np.array([0.5])) == pytest.approx(0.75)
    # In-scope scores 0.05, 0.10, ..., 1.00: the 5% quantile (linear) is at
    # position 0.05 * 19 = 0.95, i.e. 0.05 + 0.95 * 0.05 = 0.0975; out-of-scope
    # scores below it: 0.01 and 0.09, 2 of 4.
    inside = 0.05 * np.arange(1, 21)
    assert intents.oos_recall_at(inside, np.array([0.01, 0.09, 0.2, 0.5])) == 0.5


def test_baseline_is_cosine_to_each_class_mean(intents):
    # Vocabulary [UNK], a, b with IDF 1, 1, 2: "a" -> (0, 1, 0),
    # "b" -> (0, 0, 2), "a b" -> (0, 1, 2). Class 0's mean is "a"'s unit
    # vector, class 1's "b"'s; the query "a b" has cosines 1/sqrt(5) and
    # 2/sqrt(5) with them. The query "b" (second task, classes swapped):
    # cosines 1 with "b b"'s class (0) and 0 with "a"'s class (1).
    layer = keras.layers.TextVectorization(output_mode="tf_idf", vocabulary=["[UNK]", "a", "b"],
                                           idf_weights=[1.0, 1.0, 2.0])
    scores = intents.baseline_function([layer])(
        tf.constant([["a", "b"], ["b b", "a"]]), tf.constant([[0, 1], [0, 1]]),
        tf.constant([["a b"], ["b"]]), tf.constant(2)).numpy()
    np.testing.assert_allclose(scores, [[[1 / np.sqrt(5), 2 / np.sqrt(5)]], [[1.0, 0.0]]],
                               rtol=1e-6)
    # Two layers: each part of unit length, joined and scaled by 1/sqrt(2),
    # so the cosine of the means is taken on the joined vectors. With the
    # same layer twice, nothing changes.
    twice = intents.baseline_function([layer, layer])(
        tf.constant([["a", "b"]]), tf.constant([[0, 1]]), tf.constant([["a b"]]),
        tf.constant(2)).numpy()
    np.testing.assert_allclose(twice, scores[:1], rtol=1e-6)


def _card():
    path = os.path.join(SHIPPED, "card.json")
    if not os.path.isfile(path):
        pytest.fail(f"The shipped model's card {path} is missing: ship a model with "
                    "`python examples/intents.py --ship <examples/intents.py run dir>`.")
    with open(path) as f:
        return json.load(f)


def test_the_shipped_model_reaches_its_cards_accuracy_on_the_fixed_tasks(intents):
    check = _card()["check"]
    if not os.path.isfile(os.path.join(DATA, "data_full.json")):
        pytest.skip(f"CLINC150 is not in {DATA}")
    assert {k: check[k] for k in intents.CHECK} == intents.CHECK
    model = keras_reptile.pretrained.load("intents")
    accuracy = few_shot_accuracy(model, intents.check_tasks(DATA), check["tasks"],
                                 transductive=False)
    assert accuracy.num_tasks == check["tasks"]
    # The same tasks and weights: only floating-point differences between
    # machines may move it, by a few of the 2,500 queries (1% is 25).
    assert abs(accuracy.mean - check["accuracy"]) <= 0.01
    assert accuracy.mean > 2.0 / check["ways"]


def test_a_rest_request_of_plain_strings_adapts_the_shipped_saved_model(rest_client):
    _card()
    support_x = ["wake me up at 7 tomorrow", "set an alarm for 6 am",
                 "what is the weather like today", "will it rain this afternoon",
                 "play some jazz", "put on my workout playlist"]
    support_y = [0, 0, 1, 1, 2, 2]
    query_x = ["please set my alarm for noon", "what will the weather be like tomorrow",
               "play a song"]
    request = rest_client.build_adapt_request(support_x, support_y, query_x)
    body = json.loads(json.dumps(request))
    assert body["signature_name"] == "adapt_and_predict"
    assert body["inputs"]["support_x"] == support_x  # plain JSON strings
    assert body["inputs"]["query_x"] == query_x
    served = tf.saved_model.load(keras_reptile.pretrained.saved_model_path("intents"))
    signature = served.signatures["adapt_and_predict"]
    specs = signature.structured_input_signature[1]
    assert specs["support_x"].dtype == tf.string and specs["query_x"].dtype == tf.string
    assert specs["support_y"].dtype == tf.int32
    # As TF Serving decodes the JSON: strings to tf.string, numbers to int32.
    inputs = {name: tf.constant(np.asarray(value, dtype=specs[name].dtype.as_numpy_dtype))
              for name, value in body["inputs"].items()}
    probabilities = signature(**inputs)["probabilities"].numpy()
    assert probabilities.shape == (3, 20)
    # Only the task's three intents get probability (the prototype head).
    np.testing.assert_allclose(probabilities[:, :3].sum(-1), 1.0, atol=1e-5)
    model = keras_reptile.pretrained.load("intents")
    expected = tf.nn.softmax(model.adapt_and_predict(
        tf.constant(support_x), support_y, tf.constant(query_x)), -1).numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(probabilities.argmax(-1), [0, 1, 2])
