"""keras_reptile: Reptile meta-learning as a first-class Keras 3 model."""

from keras_reptile import algorithms
from keras_reptile import augmentation
from keras_reptile import batched_tasks
from keras_reptile import callbacks
from keras_reptile import datasets
from keras_reptile import episodes
from keras_reptile import evaluation
from keras_reptile import export
from keras_reptile import heads
from keras_reptile import inner_loop
from keras_reptile import models
from keras_reptile import pretrained
from keras_reptile.reptile_model import ReptileModel

__version__ = "0.1.0"

# `keras_reptile.tuning` needs the optional `keras-tuner` dependency
# (`pip install keras-reptile[tuning]`): import it explicitly.

__all__ = [
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
