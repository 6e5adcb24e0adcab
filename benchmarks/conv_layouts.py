"""Which formulation of a batch of per-task convolutions is fastest here?

Batched evaluation (`keras_reptile/batched_tasks.py`) runs each Conv2D of
conv4 for all T tasks of a meta-batch as one grouped convolution: the
tasks' feature maps side by side on the channel axis, one group per task.
Its profile (`eval_profile.py`) puts most of the time in those kernels, and
the small late layers (4x4 and 2x2 outputs) run far below the matmul rate.
This benchmark times the alternatives on each layer of conv4 alone, forward
and backward (gradients of the kernels, and of the input except for the
first layer, whose input is the images), 50 calls one after another in a
`tf.while_loop`, as in evaluation's inner loop:

* `grouped`: `tf.nn.conv2d` on `[N, H, W, T*C]` with kernels `[3, 3, C, T*F]`
  (what the library does);
* `patches`: `tf.image.extract_patches` on the tasks' images as one batch
  `[T*N, H, W, C]`, then one batched matmul with the kernels `[T, 9*C, F]`
  (im2col, no transposes: activations kept task-major);
* `slices`: the same matmul, the patches cut with nine strided slices.

    python benchmarks/conv_layouts.py

It checks that the three give the same outputs, prints milliseconds per
forward-and-backward call (median of `--repeats` calls of the loop), and
writes the numbers to `benchmarks/results/conv_layouts-<time>.json`.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
FILTERS = 64
# (input side, input channels) of conv4's four 3x3 stride-2 convolutions
# on 28x28x1 images.
LAYERS = [(28, 1), (14, 64), (7, 64), (4, 64)]
CALLS = 50


def commit():
    return subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def grouped(x, kernel):
    return tf.nn.conv2d(x, kernel, 2, "SAME")


def patches(x, kernel):
    tasks, n, side, _, channels = x.shape
    p = tf.image.extract_patches(
        tf.reshape(x, [tasks * n, side, side, channels]),
        [1, 3, 3, 1], [1, 2, 2, 1], [1, 1, 1, 1], "SAME")
    out = p.shape[1]
    p = tf.reshape(p, [tasks, n * out * out, 9 * channels])
    y = tf.matmul(p, tf.reshape(kernel, [tasks, 9 * channels, -1]))
    return tf.reshape(y, [tasks, n, out, out, -1])


def slices(x, kernel):
    tasks, n, side, _, channels = x.shape
    out = (side + 1) // 2
    pad = max((out - 1) * 2 + 3 - side, 0)
    low = pad // 2
    padded = tf.pad(x, [[0, 0], [0, 0], [low, pad - low], [low, pad - low], [0, 0]])
    cut = [padded[:, :, i:i + 2 * out - 1:2, j:j + 2 * out - 1:2, :]
           for i in range(3) for j in range(3)]
    p = tf.reshape(tf.stack(cut, axis=4), [tasks, n * out * out, 9 * channels])
    y = tf.matmul(p, tf.reshape(kernel, [tasks, 9 * channels, -1]))
    return tf.reshape(y, [tasks, n, out, out, -1])


def time_per_call(fn, x, kernel, repeats, input_gradient):
    @tf.function
    def loop(x, kernel):
        def body(i, kernel):
            with tf.GradientTape() as tape:
                tape.watch([x, kernel])
                y = fn(x, kernel)
                loss = tf.reduce_sum(y * y)
            sources = [kernel, x] if input_gradient else [kernel]
            grads = tape.gradient(loss, sources)
            # Each call starts from the previous call's kernel, as inner
            # steps do, so the calls run one after another.
            step = grads[0] if not input_gradient else grads[0] + tf.reduce_mean(grads[1])
            return i + 1, kernel - 1e-30 * step
        return tf.while_loop(lambda i, _: i < CALLS, body, [0, kernel],
                             parallel_iterations=1)[1]

    loop(x, kernel).numpy()  # trace and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        loop(x, kernel).numpy()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times) / CALLS


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--images", type=int, default=5,
                        help="images per task and inner step (evaluation's 5-way 1-shot: 5)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)
    tasks, n = args.tasks, args.images
    rng = np.random.default_rng(0)
    rows = []
    print(f"{tasks} tasks x {n} images, ms per forward+backward call "
          f"(median of {args.repeats} loops of {CALLS})")
    print(f"{'layer input':<14}{'grouped':>10}{'patches':>10}{'slices':>10}{'max diff':>12}")
    for side, channels in LAYERS:
        x = rng.standard_normal((tasks, n, side, side, channels)).astype("float32")
        kernel = rng.standard_normal((tasks, 3, 3, channels, FILTERS)).astype("float32")
        # The grouped layout: tasks side by side on the channel axis.
        x_grouped = x.transpose(1, 2, 3, 0, 4).reshape(n, side, side, tasks * channels)
        k_grouped = kernel.transpose(1, 2, 3, 0, 4).reshape(3, 3, channels, tasks * FILTERS)
        reference = grouped(x_grouped, k_grouped).numpy()
        out = reference.shape[1]
        reference = reference.reshape(n, out, out, tasks, FILTERS).transpose(3, 0, 1, 2, 4)
        diff = max(float(np.abs(f(tf.constant(x), tf.constant(kernel)).numpy() - reference).max())
                   for f in (patches, slices))
        scale = float(np.abs(reference).max())
        if diff > 1e-5 * scale:
            raise AssertionError(f"formulations disagree on layer {side}x{side}x{channels}: {diff}")
        # The inner loop needs no gradient for the images themselves.
        input_gradient = side != LAYERS[0][0]
        ms = dict(
            grouped=time_per_call(grouped, tf.constant(x_grouped), tf.constant(k_grouped),
                                  args.repeats, input_gradient),
            patches=time_per_call(patches, tf.constant(x), tf.constant(kernel),
                                  args.repeats, input_gradient),
            slices=time_per_call(slices, tf.constant(x), tf.constant(kernel),
                                 args.repeats, input_gradient),
        )
        rows.append(dict(side=side, channels=channels, max_abs_diff=diff, ms_per_call=ms))
        print(f"{f'{side}x{side}x{channels}':<14}{ms['grouped']:>10.3f}{ms['patches']:>10.3f}"
              f"{ms['slices']:>10.3f}{diff:>12.2e}")
    totals = {k: sum(r["ms_per_call"][k] for r in rows) for k in ("grouped", "patches", "slices")}
    print(f"{'all four':<14}{totals['grouped']:>10.3f}{totals['patches']:>10.3f}{totals['slices']:>10.3f}")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"conv_layouts-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        json.dump(dict(args=vars(args), commit=commit(), machine=platform.platform(),
                       cpus=os.cpu_count(), tensorflow=tf.__version__,
                       load_average=os.getloadavg(), calls=CALLS, layers=rows,
                       totals_ms=totals), f, indent=2)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
