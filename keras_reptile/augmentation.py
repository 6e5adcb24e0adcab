"""Seeded per-drawing augmentation for episodic pipelines.

The episode builders (`keras_reptile.episodes.from_arrays(augment=...)`)
distort every support and query image of a training task with Keras's own
image preprocessing layers (`keras.layers.RandomRotation`,
`RandomTranslation`, `RandomZoom`, `RandomShear`, ...). A layer drawing
from its own seed generator would give other distortions whenever the
parallel `tf.data` map runs tasks in another order, and after a resume; here
each task's distortions are drawn from that task's own seed instead, so the
episodes stay a pure function of the dataset seed and the episode index.
"""

import keras
import tensorflow as tf

__all__ = ["affine_distortions"]


def affine_distortions(
    rotation=10.0,
    shear=0.3,
    zoom=0.2,
    translation=2,
    image_size=28,
    interpolation="bilinear",
):
    """Keras layers for the Siamese-network affine distortions of drawings.

    The defaults are the ranges of Koch, Zemel & Salakhutdinov (2015):
    rotation ±10°, shear ±0.3, scale 0.8–1.2, translation ±2 pixels. Areas
    that come into view are filled with 0 (Omniglot's background).

    Args:
        rotation: Largest rotation, degrees either way (0 disables it).
        shear: Largest shear factor either way, in x and y (0 disables it).
        zoom: Largest relative change of scale either way (0 disables it).
        translation: Largest shift in pixels either way, at `image_size`
            (0 disables it).
        image_size: Height and width of the images, to turn `translation`
            into a fraction of the image.
        interpolation: `"bilinear"` or `"nearest"`.

    Returns:
        A list of Keras image preprocessing layers, for the `augment`
        argument of `keras_reptile.episodes.from_arrays`.

    Example:

    >>> import numpy as np, keras_reptile
    >>> x = np.random.rand(40, 28, 28, 1).astype("float32")
    >>> y = np.repeat(np.arange(4), 10)
    >>> tasks = keras_reptile.episodes.from_arrays(
    ...     x, y, ways=2, shots=1, seed=0,
    ...     augment=affine_distortions(rotation=5, shear=0.1))
    >>> next(iter(tasks))["support_x"].shape
    TensorShape([1, 2, 28, 28, 1])
    """
    for name, value in (("rotation", rotation), ("shear", shear), ("zoom", zoom),
                        ("translation", translation)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(
                f"Expected `{name}` to be a non-negative number. Received: "
                f"{name}={value!r}"
            )
    if interpolation not in ("bilinear", "nearest"):
        raise ValueError(
            "Expected `interpolation` to be 'bilinear' or 'nearest'. "
            f"Received: interpolation={interpolation!r}"
        )
    fill = dict(fill_mode="constant", fill_value=0.0, interpolation=interpolation)
    layers = []
    if rotation:
        layers.append(keras.layers.RandomRotation(rotation / 360.0, **fill))
    if shear:
        layers.append(keras.layers.RandomShear(shear, shear, **fill))
    if zoom:
        layers.append(keras.layers.RandomZoom(zoom, **fill))
    if translation:
        shift = translation / image_size
        layers.append(keras.layers.RandomTranslation(shift, shift, **fill))
    return layers


def check(augment):
    """`augment` as a tuple of layers, or None; a clear error otherwise."""
    if augment is None:
        return None
    layers = tuple(augment) if isinstance(augment, (list, tuple)) else (augment,)
    for layer in layers:
        if not (
            callable(getattr(layer, "get_random_transformation", None))
            and callable(getattr(layer, "transform_images", None))
        ):
            raise TypeError(
                "Expected `augment` to be a Keras image preprocessing layer "
                "(e.g. `keras.layers.RandomRotation`) or a list of them. "
                f"Received: {layer!r} of type {type(layer).__name__}"
            )
    return layers


def check_per(augment_per):
    """`augment_per` checked: `"image"` or `"class"`."""
    if augment_per not in ("image", "class"):
        raise ValueError(
            "Expected `augment_per` to be 'image' or 'class'. "
            f"Received: augment_per={augment_per!r}"
        )
    return augment_per


def apply_per_class(layers, images, seed):
    """Distorts `images` ([classes, N, H, W(, C)]) with one draw per class.

    The N drawings of a class are stacked as channels of one image, so each
    layer draws one transformation per class and applies it to all of them
    alike (affine maps act on every channel the same way).
    """
    flat = images.shape.rank == 4
    if flat:
        images = images[..., None]
    classes, count, height, width, channels = tf.unstack(tf.shape(images))
    stacked = tf.reshape(
        tf.transpose(images, [0, 2, 3, 1, 4]), [classes, height, width, count * channels]
    )
    stacked = apply(layers, stacked, seed)
    images = tf.transpose(
        tf.reshape(stacked, [classes, height, width, count, channels]), [0, 3, 1, 2, 4]
    )
    return images[..., 0] if flat else images


def apply(layers, images, seed):
    """Distorts each image of `images` ([N, H, W] or [N, H, W, C]) from `seed`."""
    flat = images.shape.rank == 3
    if flat:
        images = images[..., None]
    for index, layer in enumerate(layers):
        draws = _SeedSequence(tf.random.experimental.stateless_fold_in(seed, index))
        transformation = layer.get_random_transformation(images, training=True, seed=draws)
        images = layer.transform_images(images, transformation, training=True)
    return images[..., 0] if flat else images


class _SeedSequence(keras.random.SeedGenerator):
    """Stateless seeds for one layer's draws: `seed` folded with 0, 1, 2, ...

    Keras's layers take their randomness from a `SeedGenerator`; this one
    has no variable, and its n-th draw depends only on `seed` and n, which
    is fixed when the pipeline is traced.
    """

    def __init__(self, seed):
        # No state variable: nothing to create inside a tf.data function.
        self._seed = tf.cast(seed, "int32")
        self._draws = 0

    def next(self, ordered=True):
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)
