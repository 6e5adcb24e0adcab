"""`ReptileModel.fit` under tf.distribute equals one device.

Every run is a subprocess: logical CPU devices and multi-worker clusters must
be configured before TensorFlow initialises, and each worker is a process.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

# argv: strategy ("single", "mirrored" or "multi_worker"), meta-batch size,
# whether the inner optimizer's state is carried ("0"/"1"), algorithm.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf

    kind, meta_batch_size, carry = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    algorithm_name = sys.argv[4]
    if kind == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    elif kind == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    import keras
    import keras_reptile

    def episodes(meta_batch_size, seed):
        rng = np.random.default_rng(0)
        y = np.repeat(np.arange(8), 6)
        x = (rng.normal(size=(8, 8, 8, 1))[y]
             + 0.5 * rng.normal(size=(48, 8, 8, 1))).astype("float32")
        return keras_reptile.episodes.from_arrays(
            x, y, ways=3, shots=2, query_shots=1,
            meta_batch_size=meta_batch_size, seed=seed)

    # Each replica must adapt its share of the tasks, never all of them: the
    # algorithm's outer-gradient hook sees one replica's tasks.
    tasks_per_replica = set()
    base = keras_reptile.algorithms.get(algorithm_name)

    class Recording(type(base)):
        def outer_gradient(self, theta, results):
            tasks_per_replica.add(len(results))
            return super().outer_gradient(theta, results)

    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = keras_reptile.ReptileModel(
            keras_reptile.models.conv4((8, 8, 1), 3, filters=4, num_blocks=2),
            inner_optimizer=keras.optimizers.Adam(0.01, beta_1=0.0),
            inner_steps=3, inner_batch_size=3, eval_inner_steps=4,
            carry_inner_optimizer_state=carry,
            algorithm=Recording(**base.get_config()))
        # Without XLA on every device count: jit_compile="auto" would
        # compile the single-device step with XLA only, and the comparison
        # is about replication, not XLA's rounding.
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"], jit_compile=False)
    initial = [w.numpy().tolist() for w in model.weights]
    history = model.fit(
        episodes(meta_batch_size, 0), steps_per_epoch=3, epochs=2,
        validation_data=episodes(meta_batch_size, 1), validation_steps=2,
        verbose=0)
    # The wrapped model's weights (BatchNorm statistics included) and the
    # carried inner-optimizer state, if any.
    weights = [w.numpy().tolist() for w in model.weights]
    uneven_error = None
    if strategy.num_replicas_in_sync > 1:
        try:
            model.fit(episodes(3, 0), steps_per_epoch=1, verbose=0)
        except ValueError as error:
            uneven_error = str(error)
        # Raised before any work: nothing moved.
        assert weights == [w.numpy().tolist() for w in model.weights]
    print(json.dumps({
        "weights": weights,
        "initial": initial,
        "trainable": [bool(w.trainable) for w in model.weights],
        "history": history.history,
        "tasks_per_replica": sorted(tasks_per_replica),
        "uneven_error": uneven_error,
    }))
    """
)


def _run(kind, carry=False, env=None, algorithm="reptile"):
    process = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, kind, "4", "1" if carry else "0", algorithm],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    return process


def _report(process):
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _assert_same_training(single, distributed, num_weights, atol=1e-5):
    import numpy as np

    assert len(single["weights"]) == len(distributed["weights"]) == num_weights
    for a, b in zip(single["weights"], distributed["weights"]):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=0, atol=atol)
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        np.testing.assert_allclose(
            distributed["history"][key], single["history"][key], rtol=1e-5
        )
    # Training moved every trainable meta-weight (both conv kernels, the
    # BatchNormalization scales and offsets, the dense kernel and bias) far
    # beyond the tolerance, so the equality above is not trivial: compared
    # with the same seed's weights before training, not with zero.
    trainable = [i for i, flag in enumerate(single["trainable"]) if flag]
    assert len(trainable) == 8
    for index in trainable:
        moved = np.abs(np.array(single["weights"][index]) - np.array(single["initial"][index]))
        assert moved.max() > 100 * atol, (index, moved.max())
    assert single["initial"] == distributed["initial"]


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_mirrored_strategy_matches_single_device(algorithm):
    # Outer SGD, as in the paper: an adaptive outer optimizer (Adam) turns
    # rounding-level differences in near-zero pseudo-gradient components
    # (summation order across replicas) into full-size steps.
    single = _report(_run("single", algorithm=algorithm))
    mirrored = _report(_run("mirrored", algorithm=algorithm))
    # 2 conv kernels, 2 x 4 BatchNormalization weights (statistics included),
    # dense kernel and bias.
    # FOMAML's query-loss gradients sum in another order across replicas:
    # measured up to 2.5e-5 apart after 6 meta-steps.
    _assert_same_training(single, mirrored, 12, atol=1e-5 if algorithm == "reptile" else 5e-5)
    assert single["tasks_per_replica"] == [4]
    assert mirrored["tasks_per_replica"] == [2]
    assert single["uneven_error"] is None
    assert "divide evenly across the 2 replicas" in mirrored["uneven_error"]
    assert "split as [2, 1]" in mirrored["uneven_error"]


@pytest.mark.parametrize("algorithm", ["reptile", "fomaml"])
def test_multi_worker_mirrored_strategy_matches_single_device(algorithm):
    # Two worker processes on loopback, one CPU replica each: the meta-batch
    # of 4 tasks is split 2 + 2 across processes. With the inner Adam's state
    # carried, which is averaged across workers too.
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    workers = []
    for index in range(2):
        env = dict(os.environ)
        env["TF_CONFIG"] = json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}
        )
        workers.append(_run("multi_worker", carry=True, env=env, algorithm=algorithm))
    reports = [_report(worker) for worker in workers]
    single = _report(_run("single", carry=True, algorithm=algorithm))
    for report in reports:
        # The 12 weights above, Adam's 2 x 8 slots and its iteration count.
        _assert_same_training(single, report, 29, atol=1e-5 if algorithm == "reptile" else 5e-5)
        assert report["tasks_per_replica"] == [2]
        assert "divide evenly across the 2 replicas" in report["uneven_error"]


@pytest.mark.parametrize("algorithm", ["maml", "anil"])
def test_second_order_maml_under_several_replicas_is_a_clear_error(algorithm):
    script = SCRIPT.split("history = model.fit(")[0] + textwrap.dedent(
        """
        before = [w.numpy() for w in model.weights]
        try:
            model.fit(episodes(meta_batch_size, 0), steps_per_epoch=1, verbose=0)
        except ValueError as error:
            message = str(error)
        else:
            message = None
        unchanged = all(np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights))
        print(json.dumps({"message": message, "unchanged": unchanged}))
        """
    )
    process = subprocess.run(
        [sys.executable, "-c", script, "mirrored", "4", "0", algorithm],
        capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(process.stdout.strip().splitlines()[-1])
    assert "Second-order meta-gradients (MAML, ANIL, Meta-SGD) are not supported" in (
        report["message"])
    # The test's algorithm records its calls: a subclass, named "Recording".
    assert "Received: algorithm=Recording(first_order=False" in report["message"]
    assert report["unchanged"]


def test_a_non_finite_meta_step_is_undone_on_every_replica():
    # One NaN in one task of the second meta-batch: the replica holding that
    # task breaks, and every replica must undo the step and stop together.
    script = SCRIPT.split("history = model.fit(")[0] + textwrap.dedent(
        """
        data = list(episodes(meta_batch_size, 0).take(2))
        bad = dict(data[1])
        x = bad["support_x"].numpy()
        x[3, 0, 0, 0, 0] = np.nan
        bad["support_x"] = tf.constant(x)
        model.fit(tf.data.Dataset.from_tensors(data[0]), verbose=0)
        after_one = [w.numpy() for w in model.weights + model.optimizer.variables]
        try:
            model.fit(tf.data.Dataset.from_tensors(bad), verbose=0)
        except FloatingPointError as error:
            message = str(error)
        else:
            message = None
        now = [w.numpy() for w in model.weights + model.optimizer.variables]
        unchanged = all(np.array_equal(a, b) for a, b in zip(after_one, now))
        finite = all(np.isfinite(w).all() for w in now)
        print(json.dumps({"message": message, "unchanged": unchanged, "finite": finite}))
        """
    )
    process = subprocess.run(
        [sys.executable, "-c", script, "mirrored", "4", "1", "reptile"],
        capture_output=True, text=True, timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    report = json.loads(process.stdout.strip().splitlines()[-1])
    assert report["message"] is not None and "Meta-step 2 made" in report["message"]
    assert report["unchanged"] and report["finite"]
