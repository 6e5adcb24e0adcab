"""Task data → parameters: heads set from a task's support set.

`PrototypeHead` sets the wrapped model's final `Dense` layer from the
support set before the inner loop starts: with c_k the mean, over the
support examples of class k, of the layer's input (the embedding),

    W_k = 2 c_k,    b_k = −‖c_k‖²,

so that the logit of class k is ‖e‖² − ‖e − c_k‖²: a nearest-prototype
classifier that the inner loop then fine-tunes (Proto-MAML, Triantafillou et
al., 2020, "Meta-Dataset"). The head's meta-weights are never used; the
embedding network is what meta-learning shapes, and gradients flow through
the mapping (for MAML and FOMAML).

Because the head is computed per task, the number of ways is no longer fixed
by meta-training: a model meta-trained on 5-way tasks adapts to 20-way tasks
when its `Dense` layer has at least 20 units. Units beyond a task's classes
get zero weights and a bias of `UNUSED_CLASS_BIAS`, so they take no
probability.
"""

import weakref

import keras
import tensorflow as tf

from keras_reptile import _compat
from keras_reptile import inner_loop

__all__ = ["PrototypeHead", "get"]

# A logit this low has a softmax probability of 0 in float32 next to any
# class at a realistic logit, while staying finite (no inf − inf in losses).
UNUSED_CLASS_BIAS = -1e4


@keras.saving.register_keras_serializable(package="keras_reptile")
class PrototypeHead:
    """Sets the final Dense layer from class-mean embeddings of the support set.

    Works with functional and Sequential models whose output is the output of
    a `Dense` layer with a linear or softmax activation and a bias, and with a
    classification loss (sparse or one-hot labels).

    Example:

    >>> import keras, numpy as np, keras_reptile
    >>> net = keras_reptile.models.conv4((28, 28, 1), num_classes=20, filters=8)
    >>> model = keras_reptile.ReptileModel(net, head="prototype")
    >>> model.head
    PrototypeHead()
    """

    def initial_weights(self, model, weights, state, support_x, labels):
        """Returns `weights` with the head set from the support set.

        Args:
            model: The wrapped (built) Keras model.
            weights: Tensors for `model.trainable_variables`.
            state: Tensors for `model.non_trainable_variables`.
            support_x: Support inputs `[S, *input_shape]`.
            labels: One-hot (or soft) labels `[S, units]`.

        Returns:
            The list of weights, the head's kernel and bias replaced.
        """
        dense, embed = _head_parts(model)
        # Training mode, as in the inner loop: BatchNormalization normalises
        # with the support set's statistics. The state update is discarded.
        embeddings, _ = inner_loop.stateless_call(
            model, weights, state, support_x, training=True, layer=embed
        )
        labels = tf.cast(labels, embeddings.dtype)
        counts = tf.reduce_sum(labels, axis=0)  # [units]
        present = counts > 0
        prototypes = tf.matmul(labels, embeddings, transpose_a=True) / tf.maximum(
            counts, 1e-12
        )[:, None]  # [units, D]
        kernel = tf.where(present[None, :], 2.0 * tf.transpose(prototypes), 0.0)
        bias = tf.where(
            present,
            -tf.reduce_sum(tf.square(prototypes), axis=1),
            tf.constant(UNUSED_CLASS_BIAS, embeddings.dtype),
        )
        weights = list(weights)
        variables = model.trainable_variables
        weights[_index(variables, dense.kernel)] = tf.ensure_shape(
            tf.cast(kernel, dense.kernel.dtype), dense.kernel.shape
        )
        weights[_index(variables, dense.bias)] = tf.ensure_shape(
            tf.cast(bias, dense.bias.dtype), dense.bias.shape
        )
        return weights

    def check_model(self, model):
        """Raises a clear error if `model` has no head this can set."""
        _head_parts(model)

    def units(self, model):
        return _head_parts(model)[0].units

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return "PrototypeHead()"

    def __eq__(self, other):
        return type(self) is type(other)

    def __hash__(self):
        return hash(type(self))


_BY_NAME = {"prototype": PrototypeHead}


def get(identifier):
    """Returns a head from None, `"prototype"`, a config dict or an instance."""
    if identifier is None or isinstance(identifier, PrototypeHead):
        return identifier
    if isinstance(identifier, str) and identifier.lower() in _BY_NAME:
        return _BY_NAME[identifier.lower()]()
    if isinstance(identifier, dict):
        head = keras.saving.deserialize_keras_object(identifier)
        if isinstance(head, PrototypeHead):
            return head
    raise ValueError(
        f'Expected `head` to be None, "prototype" or a '
        "`keras_reptile.heads.PrototypeHead`. Received: "
        f"head={identifier!r}"
    )


_PARTS = weakref.WeakKeyDictionary()


def _head_parts(model):
    """The final Dense layer and a model computing its input (cached)."""
    if model in _PARTS:
        return _PARTS[model]
    layers = getattr(model, "layers", None)
    dense = layers[-1] if layers else None
    outputs = getattr(model, "outputs", None) if model.built else None
    inputs = None
    if isinstance(dense, keras.layers.Dense) and outputs and len(outputs) == 1:
        # The call of the Dense layer that made the model's output: not
        # necessarily its first (`dense.output`) when the model was rebuilt.
        inputs = _compat.call_inputs(dense, outputs[0])
    if inputs is None or len(inputs) != 1:
        raise ValueError(
            "Expected a built functional or Sequential model whose output is "
            "that of its last layer, a `keras.layers.Dense`, for "
            '`head="prototype"`. Received: model '
            f"{model.name!r} with last layer "
            f"{type(dense).__name__ if dense is not None else None}."
        )
    (embedding,) = inputs
    if len(embedding.shape) != 2:
        raise ValueError(
            "Expected the final Dense layer to take one embedding vector per "
            'example for `head="prototype"`. Received: its input shape '
            f"{embedding.shape}"
        )
    activation = keras.activations.serialize(dense.activation)
    if isinstance(activation, dict):
        activation = activation.get("config", {}).get("name", activation)
    if activation not in ("linear", "softmax") or not dense.use_bias:
        raise ValueError(
            "Expected the final Dense layer to have a bias and a linear or "
            'softmax activation for `head="prototype"` (its outputs are '
            f"prototype logits). Received: activation={activation!r}, "
            f"use_bias={dense.use_bias}"
        )
    embed = keras.Model(model.inputs, embedding)
    _PARTS[model] = (dense, embed)
    return dense, embed


def _index(variables, variable):
    for i, v in enumerate(variables):
        if v is variable:
            return i
    raise ValueError(
        f"Expected the head variable {variable.path} to be trainable. Freeze "
        "other layers, not the final Dense layer, with a prototype head."
    )
