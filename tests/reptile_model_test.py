"""`ReptileModel`: the meta-step, evaluation, adaptation, saving and errors."""

import os
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_reptile
from keras_reptile import ReptileModel

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
MODES = {
    "eager": dict(run_eagerly=True),
    "graph": dict(run_eagerly=False, jit_compile=False),
    "xla": dict(run_eagerly=False, jit_compile=True),
}


def _repeat(episode):
    return tf.data.Dataset.from_tensors(episode).repeat()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_one_meta_step_matches_hand_computation(mode, scalar_model, hand_episode):
    # y_hat = w x, loss (w x - y)^2 on one row per step (so grad 2x(wx - y)),
    # inner SGD lr 0.1, 2 inner steps over rows 0, 1; w starts at 1.
    # Task A, rows (1, 3), (2, 2):
    #   step 0: grad 2*1*(1 - 3) = -4      -> w = 1 + 0.4 = 1.4
    #   step 1: grad 2*2*(2.8 - 2) = 3.2   -> w = 1.4 - 0.32 = 1.08
    # Task B, rows (1, 0), (1, 1):
    #   step 0: grad 2*1*(1 - 0) = 2       -> w = 0.8
    #   step 1: grad 2*1*(0.8 - 1) = -0.4  -> w = 0.84
    # mean phi = 0.96; outer SGD(0.5) on pseudo-gradient 1 - 0.96 = 0.04:
    #   theta = 1 - 0.5 * 0.04 = 0.98
    # Reported query loss (query (1, 1)): ((1.08-1)^2 + (0.84-1)^2)/2 = 0.016.
    model = ReptileModel(
        scalar_model(1.0),
        inner_optimizer=keras.optimizers.SGD(0.1),
        inner_steps=2,
        inner_batch_size=1,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", **MODES[mode])
    history = model.fit(_repeat(hand_episode), steps_per_epoch=1, verbose=0)
    np.testing.assert_allclose(model.model.get_weights()[0], [[0.98]], rtol=1e-6)
    np.testing.assert_allclose(history.history["loss"][0], 0.016, rtol=1e-5)


def test_inner_batches_wrap_around_the_support_set(scalar_model, hand_episode):
    # As above with 3 inner steps: step 2 uses row (2*1) mod 2 = 0 again.
    # Task A: w = 1.08, grad 2*1*(1.08 - 3) = -3.84 -> w = 1.464
    # Task B: w = 0.84, grad 2*1*(0.84 - 0) = 1.68  -> w = 0.672
    # mean 1.068; outer SGD(1.0): theta = 1 - (1 - 1.068) = 1.068
    model = ReptileModel(
        scalar_model(1.0),
        inner_optimizer=keras.optimizers.SGD(0.1),
        inner_steps=3,
        inner_batch_size=1,
    )
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    model.fit(_repeat(hand_episode), steps_per_epoch=1, verbose=0)
    np.testing.assert_allclose(model.model.get_weights()[0], [[1.068]], rtol=1e-6)


def _conv_reptile(transductive=False, **kwargs):
    keras.utils.set_random_seed(1)
    backbone = keras_reptile.models.conv4((8, 8, 1), num_classes=3, filters=4, num_blocks=2)
    defaults = dict(
        inner_optimizer=keras.optimizers.Adam(0.01, beta_1=0.0),
        inner_steps=3,
        inner_batch_size=4,
        eval_inner_steps=12,
        eval_inner_batch_size=3,
        transductive=transductive,
    )
    defaults.update(kwargs)
    return ReptileModel(backbone, **defaults)


def _image_data(num_classes=8, per_class=6, seed=0):
    rng = np.random.default_rng(seed)
    protos = rng.normal(size=(num_classes, 8, 8, 1))
    y = np.repeat(np.arange(num_classes), per_class)
    x = protos[y] + 0.7 * rng.normal(size=(len(y), 8, 8, 1))
    return x.astype("float32"), y.astype("int32")


def _episodes(shots=2, meta_batch_size=2, seed=0):
    x, y = _image_data()
    return keras_reptile.episodes.from_arrays(
        x, y, ways=3, shots=shots, query_shots=2,
        meta_batch_size=meta_batch_size, seed=seed,
    )


def _compile(model, lr=1.0, **kwargs):
    model.compile(
        optimizer=keras.optimizers.SGD(lr), loss=SCCE, metrics=["accuracy"], **kwargs
    )
    return model


@pytest.mark.parametrize("parallel_tasks", [True, False])
def test_meta_step_equals_reptile_update_from_a_reference_loop(parallel_tasks):
    # Reference: for each task, a fresh Keras clone trained eagerly with a
    # fresh real Adam on the specified rows; then theta + eps*(mean phi - theta).
    model = _compile(_conv_reptile(parallel_tasks=parallel_tasks), lr=0.3)
    episode = next(iter(_episodes(shots=4)))
    theta = [v.numpy() for v in model.model.trainable_variables]
    phis, stats = [], []
    for b in range(2):
        clone = keras.models.clone_model(model.model)
        clone.set_weights(model.model.get_weights())
        opt = keras.optimizers.Adam(0.01, beta_1=0.0)
        sx, sy = episode["support_x"][b].numpy(), episode["support_y"][b].numpy()
        for t in range(3):
            rows = [(t * 4 + j) % len(sx) for j in range(4)]
            with tf.GradientTape() as tape:
                loss = SCCE(sy[rows], clone(sx[rows], training=True))
            grads = tape.gradient(loss, clone.trainable_variables)
            opt.apply_gradients(zip(grads, clone.trainable_variables))
        phis.append([v.numpy() for v in clone.trainable_variables])
        stats.append([v.numpy() for v in clone.non_trainable_variables])
    model.fit(tf.data.Dataset.from_tensors(episode).repeat(), steps_per_epoch=1, verbose=0)
    for i, variable in enumerate(model.model.trainable_variables):
        expected = theta[i] + 0.3 * ((phis[0][i] + phis[1][i]) / 2 - theta[i])
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-4, atol=1e-6)
    # BatchNormalization moving statistics: mean over tasks after adaptation.
    for i, variable in enumerate(model.model.non_trainable_variables):
        np.testing.assert_allclose(
            variable.numpy(), (stats[0][i] + stats[1][i]) / 2, rtol=1e-5, atol=1e-6
        )


def _reference_adaptation(model, theta, slots, iterations, x, y, steps, batch_size):
    """A clone adapted eagerly by a real Adam whose state is set to `slots`."""
    clone = keras.models.clone_model(model.model)
    clone.set_weights(model.model.get_weights())
    for variable, value in zip(clone.trainable_variables, theta):
        variable.assign(value)
    opt = keras.optimizers.Adam(0.01, beta_1=0.0)
    opt.build(clone.trainable_variables)
    for key, optimizer_slots in _adam_slots(opt).items():
        for slot, value in zip(optimizer_slots, slots[key]):
            slot.assign(value)
    opt.iterations.assign(iterations)
    for t in range(steps):
        rows = [(t * batch_size + j) % len(x) for j in range(batch_size)]
        with tf.GradientTape() as tape:
            loss = SCCE(y[rows], clone(x[rows], training=True))
        grads = tape.gradient(loss, clone.trainable_variables)
        opt.apply_gradients(zip(grads, clone.trainable_variables))
    return (
        [v.numpy() for v in clone.trainable_variables],
        {k: [s.numpy() for s in v] for k, v in _adam_slots(opt).items()},
    )


def _adam_slots(opt):
    """A built Adam's moment variables, in the order of its variables."""
    return {
        "m": [v for v in opt.variables if v.name.endswith("_momentum")],
        "v": [v for v in opt.variables if v.name.endswith("_velocity")],
    }


def _carried_state(model):
    """The carried inner state, read from the model's weights by name."""
    slots = {
        key: [w for w in model.weights if w.name.startswith(f"inner_{key}_")]
        for key in ("m", "v")
    }
    (iterations,) = [w for w in model.weights if w.name == "inner_iterations"]
    return slots, iterations


def test_carried_inner_optimizer_state_matches_a_reference_loop():
    # Reference: real Keras Adams. Every task of a meta-step starts from the
    # carried moments and iteration count; then the carried state becomes the
    # mean of the tasks' final moments, 3 iterations later.
    model = _compile(_conv_reptile(carry_inner_optimizer_state=True), lr=0.3)
    slots, iterations = _carried_state(model)
    assert all(len(slots[k]) == len(model.model.trainable_variables) for k in slots)
    theta = [v.numpy() for v in model.model.trainable_variables]
    carried = {k: [np.zeros_like(t) for t in theta] for k in ("m", "v")}
    step = 0
    batches = iter(_episodes(shots=4))
    for _ in range(2):
        episode = next(batches)
        phis, ends = [], []
        for b in range(2):
            phi, end = _reference_adaptation(
                model, theta, carried, step,
                episode["support_x"][b].numpy(), episode["support_y"][b].numpy(), 3, 4,
            )
            phis.append(phi)
            ends.append(end)
        theta = [t + 0.3 * ((p0 + p1) / 2 - t) for t, p0, p1 in zip(theta, *phis)]
        carried = {k: [(a + b) / 2 for a, b in zip(ends[0][k], ends[1][k])] for k in carried}
        step += 3
        model.train_on_batch(episode)
    for variable, expected in zip(model.model.trainable_variables, theta):
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-4, atol=1e-6)
    for key in ("m", "v"):
        for slot, expected in zip(slots[key], carried[key]):
            # Float32 gradients differ in the last bits between the compiled
            # step and the eager loop; compare at 1e-4 of each slot's scale.
            scale = np.abs(expected).max()
            np.testing.assert_allclose(slot.numpy(), expected, rtol=1e-4, atol=1e-4 * scale)
    assert int(iterations.numpy()) == 6

    # Adaptation outside training starts from the carried state (12 steps of
    # 3 rows) and leaves it alone, as do `evaluate` and `predict`.
    before = [v.numpy() for v in model.weights]
    task = _single_task()
    adapted = model.adapt(task["support_x"], task["support_y"])
    expected, _ = _reference_adaptation(
        model, [v.numpy() for v in model.model.trainable_variables], carried, 6,
        np.asarray(task["support_x"]), np.asarray(task["support_y"]), 12, 3,
    )
    for variable, value in zip(adapted.trainable_variables, expected):
        np.testing.assert_allclose(variable.numpy(), value, rtol=1e-4, atol=1e-5)
    model.evaluate(_episodes(seed=5), steps=1, verbose=0)
    model.predict(_episodes(seed=6), steps=1, verbose=0)
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_carried_inner_optimizer_state_is_saved_and_checked(tmp_path):
    model = _compile(_conv_reptile(carry_inner_optimizer_state=True))
    model.fit(_episodes(), steps_per_epoch=2, verbose=0)
    path = os.path.join(tmp_path, "carry.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert restored.carry_inner_optimizer_state
    for a, b in zip(model.weights, restored.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert int(_carried_state(restored)[1].numpy()) == 6  # 2 meta-steps x 3
    # The state belongs to these variables: freezing a layer is an error,
    # raised before anything changes.
    restored.model.layers[1].trainable = False
    _compile(restored)
    before = [w.numpy() for w in restored.weights]
    with pytest.raises(ValueError, match="Build a new `ReptileModel` after freezing"):
        restored.fit(_episodes(), steps_per_epoch=1, verbose=0)
    for a, b in zip(before, restored.weights):
        np.testing.assert_array_equal(a, b.numpy())
    with pytest.raises(ValueError, match="Expected a built `model` with trainable variables"):
        ReptileModel(keras.Sequential([keras.layers.Dense(3)]),
                     carry_inner_optimizer_state=True)


def test_zero_meta_step_size_leaves_weights_unchanged():
    model = _compile(_conv_reptile(), lr=0.0)
    before = [v.numpy().copy() for v in model.model.trainable_variables]
    model.fit(_episodes(), steps_per_epoch=3, verbose=0)
    for b, v in zip(before, model.model.trainable_variables):
        np.testing.assert_array_equal(b, v.numpy())


def _inner_adam():
    return keras.optimizers.Adam(0.01, beta_1=0.0)


def _plain_reptile_fit(plain, network, episodes, validation, *, epochs, steps_per_epoch,
                       meta_step_size, inner=(3, 4), eval_inner=(12, 3),
                       optimizer=_inner_adam, loss=SCCE):
    """`fit` as a plain loop: each task adapts a clone (`inner` = steps, rows
    per step); theta + eps (mean phi - theta), eps = `meta_step_size(step)`;
    the moving statistics become the tasks' mean. After each epoch every
    validation task adapts (`eval_inner`) and its query loss (and accuracy
    for classes) is averaged over the tasks."""
    reference = keras.models.clone_model(network)
    reference.set_weights(network.get_weights())
    batches = iter(episodes)
    history = {"val_loss": [], "val_accuracy": []}
    step = 0
    for _ in range(epochs):
        for _ in range(steps_per_epoch):
            episode = {k: v.numpy() for k, v in next(batches).items()}
            adapted = [plain.adapt(reference, x, y, *inner, optimizer, loss)
                       for x, y in zip(episode["support_x"], episode["support_y"])]
            epsilon = meta_step_size(step)
            step += 1
            for variables in ("trainable_variables", "non_trainable_variables"):
                for i, variable in enumerate(getattr(reference, variables)):
                    mean = np.mean([getattr(a, variables)[i].numpy() for a in adapted], axis=0)
                    if variables == "trainable_variables":
                        mean = variable.numpy() + epsilon * (mean - variable.numpy())
                    variable.assign(mean)
        if not validation:
            continue
        losses, correct = [], []
        for episode in validation:
            for sx, sy, qx, qy in zip(*(episode[k].numpy() for k in
                                        ("support_x", "support_y", "query_x", "query_y"))):
                adapted = plain.adapt(reference, sx, sy, *eval_inner, optimizer, loss)
                outputs = plain.query_outputs(adapted, sx, qx)
                losses.append(loss(qy, outputs).numpy())
                correct.extend(outputs.argmax(-1) == qy)
        history["val_loss"].append(np.mean(losses))
        history["val_accuracy"].append(np.mean(correct))
    return reference, history


def _assert_same_weights(actual, expected, rtol=1e-4, atol=1e-6, message=""):
    """Trainable variables, then non-trainable ones (moving statistics)."""
    for variables in ("trainable_variables", "non_trainable_variables"):
        for a, e in zip(getattr(actual, variables), getattr(expected, variables), strict=True):
            np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=rtol, atol=atol,
                                       err_msg=message)


def test_fit_and_evaluate_agree_with_a_plain_loop_in_every_execution_mode(plain):
    # 2 epochs of 2 meta-steps: the iterator carries on across epochs
    # (steps_per_epoch), so the 4 steps take the first 4 meta-batches.
    validation = list(_episodes(shots=1, seed=5).take(2))
    reference, expected = _plain_reptile_fit(
        plain, _conv_reptile().model, _episodes(), validation, epochs=2, steps_per_epoch=2,
        meta_step_size=lambda step: 1.0)
    histories = {}
    for mode in sorted(MODES):
        model = _compile(_conv_reptile(), **MODES[mode])
        histories[mode] = model.fit(
            _episodes(), steps_per_epoch=2, epochs=2,
            validation_data=_episodes(shots=1, seed=5), validation_steps=2, verbose=0,
        ).history
        _assert_same_weights(model.model, reference, message=mode)
        for key in ("val_loss", "val_accuracy"):
            np.testing.assert_allclose(histories[mode][key], expected[key],
                                       rtol=1e-4, err_msg=f"{mode} {key}")
    # The training metrics (query loss and accuracy after adaptation) are
    # the same in every mode.
    for mode in ("graph", "xla"):
        for key in ("loss", "accuracy"):
            np.testing.assert_allclose(histories[mode][key], histories["eager"][key],
                                       rtol=1e-5, err_msg=f"{mode} {key}")
    # Training moved the weights, so the agreement is not trivial.
    initial = _conv_reptile().model.trainable_variables
    assert min(np.abs(a.numpy() - b.numpy()).max()
               for a, b in zip(initial, reference.trainable_variables)) > 1e-3


def test_meta_training_learns_to_adapt_to_sine_tasks():
    # From a random initialisation, 10 SGD steps on 10 points fit a random
    # sine wave poorly; 300 Reptile meta-steps must at least halve the
    # post-adaptation query error on held-out tasks (it drops ~4.2 -> ~1.2).
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(32, activation="tanh"),
            keras.layers.Dense(1),
        ]
    )
    model = ReptileModel(
        backbone, inner_optimizer=keras.optimizers.SGD(0.02),
        inner_steps=5, inner_batch_size=10, eval_inner_steps=10,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    train = keras_reptile.datasets.sine(shots=10, query_shots=10, meta_batch_size=4, seed=0)
    val = keras_reptile.datasets.sine(shots=10, query_shots=20, meta_batch_size=8, seed=1)
    before = model.evaluate(val, steps=10, verbose=0)
    model.fit(train, steps_per_epoch=300, verbose=0)
    after = model.evaluate(val, steps=10, verbose=0)
    assert after < 0.5 * before


def test_evaluate_and_adapt_leave_meta_weights_unchanged():
    model = _compile(_conv_reptile())
    model.fit(_episodes(), steps_per_epoch=2, verbose=0)
    before = [v.numpy().copy() for v in model.model.weights]
    model.evaluate(_episodes(seed=3), steps=2, verbose=0)
    episode = next(iter(_episodes(seed=4)))
    model.adapt(episode["support_x"][0], episode["support_y"][0])
    model.adapt_and_predict(
        episode["support_x"][0], episode["support_y"][0], episode["query_x"][0]
    )
    for b, v in zip(before, model.model.weights):
        np.testing.assert_array_equal(b, v.numpy())


def _single_task(seed=4):
    episode = next(iter(_episodes(meta_batch_size=1, seed=seed)))
    return {k: v[0].numpy() for k, v in episode.items()}


def test_adapt_matches_a_plain_eager_adaptation_loop():
    model = _compile(_conv_reptile())
    model.fit(_episodes(), steps_per_epoch=2, verbose=0)
    task = _single_task()
    adapted = model.adapt(task["support_x"], task["support_y"], steps=5)
    clone = keras.models.clone_model(model.model)
    clone.set_weights(model.model.get_weights())
    opt = keras.optimizers.Adam(0.01, beta_1=0.0)
    sx, sy = task["support_x"], task["support_y"]
    for t in range(5):
        rows = [(t * 3 + j) % len(sx) for j in range(3)]
        with tf.GradientTape() as tape:
            loss = SCCE(sy[rows], clone(sx[rows], training=True))
        grads = tape.gradient(loss, clone.trainable_variables)
        opt.apply_gradients(zip(grads, clone.trainable_variables))
    for a, e in zip(adapted.trainable_variables, clone.trainable_variables):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-4, atol=1e-6)
    # The copy carries the support set's own BatchNormalization statistics:
    # inference on the support set equals training-mode normalisation of it.
    np.testing.assert_allclose(
        adapted.predict(sx, verbose=0),
        adapted(sx, training=True).numpy(),
        rtol=1e-4, atol=1e-4,
    )


def test_non_transductive_evaluation_equals_one_example_at_a_time_prediction():
    model = _compile(_conv_reptile(transductive=False))
    model.fit(_episodes(), steps_per_epoch=3, verbose=0)
    task = _single_task(seed=9)
    episode = {k: v[None] for k, v in task.items()}
    _, accuracy = model.evaluate(
        tf.data.Dataset.from_tensors(episode), verbose=0
    )
    adapted = model.adapt(task["support_x"], task["support_y"])
    one_by_one = np.concatenate(
        [adapted.predict(q[None], verbose=0) for q in task["query_x"]]
    )
    expected_accuracy = np.mean(one_by_one.argmax(-1) == task["query_y"])
    np.testing.assert_allclose(accuracy, expected_accuracy)
    batched = model.adapt_and_predict(
        task["support_x"], task["support_y"], task["query_x"]
    )
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-4, atol=1e-5)


def test_transductive_evaluation_uses_query_batch_statistics():
    model = _compile(_conv_reptile(transductive=True))
    model.fit(_episodes(), steps_per_epoch=3, verbose=0)
    task = _single_task(seed=9)
    adapted = model.adapt(task["support_x"], task["support_y"])
    expected = adapted(task["query_x"], training=True).numpy()
    actual = model.adapt_and_predict(task["support_x"], task["support_y"], task["query_x"])
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    episode = {k: v[None] for k, v in task.items()}
    loss, accuracy = model.evaluate(tf.data.Dataset.from_tensors(episode), verbose=0)
    np.testing.assert_allclose(
        accuracy, np.mean(expected.argmax(-1) == task["query_y"])
    )
    np.testing.assert_allclose(loss, SCCE(task["query_y"], expected).numpy(), rtol=1e-4)


def test_no_retracing_across_steps_epochs_and_evaluate_calls():
    model = _compile(_conv_reptile())
    traces = {"train": 0, "test": 0}
    train_step, test_step = model.train_step, model.test_step

    def counting_train_step(data):
        traces["train"] += 1  # Python side effect: runs only while tracing.
        return train_step(data)

    def counting_test_step(data):
        traces["test"] += 1
        return test_step(data)

    model.train_step, model.test_step = counting_train_step, counting_test_step
    val = _episodes(shots=1, seed=5)
    model.fit(_episodes(), steps_per_epoch=3, epochs=3, validation_data=val,
              validation_steps=2, verbose=0)
    model.evaluate(val, steps=2, verbose=0)
    model.evaluate(val, steps=3, verbose=0)
    assert traces == {"train": 1, "test": 1}


def test_parallel_tasks_overlaps_the_tasks_or_runs_them_in_order():
    # A layer that records which task calls it (the inputs of task b are all
    # b). With `parallel_tasks`, the first call of each task waits until a
    # call of another task has started: it returns only if two tasks are in
    # flight at once, which no timing of a busy machine can fake. Run in
    # order, the first task would wait alone: the wait times out (and the
    # overlap assertion fails) instead of hanging.
    overlap = os.cpu_count() > 1 and tf.config.threading.get_inter_op_parallelism_threads() != 1
    calls, state = [], {"wait": False, "timed_out": False}
    started = threading.Condition()

    def record(x):
        task = int(x.flat[0])
        with started:
            first = task not in calls
            calls.append(task)
            started.notify_all()
            if state["wait"] and first:
                if not started.wait_for(lambda: len(set(calls)) > 1, timeout=60):
                    state["timed_out"] = True
        return x

    class Probe(keras.layers.Layer):
        def call(self, x):
            y = tf.numpy_function(record, [x], x.dtype, stateful=False)
            return tf.ensure_shape(y, x.shape)

    tasks = 4
    x = np.broadcast_to(np.arange(tasks, dtype="float32")[:, None, None], (tasks, 2, 2))
    y = np.zeros((tasks, 2), "int32")
    batch = {"support_x": x, "support_y": y, "query_x": x, "query_y": y}
    order = {}
    for parallel_tasks in (False, True):
        inputs = keras.Input((2,))
        backbone = keras.Model(inputs, keras.layers.Dense(2)(Probe()(inputs)))
        model = ReptileModel(backbone, inner_optimizer="sgd", inner_steps=3,
                             inner_batch_size=2, parallel_tasks=parallel_tasks)
        # The graph executor's concurrency (XLA compiles the step as one
        # program, and has no kernel for the probe's NumPy call).
        model.compile(optimizer="sgd", loss=SCCE, jit_compile=False)
        model.train_on_batch(batch)  # traces
        calls.clear()
        state["wait"] = parallel_tasks and overlap
        model.train_on_batch(batch)
        order[parallel_tasks] = list(calls)
    # 3 inner steps and 1 query pass per task.
    assert order[False] == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert sorted(order[True]) == order[False]
    if overlap:
        # The first task's first call returned only once another task's
        # call had started: the tasks ran concurrently.
        assert not state["timed_out"], order[True]


def test_a_new_meta_batch_size_is_traced_anew():
    # Keras relaxes a second input shape to None when it retraces, and the
    # tasks of a meta-batch are unrolled: each entry point must start a fresh
    # trace for a new meta-batch size, and compute what a model that never
    # saw the old size computes.
    model = _compile(_conv_reptile())
    model.fit(_episodes(meta_batch_size=2), steps_per_epoch=1, verbose=0)
    model.evaluate(_episodes(meta_batch_size=2, seed=5), steps=1, verbose=0)
    model.predict_on_batch(next(iter(_episodes(meta_batch_size=2, seed=5))))
    fresh = _compile(_conv_reptile())
    fresh.set_weights(model.get_weights())

    val = _episodes(meta_batch_size=4, seed=5)
    expected = fresh.evaluate(val, steps=1, verbose=0, return_dict=True)
    assert model.evaluate(val, steps=1, verbose=0, return_dict=True) == expected
    batch = next(iter(val))
    outputs = model.predict_on_batch(batch)
    assert outputs.shape == (4, 6, 3)
    np.testing.assert_array_equal(outputs, fresh.predict_on_batch(batch))

    model.fit(_episodes(meta_batch_size=3), steps_per_epoch=1, verbose=0)
    fresh.fit(_episodes(meta_batch_size=3), steps_per_epoch=1, verbose=0)
    for a, b in zip(model.get_weights(), fresh.get_weights()):
        np.testing.assert_array_equal(a, b)


def _hand_inner_sgd(w, rows, lr=0.1):
    """Plain SGD on (w x - y)^2, one (x, y) row per step."""
    for x, y in rows:
        w -= lr * 2 * x * (w * x - y)
    return w


def test_outer_optimizer_schedule_and_any_optimizer_work(scalar_model, hand_episode):
    # The hand episode (see above): task A's rows (1, 3), (2, 2), task B's
    # (1, 0), (1, 1), one row per inner step. Reference: a real Adam with
    # the same schedule, on its own variable, applied to the pseudo-gradient
    # theta - mean phi computed in plain Python (0.04 at theta = 1).
    def schedule():
        # 0.1, 0.075, 0.05: the schedule decides the step sizes.
        return keras.optimizers.schedules.PolynomialDecay(0.1, 4, 0.0)

    model = ReptileModel(scalar_model(1.0), inner_optimizer=keras.optimizers.SGD(0.1),
                         inner_steps=2, inner_batch_size=1)
    model.compile(optimizer=keras.optimizers.Adam(schedule()), loss="mse")
    model.fit(_repeat(hand_episode), steps_per_epoch=3, verbose=0)

    theta = keras.Variable(np.array([[1.0]], "float32"))
    adam = keras.optimizers.Adam(schedule())
    pseudo_gradients = []
    for _ in range(3):
        w = float(theta.numpy()[0, 0])
        phi = np.mean([_hand_inner_sgd(w, [(1, 3), (2, 2)]), _hand_inner_sgd(w, [(1, 0), (1, 1)])])
        pseudo_gradients.append(w - phi)
        adam.apply_gradients([(np.array([[w - phi]], "float32"), theta)])
    np.testing.assert_allclose(pseudo_gradients[0], 0.04, rtol=1e-6)
    assert int(model.optimizer.iterations.numpy()) == 3
    np.testing.assert_allclose(model.model.get_weights()[0], theta.numpy(), rtol=1e-6)


def test_issue_snippet_runs_on_random_data():
    rng = np.random.default_rng(0)
    x_train = rng.random((40 * 20, 28, 28, 1), dtype=np.float32)
    y_train = np.repeat(np.arange(40), 20)
    x_val = rng.random((10 * 20, 28, 28, 1), dtype=np.float32)
    y_val = np.repeat(np.arange(10), 20)
    backbone = keras_reptile.models.conv4(input_shape=(28, 28, 1), num_classes=5)
    model = keras_reptile.ReptileModel(
        backbone,
        inner_optimizer=keras.optimizers.Adam(1e-3, beta_1=0.0),
        inner_steps=5, inner_batch_size=10,
        eval_inner_steps=50, eval_inner_batch_size=5,
    )
    model.compile(
        optimizer=keras.optimizers.SGD(
            keras.optimizers.schedules.PolynomialDecay(1.0, 100_000, 0.0)
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    train = keras_reptile.episodes.from_arrays(
        x_train, y_train, ways=5, shots=10, query_shots=1, meta_batch_size=5, seed=0
    )
    val = keras_reptile.episodes.from_arrays(
        x_val, y_val, ways=5, shots=1, query_shots=1, meta_batch_size=5, seed=1
    )
    initial = [w.copy() for w in backbone.get_weights()]
    history = model.fit(train, steps_per_epoch=2, epochs=2, validation_data=val,
                        validation_steps=1, verbose=0)
    support_x, support_y, query_x = x_val[:100:20], np.arange(5), x_val[1:100:20]
    trained = [w.copy() for w in backbone.get_weights()]
    adapted = model.adapt(support_x, support_y)
    probs = adapted.predict(query_x, verbose=0)
    assert isinstance(adapted, keras.Model) and adapted is not model.model
    # A plain loop is no exact reference here: the inner Adam (1e-3) moves
    # each weight by ~lr whatever its gradient's size, so float32 rounding in
    # the random data's near-zero gradient components (which differ between
    # the compiled step and an eager loop, and from run to run with the
    # threads' summation order) grows to ~1e-3 per weight in 4 meta-steps
    # (measured 5e-5 and 2.6e-3 in two runs). The plain-loop comparisons are
    # test_fit_and_evaluate_agree_with_a_plain_loop_in_every_execution_mode
    # and test_adapt_matches_a_plain_eager_adaptation_loop. Here: 2 epochs of
    # 2 meta-steps, one validation per epoch, every weight moved (the
    # convolutions and Dense by the meta-steps, the moving statistics to the
    # tasks' mean), adaptation leaves the meta-weights alone.
    assert int(model.optimizer.iterations.numpy()) == 4
    assert len(history.history["val_loss"]) == len(history.history["loss"]) == 2
    assert np.all(np.isfinite(history.history["val_loss"]))
    for before, after in zip(initial, trained, strict=True):
        assert np.abs(after - before).max() > 1e-4
    for after, now in zip(trained, backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(now, after)
    assert probs.shape == (5, 5)


def test_regression_tasks_from_a_task_generator(plain):
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential(
        [keras.Input((1,)), keras.layers.Dense(16, activation="tanh"), keras.layers.Dense(1)]
    )
    model = ReptileModel(
        backbone, inner_optimizer=keras.optimizers.SGD(0.02),
        inner_steps=3, inner_batch_size=5, eval_inner_steps=8,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    tasks = keras_reptile.datasets.sine(shots=10, query_shots=10, meta_batch_size=2, seed=0)
    initial = keras.models.clone_model(backbone)
    initial.set_weights(backbone.get_weights())
    history = model.fit(tasks, steps_per_epoch=3, verbose=0,
                        validation_data=tasks, validation_steps=1)
    task = {k: v[0].numpy() for k, v in next(iter(tasks)).items()}
    prediction = model.adapt_and_predict(task["support_x"], task["support_y"], task["query_x"])

    # The same as a plain loop: 3 inner SGD steps of 5 rows, meta-step 0.5;
    # validation (the generator's first meta-batch again) adapts 8 steps of
    # 5 rows (eval_inner_batch_size defaults to inner_batch_size).
    def inner_sgd():
        return keras.optimizers.SGD(0.02)

    mse = keras.losses.MeanSquaredError()
    reference, expected = _plain_reptile_fit(
        plain, initial, tasks, list(tasks.take(1)), epochs=1, steps_per_epoch=3,
        meta_step_size=lambda step: 0.5, inner=(3, 5), eval_inner=(8, 5),
        optimizer=inner_sgd, loss=mse)
    _assert_same_weights(model.model, reference)
    np.testing.assert_allclose(history.history["val_loss"], expected["val_loss"], rtol=1e-5)
    adapted = plain.adapt(reference, task["support_x"], task["support_y"], 8, 5, inner_sgd, mse)
    np.testing.assert_allclose(prediction, adapted(task["query_x"]).numpy(), rtol=1e-5, atol=1e-6)


def test_get_config_round_trip():
    model = _conv_reptile(transductive=True, eval_inner_batch_size=7, parallel_tasks=False,
                          carry_inner_optimizer_state=True, batched_tasks=False)
    config = model.get_config()
    restored = ReptileModel.from_config(config)
    for key in ("inner_steps", "inner_batch_size", "eval_inner_steps",
                "eval_inner_batch_size", "transductive", "parallel_tasks",
                "batched_tasks", "carry_inner_optimizer_state"):
        assert getattr(restored, key) == getattr(model, key)
    assert restored.inner_optimizer.get_config() == model.inner_optimizer.get_config()
    assert type(restored.inner_optimizer) is keras.optimizers.Adam


def test_keras_file_round_trip_gives_identical_outputs_and_training(tmp_path):
    model = _compile(_conv_reptile())
    model.fit(_episodes(), steps_per_epoch=2, verbose=0)
    path = os.path.join(tmp_path, "reptile.keras")
    model.save(path)
    restored = keras.models.load_model(path)
    assert isinstance(restored, ReptileModel)
    x, _ = _image_data()
    np.testing.assert_array_equal(
        restored.predict(x, verbose=0), model.predict(x, verbose=0)
    )
    task = _single_task()
    np.testing.assert_allclose(
        restored.adapt_and_predict(task["support_x"], task["support_y"], task["query_x"]),
        model.adapt_and_predict(task["support_x"], task["support_y"], task["query_x"]),
        rtol=1e-6, atol=1e-6,
    )
    # Continued training (the restored outer optimizer keeps its state).
    model.fit(_episodes(seed=11), steps_per_epoch=2, verbose=0)
    restored.fit(_episodes(seed=11), steps_per_epoch=2, verbose=0)
    for a, b in zip(model.model.weights, restored.model.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(inner_steps=0), "Expected `inner_steps` to be a positive integer. Received: inner_steps=0"),
        (dict(inner_batch_size=-1), "`inner_batch_size` to be a positive integer"),
        (dict(eval_inner_steps=2.5), "`eval_inner_steps` to be a positive integer"),
        (dict(eval_inner_batch_size=True), "`eval_inner_batch_size` to be a positive integer"),
        (dict(parallel_tasks="yes"), 'Expected `parallel_tasks` to be "auto", True or False. '
         "Received: parallel_tasks='yes'"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, message, scalar_model):
    with pytest.raises(ValueError, match=message):
        ReptileModel(scalar_model(), **kwargs)


def test_bad_model_and_optimizer_raise_type_error(scalar_model):
    with pytest.raises(TypeError, match="Expected `model` to be a `keras.Model`"):
        ReptileModel(keras.layers.Dense(3))
    with pytest.raises(TypeError, match="Expected `inner_optimizer` to be one of"):
        ReptileModel(scalar_model(), inner_optimizer=keras.optimizers.Ftrl())
    with pytest.raises(TypeError, match="Expected `transductive` to be a bool"):
        ReptileModel(scalar_model(), transductive="yes")
    with pytest.raises(TypeError, match="Expected `carry_inner_optimizer_state` to be a bool. "
                       "Received: carry_inner_optimizer_state=1"):
        ReptileModel(scalar_model(), carry_inner_optimizer_state=1)


def test_fit_before_compile_with_loss_is_a_clear_error():
    model = _conv_reptile()
    model.compile(optimizer="sgd", run_eagerly=True)
    with pytest.raises(ValueError, match="Call `compile\\(\\)` with a `loss`"):
        model.fit(_episodes(), steps_per_epoch=1, verbose=0)


def test_non_episode_data_is_a_clear_error():
    model = _compile(_conv_reptile(), run_eagerly=True)
    x, y = _image_data()
    with pytest.raises(ValueError, match="episode dict"):
        model.fit(x, y, verbose=0)
    bad = tf.data.Dataset.from_tensors(
        {"support_x": np.zeros((1, 3, 8, 8, 1), "float32"),
         "support_y": np.zeros((1, 3), "int32")}
    )
    with pytest.raises(ValueError, match="missing: \\['query_x', 'query_y'\\]"):
        model.fit(bad, verbose=0)


def test_adapt_rejects_bad_support_sets():
    model = _compile(_conv_reptile())
    x, y = _image_data()
    with pytest.raises(ValueError, match="Expected `support_x` of shape \\[rows, 8, 8, 1\\]"):
        model.adapt(np.zeros((3, 9, 8, 1), "float32"), [0, 1, 2])
    with pytest.raises(ValueError, match="non-empty"):
        model.adapt(np.zeros((0, 8, 8, 1), "float32"), np.zeros((0,), "int32"))
    with pytest.raises(ValueError, match="one target per support example"):
        model.adapt(x[:3], [0, 1])
    with pytest.raises(ValueError, match="labels in \\[0, 2\\]"):
        model.adapt(x[:3], [0, 1, 3])
    with pytest.raises(ValueError, match="`steps` to be a positive integer"):
        model.adapt(x[:3], [0, 1, 2], steps=0)
    with pytest.raises(ValueError, match="Expected `query_x`"):
        model.adapt_and_predict(x[:3], [0, 1, 2], np.zeros((2, 4), "float32"))


def test_adapt_accepts_targets_of_either_rank_and_subclassed_models(scalar_model):
    # Regression targets as [S] and as [S, 1] in successive calls, and a
    # subclassed backbone without `compute_output_shape`.
    model = ReptileModel(scalar_model(2.0), inner_optimizer=keras.optimizers.SGD(0.1),
                         eval_inner_steps=1, eval_inner_batch_size=4)
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((4, 1), "float32")
    # One SGD step on (1, 0) rows: w = 2 - 0.1 * 2 * (2 - 0) = 1.6.
    for y in (np.zeros((4,), "float32"), np.zeros((4, 1), "float32")):
        np.testing.assert_allclose(model.adapt_and_predict(x, y, x), 1.6 * x, rtol=1e-6)

    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    net = Net()
    net(np.zeros((1, 5), "float32"))
    wrapped = ReptileModel(net, eval_inner_steps=1)
    wrapped.compile(loss=SCCE)
    adapted = wrapped.adapt(np.zeros((3, 5), "float32"), np.array([0, 1, 2]))
    assert adapted.predict(np.zeros((2, 5), "float32"), verbose=0).shape == (2, 3)
    with pytest.raises(ValueError, match="labels in \\[0, 2\\]"):
        wrapped.adapt(np.zeros((3, 5), "float32"), np.array([0, 1, 5]))

    class Uncopyable(Net):
        def __init__(self):
            super().__init__()

    net = Uncopyable()
    net(np.zeros((1, 5), "float32"))
    wrapped = ReptileModel(net, eval_inner_steps=1)
    wrapped.compile(loss=SCCE)
    with pytest.raises(TypeError, match="`adapt_and_predict\\(\\)` works without a copy"):
        wrapped.adapt(np.zeros((3, 5), "float32"), np.array([0, 1, 2]))


def test_outer_loss_scaling_does_not_shrink_the_meta_step(scalar_model, hand_episode):
    # Same hand-computed step as above (theta 1 -> 0.98) with an outer
    # optimizer that divides gradients by its loss scale factor.
    model = ReptileModel(
        scalar_model(1.0), inner_optimizer=keras.optimizers.SGD(0.1),
        inner_steps=2, inner_batch_size=1,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5, loss_scale_factor=128.0), loss="mse")
    model.fit(_repeat(hand_episode), steps_per_epoch=1, verbose=0)
    np.testing.assert_allclose(model.model.get_weights()[0], [[0.98]], rtol=1e-6)


def test_train_and_test_on_batch_take_one_episode_batch(scalar_model, hand_episode):
    model = ReptileModel(
        scalar_model(1.0), inner_optimizer=keras.optimizers.SGD(0.1),
        inner_steps=2, inner_batch_size=1, eval_inner_steps=2, eval_inner_batch_size=1,
    )
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    # The query loss of the hand-computed step: 0.016 (see above).
    np.testing.assert_allclose(model.test_on_batch(hand_episode), 0.016, rtol=1e-5)
    model.train_on_batch(hand_episode)
    np.testing.assert_allclose(model.model.get_weights()[0], [[0.98]], rtol=1e-6)


def test_binary_labels_and_embedding_gradients_with_clipping():
    # A sigmoid binary classifier: labels 0/1 are valid for a 1-unit output.
    keras.utils.set_random_seed(0)
    binary = ReptileModel(
        keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, activation="sigmoid")]),
        inner_optimizer=keras.optimizers.SGD(0.1), eval_inner_steps=2,
    )
    binary.compile(loss="binary_crossentropy")
    x = np.random.default_rng(0).normal(size=(4, 3)).astype("float32")
    assert binary.adapt_and_predict(x, np.array([0, 1, 0, 1]), x).shape == (4, 1)
    # Embedding gradients are IndexedSlices; clipping must handle them like
    # Keras does. Reference: the real optimizer applied eagerly.
    embedding = keras.Sequential(
        [keras.Input((2,), dtype="int32"), keras.layers.Embedding(6, 3),
         keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    model = ReptileModel(
        embedding, inner_optimizer=keras.optimizers.SGD(0.5, clipnorm=0.05),
        eval_inner_steps=2, eval_inner_batch_size=3,
    )
    model.compile(loss=SCCE)
    ids, labels = np.array([[0, 1], [2, 3], [1, 4]]), np.array([0, 1, 1])
    adapted = model.adapt(ids, labels)
    clone = keras.models.clone_model(embedding)
    clone.set_weights(embedding.get_weights())
    opt = keras.optimizers.SGD(0.5, clipnorm=0.05)
    for _ in range(2):
        with tf.GradientTape() as tape:
            loss = SCCE(labels, clone(ids, training=True))
        opt.apply_gradients(zip(tape.gradient(loss, clone.trainable_variables),
                                clone.trainable_variables))
    for a, e in zip(adapted.trainable_variables, clone.trainable_variables):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-5, atol=1e-7)


def test_models_without_a_training_argument_adapt_in_training_mode():
    # `call(self, x)` with BatchNormalization inside: the inner loop must
    # still normalise with batch statistics. Reference: a plain eager loop
    # calling the model with training=True, which Keras passes down.
    class Net(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(4)
            self.norm = keras.layers.BatchNormalization()
            self.out = keras.layers.Dense(2)

        def call(self, x):
            return self.out(self.norm(self.dense(x)))

    keras.utils.set_random_seed(0)
    net = Net()
    x = (5.0 + np.random.default_rng(0).normal(size=(6, 3))).astype("float32")
    y = np.array([0, 1, 0, 1, 1, 0])
    net(x[:1])
    model = ReptileModel(net, inner_optimizer=keras.optimizers.SGD(0.1),
                         eval_inner_steps=3, eval_inner_batch_size=6)
    model.compile(loss=SCCE)
    adapted = model.adapt(x, y)
    clone = Net()
    clone(x[:1])
    clone.set_weights(net.get_weights())
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = SCCE(y, clone(x, training=True))
        grads = tape.gradient(loss, clone.trainable_variables)
        for v, g in zip(clone.trainable_variables, grads):
            v.assign_sub(0.1 * g)
    for a, e in zip(adapted.trainable_variables, clone.trainable_variables):
        np.testing.assert_allclose(a.numpy(), e.numpy(), rtol=1e-5, atol=1e-6)
    # And the copy carries the support statistics (batch mean of the
    # dense outputs, about 5 * column sums away from the initial 0).
    np.testing.assert_allclose(
        adapted.predict(x, verbose=0), adapted(x, training=True).numpy(), rtol=1e-4, atol=1e-4
    )


def test_changed_settings_take_effect_in_every_entry_point():
    # After a first use traced the steps, changing a setting must give what a
    # model built with the new value gives (same seed, same weights).
    task = _single_task()
    episodes = _episodes(seed=5)
    changed = _compile(_conv_reptile())
    changed.evaluate(episodes, steps=2, verbose=0)
    changed.predict(episodes, steps=1, verbose=0)
    changed.adapt_and_predict(task["support_x"], task["support_y"], task["query_x"])
    changed.eval_inner_steps = 1
    changed.transductive = True
    fresh = _compile(_conv_reptile(eval_inner_steps=1, transductive=True))
    assert changed.evaluate(episodes, steps=2, verbose=0) == fresh.evaluate(
        episodes, steps=2, verbose=0)
    np.testing.assert_array_equal(
        changed.predict(episodes, steps=1, verbose=0),
        fresh.predict(episodes, steps=1, verbose=0))
    np.testing.assert_array_equal(
        changed.adapt_and_predict(task["support_x"], task["support_y"], task["query_x"]),
        fresh.adapt_and_predict(task["support_x"], task["support_y"], task["query_x"]))
    # ... and differ from the old setting's, so the check is not vacuous.
    old = _compile(_conv_reptile())
    assert old.evaluate(episodes, steps=2, verbose=0) != fresh.evaluate(
        episodes, steps=2, verbose=0)

    # Training: one meta-step with 3 inner steps, then one with 1.
    changed = _compile(_conv_reptile())
    changed.fit(_episodes(), steps_per_epoch=1, verbose=0)
    changed.inner_steps = 1
    changed.fit(_episodes(), steps_per_epoch=1, verbose=0)
    reference = _compile(_conv_reptile())
    reference.fit(_episodes(), steps_per_epoch=1, verbose=0)
    second = _compile(ReptileModel(
        reference.model, inner_optimizer=keras.optimizers.Adam(0.01, beta_1=0.0),
        inner_steps=1, inner_batch_size=4))
    second.fit(_episodes(), steps_per_epoch=1, verbose=0)
    for a, b in zip(changed.model.weights, reference.model.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_settings_are_validated_when_changed():
    model = _conv_reptile()
    with pytest.raises(ValueError, match="Received: eval_inner_steps=0"):
        model.eval_inner_steps = 0
    with pytest.raises(TypeError, match="Received: transductive='yes'"):
        model.transductive = "yes"
    assert model.eval_inner_steps == 12 and model.transductive is False
    for name, value in (("parallel_tasks", False), ("batched_tasks", False),
                        ("carry_inner_optimizer_state", True),
                        ("algorithm", "maml"), ("head", "prototype")):
        with pytest.raises(AttributeError, match=f"`{name}` is fixed at construction"):
            setattr(model, name, value)
    assert model.parallel_tasks == "auto" and model.head is None
