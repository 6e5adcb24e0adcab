"""The prototype head: W and b from the support set, any ways, every path."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_reptile
from keras_reptile import ReptileModel
from keras_reptile import heads

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MODES = {
    "eager": dict(run_eagerly=True),
    "graph": dict(run_eagerly=False, jit_compile=False),
    "xla": dict(run_eagerly=False, jit_compile=True),
}


def _embedding_net():
    # Embedding e = x @ diag(1, 2); a 3-unit head on top.
    net = keras.Sequential([
        keras.Input((2,)),
        keras.layers.Dense(2, name="embed"),
        keras.layers.Dense(3, name="head"),
    ])
    net.get_layer("embed").set_weights([np.diag([1.0, 2.0]).astype("float32"), np.zeros(2, "float32")])
    return net


# Support: class 0 at x = (1, 0), (3, 0) -> embeddings (1, 0), (3, 0), so
# c_0 = (2, 0); class 1 at x = (0, 1) -> c_1 = (0, 2). Class 2 is absent.
# W = 2 c: columns (4, 0), (0, 4), (0, 0); b = -|c|^2: -4, -4, and the
# unused-class bias -1e4.
SUPPORT_X = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 1.0]], "float32")
SUPPORT_Y = np.array([0, 0, 1])
EXPECTED_W = np.array([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
EXPECTED_B = np.array([-4.0, -4.0, -1e4])


def _proto_model(algorithm="reptile", **kwargs):
    model = ReptileModel(
        _embedding_net(), inner_optimizer=keras.optimizers.SGD(0.0),
        inner_steps=1, inner_batch_size=3, eval_inner_steps=1,
        algorithm=algorithm, head="prototype", **kwargs,
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=SCCE, metrics=["accuracy"])
    return model


def test_head_weights_are_twice_the_prototypes_and_minus_their_squared_norms():
    model = _proto_model()
    before = [w.copy() for w in model.model.get_weights()]
    adapted = model.adapt(SUPPORT_X, SUPPORT_Y)
    kernel, bias = adapted.get_layer("head").get_weights()
    np.testing.assert_allclose(kernel, EXPECTED_W, rtol=1e-6)
    np.testing.assert_allclose(bias, EXPECTED_B, rtol=1e-6)
    # Logits for the query (2.1, 0): 4 * 2.1 - 4 = 4.4, then -4 and -1e4.
    outputs = model.adapt_and_predict(SUPPORT_X, SUPPORT_Y, np.array([[2.1, 0.0]]))
    np.testing.assert_allclose(outputs, [[4.4, -4.0, -1e4]], rtol=1e-5)
    # The meta-weights (the head included) are untouched by adaptation: equal
    # to a snapshot taken before, and the adapted copy is another network.
    for weight, snapshot in zip(model.model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(weight, snapshot)
    assert adapted is not model.model


def test_one_hot_labels_give_the_same_head():
    model = ReptileModel(
        _embedding_net(), inner_optimizer=keras.optimizers.SGD(0.0), inner_steps=1,
        eval_inner_steps=1, head="prototype",
    )
    model.compile(optimizer="sgd", loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    adapted = model.adapt(SUPPORT_X, np.eye(3, dtype="float32")[SUPPORT_Y])
    kernel, bias = adapted.get_layer("head").get_weights()
    np.testing.assert_allclose(kernel, EXPECTED_W, rtol=1e-6)
    np.testing.assert_allclose(bias, EXPECTED_B, rtol=1e-6)


def _templates(num_classes, per_class, seed):
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(num_classes, 8, 8, 1))
    y = np.repeat(np.arange(num_classes), per_class)
    x = protos[y] + 0.3 * rng.normal(size=(len(y), 8, 8, 1))
    return x.astype("float32"), y.astype("int32")


def _conv(num_classes=20, algorithm="reptile", head="prototype", **kwargs):
    keras.utils.set_random_seed(2)
    net = keras_reptile.models.conv4((8, 8, 1), num_classes=num_classes, filters=8, num_blocks=2)
    model = ReptileModel(
        net, inner_optimizer=keras.optimizers.Adam(0.01, beta_1=0.0), inner_steps=2,
        inner_batch_size=5, eval_inner_steps=3, algorithm=algorithm, head=head, **kwargs,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=SCCE, metrics=["accuracy"])
    return model


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("algorithm", ["reptile", "fomaml", "maml"])
def test_meta_trained_on_5_ways_adapts_to_20_ways(algorithm, mode):
    x, y = _templates(40, 4, seed=0)
    model = _conv(algorithm=algorithm)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=SCCE, metrics=["accuracy"],
                  **MODES[mode])
    five_way = keras_reptile.episodes.from_arrays(
        x[:80], y[:80], ways=5, shots=1, query_shots=1, meta_batch_size=2, seed=0)
    model.fit(five_way, steps_per_epoch=2, verbose=0)
    # 20-way 1-shot tasks on 20 other classes: well-separated templates, so
    # nearest-prototype classification is nearly perfect (chance is 5%).
    twenty_way = keras_reptile.episodes.from_arrays(
        x[80:], y[80:], ways=20, shots=1, query_shots=2, meta_batch_size=1, seed=1)
    _, accuracy = model.evaluate(twenty_way, steps=2, verbose=0)
    assert accuracy > 0.8
    predictions = model.predict(twenty_way, steps=1, verbose=0)
    assert predictions.shape == (1, 40, 20)


def test_more_ways_than_head_units_is_a_clear_error():
    model = _conv(num_classes=5)
    x, y = _templates(8, 2, seed=0)
    with pytest.raises(ValueError, match=r"Expected `support_y` labels in \[0, 4\]"):
        model.adapt(x, y)


def test_head_needs_a_final_dense_layer_and_a_classification_loss():
    conv = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(2, 3)])
    with pytest.raises(ValueError, match="whose output is that of its last layer"):
        ReptileModel(conv, head="prototype")
    relu_head = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="relu")])
    with pytest.raises(ValueError, match="linear or softmax activation"):
        ReptileModel(relu_head, head="prototype")
    with pytest.raises(ValueError, match='Expected `head` to be None, "prototype"'):
        ReptileModel(_embedding_net(), head="learned")
    model = ReptileModel(_embedding_net(), head="prototype")
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="Expected a classification loss"):
        model.adapt(SUPPORT_X, SUPPORT_Y)


def test_head_and_algorithm_survive_config_and_keras_file(tmp_path):
    model = _conv(algorithm="fomaml")
    x, y = _templates(10, 2, seed=3)
    model.fit(keras_reptile.episodes.from_arrays(
        x, y, ways=5, shots=1, query_shots=1, meta_batch_size=2, seed=0),
        steps_per_epoch=1, verbose=0)
    restored = ReptileModel.from_config(model.get_config())
    assert restored.head == heads.PrototypeHead()
    assert restored.algorithm == keras_reptile.algorithms.MAML(first_order=True)
    path = os.path.join(tmp_path, "proto.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert loaded.head == heads.PrototypeHead()
    assert loaded.algorithm == model.algorithm
    np.testing.assert_allclose(
        loaded.adapt_and_predict(x[:5], np.arange(5), x[5:8]),
        model.adapt_and_predict(x[:5], np.arange(5), x[5:8]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("algorithm", ["reptile", "maml"])
def test_exported_signature_uses_the_head(algorithm, tmp_path):
    model = _conv(algorithm=algorithm)
    x, y = _templates(20, 2, seed=4)
    path = model.export(os.path.join(tmp_path, "1"), verbose=False)
    served = tf.saved_model.load(path)
    support_x, support_y = x[::2][:20], y[::2][:20]
    outputs = served.adapt_and_predict(support_x, support_y.astype("int32"), x[1::2])
    np.testing.assert_allclose(
        outputs["outputs"].numpy(),
        model.adapt_and_predict(support_x, support_y, x[1::2]), rtol=1e-4, atol=1e-4)
    # 20 ways from one example each: the served graph classifies by prototype.
    accuracy = (outputs["outputs"].numpy().argmax(-1) == y[1::2]).mean()
    assert accuracy > 0.8


def test_a_sequential_built_again_still_has_its_head():
    # `build()` once more calls the layers again: the model's output is then
    # that of the head's second call. The head is still found, and sets the
    # same hand-derived weights as in the test above.
    net = _embedding_net()
    net.build((None, 2))
    model = ReptileModel(net, inner_optimizer=keras.optimizers.SGD(0.0), inner_steps=1,
                         inner_batch_size=3, eval_inner_steps=1, head="prototype")
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss=SCCE)
    kernel, bias = model.adapt(SUPPORT_X, SUPPORT_Y).get_layer("head").get_weights()
    np.testing.assert_allclose(kernel, EXPECTED_W, rtol=1e-6)
    np.testing.assert_allclose(bias, EXPECTED_B, rtol=1e-6)
