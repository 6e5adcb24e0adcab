"""`_settings`: properties that refuse assignment or check the value."""

import pytest

from keras_reptile import _settings
from keras_reptile._validation import check_positive_int


class _Holder:
    steps = _settings.checked_setting("steps", check_positive_int)
    algorithm = _settings.fixed_at_construction("algorithm")

    def __init__(self):
        self._algorithm = "reptile"
        self.steps = 3


def test_a_fixed_setting_is_read_but_never_assigned():
    holder = _Holder()
    assert holder.algorithm == "reptile"
    with pytest.raises(AttributeError, match=(
            "`algorithm` is fixed at construction.*Build a new `_Holder` with "
            "algorithm='maml' instead")):
        holder.algorithm = "maml"
    assert holder.algorithm == "reptile"


def test_a_checked_setting_stores_only_checked_values():
    holder = _Holder()
    holder.steps = 7
    assert holder.steps == 7 and holder._steps == 7
    with pytest.raises(ValueError, match="Received: steps=0"):
        holder.steps = 0
    assert holder.steps == 7
