"""Would batching a meta-batch's tasks into one computation pay on this CPU?

`ReptileModel` adapts each task of a meta-batch in its own branch of the
compiled step (one set of ops per task). The alternative is one batched
computation for all tasks: per-task weights stacked on a leading axis, the
tasks' images stacked on the channel axis, and every convolution a grouped
convolution (one group per task), so each op runs once for the whole
meta-batch. This benchmark measures that alternative on the bare
computation before any library code is written for it: the inner loops of
the paper's conv4 (3x3 stride-2 convolutions, BatchNormalization in
training mode, ReLU, dense logits; Adam with beta_1 = 0) for T tasks, in
plain TensorFlow, both ways, in graph mode and under XLA:

    python benchmarks/batched_tasks.py

Configurations: `train5` (5 tasks x 5 inner steps of 10 images, the
5-way meta-step), `train20` (5 x 10 steps of 20, the 20-way meta-step) and
`eval` (5 tasks x 50 steps of 5, a `tf.while_loop` as in evaluation). The
rate is meta-batches per second, median of `--repeats` calls after one
warm-up call (reported as first-call/compile time). It also checks that
both ways give the same adapted weights (max abs difference).
"""

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = {
    "train5": dict(steps=5, batch=10, support=50, ways=5),
    "train20": dict(steps=10, batch=20, support=200, ways=20),
    "eval": dict(steps=50, batch=5, support=5, ways=5),
}
TASKS = 5
FILTERS = 64
SIDE = 28
UNROLLED = 10  # longer loops run in a tf.while_loop, as in keras_reptile


def weights(rng, tasks, ways):
    shapes = []
    channels = 1
    for _ in range(4):
        shapes += [(3, 3, channels, FILTERS), (FILTERS,), (FILTERS,)]
        channels = FILTERS
    shapes += [(4 * FILTERS, ways), (ways,)]
    return [tf.constant(rng.normal(0, 0.1, (tasks,) + s).astype("float32")) for s in shapes]


def batch_norm(x, gamma, beta):
    mean, variance = tf.nn.moments(x, [0, 1, 2])
    return tf.nn.batch_normalization(x, mean, variance, beta, gamma, 1e-3)


def forward_one(w, x):
    """One task: x [N, 28, 28, 1], weights without the task axis."""
    for i in range(4):
        x = tf.nn.conv2d(x, w[3 * i], 2, "SAME")
        x = tf.nn.relu(batch_norm(x, w[3 * i + 1], w[3 * i + 2]))
    x = tf.reshape(x, [tf.shape(x)[0], -1])
    return x @ w[12] + w[13]


def forward_grouped(w, x):
    """All tasks: x [T, N, 28, 28, 1], weights [T, ...]; logits [T, N, ways]."""
    tasks, n = x.shape[0], tf.shape(x)[1]
    # Tasks on the channel axis, task-major: channel t * C + c.
    x = tf.reshape(tf.transpose(x, [1, 2, 3, 0, 4]), [n, SIDE, SIDE, tasks])
    for i in range(4):
        kernel = w[3 * i]
        kernel = tf.reshape(tf.transpose(kernel, [1, 2, 3, 0, 4]),
                            [3, 3, kernel.shape[3], tasks * FILTERS])
        x = tf.nn.conv2d(x, kernel, 2, "SAME")  # grouped: T groups
        x = tf.nn.relu(batch_norm(x, tf.reshape(w[3 * i + 1], [-1]),
                                  tf.reshape(w[3 * i + 2], [-1])))
    side = x.shape[1]
    x = tf.reshape(x, [n, side, side, tasks, FILTERS])
    x = tf.reshape(tf.transpose(x, [3, 0, 1, 2, 4]), [tasks, n, -1])
    return tf.einsum("tnf,tfo->tno", x, w[12]) + w[13][:, None, :]


def adam(w, g, v, step, lr=1e-3, beta_2=0.999, epsilon=1e-7):
    # beta_1 = 0: the first moment is the gradient.
    v = [beta_2 * vi + (1 - beta_2) * gi * gi for vi, gi in zip(v, g)]
    alpha = lr * tf.sqrt(1 - tf.pow(beta_2, step))
    return [wi - alpha * gi / (tf.sqrt(vi) + epsilon) for wi, gi, vi in zip(w, g, v)], v


def inner_loop(cfg, loss_fn, w, x, y, axis):
    def step(t, w, v):
        rows = (t * cfg["batch"] + tf.range(cfg["batch"])) % cfg["support"]
        xb, yb = tf.gather(x, rows, axis=axis), tf.gather(y, rows, axis=axis)
        with tf.GradientTape() as tape:
            tape.watch(w)
            loss = loss_fn(w, xb, yb)
        return adam(w, tape.gradient(loss, w), v, tf.cast(t + 1, tf.float32))

    v = [tf.zeros_like(a) for a in w]
    if cfg["steps"] <= UNROLLED:
        for t in range(cfg["steps"]):
            w, v = step(t, w, v)
        return w
    _, w, _ = tf.while_loop(lambda t, *_: t < cfg["steps"],
                            lambda t, w, v: (t + 1, *step(t, w, v)),
                            (tf.constant(0), w, v))
    return w


def per_task(cfg):
    def loss_fn(w, x, y):
        return tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(y, forward_one(w, x)))

    def run(w, x, y):
        adapted = [inner_loop(cfg, loss_fn, [a[b] for a in w], x[b], y[b], 0)
                   for b in range(TASKS)]
        return [tf.stack(a) for a in zip(*adapted)]
    return run


def grouped(cfg):
    def loss_fn(w, x, y):
        # The sum of the tasks' mean losses: each task's weights get exactly
        # their own task's gradient.
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(y, forward_grouped(w, x))
        return tf.reduce_sum(tf.reduce_mean(losses, axis=1))

    def run(w, x, y):
        return inner_loop(cfg, loss_fn, w, x, y, 1)
    return run


def measure(fn, args, repeats):
    start = time.perf_counter()
    fn(*args)[0].numpy()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)[0].numpy()
        times.append(time.perf_counter() - start)
    return dict(first_s=first, times_s=times, rate=1 / statistics.median(times))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    results = {}
    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        w = weights(rng, TASKS, cfg["ways"])
        x = tf.constant(rng.random((TASKS, cfg["support"], SIDE, SIDE, 1), "float32"))
        y = tf.constant(rng.integers(0, cfg["ways"], (TASKS, cfg["support"])), tf.int32)
        rows = {}
        for way, make in (("per_task", per_task), ("grouped", grouped)):
            for jit in (False, True):
                label = f"{way}, {'XLA' if jit else 'graph'}"
                print(f"{name}: {label}", file=sys.stderr, flush=True)
                fn = tf.function(make(cfg), jit_compile=jit)
                rows[label] = measure(fn, (w, x, y), args.repeats)
        difference = max(float(tf.reduce_max(tf.abs(a - b))) for a, b in zip(
            tf.function(per_task(cfg))(w, x, y), tf.function(grouped(cfg))(w, x, y)))
        results[name] = dict(cfg, tasks=TASKS, rows=rows, max_abs_difference=difference)
        base = rows["per_task, graph"]["rate"]
        print(f"\n== {name}: {TASKS} tasks x {cfg['steps']} steps of {cfg['batch']} "
              f"images; meta-batches/s (median of {args.repeats}); same weights "
              f"to {difference:.1e}")
        for label, row in rows.items():
            print(f"{label:<18} {row['rate']:8.2f}/s  x{row['rate'] / base:5.2f} "
                  f"of per-task graph   first call {row['first_s']:6.1f} s")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir,
                        f"batched_tasks-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(dict(benchmark="batched_tasks", tensorflow=tf.__version__,
                       cpus=os.cpu_count(), results=results), f, indent=2)
    print(f"\nWrote {path}")


if __name__ == "__main__":
    main()
