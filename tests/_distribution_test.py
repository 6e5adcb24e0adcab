"""`_distribution`: the replica arithmetic and where tasks run."""

import pytest
import tensorflow as tf

from keras_reptile import _distribution


def test_an_explicit_parallel_tasks_setting_is_kept(monkeypatch):
    # Even where "auto" would choose otherwise.
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind: ["/device:GPU:0"] if kind == "GPU" else [])
    assert _distribution.tasks_run_in_parallel(True) is True
    assert _distribution.tasks_run_in_parallel(False) is False


@pytest.mark.parametrize("devices, parallel", [
    ({}, True),
    ({"GPU": ["/device:GPU:0"]}, False),
    ({"TPU": ["/device:TPU:0"]}, False),
])
def test_auto_runs_tasks_in_parallel_only_without_accelerators(monkeypatch, devices, parallel):
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind: devices.get(kind, []))
    assert _distribution.tasks_run_in_parallel("auto") is parallel


def test_a_meta_batch_that_does_not_split_evenly_is_refused():
    _distribution.check_even_split(None, 2)
    _distribution.check_even_split(4, 2)
    with pytest.raises(ValueError, match=(
            r"Received a meta-batch of 5 tasks, split as \[3, 2\]")):
        _distribution.check_even_split(5, 2)
