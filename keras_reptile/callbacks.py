"""Callbacks for meta-training: ε logging, exact resumption, graceful shutdown.

`ReptileModel.fit` works with the standard Keras callbacks (`TensorBoard`,
`ModelCheckpoint`, `EarlyStopping`, `CSVLogger`, the progress bar, ...).
This module adds what meta-training needs on top of them:

* `MetaStepSizeLogger` adds ε, the outer optimizer's current learning rate,
  to the logs, so that `TensorBoard`, `CSVLogger` and the progress bar show
  it (Keras 3.15 only logs the learning rate from `LearningRateScheduler` and
  `ReduceLROnPlateau`).
* `BackupAndRestore` is `keras.callbacks.BackupAndRestore` made exact for
  episodic training: a run resumed from a backup ends with the same
  meta-weights, outer-optimizer state and ε schedule position as an
  uninterrupted run, even when the backup was written in the middle of an
  epoch, and backups are written atomically, so that killing the process
  at any moment leaves a loadable one.
* `GracefulShutdown` turns SIGTERM/SIGINT (a scheduler's preemption notice,
  Ctrl-C) into "stop after the current meta-step, with a backup written".
"""

import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import warnings

import h5py
import keras
import numpy as np
import tensorflow as tf

from keras_reptile import _compat
from keras_reptile import _durable

__all__ = ["BackupAndRestore", "GracefulShutdown", "MetaStepSizeLogger"]

_logger = logging.getLogger(__name__)


class MetaStepSizeLogger(keras.callbacks.Callback):
    """Logs ε, the outer optimizer's current learning rate (the meta step size).

    Adds `name` (default `"meta_step_size"`) to the logs at the end of every
    training batch and epoch. The value is the learning rate the outer
    optimizer will use for the next meta-step: with a learning-rate schedule
    it follows the schedule's position (`optimizer.iterations`), so a linear
    decay to 0 over the planned meta-steps logs 0 at the end.

    Keras passes one logs dict through the callbacks in list order, so put
    this callback before the callbacks that should record ε (`TensorBoard`,
    `CSVLogger`, `ModelCheckpoint`, ...). The progress bar and `History` are
    appended by Keras after all user callbacks and always see it.

    Args:
        name: The key to add to the logs.

    Example:

    >>> import keras, numpy as np, keras_reptile
    >>> backbone = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model = keras_reptile.ReptileModel(backbone, inner_steps=2,
    ...                                    inner_batch_size=5)
    >>> model.compile(optimizer=keras.optimizers.SGD(
    ...     keras.optimizers.schedules.PolynomialDecay(1.0, 4, 0.0)),
    ...     loss="mse")
    >>> tasks = keras_reptile.datasets.sine(shots=5, meta_batch_size=2,
    ...                                     seed=0)
    >>> history = model.fit(tasks, steps_per_epoch=2, epochs=2, verbose=0,
    ...                     callbacks=[keras_reptile.callbacks.MetaStepSizeLogger()])
    >>> [round(v, 2) for v in history.history["meta_step_size"]]
    [0.5, 0.0]
    """

    def __init__(self, name="meta_step_size"):
        super().__init__()
        if not isinstance(name, str) or not name:
            raise ValueError(
                "Expected `name` to be a non-empty string. "
                f"Received: name={name!r}"
            )
        self.name = name

    def _log(self, logs):
        if logs is None:
            return
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return
        logs[self.name] = float(
            keras.ops.convert_to_numpy(optimizer.learning_rate)
        )

    def on_train_batch_end(self, batch, logs=None):
        self._log(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._log(logs)


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """Backs up meta-training and resumes it exactly after an interruption.

    A drop-in replacement for `keras.callbacks.BackupAndRestore` (same
    arguments, same files in `backup_dir`) that makes resuming exact for
    episodic training. After a restart, `fit` with this callback ends with
    the same meta-weights, outer-optimizer state (`iterations`, slots) and ε
    schedule position as a run that was never interrupted, and reports the
    same validation metrics at the same epochs, provided that:

    * the training dataset is passed through `resumable()` (Keras restarts
      the dataset iterator in a new `fit` call; `resumable()` makes it
      continue where the interrupted run stopped; the validation iterator
      needs nothing, since Keras restarts it for every validation pass),
    * the episodes are reproducible (an integer `seed` in
      `keras_reptile.episodes`), the script builds and compiles the same
      model, and calls `fit` with the same `epochs` and `steps_per_epoch`,
    * TensorFlow computes the same in both runs: same versions and
      settings. TensorFlow's CPU kernels are deterministic for such models;
      `tf.config.experimental.enable_op_determinism()`, if used, must be
      used in both runs, since it selects other kernels.

    Granularity: the run resumes from the last backup, i.e. from the end of
    the last epoch (`save_freq="epoch"`) or of the last multiple of
    `save_freq` meta-steps (an integer), also in the middle of an epoch, and
    redoes the meta-steps after it. Keras itself can only resume at an epoch
    boundary (it restarts the interrupted epoch from its first step); this
    callback restores the partial epoch and runs its first steps as no-ops
    (they show up in the progress bar with zero metrics), so that epochs,
    validation passes and epoch-end callbacks fall on the same meta-steps as
    without interruption. The training metrics of the resumed epoch average
    only the steps run after the restart. Callback state that Keras does not
    back up (e.g. `EarlyStopping`'s patience counter, `ModelCheckpoint`'s
    best value) starts afresh.

    A backup is one file, written to a temporary name and then renamed, so
    killing the process at any moment leaves the previous backup or the new
    one, never a torn one. It is deleted when `fit` completes (unless
    `delete_checkpoint=False`), and kept when training is stopped by
    `GracefulShutdown` or ends with an exception.

    A backup also records what it was made with: the model's configuration
    (`get_config()`, without layer and optimizer names), the outer
    optimizer's type and configuration, and the shapes and dtypes of the
    model's variables. `fit` refuses to resume into anything else (another
    optimizer, learning rate, `inner_steps`, architecture, ...) with a
    `ValueError` listing the differences, as it does for an unreadable
    backup; then nothing is restored and the backup is kept. An unwritable
    `backup_dir` is reported when training begins.

    Args:
        backup_dir: Local directory for the backup; not shared with any
            other callback or run.
        save_freq: `"epoch"` to back up at the end of each epoch, or an
            integer to back up every `save_freq` meta-steps.
        double_checkpoint: Whether to also keep the previous backup, used
            (with a warning) if the latest one cannot be read.
        delete_checkpoint: Whether to delete the backup when `fit` completes.

    Example:

    >>> import keras, keras_reptile
    >>> backbone = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model = keras_reptile.ReptileModel(backbone, inner_steps=2,
    ...                                    inner_batch_size=5)
    >>> model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    >>> backup = keras_reptile.callbacks.BackupAndRestore(
    ...     "/tmp/reptile_backup_doctest", save_freq=2)
    >>> tasks = keras_reptile.datasets.sine(shots=5, meta_batch_size=2,
    ...                                     seed=0)
    >>> history = model.fit(backup.resumable(tasks), epochs=2,
    ...                     steps_per_epoch=3, callbacks=[backup], verbose=0)
    >>> int(model.optimizer.iterations)
    6
    """

    def __init__(
        self,
        backup_dir,
        save_freq="epoch",
        double_checkpoint=False,
        delete_checkpoint=True,
    ):
        if not backup_dir or not isinstance(backup_dir, (str, os.PathLike)):
            raise ValueError(
                "Expected `backup_dir` to be a non-empty path. "
                f"Received: backup_dir={backup_dir!r}"
            )
        if save_freq != "epoch" and (
            isinstance(save_freq, (bool, np.bool_))
            or not isinstance(save_freq, (int, np.integer))
            or save_freq < 1
        ):
            raise ValueError(
                "Expected `save_freq` to be 'epoch' or a positive integer "
                f"(meta-steps). Received: save_freq={save_freq!r}"
            )
        super().__init__(
            os.fspath(backup_dir),
            save_freq=save_freq if save_freq == "epoch" else int(save_freq),
            double_checkpoint=double_checkpoint,
            delete_checkpoint=delete_checkpoint,
        )
        # Read by `resumable()` datasets when their iterator starts, which
        # Keras does after `on_train_begin`: the number of meta-batches the
        # interrupted run had consumed.
        self._offset = tf.Variable(0, dtype=tf.int64, trainable=False)
        self._reset_run_state()

    def _reset_run_state(self):
        self._epoch = 0
        self._batches_done = 0  # Meta-steps of `_epoch` in the weights.
        self._restored_batches = 0  # Of those, restored from the backup.
        self._restored_epoch = None
        self._steps = None
        self._start_iterations = 0
        self._since_save = 0
        self._last_saved = None
        self._interrupted = False
        self._train_function = None
        self._configuration = None
        # Set when the latest backup was unreadable and the previous one was
        # restored instead.
        self._latest_unreadable = False

    # ------------------------------------------------------------------
    # Datasets

    def resumable(self, dataset):
        """Returns training episodes that continue where a run stopped.

        Keras creates a new dataset iterator in every `fit` call, so after a
        restart an episodic dataset would start again from its first
        episode, and the resumed run would meta-train on other tasks than
        the uninterrupted one. The returned dataset skips, when its iterator
        starts, the meta-batches of the meta-steps in the restored backup.
        In a run that starts from scratch it yields the elements of
        `dataset` unchanged.

        Skipping computes the skipped episodes (about 0.5 ms per Omniglot
        meta-batch on one CPU core), so resuming after N meta-steps costs
        roughly N times that before the first step.

        Args:
            dataset: The infinite episodic training `tf.data.Dataset` (see
                `keras_reptile.episodes`), with a fixed seed.

        Returns:
            A `tf.data.Dataset` with the same elements and `element_spec`.
        """
        if not isinstance(dataset, tf.data.Dataset):
            raise TypeError(
                "Expected `dataset` to be a `tf.data.Dataset` of episodes. "
                f"Received: dataset={dataset!r} of type "
                f"{type(dataset).__name__}"
            )
        if dataset.cardinality() != tf.data.INFINITE_CARDINALITY:
            raise ValueError(
                "Expected an infinite episodic dataset (as built by "
                "`keras_reptile.episodes`): Keras iterates a finite dataset "
                "from its start in every epoch, so there is no position to "
                "resume from. Received: a dataset of cardinality "
                f"{int(dataset.cardinality())}"
            )
        offset = self._offset
        # The offset is read when the iterator pulls its first element, not
        # when the pipeline is built, so it sees the restored position.
        resumed = tf.data.Dataset.from_tensors(np.int64(0)).flat_map(
            lambda _: dataset.skip(offset.read_value())
        )
        return resumed.apply(
            tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)
        )

    # ------------------------------------------------------------------
    # Callback hooks

    def on_train_begin(self, logs=None):
        self._reset_run_state()
        self._steps = self.params.get("steps") if self.params else None
        if self.save_freq != "epoch" and not self._steps:
            raise ValueError(
                "`BackupAndRestore(save_freq=<int>)` needs `fit(..., "
                "steps_per_epoch=...)` to place a backup inside an epoch. "
                f"Received: steps_per_epoch={self._steps}"
            )
        self._check_writable()
        self._configuration = _configuration(self.model)
        state = self._restore()
        if state is None:
            self._start_iterations = self._iterations()
            self._offset.assign(0)
            return
        epoch, batches_done, self._start_iterations = state
        self._offset.assign(self._iterations() - self._start_iterations)
        # Keras's own mechanism for resuming at an epoch (also used by
        # `keras.callbacks.BackupAndRestore`); reset in `on_train_end`.
        _compat.set_initial_epoch(self.model, epoch)
        self._epoch = epoch
        self._restored_epoch = epoch
        self._restored_batches = batches_done
        self._batches_done = batches_done
        if batches_done:
            self._skip_restored_steps(batches_done)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if epoch != self._restored_epoch:
            self._batches_done = 0
            self._restored_batches = 0
        self._restored_epoch = None

    def on_train_batch_end(self, batch, logs=None):
        if not self._note_batch(batch):
            return
        if self.save_freq != "epoch":
            self._since_save += self._steps_per_call()
            if self._since_save >= self.save_freq:
                self._since_save = 0
                self._save()

    def on_epoch_end(self, epoch, logs=None):
        complete = self._finish_epoch(epoch)
        # A stopped, partial epoch is backed up as partial: a backup
        # claiming it complete would skip its remaining steps.
        if (complete and self.save_freq == "epoch") or self._interrupted:
            self._save()

    def on_train_end(self, logs=None):
        self._restore_train_function()
        _compat.set_initial_epoch(self.model, None)
        self._offset.assign(0)
        if (
            self.delete_checkpoint
            and not self._interrupted
            and os.path.exists(self.backup_dir)
        ):
            shutil.rmtree(self.backup_dir)

    # ------------------------------------------------------------------
    # Used by `GracefulShutdown`.

    def _backup_now(self, batch=None, epoch=None):
        """Backs up the current state now, and keeps the backup after `fit`.

        Args:
            batch: The batch that just ended, if called at a batch end.
            epoch: The epoch that just ended, if called at an epoch end.
        """
        self._interrupted = True
        if batch is not None:
            self._note_batch(batch)
        if epoch is not None:
            self._finish_epoch(epoch)
        self._save()

    # ------------------------------------------------------------------
    # Internals

    def _iterations(self):
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def _steps_per_call(self):
        return int(getattr(self.model, "steps_per_execution", 1) or 1)

    def _note_batch(self, batch):
        """Records that the meta-steps up to `batch` are in the weights."""
        if batch + 1 <= self._restored_batches:
            return False  # A no-op step standing for a restored one.
        self._batches_done = max(self._batches_done, batch + 1)
        return True

    def _finish_epoch(self, epoch):
        """Moves the position past `epoch` if all its steps are done."""
        if self._epoch == epoch + 1 and self._batches_done == 0:
            return True  # Already done (by `GracefulShutdown`).
        if self._steps and self._batches_done < self._steps:
            return False
        self._epoch, self._batches_done, self._restored_batches = epoch + 1, 0, 0
        return True

    def _skip_restored_steps(self, batches_done):
        # Keras restarts the interrupted epoch from its first step. Replace
        # the train function by a no-op for the steps already in the
        # restored weights (it consumes no data: `resumable()` has skipped
        # their episodes), then hand back the real one.
        model = self.model
        remaining = [batches_done // self._steps_per_call()]

        def restored_step(iterator):
            remaining[0] -= 1
            if remaining[0] <= 0:
                self._restore_train_function()
            return model.get_metrics_result()

        self._train_function = _compat.swap_train_function(model, restored_step)

    def _restore_train_function(self):
        if self._train_function is not None:
            _compat.swap_train_function(self.model, self._train_function)
            self._train_function = None

    def _paths(self, previous=False):
        suffix = ".bkp" if previous else ""
        return (
            os.path.join(self.backup_dir, "latest.weights.h5") + suffix,
            os.path.join(self.backup_dir, "training_metadata.json") + suffix,
        )

    def _check_writable(self):
        # Found now, rather than when the first backup is due, after an
        # epoch or `save_freq` meta-steps of work.
        try:
            os.makedirs(self.backup_dir, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.backup_dir):
                pass
        except OSError as error:
            raise ValueError(
                "Expected `backup_dir` to be a writable directory. Received: "
                f"backup_dir={self.backup_dir!r}, which cannot be written "
                f"({error})"
            ) from error

    def _save(self):
        iterations = self._iterations()
        key = (self._epoch, self._batches_done, iterations)
        if key == self._last_saved:
            return
        os.makedirs(self.backup_dir, exist_ok=True)
        weights_path, metadata_path = self._paths()
        # Copying an unreadable latest backup over the previous one would
        # leave no readable backup until the rename below.
        if (
            self.double_checkpoint
            and os.path.exists(weights_path)
            and not self._latest_unreadable
        ):
            for src, dst in zip(self._paths(), self._paths(previous=True)):
                if os.path.exists(src):
                    _atomic_copy(src, dst)
        metadata = {
            "epoch": self._epoch,
            # Meta-steps of `epoch` done (Keras writes the index of the last
            # batch here, and never reads it).
            "batch": self._batches_done,
            "iterations": iterations,
            "start_iterations": self._start_iterations,
            "steps_per_epoch": self._steps,
            "configuration": self._configuration,
        }
        # The position goes inside the weights file, so that one atomic
        # rename commits both: a kill at any moment leaves the previous
        # backup or the new one, never the weights of one meta-step with the
        # position of another.
        # (Keras saves weights only under names ending in ".weights.h5".)
        tmp = os.path.join(self.backup_dir, "latest.tmp.weights.h5")
        with _durable.atomic_write(weights_path, tmp) as tmp:
            self.model.save_weights(tmp, overwrite=True)
            with h5py.File(tmp, "a") as f:
                f.attrs[_METADATA_ATTR] = json.dumps(metadata)
        # Also in Keras's metadata file, for tools that read it.
        with _durable.atomic_write(metadata_path, metadata_path + ".tmp") as tmp:
            with open(tmp, "w") as f:
                f.write(json.dumps(metadata))
        # The renames themselves survive a power cut only once the directory
        # is on disk (a kill needs no flush: the kernel keeps the writes).
        _durable.fsync_dir(self.backup_dir)
        self._last_saved = key
        self._latest_unreadable = False

    def _restore(self):
        latest, previous = self._paths(), self._paths(previous=True)
        if not os.path.exists(latest[0]):
            return None
        if not self.model.built:
            raise ValueError(
                "Expected a built model to restore the backup into: build "
                "the wrapped model (e.g. call it on a batch) before `fit`. "
                f"Received: an unbuilt model {self.model.name!r}"
            )
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        # Everything is read and checked before anything is loaded, so that
        # a refused backup leaves the model as it was.
        weights_path = latest[0]
        try:
            metadata = _read_backup(*latest)
        except _UnreadableBackupError as error:
            if not (self.double_checkpoint and os.path.exists(previous[0])):
                raise _UnreadableBackupError(
                    f"{error} Nothing was restored and the file is kept; "
                    f"remove {self.backup_dir} to start afresh."
                ) from error
            try:
                metadata = _read_backup(*previous)
            except _UnreadableBackupError as previous_error:
                raise _UnreadableBackupError(
                    f"{error} Neither can the previous backup be restored: "
                    f"{previous_error} Nothing was restored and the files "
                    f"are kept; remove {self.backup_dir} to start afresh."
                ) from previous_error
            warnings.warn(
                f"{error} Resuming from the previous backup, {previous[0]}, "
                "instead: the meta-steps after it are redone.",
                stacklevel=2,
            )
            weights_path = previous[0]
            self._latest_unreadable = True
        if metadata is not None:
            self._check_resumable(metadata)
        _load_weights(self.model, weights_path)
        if metadata is None:
            return None
        if "iterations" not in metadata:
            # Written by `keras.callbacks.BackupAndRestore`: epoch only.
            return metadata["epoch"], 0, self._iterations()
        return metadata["epoch"], metadata["batch"], metadata["start_iterations"]

    def _check_resumable(self, metadata):
        """Raises if the backup was made by a run configured differently."""
        if "iterations" not in metadata:
            return  # Written by `keras.callbacks.BackupAndRestore`.
        saved_steps = metadata["steps_per_epoch"]
        if saved_steps is not None and saved_steps != self._steps:
            raise ValueError(
                "Expected `fit` to be called with the `steps_per_epoch` of "
                f"the interrupted run ({saved_steps}) to resume it from "
                f"{self.backup_dir}. Received: steps_per_epoch={self._steps}"
            )
        saved = metadata.get("configuration")
        if saved is None:
            return  # Written before backups recorded their configuration.
        differences = list(_differences(saved, self._configuration))
        if not differences:
            return
        listed = "; ".join(
            f"{field}: {_brief(old)} vs. {_brief(new)}"
            for field, old, new in differences[:_MAX_LISTED_DIFFERENCES]
        )
        if len(differences) > _MAX_LISTED_DIFFERENCES:
            listed += f"; and {len(differences) - _MAX_LISTED_DIFFERENCES} more"
        raise ValueError(
            "Expected the model and outer optimizer to be configured as in "
            f"the run that wrote the backup in {self.backup_dir}, to resume "
            f"it. Received differences (backup vs. this run): {listed}. "
            "Nothing was restored and the backup is kept: configure the run "
            "as before to resume it, or pass another `backup_dir` to start "
            "afresh."
        )


class GracefulShutdown(keras.callbacks.Callback):
    """Stops `fit` after the current meta-step on SIGTERM or SIGINT.

    Schedulers send SIGTERM before preempting a job, and Ctrl-C sends
    SIGINT. By default the first would kill the process, possibly in the
    middle of writing a checkpoint, and the second would raise
    `KeyboardInterrupt` at an arbitrary point. With this callback, `fit`
    finishes the running meta-step, writes a backup (with `backup`) and
    returns normally; the script can then exit, e.g. with
    `128 + received_signal`. Keras still ends the epoch: the validation pass
    and the epoch-end callbacks run once more on the partial epoch (a
    `BackupAndRestore` backup still records it as partial, so a restarted
    run redoes them at the right meta-step). A second signal restores the
    previous handlers and delivers the signal to them (the default SIGTERM
    handler kills the process; SIGINT raises `KeyboardInterrupt`).

    The handlers are installed when training begins, in the main thread
    only, and the previous ones restored when it ends. Copies of the
    callback (Keras Tuner deep-copies callbacks for each trial) share their
    state, so `received_signal` of the instance passed to `fit` or
    `tuner.search` tells whether a signal stopped training.

    Args:
        backup: Optional `keras_reptile.callbacks.BackupAndRestore` from the
            same `fit` call, to back up at the meta-step where training
            stops and keep the backup after `fit` returns.
        signals: The signals to handle.

    Example:

    >>> import sys, keras, keras_reptile
    >>> backbone = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    >>> model = keras_reptile.ReptileModel(backbone, inner_steps=2,
    ...                                    inner_batch_size=5)
    >>> model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    >>> backup = keras_reptile.callbacks.BackupAndRestore(
    ...     "/tmp/reptile_shutdown_doctest", save_freq=100)
    >>> shutdown = keras_reptile.callbacks.GracefulShutdown(backup)
    >>> tasks = keras_reptile.datasets.sine(shots=5, seed=0)
    >>> history = model.fit(backup.resumable(tasks), steps_per_epoch=2,
    ...                     callbacks=[backup, shutdown], verbose=0)
    >>> if shutdown.received_signal is not None:
    ...     sys.exit(128 + shutdown.received_signal)
    """

    def __init__(self, backup=None, signals=(signal.SIGTERM, signal.SIGINT)):
        super().__init__()
        if backup is not None and not isinstance(backup, BackupAndRestore):
            if isinstance(backup, keras.callbacks.BackupAndRestore):
                raise TypeError(
                    "Expected `backup` to be a "
                    "`keras_reptile.callbacks.BackupAndRestore`: Keras's own "
                    "restarts a partial epoch from its first step and "
                    "deletes its backup when `fit` returns after a stop. "
                    f"Received: backup={backup!r}"
                )
            raise TypeError(
                "Expected `backup` to be a "
                "`keras_reptile.callbacks.BackupAndRestore` or None. "
                f"Received: backup={backup!r} of type {type(backup).__name__}"
            )
        try:
            signals = tuple(signal.Signals(s) for s in signals)
        except (TypeError, ValueError):
            raise ValueError(
                "Expected `signals` to be a sequence of signal numbers, e.g. "
                f"(signal.SIGTERM, signal.SIGINT). Received: signals={signals!r}"
            ) from None
        uncatchable = [
            s for s in signals
            if s in (getattr(signal, "SIGKILL", None), getattr(signal, "SIGSTOP", None))
        ]
        if not signals or uncatchable:
            raise ValueError(
                "Expected `signals` to be a non-empty sequence of catchable "
                f"signals. Received: signals={signals!r}"
            )
        self.backup = backup
        self.signals = signals
        self._state = _SharedState()

    @property
    def received_signal(self):
        """The signal that stopped the last `fit`, or `None`."""
        return self._state.signum

    def on_train_begin(self, logs=None):
        state = self._state
        state.signum = None
        state.active = self
        if threading.current_thread() is not threading.main_thread():
            warnings.warn(
                "`GracefulShutdown` can only install signal handlers in the "
                "main thread; `fit` is running in another thread, so signals "
                "keep their current handlers.",
                stacklevel=2,
            )
            return
        for signum in self.signals:
            # A `fit` that raised never reached `on_train_end`: keep the
            # handlers it saved rather than saving our own as "previous".
            if signum not in state.previous:
                state.previous[signum] = signal.getsignal(signum)
            signal.signal(signum, state.handle)

    def on_train_batch_end(self, batch, logs=None):
        if self._state.signum is None:
            return
        self.model.stop_training = True
        if self.backup is not None:
            self.backup._backup_now(batch)

    def on_epoch_end(self, epoch, logs=None):
        # The signal came after the last batch-end of the epoch (e.g. during
        # validation): the weights are still those of that meta-step.
        if self._state.signum is not None and self.backup is not None:
            self.backup._backup_now(epoch=epoch)

    def on_train_end(self, logs=None):
        self._state.restore_handlers()
        self._state.active = None


class _SharedState:
    """Signal state shared by a `GracefulShutdown` and all its copies."""

    def __init__(self):
        self.signum = None
        self.active = None
        self.previous = {}

    def __deepcopy__(self, memo):
        # Signals are process-wide: every copy must see one state.
        return self

    def handle(self, signum, frame):
        if self.signum is not None or self.active is None:
            # Second signal (or one arriving after a `fit` that raised):
            # give up on stopping gracefully.
            previous = self.previous.get(signum)
            self.restore_handlers()
            if callable(previous):
                previous(signum, frame)
            elif previous in (signal.SIG_DFL, None):
                signal.raise_signal(signum)
            return
        self.signum = signum
        callback = self.active
        callback.model.stop_training = True
        if callback.backup is not None:
            # Keep the backup even if the signal arrives after the callback
            # hooks of the current step have run.
            callback.backup._interrupted = True
        _logger.warning(
            "Received %s: stopping after the current meta-step. Send it "
            "again to stop immediately.",
            signal.Signals(signum).name,
        )

    def restore_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return
        for signum, previous in self.previous.items():
            signal.signal(
                signum, signal.SIG_DFL if previous is None else previous
            )
        self.previous = {}


_METADATA_ATTR = "keras_reptile_backup"


_MAX_LISTED_DIFFERENCES = 5
_MAX_SHOWN_CHARS = 80

# Keys of Keras configs that hold names, which Keras makes unique within a
# process ("dense_3"): the same model built twice differs only there. (So a
# functional model's wiring, by layer name, is compared through shapes only.)
_NAME_KEYS = frozenset(["name", "keras_history", "input_layers", "output_layers"])


class _UnreadableBackupError(ValueError):
    """A backup file that cannot be read (and may have a fallback)."""


def _configuration(model):
    """What a backup is made with, as JSON values: checked before resuming."""
    try:
        model_config = model.get_config()
    except NotImplementedError:
        # A subclassed model without `get_config()`: the variables still
        # tell most architecture changes.
        model_config = None
    optimizer = getattr(model, "optimizer", None)
    configuration = {
        "model": {"class": type(model).__name__, "config": model_config},
        "optimizer": None if optimizer is None else {
            "class": type(optimizer).__name__,
            "config": optimizer.get_config(),
        },
        "variables": [
            f"{v.dtype}{list(v.shape)}" + ("" if v.trainable else " non-trainable")
            for v in model.weights
        ],
    }
    # Compared with one read back from JSON, where tuples are lists.
    return _without_names(json.loads(json.dumps(configuration, default=str)))


def _without_names(value):
    if isinstance(value, dict):
        if str(value.get("class_name", "")).endswith("DTypePolicy"):
            return value  # Its name is the dtype policy, e.g. "mixed_float16".
        return {
            key: _without_names(item)
            for key, item in value.items()
            if key not in _NAME_KEYS
        }
    if isinstance(value, list):
        return [_without_names(item) for item in value]
    return value


def _differences(saved, current, field=""):
    """Yields `(field, saved value, current value)` where two JSON values differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        for key in list(saved) + [k for k in current if k not in saved]:
            yield from _differences(
                saved.get(key, "<missing>"),
                current.get(key, "<missing>"),
                f"{field}.{key}" if field else key,
            )
    elif (
        isinstance(saved, list)
        and isinstance(current, list)
        and len(saved) == len(current)
    ):
        for i, (s, c) in enumerate(zip(saved, current)):
            yield from _differences(s, c, f"{field}[{i}]")
    elif saved != current:
        yield field, saved, current


def _brief(value):
    text = json.dumps(value)
    if len(text) > _MAX_SHOWN_CHARS:
        text = text[: _MAX_SHOWN_CHARS - 3] + "..."
    return text


def _read_backup(weights_path, metadata_path):
    """Returns a backup's metadata (or `None`), after reading all its weights.

    Raises:
        _UnreadableBackupError: If the weights file or the metadata cannot
            be read; the message names the file.
    """
    try:
        with h5py.File(weights_path, "r") as f:
            # Reading every array finds a truncated or garbled file before
            # `load_weights` has assigned some of the variables.
            f.visititems(_read_array)
            metadata = f.attrs.get(_METADATA_ATTR)
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        raise _UnreadableBackupError(
            f"Expected {weights_path} to be a backup weights file, but it "
            f"cannot be read: it is corrupt or truncated ({error})."
        ) from error
    source = weights_path
    try:
        if metadata is None:
            # Written by `keras.callbacks.BackupAndRestore`.
            if not os.path.exists(metadata_path):
                return None
            source = metadata_path
            with open(metadata_path) as f:
                metadata = f.read()
        metadata = json.loads(metadata)
    except (OSError, ValueError) as error:
        raise _UnreadableBackupError(
            f"Expected the backup metadata in {source} to be JSON, but it "
            f"cannot be read: it is corrupt ({error})."
        ) from error
    if not isinstance(metadata, dict) or "epoch" not in metadata:
        raise _UnreadableBackupError(
            f"Expected the backup metadata in {source} to be a JSON object "
            f"with an `epoch`. Received: {_brief(metadata)}."
        )
    return metadata


def _read_array(name, item):
    if isinstance(item, h5py.Dataset):
        item[()]  # Raises if the data is cut off or unreadable.
    return None  # `visititems` stops at the first other return value.


def _load_weights(model, path):
    if path.endswith(".weights.h5"):
        model.load_weights(path)
        return
    # `load_weights` only reads names ending in ".weights.h5", and the
    # previous backup is "latest.weights.h5.bkp" (Keras's name for it).
    with tempfile.TemporaryDirectory(dir=os.path.dirname(path)) as tmp:
        link = os.path.join(tmp, "previous.weights.h5")
        try:
            os.link(path, link)
        except OSError:
            shutil.copyfile(path, link)
        model.load_weights(link)


def _atomic_copy(src, dst):
    with _durable.atomic_write(dst, dst + ".tmp") as tmp:
        shutil.copyfile(src, tmp)
