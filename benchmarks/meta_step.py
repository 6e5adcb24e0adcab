"""Meta-step throughput of `ReptileModel` against plain Keras Reptile loops.

Run from the repository root, on an otherwise idle machine (one process;
meant to finish within 10 minutes on 2 CPU cores at the default settings,
most of it compile time and the eager loops):

    python benchmarks/meta_step.py

Smaller runs:

    python benchmarks/meta_step.py --quick                  # smoke test
    python benchmarks/meta_step.py --configs 5way1shot --variants reptile,eager
    python benchmarks/meta_step.py --repeats 7 --steps 30 --threads 2

For each configuration it measures, in this process and run:

* `reptile` / `reptile_no_xla` / `reptile_sequential` / `reptile_jit` /
  `reptile_per_task`:
  `ReptileModel.fit` as shipped (default settings: `jit_compile="auto"`,
  which compiles the meta-step with XLA and leaves evaluation to Keras's
  choice, `parallel_tasks="auto"`, which on a CPU lets the executor run
  the meta-batch's tasks concurrently, and `batched_tasks="auto"`, which
  adapts evaluation's tasks in one batched computation), with
  `compile(jit_compile=False)` (no XLA anywhere: what the default did
  before), with `parallel_tasks=False` (tasks one after the other), with
  `compile(jit_compile=True)`, and, for `eval` only, with
  `batched_tasks=False` (one graph branch per task: what evaluation did
  before), on an episodic
  dataset from `keras_reptile.episodes.from_arrays` over random
  Omniglot-shaped data (100 classes x 20 images of 28x28x1). One warm-up
  `fit(steps_per_epoch=1)` (its wall time is reported as first-step/compile
  time), then `--repeats` separate `fit(ds, steps_per_epoch=N, verbose=0)`
  calls; rate = N / wall time, median over repeats. For the `eval`
  configuration the same with `evaluate(ds, steps=N)`. Each call creates a
  new dataset iterator; that cost is measured and printed separately.
  `traces` counts traces of `train_step`/`test_step` over all calls
  (expected: 1). For the training configurations, `--algorithms` adds the
  `reptile` and `reptile_no_xla` rows (and the plain loops, for FOMAML)
  with `ReptileModel(algorithm="fomaml")` and `"maml"`.
* `eager`: a plain eager loop in the style of the keras.io Reptile example
  (per-task Python loop, `tf.GradientTape`, a real `keras.optimizers.Adam`
  whose variables are reset per task, `get_weights`/`set_weights`, outer
  interpolation in NumPy), doing the same arithmetic as `ReptileModel`.
  One warm-up step (reported as first-step time), then `--repeats` timed
  runs of N steps on one dataset iterator. For `eval` a step is one task.
* `eager_tf_function`: the same loop with each inner step (forward, backward
  and optimizer apply) wrapped in `tf.function`. For FOMAML both loops also
  take each task's query gradient at the adapted weights (in `tf.function`
  for the second). There is no plain MAML loop: its second-order gradient
  needs a functional inner loop, which is what the library provides.
* `inner_steps`: for reference, the inner steps of one meta-step (one task,
  for `eval`) as separate calls of one `tf.function` train step (forward,
  backward, Adam apply) on one inner batch each, back to back: what the
  inner steps cost on their own at this batch size, without the meta-step
  around them.
* `fused`: for reference, one `tf.function` train step (forward, backward,
  Adam apply) of the network on all the images one meta-step (one task, for
  `eval`) adapts on, as a single batch.
* `ceiling`: FLOPs of one meta-step (conv and dense multiply-adds from the
  layer shapes; training step = 3 forward passes) divided by the FLOP/s of
  a 2048^3 float32 matmul in a `tf.function`, median of repeats, measured
  at the start and at the end of the run (the faster is used).

Configurations (the paper's Omniglot settings, Nichol et al. 2018):

* `5way1shot`: conv4 (64 filters, BatchNorm), train shots 10 (S = 50),
  query shots 1, inner batch 10, inner steps 5, meta-batch 5, inner
  `Adam(1e-3, beta_1=0)`, outer `SGD(PolynomialDecay(1.0, 100000, 0.0))`.
* `20way1shot`: 20 ways, train shots 10 (S = 200), inner batch 20, inner
  steps 10, meta-batch 5, inner `Adam(5e-4, beta_1=0)`.
* `eval`: `evaluate()` on 5-way 1-shot episodes (S = 5, Q = 5), meta-batch
  5, `eval_inner_steps=50`, `eval_inner_batch_size=5`, non-transductive;
  rates are tasks (episodes) per second.
* `eval20`: the same on 20-way 1-shot episodes (S = 20, Q = 20),
  `eval_inner_batch_size=10`, inner `Adam(5e-4, beta_1=0)`.

Then the issue's targets (keras_reptile issue 14) next to the default's
ratios and those of the default before (`jit_compile=False`): `fit` at
>= 45x the eager loop, >= 3.5x the `tf.function` loop and >= 60% of the
matmul ceiling; `evaluate` at >= 2x its rate before: against
`batched_tasks=False` in this run and, given `--before`, against the default
in the JSON of a run of the earlier code on the same machine. The ceiling of a
FOMAML meta-step adds its query backward passes; MAML's has no simple
count and is not given.

Prints a table and writes `benchmarks/results/meta_step-<timestamp>.json`
with every timing, the settings and machine facts. All ratios are computed
from numbers measured in the same run. Timings taken while other processes
load the CPU are not meaningful (the load average is recorded).
"""

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import keras_reptile  # noqa: E402
from keras_reptile import _compat  # noqa: E402

INPUT_SHAPE = (28, 28, 1)
NUM_CLASSES = 100  # random "Omniglot": 100 classes x 20 images
IMAGES_PER_CLASS = 20
FILTERS = 64

# Settings of each configuration. `inner_steps`/`inner_batch` are the
# evaluation values (`eval_inner_*`) for the `eval` configuration.
CONFIGS = {
    "5way1shot": dict(
        kind="train", ways=5, shots=10, query_shots=1, meta_batch=5,
        inner_batch=10, inner_steps=5, inner_lr=1e-3, decay_steps=100_000,
        repeats=5,
        steps={"reptile": 10, "reptile_no_xla": 10, "reptile_sequential": 10,
               "reptile_jit": 10, "eager": 1, "eager_tf_function": 4,
               "inner_steps": 10, "fused": 10},
    ),
    "20way1shot": dict(
        kind="train", ways=20, shots=10, query_shots=1, meta_batch=5,
        inner_batch=20, inner_steps=10, inner_lr=5e-4, decay_steps=200_000,
        repeats=3,
        steps={"reptile": 4, "reptile_no_xla": 4, "reptile_sequential": 4,
               "reptile_jit": 4, "eager": 1, "eager_tf_function": 1,
               "inner_steps": 4, "fused": 5},
    ),
    "eval": dict(
        kind="eval", ways=5, shots=1, query_shots=1, meta_batch=5,
        inner_batch=5, inner_steps=50, inner_lr=1e-3, decay_steps=100_000,
        repeats=5,
        # evaluate steps of 5 tasks; the eager loops' and fused steps are
        # single tasks. Repeats of a few seconds: with 2 steps per repeat
        # the per-task rows varied by up to 30% between runs.
        steps={"reptile": 10, "reptile_no_xla": 10, "reptile_sequential": 10,
               "reptile_jit": 2, "reptile_per_task": 10, "eager": 1, "eager_tf_function": 2,
               "inner_steps": 5, "fused": 5},
    ),
    "eval20": dict(
        kind="eval", ways=20, shots=1, query_shots=1, meta_batch=5,
        inner_batch=10, inner_steps=50, inner_lr=5e-4, decay_steps=200_000,
        repeats=5,
        steps={"reptile": 4, "reptile_no_xla": 4, "reptile_sequential": 4,
               "reptile_jit": 1, "reptile_per_task": 4, "eager": 1, "eager_tf_function": 1,
               "inner_steps": 2, "fused": 2},
    ),
}
VARIANTS = ("reptile", "reptile_no_xla", "reptile_sequential", "reptile_jit",
            "reptile_per_task", "eager", "eager_tf_function", "inner_steps", "fused", "ceiling")
REPTILE_VARIANTS = ("reptile", "reptile_no_xla", "reptile_sequential", "reptile_jit",
                    "reptile_per_task")
# Variants that differ from the default only in evaluation.
EVAL_ONLY_VARIANTS = ("reptile_per_task",)
EAGER_VARIANTS = ("eager", "eager_tf_function")
ALGORITHMS = ("reptile", "fomaml", "maml")
# FOMAML and MAML get the rows that compare the default with the plain loops
# and with the default before XLA was chosen automatically; the other
# ReptileModel variants are the same machinery and are measured on Reptile.
OTHER_ALGORITHM_VARIANTS = ("reptile", "reptile_no_xla", "eager", "eager_tf_function")
# The targets (keras_reptile issue 14): default `fit` against the
# plain loops and the matmul ceiling, and `evaluate` against the default
# before (`jit_compile=False` per-task evaluation, today's numbers).
TARGETS = dict(x_eager=45.0, x_tf_function=3.5, pct_of_ceiling=60.0, eval_speedup=2.0)
QUICK = dict(repeats=2, steps=2, eager_steps=1, matmul_size=1024,
             matmul_repeats=3)


def label(variant, kind, algorithm="reptile"):
    method = "fit" if kind == "train" else "evaluate"
    text = {
        "reptile": f"ReptileModel.{method} (default)",
        "reptile_no_xla": f"ReptileModel.{method} (jit_compile=False)",
        "reptile_sequential": f"ReptileModel.{method} (parallel_tasks=False)",
        "reptile_jit": f"ReptileModel.{method} (jit_compile=True)",
        "reptile_per_task": f"ReptileModel.{method} (batched_tasks=False)",
        "eager": "eager loop (keras.io style)",
        "eager_tf_function": "eager loop, tf.function inner step",
        "inner_steps": "inner steps alone, back to back (reference)",
        "fused": "fused fwd+bwd, one batch (reference)",
        "ceiling": "compute ceiling (matmul FLOP/s)",
    }[variant]
    if kind == "train" and algorithm != "reptile" and (
            variant in REPTILE_VARIANTS or variant in EAGER_VARIANTS):
        text = f"[{algorithm}] " + text
    return text


# ----------------------------------------------------------------------
# Helpers


def rss_mb():
    """Current and peak resident set size of this process, in MiB."""
    current = None
    try:
        import psutil

        current = psutil.Process().memory_info().rss / 2**20
    except ImportError:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        current = int(line.split()[1]) / 1024
        except OSError:
            pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = peak / 2**20 if sys.platform == "darwin" else peak / 1024
    return current, peak


def load_average():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_backbone(cfg):
    return keras_reptile.models.conv4(
        INPUT_SHAPE, num_classes=cfg["ways"], filters=FILTERS
    )


def make_inner_optimizer(cfg):
    return keras.optimizers.Adam(cfg["inner_lr"], beta_1=0.0)


def make_outer_schedule(cfg):
    return keras.optimizers.schedules.PolynomialDecay(
        1.0, cfg["decay_steps"], 0.0
    )


def make_loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def random_omniglot(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((NUM_CLASSES * IMAGES_PER_CLASS,) + INPUT_SHAPE, "float32")
    y = np.repeat(np.arange(NUM_CLASSES), IMAGES_PER_CLASS)
    return x, y


def make_dataset(cfg, data):
    x, y = data
    return keras_reptile.episodes.from_arrays(
        x, y, ways=cfg["ways"], shots=cfg["shots"],
        query_shots=cfg["query_shots"], meta_batch_size=cfg["meta_batch"],
        seed=0,
    )


def measure_iterator_overhead(cfg, data, repeats=3):
    """Seconds to create a dataset iterator, get one element and delete it.

    Every `fit`/`evaluate` call pays this once (Keras makes a new iterator
    per call), so it is part of each timed repeat of the Keras variants;
    the eager loops keep one iterator.
    """
    ds = make_dataset(cfg, data)

    def once():
        iterator = iter(ds)
        next(iterator)
        del iterator

    once()
    times = [timed(once) for _ in range(repeats)]
    return dict(times_s=times, median_s=statistics.median(times))


def units_per_step(cfg):
    """Units one `fit`/`evaluate` step stands for: 1 meta-step, or
    meta_batch tasks."""
    return 1 if cfg["kind"] == "train" else cfg["meta_batch"]


def unit_name(cfg):
    return "meta-steps/s" if cfg["kind"] == "train" else "tasks/s"


# ----------------------------------------------------------------------
# FLOP counting and the matmul ceiling


def forward_flops_per_image(model):
    """2 x the multiply-adds of the conv and dense layers, from their shapes."""
    macs = 0
    layers = {}
    for layer in _compat.flatten_layers(model)[1:]:
        if isinstance(layer, keras.layers.Conv2D):
            kh, kw, in_per_group, filters = layer.kernel.shape
            out_h, out_w = layer.output.shape[1:3]
            n = out_h * out_w * filters * kh * kw * in_per_group
        elif isinstance(layer, keras.layers.Dense):
            fan_in, units = layer.kernel.shape
            rows = int(np.prod(layer.input.shape[1:-1] or [1]))
            n = rows * fan_in * units
        else:
            continue
        layers[layer.name] = int(n)
        macs += n
    return 2 * macs, layers


def flops_per_unit(cfg, fwd):
    """FLOPs of one meta-step (train) or one task (eval).

    A training step costs ~3 forward passes (forward, backward wrt inputs
    and wrt weights). Training: meta_batch x inner_steps x inner_batch
    training images plus the query forward of every task. Evaluation, per
    task: the inner steps, the forward pass over the support set that sets
    the BatchNormalization statistics, and the query forward.
    """
    s = cfg["ways"] * cfg["shots"]
    q = cfg["ways"] * cfg["query_shots"]
    adapt = cfg["inner_steps"] * cfg["inner_batch"] * 3 * fwd
    if cfg["kind"] == "train":
        return cfg["meta_batch"] * (adapt + q * fwd)
    return adapt + (s + q) * fwd


def flops_per_unit_by_algorithm(cfg, fwd):
    """FLOPs of one meta-step per algorithm whose count is exact enough.

    FOMAML adds the backward pass of each task's query loss (2 forward
    passes' worth). MAML's backward pass through the inner loop (Hessian-
    vector products through Adam) has no comparably simple count, so it
    gets no ceiling.
    """
    reptile = flops_per_unit(cfg, fwd)
    if cfg["kind"] != "train":
        return {"reptile": reptile}
    q = cfg["ways"] * cfg["query_shots"]
    return {"reptile": reptile, "fomaml": reptile + cfg["meta_batch"] * q * 2 * fwd,
            "maml": None}


def measure_matmul(n, repeats):
    a = tf.random.stateless_normal([n, n], seed=[1, 2])
    b = tf.random.stateless_normal([n, n], seed=[3, 4])
    matmul = tf.function(tf.matmul)
    matmul(a, b).numpy()  # trace and warm up
    times = [timed(lambda: matmul(a, b).numpy()) for _ in range(repeats)]
    median = statistics.median(times)
    return dict(
        size=n, repeats=repeats, times_s=times, median_s=median,
        flops=2 * n**3, flops_per_s=2 * n**3 / median,
    )


# ----------------------------------------------------------------------
# Variants


def bench_reptile(cfg, data, *, jit, parallel_tasks, repeats, steps,
                  algorithm="reptile", batched_tasks="auto"):
    """`ReptileModel.fit` (or `evaluate`) as a user would call it.

    `jit` is passed to `compile(jit_compile=...)`; None leaves Keras's
    default, `"auto"`.
    """
    keras.utils.set_random_seed(0)
    model = keras_reptile.ReptileModel(
        make_backbone(cfg),
        algorithm=algorithm,
        inner_optimizer=make_inner_optimizer(cfg),
        # For `eval` the training settings are irrelevant; keep the defaults.
        inner_steps=cfg["inner_steps"] if cfg["kind"] == "train" else 5,
        inner_batch_size=cfg["inner_batch"] if cfg["kind"] == "train" else 10,
        eval_inner_steps=cfg["inner_steps"] if cfg["kind"] == "eval" else 50,
        eval_inner_batch_size=cfg["inner_batch"],
        parallel_tasks=parallel_tasks,
        batched_tasks=batched_tasks,
    )
    # Python side effects run only while `tf.function` traces, so this
    # counts traces of the step. Keras binds `self.train_step` when it first
    # builds the train function, so wrap before the first `fit`.
    method = "train_step" if cfg["kind"] == "train" else "test_step"
    traces = [0]
    step_fn = getattr(model, method)

    def counted_step(data):
        traces[0] += 1
        return step_fn(data)

    setattr(model, method, counted_step)
    compile_kwargs = dict(
        optimizer=keras.optimizers.SGD(make_outer_schedule(cfg)),
        loss=make_loss(),
        metrics=["accuracy"],
    )
    if jit is not None:
        compile_kwargs["jit_compile"] = jit
    model.compile(**compile_kwargs)
    ds = make_dataset(cfg, data)

    if cfg["kind"] == "train":
        def run(n):
            model.fit(ds, steps_per_epoch=n, epochs=1, verbose=0)
    else:
        def run(n):
            model.evaluate(ds, steps=n, verbose=0)

    first = timed(lambda: run(1))
    traces_warmup = traces[0]
    times = [timed(lambda: run(steps)) for _ in range(repeats)]
    current, peak = rss_mb()
    result = dict(
        first_s=first, times_s=times, steps_per_repeat=steps,
        units_per_step=units_per_step(cfg),
        traces=traces[0], traces_in_timed_calls=traces[0] - traces_warmup,
        rss_mb=current, peak_rss_mb=peak,
        jit_compile=jit,
    )
    del model, ds
    gc.collect()
    return result


class PlainReptile:
    """Reptile the way the keras.io example writes it, with a meta-batch.

    Per task: `set_weights(θ)`, reset the Adam variables, `inner_steps`
    steps of `tf.GradientTape` + `optimizer.apply` on batches taken in order
    from the support set (as `ReptileModel` does), `get_weights()`, then the
    query forward in training mode (what `fit` reports). Outer update in
    NumPy: trainable weights θ + ε (mean φ − θ) with the `PolynomialDecay`
    ε, BatchNormalization moving statistics set to their mean over tasks.

    With `algorithm="fomaml"` each task's query loss is differentiated at
    φ instead (`GradientTape`, one more backward pass per task) and the
    outer update is θ − ε mean(gradient), as `ReptileModel(algorithm=
    "fomaml")` with the same outer SGD computes it.

    For evaluation (`evaluate_task`, one task): the inner steps, then the
    BatchNormalization statistics of the whole support set (momentum 0,
    one training-mode forward) and the query forward in inference mode;
    θ is restored afterwards.
    """

    def __init__(self, cfg, use_tf_function, algorithm="reptile"):
        keras.utils.set_random_seed(0)
        self.cfg = cfg
        self.algorithm = algorithm
        self.model = make_backbone(cfg)
        self.optimizer = make_inner_optimizer(cfg)
        self.optimizer.build(self.model.trainable_variables)
        self.loss_fn = make_loss()
        self.schedule = make_outer_schedule(cfg)
        self.meta_iteration = 0
        trainable = {id(v) for v in self.model.trainable_weights}
        self.is_trainable = [id(w) in trainable for w in self.model.weights]
        # Reset = a fresh optimizer's state: every variable but the learning
        # rate back to zero (Adam's moments and iteration count).
        self.reset_pairs = [
            (v, np.zeros(v.shape, v.dtype))
            for v in self.optimizer.variables
            if v is not _compat.raw_learning_rate(self.optimizer)
        ]
        self.batch_norms = [
            layer for layer in self.model.layers
            if isinstance(layer, keras.layers.BatchNormalization)
        ]
        self.traces = 0
        self.inner_step = (
            tf.function(self._inner_step) if use_tf_function
            else self._inner_step
        )
        self.query_gradient = (
            tf.function(self._query_gradient) if use_tf_function
            else self._query_gradient
        )

    def _inner_step(self, x, y):
        if not tf.executing_eagerly():
            self.traces += 1
        with tf.GradientTape() as tape:
            loss = self.loss_fn(y, self.model(x, training=True))
        grads = tape.gradient(loss, self.model.trainable_variables)
        self.optimizer.apply(grads, self.model.trainable_variables)
        return loss

    def _query_gradient(self, x, y):
        if not tf.executing_eagerly():
            self.traces += 1
        with tf.GradientTape() as tape:
            logits = self.model(x, training=True)
            loss = self.loss_fn(y, logits)
        return logits, tape.gradient(loss, self.model.trainable_variables)

    def _adapt(self, theta, support_x, support_y):
        self.model.set_weights(theta)
        for variable, zeros in self.reset_pairs:
            variable.assign(zeros)
        size = self.cfg["inner_batch"]
        offsets = np.arange(size)
        for t in range(self.cfg["inner_steps"]):
            rows = (t * size + offsets) % len(support_x)
            self.inner_step(support_x[rows], support_y[rows])

    def train_step(self, episode):
        episode = {k: v.numpy() for k, v in episode.items()}
        theta = self.model.get_weights()
        phis = []
        grads = []
        correct = 0
        for b in range(self.cfg["meta_batch"]):
            self._adapt(theta, episode["support_x"][b], episode["support_y"][b])
            phis.append(self.model.get_weights())
            if self.algorithm == "fomaml":
                logits, grad = self.query_gradient(
                    episode["query_x"][b], episode["query_y"][b])
                grads.append([g.numpy() for g in grad])
            else:
                logits = self.model(episode["query_x"][b], training=True)
            correct += int(
                np.sum(np.argmax(logits, -1) == episode["query_y"][b])
            )
        epsilon = float(self.schedule(self.meta_iteration))
        new = []
        trainable_index = 0
        for i, old in enumerate(theta):
            mean = np.mean([phi[i] for phi in phis], axis=0)
            if not self.is_trainable[i]:
                new.append(mean)
                continue
            if self.algorithm == "fomaml":
                grad = np.mean([g[trainable_index] for g in grads], axis=0)
                new.append(old - epsilon * grad)
            else:
                new.append(old + epsilon * (mean - old))
            trainable_index += 1
        self.model.set_weights(new)
        self.meta_iteration += 1
        return correct

    def evaluate_task(self, task):
        theta = self.model.get_weights()
        self._adapt(theta, task["support_x"], task["support_y"])
        momenta = [layer.momentum for layer in self.batch_norms]
        for layer in self.batch_norms:
            layer.momentum = 0.0
        self.model(task["support_x"], training=True)
        for layer, momentum in zip(self.batch_norms, momenta):
            layer.momentum = momentum
        logits = self.model(task["query_x"], training=False)
        correct = int(np.sum(np.argmax(logits, -1) == task["query_y"]))
        self.model.set_weights(theta)
        return correct


def single_tasks(iterator):
    """Yields the tasks of each episode batch one at a time, as NumPy."""
    for episode in iterator:
        episode = {k: v.numpy() for k, v in episode.items()}
        for b in range(len(episode["support_x"])):
            yield {k: v[b] for k, v in episode.items()}


def bench_plain(cfg, data, *, use_tf_function, repeats, steps, algorithm="reptile"):
    """The plain loops; a step is one meta-step, or one task for `eval`."""
    loop = PlainReptile(cfg, use_tf_function, algorithm)
    iterator = iter(make_dataset(cfg, data))
    if cfg["kind"] == "train":
        def step():
            loop.train_step(next(iterator))
    else:
        tasks = single_tasks(iterator)

        def step():
            loop.evaluate_task(next(tasks))

    def run(n):
        for _ in range(n):
            step()

    first = timed(lambda: run(1))
    traces_warmup = loop.traces
    times = [timed(lambda: run(steps)) for _ in range(repeats)]
    current, peak = rss_mb()
    result = dict(
        first_s=first, times_s=times, steps_per_repeat=steps,
        units_per_step=1,
        traces=loop.traces if use_tf_function else None,
        traces_in_timed_calls=(
            loop.traces - traces_warmup if use_tf_function else None
        ),
        rss_mb=current, peak_rss_mb=peak,
    )
    del loop, iterator, step
    gc.collect()
    return result


def bench_fused(cfg, *, repeats, steps, per_inner_step=False):
    """`tf.function` train steps on the images one unit adapts on.

    One step on all of them as a single batch, or (`per_inner_step`) one
    step per inner batch, back to back.
    """
    keras.utils.set_random_seed(0)
    model = make_backbone(cfg)
    optimizer = make_inner_optimizer(cfg)
    optimizer.build(model.trainable_variables)
    loss_fn = make_loss()
    calls_per_unit = cfg["inner_steps"]
    if cfg["kind"] == "train":
        calls_per_unit *= cfg["meta_batch"]
    images = cfg["inner_batch"] * calls_per_unit
    if per_inner_step:
        images = cfg["inner_batch"]
    else:
        calls_per_unit = 1
    rng = np.random.default_rng(0)
    x = tf.constant(rng.random((images,) + INPUT_SHAPE, "float32"))
    y = tf.constant(rng.integers(0, cfg["ways"], images), tf.int32)

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    def run(n):
        for _ in range(n):
            loss = train_step(x, y)
        loss.numpy()

    first = timed(lambda: run(1))
    times = [timed(lambda: run(steps * calls_per_unit)) for _ in range(repeats)]
    current, peak = rss_mb()
    del model, optimizer
    gc.collect()
    # `calls_per_unit` calls stand for one meta-step (train) or one task (eval).
    return dict(first_s=first, times_s=times, steps_per_repeat=steps,
                images_per_call=images, calls_per_unit=calls_per_unit,
                units_per_step=1, rss_mb=current, peak_rss_mb=peak)


# ----------------------------------------------------------------------
# Driver


def machine_facts(threads):
    facts = dict(
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
        machine=platform.machine(),
        processor=platform.processor(),
        python=platform.python_version(),
        tensorflow=tf.__version__,
        keras=keras.__version__,
        numpy=np.__version__,
        keras_reptile=getattr(keras_reptile, "__version__", None),
        intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
        inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
        threads_flag=threads,
    )
    if hasattr(os, "sched_getaffinity"):
        facts["usable_cpus"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as f:
            names = [l.split(":", 1)[1].strip() for l in f
                     if l.startswith("model name")]
        if names:
            facts["cpu_model"] = names[0]
    except OSError:
        pass
    try:
        facts["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
            text=True, check=True,
        ).stdout.strip()
        facts["git_dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO, capture_output=True, text=True, check=True,
        ).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return facts


def parse_list(value, allowed, what):
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in allowed]
    if unknown or not items:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {unknown}; choose from {', '.join(allowed)}"
        )
    return items


def positive_int(value):
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"Default steps per repeat ({', '.join(VARIANTS[:-1])}) and repeats: "
        + "; ".join(
            f"{name}: steps {', '.join(str(c['steps'].get(v, '-')) for v in VARIANTS[:-1])}"
            f", repeats {c['repeats']}"
            for name, c in CONFIGS.items()
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--configs", default=",".join(CONFIGS),
        type=lambda v: parse_list(v, CONFIGS, "configs"),
        help="comma-separated subset of: %(default)s",
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS),
        type=lambda v: parse_list(v, VARIANTS, "variants"),
        help="comma-separated subset of: %(default)s",
    )
    parser.add_argument(
        "--algorithms", default=",".join(ALGORITHMS),
        type=lambda v: parse_list(v, ALGORITHMS, "algorithms"),
        help="comma-separated subset of: %(default)s (FOMAML and MAML get "
        "the default, jit_compile=False and plain-loop rows)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=None,
        help="timed repeats after warm-up, for every config and variant "
        "(default: 5 for 5way1shot, 3 otherwise)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None,
        help="steps per repeat, for every variant: meta-steps; for eval, "
        "evaluate steps (meta-batches of 5 tasks) and, for the eager loops "
        "and fused, single tasks; fused: calls (default: per config and "
        "variant, see below)",
    )
    parser.add_argument(
        "--eager-steps", type=positive_int, default=None,
        help="steps per repeat of the two eager loops only; overrides "
        "--steps for them",
    )
    parser.add_argument(
        "--matmul-size", type=positive_int, default=2048,
        help="n of the n x n @ n x n float32 matmul (default: %(default)s)",
    )
    parser.add_argument(
        "--matmul-repeats", type=positive_int, default=10,
        help="timed matmuls, median taken (default: %(default)s)",
    )
    parser.add_argument(
        "--quick", action="store_true",
        help="tiny smoke run: 2 repeats of 2 steps (eager loops 1), a "
        "1024 matmul; compile times still apply. Explicit flags win.",
    )
    parser.add_argument(
        "--threads", default=None, metavar="INTRA[,INTER]",
        help="TensorFlow intra-op (and inter-op; default the same) thread "
        "counts (default: TensorFlow's choice)",
    )
    parser.add_argument(
        "--before", default=None, metavar="JSON",
        help="this benchmark's JSON from the earlier code on this machine: "
        "evaluate's target compares the default rate with that run's",
    )
    parser.add_argument(
        "--output-dir", default=os.path.join(HERE, "results"),
        help="where the JSON goes (default: benchmarks/results)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        if args.repeats is None:
            args.repeats = QUICK["repeats"]
        if args.steps is None:
            args.steps = QUICK["steps"]
        if args.eager_steps is None:
            args.eager_steps = QUICK["eager_steps"]
        if args.matmul_size == parser.get_default("matmul_size"):
            args.matmul_size = QUICK["matmul_size"]
        if args.matmul_repeats == parser.get_default("matmul_repeats"):
            args.matmul_repeats = QUICK["matmul_repeats"]
    if args.threads is not None:
        try:
            parts = [int(p) for p in args.threads.split(",")]
            if not 1 <= len(parts) <= 2 or min(parts) < 1:
                raise ValueError
        except ValueError:
            parser.error("--threads takes INTRA or INTRA,INTER (positive ints)")
        args.threads = parts if len(parts) == 2 else parts * 2
    return args


def set_threads(threads):
    if threads is None:
        return
    intra, inter = threads
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)


def planned_rows(cfg, args):
    """(algorithm, variant) pairs to measure for one configuration, in order.

    Evaluation does not depend on the algorithm (every algorithm adapts
    alike), so it is measured once. There is no plain MAML loop: second-order
    MAML needs a functional inner loop, which is what the library provides.
    """
    rows = []
    for variant in args.variants:
        if variant == "ceiling" or (
                cfg["kind"] == "train" and variant in EVAL_ONLY_VARIANTS):
            continue
        rows.append(("reptile", variant))
        if cfg["kind"] == "train" and variant in OTHER_ALGORITHM_VARIANTS:
            for algorithm in args.algorithms:
                if algorithm == "reptile" or (
                        algorithm == "maml" and variant in EAGER_VARIANTS):
                    continue
                rows.append((algorithm, variant))
    return sorted(rows, key=lambda r: ALGORITHMS.index(r[0]))


def steps_for(cfg, variant, args):
    if variant in EAGER_VARIANTS and args.eager_steps is not None:
        return args.eager_steps
    if args.steps is not None:
        return args.steps
    return cfg["steps"][variant]


def finish_rows(cfg, rows, ceiling_rates):
    """Adds rates, ratios against the same algorithm's plain loops and % of
    that algorithm's ceiling (`ceiling_rates[algorithm]`, None if unknown)."""
    for row in rows:
        row.setdefault("algorithm", "reptile")
        if row["variant"] == "ceiling":
            continue
        units = row["steps_per_repeat"] * row["units_per_step"]
        row["rates"] = [units / t for t in row["times_s"]]
        row["rate"] = units / statistics.median(row["times_s"])

    def rate_of(variant, algorithm):
        return next((r["rate"] for r in rows if r["variant"] == variant
                     and r["algorithm"] == algorithm), None)

    for row in rows:
        eager = rate_of("eager", row["algorithm"])
        eager_tf_function = rate_of("eager_tf_function", row["algorithm"])
        ceiling_rate = ceiling_rates.get(row["algorithm"])
        row["unit"] = unit_name(cfg)
        row["ratio_vs_eager"] = row["rate"] / eager if eager else None
        row["ratio_vs_eager_tf_function"] = (
            row["rate"] / eager_tf_function if eager_tf_function else None
        )
        row["pct_of_ceiling"] = (
            100 * row["rate"] / ceiling_rate if ceiling_rate else None
        )


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def print_table(results, matmul):
    print()
    print(
        f"Matmul {matmul['size']}x{matmul['size']} float32: "
        f"{matmul['flops_per_s'] / 1e9:.1f} GFLOP/s (median of "
        f"{matmul['repeats']}; the better of the runs before and after)"
    )
    header = (
        f"{'variant':<50} {'rate':>10} {'first/compile s':>16} "
        f"{'x eager':>8} {'x tf.fn':>8} {'% ceiling':>10} {'traces':>7} "
        f"{'RSS MiB':>8}"
    )
    for name, config in results.items():
        print()
        print(
            f"== {name}: {config['flops_per_unit'] / 1e9:.2f} GFLOP per "
            f"{'meta-step' if config['kind'] == 'train' else 'task'}; "
            f"rate in {config['unit']} (median of repeats)"
        )
        print(header)
        print("-" * len(header))
        for row in config["rows"]:
            print(
                f"{row['label']:<50} {fmt(row['rate'], '10.3f'):>10} "
                f"{fmt(row.get('first_s'), '16.1f'):>16} "
                f"{fmt(row['ratio_vs_eager'], '8.2f'):>8} "
                f"{fmt(row['ratio_vs_eager_tf_function'], '8.2f'):>8} "
                f"{fmt(row['pct_of_ceiling'], '10.1f'):>10} "
                f"{fmt(row.get('traces'), 'd'):>7} "
                f"{fmt(row.get('rss_mb'), '8.0f'):>8}"
            )
        overhead = config.get("iterator_overhead")
        fractions = [
            row["iterator_overhead_fraction"] for row in config["rows"]
            if "iterator_overhead_fraction" in row
        ]
        if overhead and fractions:
            print(
                f"Each {'fit' if config['kind'] == 'train' else 'evaluate'} "
                "call includes creating and deleting the dataset iterator: "
                f"{overhead['median_s']:.2f} s, "
                f"{', '.join(f'{100 * f:.0f}%' for f in fractions)} of a "
                "timed repeat."
            )


def targets(results, before_report=None):
    """The issue's target ratios next to the measured ones, default and before.

    For `fit`, "before" is `compile(jit_compile=False)`, which is what the
    default did before the meta-step chose XLA itself. For `evaluate` it is
    `batched_tasks=False` in this run (the per-task evaluation) and, given
    `before_report` (this benchmark's JSON, run on the earlier code on the
    same machine), that run's default `evaluate` rate.
    """
    lines = []
    for name, config in results.items():
        rows = {(r["algorithm"], r["variant"]): r for r in config["rows"]}
        for algorithm in ALGORITHMS:
            now, before = rows.get((algorithm, "reptile")), rows.get((algorithm, "reptile_no_xla"))
            if now is None:
                continue
            if config["kind"] == "train":
                for key, target, unit in (
                        ("ratio_vs_eager", TARGETS["x_eager"], "x eager loop"),
                        ("ratio_vs_eager_tf_function", TARGETS["x_tf_function"],
                         "x tf.function loop"),
                        ("pct_of_ceiling", TARGETS["pct_of_ceiling"], "% of ceiling")):
                    lines.append(dict(
                        config=name, algorithm=algorithm, measure=unit, target=target,
                        default=now.get(key), before=before and before.get(key)))
                continue
            per_task = rows.get((algorithm, "reptile_per_task"))
            if per_task is not None:
                lines.append(dict(
                    config=name, algorithm="any", measure="x per-task evaluate",
                    target=TARGETS["eval_speedup"], default=now["rate"] / per_task["rate"],
                    before=1.0))
            if before_report and name in before_report["configs"]:
                earlier = next(r for r in before_report["configs"][name]["rows"]
                               if r["variant"] == "reptile")
                lines.append(dict(
                    config=name, algorithm="any", measure="x evaluate before",
                    target=TARGETS["eval_speedup"], default=now["rate"] / earlier["rate"],
                    before=1.0))
    return lines


def print_targets(lines):
    print()
    print("Targets (issue 14): default against the target, and the default before "
          "(jit_compile=False)")
    print(f"{'config':<11} {'algorithm':<9} {'measure':<20} {'target':>7} "
          f"{'default':>8} {'before':>7}  met")
    for line in lines:
        met = "-" if line["default"] is None else (
            "yes" if line["default"] >= line["target"] else "no")
        print(f"{line['config']:<11} {line['algorithm']:<9} {line['measure']:<20} "
              f"{line['target']:7.1f} {fmt(line['default'], '8.2f'):>8} "
              f"{fmt(line['before'], '7.2f'):>7}  {met}")


def main(argv=None):
    args = parse_args(argv)
    set_threads(args.threads)
    # `fit` passes its default `shuffle=True` to the data adapter, which
    # warns that a tf.data.Dataset is not shuffled by Keras.
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed")
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    load_start = load_average()
    facts = machine_facts(args.threads)
    cpus = facts.get("usable_cpus") or os.cpu_count() or 1
    if load_start:
        if load_start[0] > 0.5 * cpus:
            print(
                f"WARNING: load average {load_start[0]:.2f} on {cpus} CPUs: "
                "other processes are using the CPU; timings will be low.",
                file=sys.stderr, flush=True,
            )

    def progress(message):
        print(f"[{time.time() - started:6.0f}s] {message}", file=sys.stderr,
              flush=True)

    progress(f"matmul {args.matmul_size}^3 x {args.matmul_repeats}")
    matmul_start = measure_matmul(args.matmul_size, args.matmul_repeats)
    data = random_omniglot()

    results = {}
    for name in args.configs:
        cfg = CONFIGS[name]
        repeats = args.repeats or cfg["repeats"]
        fwd, layer_macs = forward_flops_per_image(make_backbone(cfg))
        flops = flops_per_unit(cfg, fwd)
        flops_by_algorithm = flops_per_unit_by_algorithm(cfg, fwd)
        rows = []
        overhead = None
        if set(REPTILE_VARIANTS) & set(args.variants):
            progress(f"{name} dataset iterator overhead")
            overhead = measure_iterator_overhead(cfg, data)
        for algorithm, variant in planned_rows(cfg, args):
            steps = steps_for(cfg, variant, args)
            progress(f"{name} {algorithm} {variant}: warm-up + {repeats} x {steps} steps")
            if variant in REPTILE_VARIANTS:
                row = bench_reptile(
                    cfg, data, jit={"reptile_jit": True,
                                    "reptile_no_xla": False}.get(variant),
                    parallel_tasks=False if variant == "reptile_sequential" else "auto",
                    repeats=repeats, steps=steps, algorithm=algorithm,
                    batched_tasks=False if variant == "reptile_per_task" else "auto",
                )
            elif variant in EAGER_VARIANTS:
                row = bench_plain(
                    cfg, data, use_tf_function=variant == "eager_tf_function",
                    repeats=repeats, steps=steps, algorithm=algorithm,
                )
            else:
                row = bench_fused(cfg, repeats=repeats, steps=steps,
                                  per_inner_step=variant == "inner_steps")
            row.update(variant=variant, algorithm=algorithm,
                       label=label(variant, cfg["kind"], algorithm),
                       repeats=repeats)
            rows.append(row)
        settings = {k: v for k, v in cfg.items() if k not in ("steps", "repeats")}
        results[name] = dict(
            **settings,
            support_size=cfg["ways"] * cfg["shots"],
            query_size=cfg["ways"] * cfg["query_shots"],
            filters=FILTERS,
            input_shape=list(INPUT_SHAPE),
            unit=unit_name(cfg),
            forward_flops_per_image=fwd,
            macs_per_image_by_layer=layer_macs,
            flops_per_unit=flops,
            flops_per_unit_by_algorithm=flops_by_algorithm,
            iterator_overhead=overhead,
            rows=rows,
        )

    # The ceiling is an upper bound, so use the faster of two matmul
    # measurements, one before and one after everything else.
    progress(f"matmul {args.matmul_size}^3 x {args.matmul_repeats} again")
    matmul_end = measure_matmul(args.matmul_size, args.matmul_repeats)
    matmul = max(matmul_start, matmul_end, key=lambda m: m["flops_per_s"])
    for name, config in results.items():
        cfg = CONFIGS[name]
        config["ceiling_rate"] = matmul["flops_per_s"] / config["flops_per_unit"]
        if "ceiling" in args.variants:
            config["rows"].append(dict(
                variant="ceiling", label=label("ceiling", None),
                rate=config["ceiling_rate"], first_s=None,
            ))
        finish_rows(cfg, config["rows"], {
            algorithm: matmul["flops_per_s"] / flops if flops else None
            for algorithm, flops in config["flops_per_unit_by_algorithm"].items()})
        overhead = config["iterator_overhead"]
        for row in config["rows"]:
            if overhead and row["variant"] in REPTILE_VARIANTS:
                row["iterator_overhead_fraction"] = (
                    overhead["median_s"] / statistics.median(row["times_s"])
                )

    print_table(results, matmul)
    before_report = None
    if args.before:
        with open(args.before) as f:
            before_report = json.load(f)
    target_lines = targets(results, before_report)
    print_targets(target_lines)
    report = dict(
        benchmark="meta_step",
        timestamp=stamp,
        command=[os.path.basename(sys.executable)] + sys.argv,
        args={k: v for k, v in vars(args).items()},
        machine=facts,
        load_average_start=load_start,
        load_average_end=load_average(),
        data=dict(classes=NUM_CLASSES, images_per_class=IMAGES_PER_CLASS,
                  kind="uniform random float32"),
        matmul=dict(start=matmul_start, end=matmul_end,
                    used_flops_per_s=matmul["flops_per_s"]),
        configs=results,
        targets=target_lines,
        wall_time_s=time.time() - started,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"meta_step-{stamp}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"\nWall time {report['wall_time_s']:.0f}s. Wrote {path}")
    return report


if __name__ == "__main__":
    main()
