"""Few-shot data sets: Omniglot, CLINC150 intents and the sine-wave task family."""

from keras_reptile.datasets.clinc150 import Clinc150
from keras_reptile.datasets.clinc150 import clinc150
from keras_reptile.datasets.clinc150 import string_episodes
from keras_reptile.datasets.omniglot import Omniglot
from keras_reptile.datasets.omniglot import OmniglotDownloadError
from keras_reptile.datasets.omniglot import omniglot
from keras_reptile.datasets.sine import sine
from keras_reptile.datasets.sine import sine_function

__all__ = [
    "Clinc150",
    "clinc150",
    "Omniglot",
    "OmniglotDownloadError",
    "omniglot",
    "sine",
    "sine_function",
    "string_episodes",
]
