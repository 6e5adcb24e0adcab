"""A soak: memory, step time and traces stay flat over 20,000 meta-steps.

Runs in a subprocess so that the resident set size measured is the training
process's own, not the test session's.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import json, time
    import keras
    import keras_reptile

    def rss_mib():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024

    class Soak(keras.callbacks.Callback):
        # Resident memory and the mean training-step time of every epoch.
        def __init__(self):
            super().__init__()
            self.rss, self.step_seconds, self.steps = [], [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.train_seconds = 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.train_seconds += time.perf_counter() - self.started

        def on_epoch_end(self, epoch, logs=None):
            self.rss.append(rss_mib())
            self.step_seconds.append(self.train_seconds / self.params["steps"])
            self.steps.append(int(self.model.optimizer.iterations.numpy()))

    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([keras.Input((1,)), keras.layers.Dense(16, activation="tanh"),
                                 keras.layers.Dense(1)])
    model = keras_reptile.ReptileModel(
        backbone, inner_optimizer=keras.optimizers.Adam(0.01), inner_steps=2,
        inner_batch_size=5, eval_inner_steps=3)
    traces = {"train_step": 0, "test_step": 0}
    for name in traces:
        step = getattr(model, name)
        def counted(data, step=step, name=name):
            traces[name] += 1  # Python runs only while tracing
            return step(data)
        setattr(model, name, counted)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    tasks = keras_reptile.datasets.sine(shots=5, query_shots=5, meta_batch_size=2, seed=0)
    soak = Soak()
    # Ten `fit` calls of 4 epochs of 500 meta-steps, validation after every
    # epoch: nothing may grow per call either, nor trace again.
    for _ in range(10):
        model.fit(tasks, steps_per_epoch=500, epochs=4, verbose=0, callbacks=[soak],
                  validation_data=tasks, validation_steps=2)
    print(json.dumps(dict(rss=soak.rss, step_seconds=soak.step_seconds,
                          steps=soak.steps, traces=traces)))
    """
)


@pytest.mark.slow
def test_soak_of_20000_meta_steps_with_validation_every_epoch():
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=1800
    )
    assert result.returncode == 0, result.stderr[-3000:]
    soak = json.loads(result.stdout.strip().splitlines()[-1])
    assert soak["steps"][-1] == 20_000
    # One trace of the train step and of the validation step over all calls.
    assert soak["traces"] == {"train_step": 1, "test_step": 1}, soak["traces"]
    # Memory after the first epochs (allocator warm-up) does not grow: the
    # least-squares slope over the last 38 epochs is under 0.5 MiB per 1,000
    # meta-steps, and the end is within 5% of epoch 2.
    steps = np.array(soak["steps"][2:]) / 1000
    rss = np.array(soak["rss"][2:])
    slope = np.polyfit(steps, rss, 1)[0]
    report = (f"RSS {rss[0]:.0f} -> {rss[-1]:.0f} MiB, slope {slope:+.3f} MiB per "
              f"1k meta-steps; step time {1e3 * soak['step_seconds'][2]:.2f} -> "
              f"{1e3 * soak['step_seconds'][-1]:.2f} ms, slope "
              f"{1e3 * np.polyfit(steps, soak['step_seconds'][2:], 1)[0]:+.4f} ms per "
              "1k meta-steps")
    print(report)
    assert slope < 0.5, report
    assert rss[-1] <= 1.05 * rss[0], report
