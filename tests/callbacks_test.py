"""Keras callbacks with `ReptileModel.fit`, exact resumption and shutdown."""

import contextlib
import copy
import csv
import glob
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reptile import ReptileModel
from keras_reptile.callbacks import BackupAndRestore
from keras_reptile.callbacks import GracefulShutdown
from keras_reptile.callbacks import MetaStepSizeLogger

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
EPOCHS, STEPS = 3, 4
EPSILON = 0.3  # ε decays linearly to 0 over EPOCHS * STEPS meta-steps.

# The model, data and fit arguments shared by the tests and by the training
# script that the subprocess tests run, so both train the same way.
SETUP = '''
import keras
import numpy as np

import keras_reptile

EPOCHS, STEPS, EPSILON = 3, 4, 0.3


def make_model():
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.Dense(3),
    ])
    model = keras_reptile.ReptileModel(
        backbone,
        inner_optimizer=keras.optimizers.Adam(0.02, beta_1=0.0),
        inner_steps=2, inner_batch_size=3, eval_inner_steps=3,
    )
    # Adam has slots, the schedule a position: both must survive a resume.
    model.compile(
        optimizer=keras.optimizers.Adam(
            keras.optimizers.schedules.PolynomialDecay(
                EPSILON, EPOCHS * STEPS, 0.0)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    return model


def make_data():
    rng = np.random.default_rng(0)
    protos = rng.normal(size=(8, 6))
    y = np.repeat(np.arange(8), 6).astype("int32")
    x = (protos[y] + 0.5 * rng.normal(size=(48, 6))).astype("float32")
    train = keras_reptile.episodes.from_arrays(
        x, y, ways=3, shots=2, query_shots=1, meta_batch_size=2, seed=0)
    val = keras_reptile.episodes.from_arrays(
        x, y, ways=3, shots=2, query_shots=2, meta_batch_size=2, seed=1)
    return train, val


def state(model):
    """Meta-weights, outer-optimizer variables and the current ε."""
    return (
        [np.asarray(w) for w in model.get_weights()]
        + [v.numpy() for v in model.optimizer.variables]
        + [np.float32(model.optimizer.learning_rate.numpy())]
    )
'''

SCRIPT = '''
import argparse
import os
import sys
import time

import keras
import numpy as np

from keras_reptile import callbacks as reptile_callbacks
from reptile_setup import EPOCHS, STEPS, make_data, make_model, state

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--backup", action="store_true")
parser.add_argument("--stop-at", type=int, default=0)
args = parser.parse_args()
# Same TensorFlow settings as the in-process reference run (CPU kernels are
# deterministic; `enable_op_determinism()` would pick other kernels).
model = make_model()
train, val = make_data()


class StopAt(keras.callbacks.Callback):
    """After meta-step `--stop-at`, writes a marker and waits for a signal."""

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) != args.stop_at:
            return
        with open(os.path.join(args.out, "marker"), "w") as f:
            f.write("reached")
        deadline = time.time() + 60
        while not self.model.stop_training and time.time() < deadline:
            time.sleep(0.02)


callbacks = [reptile_callbacks.MetaStepSizeLogger()]
shutdown = None
if args.backup:
    backup = reptile_callbacks.BackupAndRestore(
        os.path.join(args.out, "backup"), save_freq=3)
    shutdown = reptile_callbacks.GracefulShutdown(backup)
    train = backup.resumable(train)
    callbacks = [backup] + callbacks
if args.stop_at:
    callbacks.append(StopAt())
if shutdown is not None:
    callbacks.append(shutdown)
callbacks.append(
    keras.callbacks.CSVLogger(os.path.join(args.out, "log.csv"), append=True))
model.fit(train, epochs=EPOCHS, steps_per_epoch=STEPS, validation_data=val,
          validation_steps=1, callbacks=callbacks, verbose=0)
if shutdown is not None and shutdown.received_signal is not None:
    sys.exit(128 + shutdown.received_signal)
np.savez(os.path.join(args.out, "final.npz"), *state(model))
'''

_setup = {}
exec(SETUP, _setup)
make_model, make_data, state = (
    _setup["make_model"], _setup["make_data"], _setup["state"]
)
assert (_setup["EPOCHS"], _setup["STEPS"], _setup["EPSILON"]) == (
    EPOCHS, STEPS, EPSILON
)


# Tracing the meta-step costs several times more than these short fits, so
# most tests reuse one model, reset to its initial state (which also checks
# that the callbacks leave no resume state behind on the model).
_SHARED = {}


def _shared_model():
    if "model" not in _SHARED:
        model = make_model()
        model.optimizer.build(model.trainable_variables)
        _SHARED["model"] = model
        _SHARED["initial"] = [np.copy(w) for w in model.get_weights()]
    model = _SHARED["model"]
    model.set_weights(_SHARED["initial"])
    for variable in model.optimizer.variables:
        variable.assign(tf.zeros_like(variable))  # Fresh Adam: all zeros.
    return model


@pytest.fixture
def model():
    return _shared_model()


@pytest.fixture
def reference():
    """An uninterrupted run: its history and its state after each meta-step."""
    if "reference" not in _SHARED:
        model = _shared_model()
        states = {}

        def record(batch, logs):
            states[int(model.optimizer.iterations)] = state(model)

        history = _fit(
            model,
            [MetaStepSizeLogger(), keras.callbacks.LambdaCallback(on_train_batch_end=record)],
        )
        _SHARED["reference"] = history.history, states
        _shared_model()  # Reset again, for the `model` fixture of the test.
    return _SHARED["reference"]


def _epsilon_after(steps):
    return EPSILON * (1 - steps / (EPOCHS * STEPS))


def _fit(model, callbacks=(), train=None, **kwargs):
    default_train, val = make_data()
    options = dict(
        epochs=EPOCHS, steps_per_epoch=STEPS, validation_data=val,
        validation_steps=1, verbose=0, shuffle=False,  # Episodes: no shuffle.
    )
    options.update(kwargs)
    return model.fit(
        default_train if train is None else train,
        callbacks=list(callbacks), **options,
    )


def _assert_states_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, e)


class _RaiseAt(keras.callbacks.Callback):
    """Simulates a crash right after meta-step `iteration`."""

    def __init__(self, iteration):
        super().__init__()
        self.iteration = iteration

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == self.iteration:
            raise RuntimeError("simulated crash")


# ----------------------------------------------------------------------------
# ε and the standard Keras callbacks


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One run with every logging callback: history, batch logs, files, stdout."""
    directory = tmp_path_factory.mktemp("logged")
    batch_logs = []
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        history = _fit(
            _shared_model(),
            [
                MetaStepSizeLogger(),
                keras.callbacks.LambdaCallback(
                    on_train_batch_end=lambda b, logs: batch_logs.append(dict(logs))
                ),
                keras.callbacks.TensorBoard(str(directory / "logs")),
                keras.callbacks.CSVLogger(str(directory / "log.csv")),
            ],
            verbose=1,
        )
    return history.history, batch_logs, directory, stdout.getvalue()


def test_meta_step_size_logger_reports_the_schedule_value(logged):
    history, batch_logs, _, _ = logged
    np.testing.assert_allclose(
        history["meta_step_size"],
        [_epsilon_after(STEPS * (e + 1)) for e in range(EPOCHS)],
        rtol=1e-6, atol=1e-7,
    )
    np.testing.assert_allclose(
        [logs["meta_step_size"] for logs in batch_logs],
        [_epsilon_after(k) for k in range(1, EPOCHS * STEPS + 1)],
        rtol=1e-6, atol=1e-7,
    )
    with pytest.raises(ValueError, match="Expected `name` to be a non-empty string"):
        MetaStepSizeLogger(name="")


def _read_events(log_dir):
    values = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values.setdefault(value.tag, {})[event.step] = float(
                    tf.make_ndarray(value.tensor)
                )
    return {tag: [steps[s] for s in sorted(steps)] for tag, steps in values.items()}


def test_tensorboard_logs_meta_training_metrics_and_epsilon(logged):
    history, _, directory, _ = logged
    train = _read_events(str(directory / "logs" / "train"))
    validation = _read_events(str(directory / "logs" / "validation"))
    for tag, key in (
        ("epoch_loss", "loss"),  # Meta-train loss (post-adaptation query).
        ("epoch_accuracy", "accuracy"),  # Post-adaptation query accuracy.
        ("epoch_meta_step_size", "meta_step_size"),
    ):
        np.testing.assert_allclose(train[tag], history[key], rtol=1e-6)
    # Few-shot accuracy on the validation tasks after adaptation.
    np.testing.assert_allclose(
        validation["epoch_accuracy"], history["val_accuracy"], rtol=1e-6
    )
    np.testing.assert_allclose(validation["epoch_loss"], history["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(
        train["epoch_meta_step_size"],
        [_epsilon_after(STEPS * (e + 1)) for e in range(EPOCHS)],
        rtol=1e-6, atol=1e-7,
    )


def test_csv_logger_writes_one_row_per_epoch(logged):
    history, _, directory, _ = logged
    with open(directory / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "epoch", "accuracy", "loss", "meta_step_size", "val_accuracy", "val_loss"
    ]
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    for key, values in history.items():
        np.testing.assert_allclose([float(r[key]) for r in rows], values, rtol=1e-6)


def test_progress_bar_shows_meta_training_metrics(logged):
    history, _, _, out = logged
    assert f"Epoch {EPOCHS}/{EPOCHS}" in out
    final = out.strip().splitlines()[-1]
    for key in ("accuracy", "loss", "meta_step_size", "val_accuracy", "val_loss"):
        assert f" {key}: {history[key][-1]:.4f}" in final


def test_model_checkpoint_keeps_the_best_validation_accuracy_model(model, tmp_path):
    path = str(tmp_path / "best.keras")
    weights, iterations = [], []

    def snapshot(epoch, logs):
        weights.append([np.copy(w) for w in model.get_weights()])
        iterations.append(int(model.optimizer.iterations))

    history = _fit(
        model,
        [
            keras.callbacks.ModelCheckpoint(
                path, monitor="val_accuracy", save_best_only=True
            ),
            keras.callbacks.LambdaCallback(on_epoch_end=snapshot),
        ],
        epochs=4,
    )
    # The first epoch with the highest validation accuracy (a later tie is
    # not an improvement).
    best = int(np.argmax(history.history["val_accuracy"]))
    restored = keras.models.load_model(path)
    assert isinstance(restored, ReptileModel)
    _assert_states_equal(restored.get_weights(), weights[best])
    assert int(restored.optimizer.iterations) == iterations[best]
    # The reloaded model adapts and evaluates as the saved one did.
    _, val = make_data()
    _, accuracy = restored.evaluate(val, steps=1, verbose=0)
    assert accuracy == pytest.approx(history.history["val_accuracy"][best])


def test_early_stopping_stops_and_restores_the_best_weights(model):
    weights = []
    # No later epoch can beat the first by 1e6: stop after `patience` more.
    history = _fit(
        model,
        [
            keras.callbacks.LambdaCallback(
                on_epoch_end=lambda e, logs: weights.append(model.get_weights())
            ),
            keras.callbacks.EarlyStopping(
                monitor="val_loss", min_delta=1e6, patience=1,
                restore_best_weights=True,
            ),
        ],
        epochs=5,
    )
    assert len(history.history["loss"]) == 2
    _assert_states_equal(model.get_weights(), weights[0])


def test_keras_file_round_trip_restores_compile_state_without_warnings(model, tmp_path):
    _fit(model, epochs=1)
    path = str(tmp_path / "model.keras")
    model.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        restored = keras.models.load_model(path)
    assert [
        str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)
    ] == []
    assert isinstance(restored, ReptileModel)
    assert restored.compiled
    assert restored.get_compile_config() == model.get_compile_config()
    assert restored.optimizer.get_config() == model.optimizer.get_config()
    _assert_states_equal(state(restored), state(model))
    # Continued training is identical, ε schedule position included.
    history = _fit(model, epochs=2)
    restored_history = _fit(restored, epochs=2)
    _assert_states_equal(state(restored), state(model))
    assert restored_history.history == history.history


# ----------------------------------------------------------------------------
# BackupAndRestore


def test_keras_backup_and_restore_resumes_at_the_interrupted_epoch(model, tmp_path):
    backup_dir = str(tmp_path / "backup")

    class CrashAtEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(model, [keras.callbacks.BackupAndRestore(backup_dir), CrashAtEpoch()])
    assert int(model.optimizer.iterations) == 2 * STEPS
    # Keras's callback leaves its resume epoch on the model: use a new one.
    restored = make_model()
    epochs = []
    history = _fit(
        restored,
        [
            keras.callbacks.BackupAndRestore(backup_dir),
            keras.callbacks.LambdaCallback(
                on_epoch_begin=lambda e, logs: epochs.append(e)
            ),
        ],
    )
    # Only the last epoch runs, from the restored weights and optimizer.
    assert epochs == [2]
    assert len(history.history["loss"]) == 1
    assert int(restored.optimizer.iterations) == EPOCHS * STEPS
    assert not os.path.exists(backup_dir)


@pytest.mark.parametrize("save_freq", [3, "epoch"])
def test_backup_and_restore_resumes_exactly_after_a_crash(
    model, reference, tmp_path, save_freq
):
    reference_history, reference_states = reference
    backup_dir = str(tmp_path / "backup")
    train, _ = make_data()
    backup = BackupAndRestore(backup_dir, save_freq=save_freq)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(model, [backup, _RaiseAt(7)], train=backup.resumable(train))
    with open(os.path.join(backup_dir, "training_metadata.json")) as f:
        metadata = json.load(f)
    # save_freq=3: the backup after meta-step 6, i.e. 2 steps into epoch 1;
    # "epoch": the backup at the end of epoch 0.
    expected = (1, 2, 6) if save_freq == 3 else (1, 0, 4)
    assert (metadata["epoch"], metadata["batch"], metadata["iterations"]) == expected

    model = _shared_model()  # As a new process would build it.
    backup = BackupAndRestore(backup_dir, save_freq=save_freq)
    history = _fit(
        model, [backup, MetaStepSizeLogger()], train=backup.resumable(train)
    )
    _assert_states_equal(state(model), reference_states[EPOCHS * STEPS])
    # Epochs and validation passes fall on the same meta-steps.
    for key in ("val_loss", "val_accuracy", "meta_step_size"):
        np.testing.assert_array_equal(history.history[key], reference_history[key][1:])
    assert not os.path.exists(backup_dir)
    # The resumed epoch is forgotten when the run ends: a later fit on the
    # same model runs all its epochs again, from epoch 0.
    again = model.fit(train, epochs=EPOCHS, steps_per_epoch=1, verbose=0, shuffle=False)
    assert again.epoch == list(range(EPOCHS))


def test_resumable_yields_the_episodes_after_the_restored_meta_step(model, tmp_path):
    backup_dir = str(tmp_path / "backup")
    train, _ = make_data()
    backup = BackupAndRestore(backup_dir, save_freq=2)
    with pytest.raises(RuntimeError):
        _fit(model, [backup, _RaiseAt(5)], train=backup.resumable(train), epochs=2)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            # After `BackupAndRestore.on_train_begin`, as in `fit`.
            seen.append(next(iter(resumable))["support_y"].numpy())

    backup = BackupAndRestore(backup_dir, save_freq=2)
    resumable = backup.resumable(train)
    assert resumable.element_spec == train.element_spec
    assert resumable.cardinality() == tf.data.INFINITE_CARDINALITY
    _fit(_shared_model(), [backup, Record()], train=resumable, epochs=2)
    # Restored after meta-step 4: the next meta-batch is the fifth.
    expected = next(iter(train.skip(4)))["support_y"].numpy()
    np.testing.assert_array_equal(seen[0], expected)
    assert not np.array_equal(seen[0], next(iter(train))["support_y"].numpy())


def test_backup_and_restore_rejects_bad_use(model, tmp_path):
    with pytest.raises(ValueError, match="Expected `save_freq` to be 'epoch' or"):
        BackupAndRestore(str(tmp_path), save_freq=0)
    with pytest.raises(ValueError, match="Expected `backup_dir`"):
        BackupAndRestore("")
    backup = BackupAndRestore(str(tmp_path / "b"), save_freq=2)
    train, _ = make_data()
    with pytest.raises(ValueError, match="Expected an infinite episodic dataset"):
        backup.resumable(train.take(3))
    with pytest.raises(TypeError, match="Expected `dataset` to be a `tf.data.Dataset`"):
        backup.resumable(np.zeros(3))
    with pytest.raises(ValueError, match="needs `fit\\(..., steps_per_epoch=...\\)`"):
        model.fit(train, callbacks=[backup], verbose=0, shuffle=False)
    with pytest.raises(RuntimeError):
        _fit(model, [backup, _RaiseAt(2)])
    with pytest.raises(
        ValueError, match="the `steps_per_epoch` of the interrupted run \\(4\\)"
    ):
        _fit(
            _shared_model(), [BackupAndRestore(str(tmp_path / "b"), save_freq=2)],
            steps_per_epoch=5,
        )


def _files(directory):
    """The contents of every file under `directory`, by relative path."""
    contents = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                contents[os.path.relpath(path, directory)] = f.read()
    return contents


def _damage(path, how):
    size = os.path.getsize(path)
    if how == "truncated":  # As a full disk or a killed copy leaves it.
        with open(path, "r+b") as f:
            f.truncate(size // 2)
    else:
        with open(path, "wb") as f:
            f.write(np.random.default_rng(0).bytes(size))


def _state_in(path):
    """The state stored in a backup weights file, read by plain Keras."""
    model = _shared_model()
    model.load_weights(path)
    return state(model)


def test_double_checkpoint_resumes_from_the_previous_backup_if_the_latest_is_corrupt(
    model, reference, tmp_path
):
    _, reference_states = reference
    backup_dir = str(tmp_path / "backup")
    latest = os.path.join(backup_dir, "latest.weights.h5")
    previous = latest + ".bkp"
    train, _ = make_data()

    def run(model, crash_at=None):
        backup = BackupAndRestore(backup_dir, save_freq=3, double_checkpoint=True)
        restored = []
        callbacks = [
            backup,
            keras.callbacks.LambdaCallback(
                on_train_begin=lambda logs: restored.append(state(model))
            ),
        ]
        if crash_at is None:
            _fit(model, callbacks, train=backup.resumable(train))
        else:
            with pytest.raises(RuntimeError, match="simulated crash"):
                _fit(model, callbacks + [_RaiseAt(crash_at)],
                     train=backup.resumable(train))
        return restored[0]

    run(model, crash_at=7)
    # Backups after meta-steps 6 (latest) and 3 (previous).
    _damage(latest, "truncated")
    with open(previous, "rb") as f:
        previous_contents = f.read()
    with pytest.warns(
        UserWarning,
        match=re.escape(latest) + r" .*cannot be read.* Resuming from the "
        + re.escape(f"previous backup, {previous}, instead"),
    ):
        restored = run(_shared_model(), crash_at=7)
    _assert_states_equal(restored, reference_states[3])
    # The backup after meta-step 6 replaced the corrupt one, which was not
    # copied over the previous backup.
    with open(previous, "rb") as f:
        assert f.read() == previous_contents
    _assert_states_equal(_state_in(latest), reference_states[6])

    model = _shared_model()
    _assert_states_equal(run(model), reference_states[6])
    _assert_states_equal(state(model), reference_states[EPOCHS * STEPS])
    assert not os.path.exists(backup_dir)


@pytest.mark.parametrize(
    "how, double_checkpoint",
    [("truncated", False), ("garbage", False), ("garbage", True)],
)
def test_corrupt_backup_with_no_fallback_is_refused_and_kept(
    model, tmp_path, how, double_checkpoint
):
    backup_dir = str(tmp_path / "backup")
    latest = os.path.join(backup_dir, "latest.weights.h5")
    backup = BackupAndRestore(
        backup_dir, save_freq=2, double_checkpoint=double_checkpoint
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(model, [backup, _RaiseAt(5)])
    damaged = [latest] + ([latest + ".bkp"] if double_checkpoint else [])
    for path in damaged:
        _damage(path, how)
    before = _files(backup_dir)
    model = _shared_model()
    fresh = state(model)
    message = "".join(
        f"Expected {re.escape(path)} to be a backup weights file, but it "
        r"cannot be read: it is corrupt or truncated \(.*\)\..*"
        for path in damaged
    ) + "Nothing was restored"
    with pytest.raises(ValueError, match=message):
        _fit(
            model,
            [BackupAndRestore(
                backup_dir, save_freq=2, double_checkpoint=double_checkpoint
            )],
        )
    _assert_states_equal(state(model), fresh)
    assert _files(backup_dir) == before


@pytest.mark.parametrize("where", ["under_a_file", "a_file"])
def test_unwritable_backup_dir_is_reported_before_any_meta_step(
    model, tmp_path, where
):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("data")
    backup_dir = str(blocker / "backup" if where == "under_a_file" else blocker)
    steps = []
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Expected `backup_dir` to be a writable directory. Received: "
            f"backup_dir={backup_dir!r}, which cannot be written"
        ),
    ):
        _fit(
            model,
            [
                BackupAndRestore(backup_dir),
                keras.callbacks.LambdaCallback(
                    on_train_batch_begin=lambda b, logs: steps.append(b)
                ),
            ],
        )
    assert steps == []
    assert int(model.optimizer.iterations) == 0
    assert blocker.read_text() == "data"


def _configured_model(
    optimizer="adam", learning_rate=0.1, inner_steps=2, units=8, functional=False
):
    """A small model to back up, or to resume in another configuration."""
    keras.utils.set_random_seed(0)
    layers = [keras.layers.Dense(units), keras.layers.ReLU(), keras.layers.Dense(3)]
    if functional:
        inputs = outputs = keras.Input((6,))
        for layer in layers:
            outputs = layer(outputs)
        backbone = keras.Model(inputs, outputs)
    else:
        backbone = keras.Sequential([keras.Input((6,))] + layers)
    model = ReptileModel(
        backbone, inner_steps=inner_steps, inner_batch_size=3, eval_inner_steps=3
    )
    model.compile(
        optimizer=keras.optimizers.get(
            {"class_name": optimizer, "config": {"learning_rate": learning_rate}}
        ),
        loss=SCCE,
    )
    model.optimizer.build(model.trainable_variables)
    return model


def _write_backup(backup_dir, **config):
    """Backs up `_configured_model(**config)` after meta-step 2; its state then."""
    model = _configured_model(**config)
    saved = []

    def record(batch, logs):
        if int(model.optimizer.iterations) == 2:
            saved.append(state(model))

    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(
            model,
            [
                BackupAndRestore(backup_dir, save_freq=2),
                keras.callbacks.LambdaCallback(on_train_batch_end=record),
                _RaiseAt(3),
            ],
            epochs=1,
        )
    return saved[0]


@pytest.fixture(scope="module")
def configured_backup(tmp_path_factory):
    backup_dir = str(tmp_path_factory.mktemp("configured") / "backup")
    _write_backup(backup_dir)
    return backup_dir


@pytest.mark.parametrize("functional", [False, True])
def test_backup_resumes_into_a_new_model_of_the_same_configuration(
    tmp_path, functional
):
    backup_dir = str(tmp_path / "backup")
    saved = _write_backup(backup_dir, functional=functional)
    # Built anew, so its layers and optimizer have other generated names.
    model = _configured_model(functional=functional)
    restored = []
    _fit(
        model,
        [
            BackupAndRestore(backup_dir, save_freq=2),
            keras.callbacks.LambdaCallback(
                on_train_begin=lambda logs: restored.append(state(model))
            ),
        ],
        epochs=1,
    )
    _assert_states_equal(restored[0], saved)
    assert int(model.optimizer.iterations) == STEPS
    assert not os.path.exists(backup_dir)


def _float32(value):
    return repr(float(np.float32(value)))


@pytest.mark.parametrize(
    "changes, difference",
    [
        (dict(optimizer="sgd"), 'optimizer.class: "Adam" vs. "SGD"'),
        (
            dict(learning_rate=0.05),
            f"optimizer.config.learning_rate: {_float32(0.1)} vs. "
            f"{_float32(0.05)}",
        ),
        (dict(inner_steps=3), "model.config.inner_steps: 2 vs. 3"),
        (
            dict(units=16),
            "model.config.model.config.layers[1].config.units: 8 vs. 16",
        ),
        (dict(units=16), 'variables[0]: "float32[6, 8]" vs. "float32[6, 16]"'),
    ],
)
def test_resuming_into_another_configuration_is_refused(
    configured_backup, tmp_path, changes, difference
):
    backup_dir = str(tmp_path / "backup")
    shutil.copytree(configured_backup, backup_dir)
    before = _files(backup_dir)
    model = _configured_model(**changes)
    fresh = state(model)
    with pytest.raises(ValueError) as info:
        _fit(model, [BackupAndRestore(backup_dir, save_freq=2)], epochs=1)
    message = str(info.value)
    assert message.startswith(
        "Expected the model and outer optimizer to be configured as in the "
        f"run that wrote the backup in {backup_dir}, to resume it. Received "
        "differences (backup vs. this run): "
    )
    assert difference in message
    assert message.endswith(
        "Nothing was restored and the backup is kept: configure the run as "
        "before to resume it, or pass another `backup_dir` to start afresh."
    )
    _assert_states_equal(state(model), fresh)
    assert _files(backup_dir) == before


@pytest.mark.parametrize("where", ["weights_file", "keras_metadata_file"])
def test_unreadable_backup_metadata_is_refused_before_loading(
    configured_backup, tmp_path, where
):
    backup_dir = str(tmp_path / "backup")
    shutil.copytree(configured_backup, backup_dir)
    latest = os.path.join(backup_dir, "latest.weights.h5")
    metadata_file = os.path.join(backup_dir, "training_metadata.json")
    with h5py.File(latest, "a") as f:
        if where == "weights_file":
            f.attrs["keras_reptile_backup"] = '{"epoch": 0, "batch'
            damaged = latest
        else:
            # As `keras.callbacks.BackupAndRestore` writes a backup.
            del f.attrs["keras_reptile_backup"]
            damaged = metadata_file
    if where == "keras_metadata_file":
        with open(metadata_file, "w") as f:
            f.write('{"epoch": 0, "batch')
    before = _files(backup_dir)
    model = _configured_model()
    fresh = state(model)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Expected the backup metadata in {damaged} to be JSON, but it "
            "cannot be read: it is corrupt"
        ) + ".*Nothing was restored",
    ):
        _fit(model, [BackupAndRestore(backup_dir, save_freq=2)], epochs=1)
    _assert_states_equal(state(model), fresh)
    assert _files(backup_dir) == before


# ----------------------------------------------------------------------------
# GracefulShutdown


class _SignalAt(keras.callbacks.Callback):
    """Sends `signum` to this process `times` times after meta-step `iteration`."""

    def __init__(self, iteration, signum, times=1):
        super().__init__()
        self.iteration, self.signum, self.times = iteration, signum, times

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == self.iteration:
            for _ in range(self.times):
                signal.raise_signal(self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_graceful_shutdown_stops_after_the_meta_step_and_keeps_a_backup(
    model, reference, tmp_path, signum
):
    _, reference_states = reference
    before = signal.getsignal(signum)
    backup_dir = str(tmp_path / "backup")
    train, _ = make_data()
    backup = BackupAndRestore(backup_dir, save_freq=100)
    shutdown = GracefulShutdown(backup)
    installed = []
    _fit(
        model,
        [
            backup,
            keras.callbacks.LambdaCallback(
                # After every `on_train_begin`.
                on_epoch_begin=lambda e, logs: installed.append(signal.getsignal(signum))
            ),
            _SignalAt(6, signum),
            shutdown,
        ],
        train=backup.resumable(train),
    )
    assert installed[0] != before
    assert signal.getsignal(signum) == before
    assert shutdown.received_signal == signum
    assert int(model.optimizer.iterations) == 6
    with open(os.path.join(backup_dir, "training_metadata.json")) as f:
        metadata = json.load(f)
    assert (metadata["epoch"], metadata["batch"], metadata["iterations"]) == (1, 2, 6)
    restored = _shared_model()
    restored.load_weights(os.path.join(backup_dir, "latest.weights.h5"))
    _assert_states_equal(state(restored), reference_states[6])


def test_graceful_shutdown_second_signal_stops_immediately(model):
    # A process started with SIGINT ignored (a background job of a shell
    # without job control) has no KeyboardInterrupt handler: pin Python's.
    outside = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            _fit(model, [_SignalAt(2, signal.SIGINT, times=2), GracefulShutdown()])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, outside)


def test_graceful_shutdown_second_signal_keeps_an_ignored_signal_ignored(model):
    # The handler before `fit` ignored SIGINT: the second signal restores
    # that, and `fit` still stops after the meta-step of the first.
    outside = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        shutdown = GracefulShutdown()
        _fit(model, [_SignalAt(2, signal.SIGINT, times=2), shutdown])
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert shutdown.received_signal == signal.SIGINT
        assert int(model.optimizer.iterations) == 2
    finally:
        signal.signal(signal.SIGINT, outside)


def test_graceful_shutdown_copies_share_the_received_signal(model):
    shutdown = GracefulShutdown()
    (copied,) = copy.deepcopy([shutdown])  # As Keras Tuner does per trial.
    _fit(model, [_SignalAt(1, signal.SIGINT), copied], epochs=1)
    assert shutdown.received_signal == signal.SIGINT
    assert int(model.optimizer.iterations) == 1


def test_graceful_shutdown_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="restarts a partial epoch"):
        GracefulShutdown(keras.callbacks.BackupAndRestore(str(tmp_path)))
    with pytest.raises(TypeError, match="Expected `backup` to be a"):
        GracefulShutdown("backup")
    with pytest.raises(ValueError, match="catchable signals"):
        GracefulShutdown(signals=[signal.SIGKILL])
    with pytest.raises(ValueError, match="sequence of signal numbers"):
        GracefulShutdown(signals=["TERM"])


# ----------------------------------------------------------------------------
# Real processes: SIGKILL and SIGTERM mid-fit


def _start(script_dir, out, *args):
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(
        [script_dir, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    ))
    return subprocess.Popen(
        [sys.executable, os.path.join(script_dir, "train.py"), out, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _wait_for(path, process, timeout=120):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if process.poll() is not None:
            raise AssertionError(f"exited early:\n{process.stderr.read()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.05)


def _finish(process, timeout=120):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, err


def _load(path):
    data = np.load(path)
    return [data[f"arr_{i}"] for i in range(len(data.files))]


def _last_row_per_epoch(path):
    with open(path) as f:
        rows = {int(r["epoch"]): r for r in csv.DictReader(f)}
    return [rows[e] for e in sorted(rows)]


def test_killed_and_terminated_runs_resume_exactly(reference, tmp_path):
    reference_history, reference_states = reference
    script_dir = str(tmp_path / "script")
    os.makedirs(script_dir)
    with open(os.path.join(script_dir, "reptile_setup.py"), "w") as f:
        f.write(SETUP)
    with open(os.path.join(script_dir, "train.py"), "w") as f:
        f.write(SCRIPT)
    killed, term = str(tmp_path / "killed"), str(tmp_path / "term")
    # SIGKILL after meta-step 7: the last backup (save_freq=3) is from
    # meta-step 6, in the middle of epoch 1.
    to_kill = _start(script_dir, killed, "--backup", "--stop-at", "7")
    # SIGTERM after meta-step 5: the run stops there, with a backup.
    to_term = _start(script_dir, term, "--backup", "--stop-at", "5")
    _wait_for(os.path.join(killed, "marker"), to_kill)
    to_kill.send_signal(signal.SIGKILL)
    assert _finish(to_kill)[0] == -signal.SIGKILL
    resumed = _start(script_dir, killed, "--backup")

    _wait_for(os.path.join(term, "marker"), to_term)
    to_term.send_signal(signal.SIGTERM)
    returncode, err = _finish(to_term)
    assert returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    assert "Received SIGTERM: stopping after the current meta-step" in err
    with open(os.path.join(term, "backup", "training_metadata.json")) as f:
        metadata = json.load(f)
    assert (metadata["epoch"], metadata["batch"], metadata["iterations"]) == (1, 1, 5)
    # The backup loads into a new model, with the state after meta-step 5
    # of an uninterrupted run.
    model = _shared_model()
    model.load_weights(os.path.join(term, "backup", "latest.weights.h5"))
    _assert_states_equal(state(model), reference_states[5])

    returncode, err = _finish(resumed)
    assert returncode == 0, err
    assert not os.path.exists(os.path.join(killed, "backup"))
    _assert_states_equal(
        _load(os.path.join(killed, "final.npz")), reference_states[EPOCHS * STEPS]
    )
    # The CSV log continued across the kill: same validation metrics and ε
    # at every epoch (training metrics of the resumed epoch average only the
    # steps after the restart).
    rows = _last_row_per_epoch(os.path.join(killed, "log.csv"))
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    for key in ("val_loss", "val_accuracy", "meta_step_size"):
        assert [float(r[key]) for r in rows] == reference_history[key]


def test_a_full_disk_during_a_backup_leaves_no_torn_file_and_says_so(
    model, tmp_path, monkeypatch
):
    backup_dir = str(tmp_path / "backup")
    save_weights = type(model).save_weights
    calls, before = [], {}

    def full_disk_at_the_second_backup(self, filepath, *args, **kwargs):
        calls.append(filepath)
        if len(calls) == 1:
            return save_weights(self, filepath, *args, **kwargs)
        before.update(_files(backup_dir))
        # As h5py does when the disk fills up: part of the file is written,
        # then closing it fails with its own words.
        save_weights(self, filepath, *args, **kwargs)
        with open(filepath, "r+b") as f:
            f.truncate(100)
        raise OSError(
            "Unable to synchronously close file (file write failed: errno = "
            "28, error message = 'No space left on device')"
        )

    monkeypatch.setattr(type(model), "save_weights", full_disk_at_the_second_backup)
    with pytest.raises(
        OSError,
        match=re.escape(
            f"Could not write {os.path.join(backup_dir, 'latest.weights.h5')}: "
            f"no space left on {backup_dir}."
        ),
    ):
        _fit(model, [BackupAndRestore(backup_dir, save_freq=STEPS)])
    assert len(calls) == 2 and "latest.weights.h5" in before
    # The first backup, as it was, and nothing beside it.
    assert _files(backup_dir) == before
