"""Kill -9 at random moments of backup and export writes (issue #13).

A worker process writes over and over what a crash must never leave torn:
`BackupAndRestore` backups (every meta-step of a `fit`) or SavedModel
versions (`export_saved_model`, new versions or `overwrite=True`). The test
stops it at seeded random moments and then kills it with SIGKILL at another,
and checks what is on disk:

* every backup file present loads, holds the state the worker had at the
  meta-step it claims, and `BackupAndRestore` resumes from it at that
  meta-step with that state;
* every integer-named directory (what TF Serving takes for a version) is a
  complete SavedModel that loads and serves the weights of its version;
  everything else is dot-prefixed, so TF Serving ignores it.

Before the kill, the worker is also frozen with SIGSTOP at random moments
(half of them just after it changed a file, to land inside writes) and the
directory copied while it is frozen: the copy is exactly what a SIGKILL at
that moment would leave (a killed process writes nothing more, and the
kernel keeps what it wrote), so one worker process, which takes seconds to
start, gives many kill points.

An export worker is killed while one of its temporary directories exists,
and the next export to the same directory must remove it.

The same harness run on writers known not to be atomic (Keras's own
`BackupAndRestore`, and Keras's `Model.export`, which write in place) must
find torn states: that shows the checks can fail.

Linux only (`/proc` tells when every thread of the worker is stopped).
"""

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_reptile import callbacks as reptile_callbacks
from keras_reptile import export as export_lib

pytestmark = pytest.mark.skipif(
    not os.path.isdir("/proc/self/task"),
    reason="needs Linux /proc to tell when the worker is stopped",
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shared by the worker and this process, so both build the same model (the
# backup records the configuration and refuses to resume into another).
SETUP = r'''
import keras
import numpy as np

import keras_reptile

STEPS = 7  # Meta-steps per epoch: backups fall inside and at ends of epochs.
EXPORT_X = np.array([[1.0], [2.0]], "float32")


def make_model():
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([
        keras.Input((1,)),
        keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(1),
    ])
    model = keras_reptile.ReptileModel(backbone, inner_steps=1, inner_batch_size=5)
    # Adam: the backup must also hold the outer optimizer's slots.
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


def make_tasks():
    return keras_reptile.datasets.sine(shots=5, meta_batch_size=1, seed=0)


def state(model):
    """Everything a backup restores: weights and outer-optimizer variables."""
    return [np.array(v) for v in model.weights] + [
        np.array(v) for v in model.optimizer.variables
    ]


def make_export_model():
    backbone = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model = keras_reptile.ReptileModel(backbone, eval_inner_steps=1)
    model.compile(optimizer="sgd", loss="mse")
    return model


def coefficient(k):
    return 0.25 * k  # Exact in float32, as are the outputs below.


def set_coefficient(model, k):
    """Export number `k` serves `outputs = c * x + c` with `c = 0.25 * k`."""
    c = coefficient(k)
    model.model.set_weights([np.full((1, 1), c, "float32"), np.full((1,), c, "float32")])
'''

WORKER = r'''
import json
import os
import sys

import keras
import numpy as np

import keras_reptile
from atomicity_setup import (
    STEPS, make_export_model, make_model, make_tasks, set_coefficient, state,
)

mode, out, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

if mode == "backup":
    # One `fit` backed up by every writer under test, each into its own
    # directory: one process start for all of them.
    model = make_model()
    states = os.path.join(out, "states")
    os.makedirs(states)

    class Record(keras.callbacks.Callback):
        # Listed first: the state after a meta-step is on disk before any
        # backup of it.
        def on_train_batch_end(self, batch, logs=None):
            n = int(self.model.optimizer.iterations)
            tmp = os.path.join(states, f"{n}.tmp.npz")
            np.savez(tmp, *state(self.model))
            os.replace(tmp, os.path.join(states, f"{n}.npz"))

    backups = []
    for writer in options["writers"]:
        kind, double = writer.split("-")
        cls = (keras.callbacks.BackupAndRestore if kind == "keras"
               else keras_reptile.callbacks.BackupAndRestore)
        backups.append(cls(os.path.join(out, "backup", writer), save_freq=1,
                           double_checkpoint=double == "double"))
    model.fit(make_tasks(), epochs=10**6, steps_per_epoch=STEPS,
              callbacks=[Record()] + backups, verbose=0)
else:
    model = make_export_model()
    k = 0
    while True:
        k += 1
        set_coefficient(model, k)
        for writer in options["writers"]:
            models = os.path.join(out, "models", writer)
            if writer == "keras":
                # Written in place by `tf.saved_model.save`.
                model.model.export(
                    keras_reptile.export.next_version_path(models),
                    format="tf_saved_model", verbose=False)
            elif writer == "overwrite":
                keras_reptile.export.export_saved_model(
                    model, os.path.join(models, "1"), overwrite=True,
                    verbose=False)
            else:
                keras_reptile.export.export_saved_model(
                    model, keras_reptile.export.next_version_path(models),
                    verbose=False)
'''

_setup = {}
exec(SETUP, _setup)
STEPS = _setup["STEPS"]
EXPORT_X = _setup["EXPORT_X"]

# Seconds between the first write on disk and the SIGKILL, over which the
# freezes are spread; backups come every few milliseconds, versions every
# second or so.
BACKUP_WINDOW, EXPORT_WINDOW = 2.0, 5.0
START_TIMEOUT = 240  # A worker imports TensorFlow: slow on a loaded machine.


# ----------------------------------------------------------------------------
# Worker control


class _Worker:
    """A worker process writing into `out`, with its output in files."""

    def __init__(self, tmp_path, mode, **options):
        script_dir = tmp_path / "script"
        script_dir.mkdir(exist_ok=True)
        (script_dir / "atomicity_setup.py").write_text(SETUP)
        (script_dir / "worker.py").write_text(WORKER)
        self.out = tmp_path / "out"
        self.out.mkdir()
        env = dict(
            os.environ,
            TF_CPP_MIN_LOG_LEVEL="3",
            PYTHONPATH=os.pathsep.join([str(script_dir), REPO]),
        )
        self._log = open(tmp_path / "worker.log", "w")
        self._log_path = tmp_path / "worker.log"
        self.process = subprocess.Popen(
            [sys.executable, str(script_dir / "worker.py"), mode,
             str(self.out), json.dumps(options)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )

    def log(self):
        if not self._log.closed:
            self._log.flush()
        return self._log_path.read_text()[-3000:]

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        # Whatever happened in the trial, no writer is left running.
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=60)
        if not self._log.closed:
            self._log.close()

    def wait_for(self, ready):
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            if self.process.poll() is not None:
                raise AssertionError(f"the worker exited early:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"the worker did not start:\n{self.log()}")
            time.sleep(0.02)

    @contextlib.contextmanager
    def frozen(self):
        """Stops every thread of the worker for the duration of the block."""
        pid = self.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 30
            while not _all_threads_stopped(pid):
                if time.monotonic() > deadline:
                    raise AssertionError("the worker did not stop on SIGSTOP")
                time.sleep(0.001)
            yield
        finally:
            os.kill(pid, signal.SIGCONT)

    def kill(self):
        if self.process.poll() is not None:
            raise AssertionError(
                f"the worker exited before the kill:\n{self.log()}"
            )
        self.process.send_signal(signal.SIGKILL)
        assert self.process.wait(timeout=60) == -signal.SIGKILL


def _all_threads_stopped(pid):
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                # The state follows the parenthesised command name.
                states.append(f.read().rsplit(")", 1)[1].split()[0])
        except FileNotFoundError:
            continue  # A thread that has just exited.
    return bool(states) and all(s in ("T", "t") for s in states)


def _tree_signature(path):
    """Names, sizes and modification times of everything under `path`."""
    signature = set()
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            entry = os.path.join(root, name)
            try:
                stat = os.stat(entry)
            except FileNotFoundError:
                continue  # Renamed or deleted since the listing.
            signature.add((entry, stat.st_size, stat.st_mtime_ns))
    return signature


def _listdir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _kill_at_random_moments(
    worker, watched, snapshots_dir, rng, freezes, window, writers,
    kill_when=None,
):
    """Freezes the worker and copies `watched` `freezes` times, then kills it.

    The freezes are at moments drawn uniformly over `window` seconds; every
    other one then also waits for one of the worker's next few changes
    under `watched/<writer>` (each writer in turn), so that many freezes
    fall in the middle of a write (writes take a small part of the time,
    especially exports, which are mostly tracing).
    The SIGKILL follows the last freeze after a random delay of at most
    0.5 s, or, with `kill_when`, at a random moment (within 20 ms) after
    `kill_when()` is next true (if it is within 10 s). Returns the copies,
    in order.
    """
    moments = sorted(rng.uniform(0, window) for _ in range(freezes))
    start = time.monotonic()
    copies = []
    for i, moment in enumerate(moments):
        time.sleep(max(0.0, start + moment - time.monotonic()))
        if i % 2:
            target = os.path.join(watched, writers[(i // 2) % len(writers)])
            # A write is several changes (create, grow, rename, ...): stop
            # after a random one of the next few, not always the first.
            seen = _tree_signature(target)
            deadline = time.monotonic() + 3
            for _ in range(rng.randint(1, 3)):
                while time.monotonic() < deadline:
                    current = _tree_signature(target)
                    if current != seen:
                        seen = current
                        break
                    time.sleep(0.0002)
        copy = os.path.join(snapshots_dir, f"{i:03d}")
        with worker.frozen():
            shutil.copytree(watched, copy, symlinks=True)
        copies.append(copy)
    if kill_when is None:
        time.sleep(rng.uniform(0, 0.5))
    else:
        deadline = time.monotonic() + 10
        while not kill_when() and time.monotonic() < deadline:
            time.sleep(0.0005)
        time.sleep(rng.uniform(0, 0.02))
    worker.kill()
    return copies


# ----------------------------------------------------------------------------
# Backups


def _states(states_dir):
    """The worker's state after each meta-step, written before its backup."""
    states = {}
    for name in os.listdir(states_dir):
        if name.endswith(".npz") and ".tmp" not in name:
            with np.load(os.path.join(states_dir, name)) as data:
                states[int(name[: -len(".npz")])] = [
                    data[f"arr_{i}"] for i in range(len(data.files))
                ]
    return states


def _same_state(a, b):
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


_TASKS = []


def _tasks():
    """The worker's training episodes, built once (a pipeline costs ~0.1 s)."""
    if not _TASKS:
        _TASKS.append(_setup["make_tasks"]())
    return _TASKS[0]


class _Probe(keras.callbacks.Callback):
    """Records the state `BackupAndRestore` restored, and stops at once."""

    def on_train_begin(self, logs=None):
        self.iterations = int(self.model.optimizer.iterations)
        self.state = _setup["state"](self.model)
        self.model.stop_training = True


def _backup_problems(backup_dir, states, model, double_checkpoint, scratch):
    """What is wrong with the backups in `backup_dir`, as messages."""
    problems = []
    loaded = {}
    for name in ("latest.weights.h5", "latest.weights.h5.bkp"):
        path = os.path.join(backup_dir, name)
        if not os.path.exists(path):
            continue
        # Plain Keras reads only names ending in ".weights.h5".
        readable = os.path.join(scratch, "backup.weights.h5")
        shutil.copyfile(path, readable)
        try:
            model.load_weights(readable)
        except Exception as error:  # Any failure is a torn backup.
            problems.append(f"{name} cannot be loaded: {type(error).__name__}: "
                            f"{str(error)[:200]}")
            continue
        n = int(model.optimizer.iterations)
        if n not in states or not _same_state(_setup["state"](model), states[n]):
            problems.append(
                f"{name} holds a state that the worker never had after "
                f"meta-step {n}"
            )
            continue
        loaded[name] = n
    if "latest.weights.h5" not in loaded:
        if not problems:
            problems.append("no backup at all")
        return problems

    # `BackupAndRestore` resumes from the latest backup, at its meta-step.
    backup = reptile_callbacks.BackupAndRestore(
        backup_dir, save_freq=1, double_checkpoint=double_checkpoint,
        delete_checkpoint=False,
    )
    probe = _Probe()
    try:
        model.fit(
            backup.resumable(_tasks()), epochs=10**6,
            steps_per_epoch=STEPS, callbacks=[backup, probe], verbose=0,
        )
    except Exception as error:
        return problems + [
            f"BackupAndRestore cannot resume: {type(error).__name__}: "
            f"{str(error)[:300]}"
        ]
    if probe.iterations != loaded["latest.weights.h5"]:
        problems.append(
            f"BackupAndRestore resumed at meta-step {probe.iterations}, but "
            f"the latest backup is of meta-step {loaded['latest.weights.h5']}"
        )
    elif not _same_state(probe.state, states[probe.iterations]):
        problems.append(
            f"BackupAndRestore resumed with a state the worker never had "
            f"after meta-step {probe.iterations}"
        )
    return problems


# Ours with and without the previous backup, in one `fit` (one process
# start); Keras's in a process of its own, where its writes take most of the
# time, as they would in a real run (ours `fsync`, so they dominate a `fit`
# of this tiny model).
BACKUP_WRITERS = ("reptile-single", "reptile-double")
CONTROL_BACKUP_WRITERS = ("keras-double",)


@pytest.fixture(scope="module")
def backup_model():
    model = _setup["make_model"]()
    model.optimizer.build(model.trainable_variables)
    return model


def _backup_trial(tmp_path, model, writers, seed, freezes):
    """Kills a backing-up worker; returns `{writer: {kill point: problems}}`."""
    with _Worker(tmp_path, "backup", writers=writers) as worker:
        return _backup_trial_with(worker, tmp_path, model, writers, seed, freezes)


def _backup_trial_with(worker, tmp_path, model, writers, seed, freezes):
    root = os.path.join(worker.out, "backup")

    def ready():
        # Past the first backups, so that the previous ones exist too.
        for writer in writers:
            latest = os.path.join(root, writer, "latest.weights.h5")
            if not os.path.exists(latest + (".bkp" if "double" in writer else "")):
                return False
        return True

    worker.wait_for(ready)
    snapshots_dir = tmp_path / "snapshots"
    snapshots_dir.mkdir()
    copies = _kill_at_random_moments(
        worker, root, str(snapshots_dir),
        random.Random(f"backup-{'-'.join(writers)}-{seed}"), freezes,
        BACKUP_WINDOW, writers,
    )
    states = _states(os.path.join(worker.out, "states"))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    found = {}
    for writer in writers:
        found[writer] = {}
        for where in copies + [root]:
            problems = _backup_problems(
                os.path.join(where, writer), states, model,
                "double" in writer, str(scratch),
            )
            if problems:
                found[writer][_kill_point(where, root)] = problems
    return found, len(copies) + 1


def _kill_point(where, final):
    return "after SIGKILL" if where == final else f"freeze {os.path.basename(where)}"


@pytest.fixture(scope="module")
def backup_trial(tmp_path_factory, backup_model):
    return _backup_trial(
        tmp_path_factory.mktemp("backup_trial"), backup_model, BACKUP_WRITERS,
        seed=0, freezes=20,
    )


@pytest.mark.parametrize("writer", BACKUP_WRITERS)
def test_killed_backups_are_whole_and_resumable(backup_trial, writer):
    found, kill_points = backup_trial
    assert not found[writer], (
        f"{len(found[writer])} of {kill_points} kill points: {found[writer]}"
    )


def test_the_backup_checks_catch_a_writer_that_is_not_atomic(
    tmp_path, backup_model
):
    # Keras's `BackupAndRestore` writes the weights file in place (and copies
    # it to the previous backup in place): some kill points must find it
    # torn, or the checks above prove nothing.
    found, kill_points = _backup_trial(
        tmp_path, backup_model, CONTROL_BACKUP_WRITERS, seed=0, freezes=10
    )
    assert found["keras-double"], (
        f"none of {kill_points} kill points found a torn backup of Keras's "
        "BackupAndRestore"
    )


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_backups_are_whole_and_resumable_more_trials(
    tmp_path, backup_model, seed
):
    found, kill_points = _backup_trial(
        tmp_path, backup_model, BACKUP_WRITERS, seed, freezes=40
    )
    for writer in BACKUP_WRITERS:
        assert not found[writer], (
            f"{writer}: {len(found[writer])} of {kill_points} kill points: "
            f"{found[writer]}"
        )


# ----------------------------------------------------------------------------
# SavedModel versions


def _digest(directory):
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()


def _version_problem(path, version, overwrite, full_api):
    """Why `path` is not a complete export of `version`, or None."""
    try:
        loaded = tf.saved_model.load(path)
        serve = loaded.signatures["serving_default"]
        (input_name,) = serve.structured_input_signature[1]
        outputs = serve(**{input_name: tf.constant(EXPORT_X)})
    except Exception as error:  # Any failure is a torn version.
        message = str(error).replace(path, "<version>")[:200]
        return f"cannot be served: {type(error).__name__}: {message}"
    (values,) = [v.numpy() for k, v in outputs.items() if k in ("outputs", "output_0")]
    c = values[0, 0] / 2.0  # outputs = c * x + c at x = 1, 2.
    if overwrite:
        # Overwritten again and again: any export k of the worker.
        k = c / _setup["coefficient"](1)
        from_an_export = k >= 1 and k == round(k)
    else:
        from_an_export = c == _setup["coefficient"](version)
    if not from_an_export or not np.array_equal(values, c * EXPORT_X + c):
        return f"serves outputs {values.ravel().tolist()}, of no export"
    if full_api:
        missing = {
            export_lib.SERVING_SIGNATURE, export_lib.ADAPT_SIGNATURE,
            export_lib.ADAPT_STEPS_SIGNATURE,
        } - set(loaded.signatures)
        if missing:
            return f"lacks the signatures {sorted(missing)}"
    return None


def _models_problems(models_dir, cache, overwrite, full_api):
    problems = []
    if not os.path.isdir(models_dir):
        return problems
    for entry in sorted(os.listdir(models_dir)):
        path = os.path.join(models_dir, entry)
        if not entry.isdigit():
            # TF Serving takes any integer name for a version.
            if not entry.startswith("."):
                problems.append(f"{entry}: neither a version nor hidden")
            continue
        key = (_digest(path), entry)
        if key not in cache:
            cache[key] = _version_problem(path, int(entry), overwrite, full_api)
        if cache[key]:
            problems.append(f"version {entry} {cache[key]}")
    return problems


def _export_trial(tmp_path, writers, seed, freezes):
    """Kills an exporting worker; returns `{writer: {kill point: problems}}`."""
    with _Worker(tmp_path, "export", writers=writers) as worker:
        return _export_trial_with(worker, tmp_path, writers, seed, freezes)


def _export_trial_with(worker, tmp_path, writers, seed, freezes):
    root = os.path.join(worker.out, "models")

    def ready():
        for writer in writers:
            models = os.path.join(root, writer)
            if not (os.path.isdir(models) and any(
                e.isdigit() for e in os.listdir(models)
            )):
                return False
        return True

    worker.wait_for(ready)
    snapshots_dir = tmp_path / "snapshots"
    snapshots_dir.mkdir()
    copies = _kill_at_random_moments(
        worker, root, str(snapshots_dir),
        random.Random(f"export-{'-'.join(writers)}-{seed}"), freezes,
        EXPORT_WINDOW, writers,
        # Ours: while a temporary directory exists, which the next export
        # must then clean up. (Keras's `export` makes none.)
        kill_when=None if "keras" in writers else lambda: any(
            e.startswith(".") for writer in writers
            for e in _listdir(os.path.join(root, writer))
        ),
    )
    found = {}
    for writer in writers:
        cache = {}
        found[writer] = {}
        for where in copies + [root]:
            problems = _models_problems(
                os.path.join(where, writer), cache,
                overwrite=writer == "overwrite", full_api=writer != "keras",
            )
            if problems:
                found[writer][_kill_point(where, root)] = problems
    return found, len(copies) + 1, root, worker.process.pid


def _check_next_export_cleans_up(models_dir, killed_pid):
    """The next export removes what the killed one left, and loses nothing."""
    before = os.listdir(models_dir)
    # An interrupted overwrite may have moved its version aside: it counts.
    moved_aside = [
        e[1:].split(".old-")[0] for e in before
        if ".old-" in e and f"-{killed_pid}-" in e
    ]
    versions_before = {e for e in before if e.isdigit()} | set(moved_aside)
    model = _setup["make_export_model"]()
    _setup["set_coefficient"](model, 1000)
    path = export_lib.next_version_path(models_dir)
    export_lib.export_saved_model(model, path, verbose=False)
    after = os.listdir(models_dir)
    versions = {e for e in after if e.isdigit()}
    # No other process writes here: anything else is a leftover.
    assert set(after) == versions, (
        f"left after the next export: {sorted(set(after) - versions)} "
        f"(before it: {sorted(before)})"
    )
    assert versions == versions_before | {os.path.basename(path)}, (before, after)
    assert int(os.path.basename(path)) == max(int(v) for v in versions)


@pytest.fixture(scope="module")
def export_trial(tmp_path_factory):
    return _export_trial(
        tmp_path_factory.mktemp("export_trial"), ("fresh", "overwrite"),
        seed=0, freezes=12,
    )


@pytest.mark.parametrize("writer", ["fresh", "overwrite"])
def test_killed_exports_leave_only_whole_versions(export_trial, writer):
    found, kill_points, root, pid = export_trial
    assert not found[writer], (
        f"{len(found[writer])} of {kill_points} kill points: {found[writer]}"
    )
    _check_next_export_cleans_up(os.path.join(root, writer), pid)


def test_the_version_checks_catch_an_export_that_is_not_atomic(tmp_path):
    # Keras's `Model.export` writes the SavedModel in place: some kill
    # points must find a part-written version, or the checks prove nothing.
    found, kill_points, _, _ = _export_trial(
        tmp_path, ("keras",), seed=0, freezes=16
    )
    assert found["keras"], (
        f"none of {kill_points} kill points found a part-written version of "
        "Keras's Model.export"
    )


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_exports_leave_only_whole_versions_more_trials(tmp_path, seed):
    found, kill_points, root, pid = _export_trial(
        tmp_path, ("fresh", "overwrite"), seed, freezes=40
    )
    for writer in ("fresh", "overwrite"):
        assert not found[writer], (
            f"{writer}: {len(found[writer])} of {kill_points} kill points: "
            f"{found[writer]}"
        )
        _check_next_export_cleans_up(os.path.join(root, writer), pid)
