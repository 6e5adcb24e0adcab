"""Seeded per-drawing augmentation in the episode pipeline."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_reptile
from keras_reptile import augmentation
from keras_reptile.episodes import from_arrays


def _drawings(num_classes=6, per_class=4, size=16):
    # One distinct random stroke pattern per example, inside a margin so that
    # a shift of 2 pixels never pushes ink off the image.
    rng = np.random.default_rng(0)
    x = np.zeros((num_classes * per_class, size, size, 1), "float32")
    x[:, 3:-3, 3:-3, 0] = rng.random((len(x), size - 6, size - 6)) < 0.3
    return x, np.repeat(np.arange(num_classes), per_class)


def _episodes(augment=None, seed=0):
    x, y = _drawings()
    return from_arrays(x, y, ways=3, shots=2, query_shots=1, meta_batch_size=2,
                       seed=seed, augment=augment)


def _take(dataset, n):
    return [{k: v.numpy() for k, v in e.items()} for e in dataset.take(n)]


def _shifted(image, dy, dx):
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = image[
        max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def test_translation_shifts_each_drawing_by_whole_pixels_within_the_range():
    shift = keras.layers.RandomTranslation(
        2 / 16, 2 / 16, fill_mode="constant", fill_value=0.0, interpolation="nearest"
    )
    plain, shifted = _take(_episodes(), 3), _take(_episodes(shift), 3)
    moved = 0
    for a, b in zip(plain, shifted):
        # Sampling is untouched by augmentation: same classes, same labels.
        np.testing.assert_array_equal(a["support_y"], b["support_y"])
        np.testing.assert_array_equal(a["query_y"], b["query_y"])
        for key in ("support_x", "query_x"):
            for original, distorted in zip(a[key].reshape(-1, 16, 16, 1),
                                           b[key].reshape(-1, 16, 16, 1)):
                # Nearest-neighbour sampling of a translation by t pixels is
                # a shift by round(t), |t| <= 2: one of the 25 shifts must
                # reproduce the distorted drawing exactly.
                matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                           if np.array_equal(_shifted(original, dy, dx), distorted)]
                assert matches, "not a whole-pixel shift within 2 pixels"
                moved += (0, 0) not in matches
    # Every image draws its own shift: most of the 54 drawings moved.
    assert moved > 30


@pytest.mark.parametrize("rotations", [False, True])
@pytest.mark.parametrize("channels", [True, False])
def test_augment_per_class_shifts_all_drawings_of_a_class_alike(rotations, channels):
    shift = keras.layers.RandomTranslation(
        2 / 16, 2 / 16, fill_mode="constant", fill_value=0.0, interpolation="nearest"
    )
    x, y = _drawings()
    if not channels:
        x = x[..., 0]

    def episodes(**augment):
        return _take(from_arrays(x, y, ways=3, shots=2, query_shots=1, meta_batch_size=2,
                                 seed=0, rotations=rotations, **augment), 4)

    plain, per_class = episodes(), episodes(augment=shift, augment_per="class")
    shifts_seen = set()
    for a, b in zip(plain, per_class):
        # Sampling is untouched: same classes, same labels in the same order.
        for key in ("support_y", "query_y"):
            np.testing.assert_array_equal(a[key], b[key])
        for task in range(2):
            # Each class's support and query drawings, plain and distorted.
            for label in range(3):
                pairs = [
                    (o.reshape(16, 16, 1), d.reshape(16, 16, 1))
                    for part in ("support", "query")
                    for o, d, l in zip(a[f"{part}_x"][task], b[f"{part}_x"][task],
                                       a[f"{part}_y"][task])
                    if l == label
                ]
                assert len(pairs) == 3
                # The whole-pixel shifts (|shift| <= 2) that reproduce each
                # drawing: one shift must fit all three drawings of the class.
                common = set.intersection(*[
                    {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                     if np.array_equal(_shifted(o, dy, dx), d)}
                    for o, d in pairs
                ])
                assert len(common) == 1, common
                shifts_seen |= common
    # Classes draw their own shifts: 24 classes, 25 possible shifts.
    assert len(shifts_seen) > 5


def test_augment_per_class_is_seeded_and_differs_from_per_image():
    layers = augmentation.affine_distortions(image_size=16)
    x, y = _drawings()

    def episodes(augment_per, seed=0):
        return _take(from_arrays(x, y, ways=3, shots=2, meta_batch_size=2, seed=seed,
                                 augment=layers, augment_per=augment_per), 2)

    first, again = episodes("class"), episodes("class")
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(first[0]["support_x"], episodes("image")[0]["support_x"])
    assert not np.array_equal(first[0]["support_x"], episodes("class", 1)[0]["support_x"])


def test_episodes_are_a_pure_function_of_the_seed_and_the_episode_index():
    layers = augmentation.affine_distortions(image_size=16)
    first = _take(_episodes(layers), 4)
    # A new pipeline (as after a restart) and a skipped one (as `resumable()`
    # skips) give the same episodes at the same indices.
    again = _take(_episodes(augmentation.affine_distortions(image_size=16)), 4)
    skipped = _take(_episodes(layers).skip(3), 1)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    for key in first[3]:
        np.testing.assert_array_equal(first[3][key], skipped[0][key])
    other = _take(_episodes(layers, seed=1), 1)
    assert not np.array_equal(first[0]["support_x"], other[0]["support_x"])
    plain = _take(_episodes(), 1)
    assert not np.array_equal(first[0]["support_x"], plain[0]["support_x"])
    # Ink stays in [0, 1] and the background is filled with 0.
    assert first[0]["support_x"].min() >= 0.0 and first[0]["support_x"].max() <= 1.0


def test_affine_distortions_are_keras_layers_with_the_requested_ranges():
    layers = augmentation.affine_distortions(rotation=10, shear=0.3, zoom=0.2,
                                             translation=2, image_size=28)
    kinds = [type(layer) for layer in layers]
    assert kinds == [keras.layers.RandomRotation, keras.layers.RandomShear,
                     keras.layers.RandomZoom, keras.layers.RandomTranslation]
    assert layers[0].factor == pytest.approx((-10 / 360, 10 / 360))
    assert layers[3].height_factor == pytest.approx(2 / 28)
    assert [type(layer) for layer in augmentation.affine_distortions(
        rotation=0, shear=0, zoom=0.1, translation=0)] == [keras.layers.RandomZoom]


def test_omniglot_episodes_pass_augment_through():
    # 4 characters of 2 drawings each.
    images = np.zeros((4, 2, 28, 28, 1), "float32")
    images[:, :, 10:18, 12:16] = 1.0
    data = keras_reptile.datasets.Omniglot(images, ["a"] * 4, [f"c{i}" for i in range(4)])
    tasks = data.episodes(ways=2, shots=1, query_shots=1, seed=0,
                          augment=augmentation.affine_distortions())
    plain = data.episodes(ways=2, shots=1, query_shots=1, seed=0)
    per_class = data.episodes(ways=2, shots=1, query_shots=1, seed=0,
                              augment=augmentation.affine_distortions(),
                              augment_per="class")
    a, b, c = next(iter(tasks)), next(iter(plain)), next(iter(per_class))
    np.testing.assert_array_equal(a["support_y"], b["support_y"])
    np.testing.assert_array_equal(c["support_y"], b["support_y"])
    assert not np.array_equal(a["support_x"], b["support_x"])
    assert not np.array_equal(c["support_x"], b["support_x"])
    assert not np.array_equal(c["support_x"], a["support_x"])


def test_bad_augment_is_a_clear_error():
    x, y = _drawings()
    with pytest.raises(TypeError, match="Keras image preprocessing layer"):
        from_arrays(x, y, ways=3, shots=1, augment="rotate")
    with pytest.raises(TypeError, match="Keras image preprocessing layer"):
        from_arrays(x, y, ways=3, shots=1, augment=[keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="requires image features"):
        from_arrays(np.zeros((24, 5), "float32"), y, ways=3, shots=1,
                    augment=augmentation.affine_distortions())
    with pytest.raises(ValueError, match="Expected `shear` to be a non-negative number"):
        augmentation.affine_distortions(shear=-0.1)
    with pytest.raises(ValueError, match="Expected `augment_per` to be 'image' or 'class'. "
                       "Received: augment_per='task'"):
        from_arrays(x, y, ways=3, shots=1, augment=augmentation.affine_distortions(),
                    augment_per="task")
    with pytest.raises(ValueError, match="Expected `augment_per`"):
        keras_reptile.episodes.from_dataset(
            tf.data.Dataset.from_tensor_slices((x, y)), ways=3, shots=1, augment_per=None)
    with pytest.raises(ValueError, match="Expected `interpolation`"):
        augmentation.affine_distortions(interpolation="cubic")
