"""The public API is exactly what `__all__` lists."""

import keras

import keras_reptile


def test_public_api_is_listed_explicitly():
    assert sorted(keras_reptile.__all__) == [
        "ReptileModel",
        "algorithms",
        "augmentation",
        "batched_tasks",
        "callbacks",
        "datasets",
        "episodes",
        "evaluation",
        "export",
        "heads",
        "inner_loop",
        "models",
        "pretrained",
    ]
    for name in keras_reptile.__all__:
        assert getattr(keras_reptile, name) is not None
    public = {n for n in dir(keras_reptile) if not n.startswith("_")}
    # Submodules Python binds on import: the model's own module,
    # `image_folders` (behind `episodes.from_directory`), and `tuning`, which
    # is imported explicitly (optional dependencies).
    assert public - {"reptile_model", "image_folders", "tuning"} <= set(
        keras_reptile.__all__
    )


def test_submodule_apis():
    assert sorted(keras_reptile.episodes.__all__) == [
        "from_arrays", "from_dataset", "from_directory", "from_task_fn",
    ]
    assert sorted(keras_reptile.algorithms.__all__) == [
        "ANIL", "Adaptation", "MAML", "MetaAlgorithm", "MetaSGD", "Reptile", "TaskResult",
        "get", "names",
    ]
    assert sorted(keras_reptile.heads.__all__) == ["PrototypeHead", "get"]
    assert keras_reptile.augmentation.__all__ == ["affine_distortions"]
    assert sorted(keras_reptile.batched_tasks.__all__) == [
        "adapt", "grouped_convolutions_work", "unsupported_reason",
    ]
    assert sorted(keras_reptile.pretrained.__all__) == ["NAMES", "load", "saved_model_path"]
    assert sorted(keras_reptile.datasets.__all__) == [
        "Clinc150", "Omniglot", "OmniglotDownloadError", "clinc150", "omniglot", "sine",
        "sine_function", "string_episodes",
    ]


def test_public_classes_are_registered_for_serialization():
    for cls in (
        keras_reptile.ReptileModel,
        keras_reptile.algorithms.Reptile,
        keras_reptile.algorithms.MAML,
        keras_reptile.algorithms.ANIL,
        keras_reptile.algorithms.MetaSGD,
        keras_reptile.heads.PrototypeHead,
    ):
        name = keras.saving.get_registered_name(cls)
        assert name == f"keras_reptile>{cls.__name__}"
        assert keras.saving.get_registered_object(name) is cls
