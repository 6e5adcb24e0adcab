"""Meta-step time of each algorithm: ANIL and Meta-SGD beside MAML, FOMAML, Reptile.

Run from the repository root:

    python benchmarks/algorithms_meta_step.py
    python benchmarks/algorithms_meta_step.py --algorithms maml,anil,reptile --filters 32

For each algorithm, a `ReptileModel` wrapping conv4 (`--filters`) on
Omniglot-shaped random data (28x28x1, 5-way 1-shot training tasks with 5
query rows, `--inner-steps` inner SGD steps of 5 rows, `--meta-batch` tasks)
is compiled as shipped (`jit_compile="auto"`: XLA on CPUs), warmed up with
one `fit` step (reported as the compile time), then timed over `--repeats`
`fit(steps_per_epoch=--steps)` calls, the algorithms taking turns in each
repeat so that a change in the machine's load hits them alike. It prints
the median wall and CPU seconds (all of the process's threads) per
meta-step, and MAML's over each algorithm's. On a machine busy with other
work the CPU seconds are the steadier measure of cost.
"""

import argparse
import statistics
import time

import keras
import numpy as np

import keras_reptile

ALGORITHMS = ("maml", "anil", "metasgd", "fomaml", "reptile")
DEFAULT = ("maml", "anil", "metasgd")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", default=",".join(DEFAULT),
                        help=f"Comma-separated, among {','.join(ALGORITHMS)}.")
    parser.add_argument("--filters", type=int, default=16)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--meta-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    return parser.parse_args(argv)


def make_model(algorithm, args):
    if algorithm not in ALGORITHMS:
        raise ValueError(f"Expected an algorithm among {ALGORITHMS}. Received: {algorithm!r}")
    keras.utils.set_random_seed(0)
    net = keras_reptile.models.conv4((28, 28, 1), num_classes=5, filters=args.filters)
    model = keras_reptile.ReptileModel(
        net, inner_optimizer=keras.optimizers.SGD(0.1), inner_steps=args.inner_steps,
        inner_batch_size=5, algorithm=algorithm)
    outer = keras.optimizers.SGD(1.0) if algorithm == "reptile" else keras.optimizers.Adam(1e-3)
    model.compile(optimizer=outer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def main(argv=None):
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    x = rng.random((100 * 20, 28, 28, 1), dtype=np.float32)
    y = np.repeat(np.arange(100), 20)
    tasks = keras_reptile.episodes.from_arrays(
        x, y, ways=5, shots=1, query_shots=1, meta_batch_size=args.meta_batch, seed=0)
    names = args.algorithms.split(",")
    models = {}
    times = {name: [] for name in names}
    cpu = {name: [] for name in names}
    for name in names:
        models[name] = make_model(name, args)
        start = time.perf_counter()
        models[name].fit(tasks, steps_per_epoch=1, verbose=0)
        print(f"{name}: first step (compile) {time.perf_counter() - start:.1f} s", flush=True)
    for _ in range(args.repeats):
        for name in names:
            start, start_cpu = time.perf_counter(), time.process_time()
            models[name].fit(tasks, steps_per_epoch=args.steps, verbose=0)
            times[name].append((time.perf_counter() - start) / args.steps)
            cpu[name].append((time.process_time() - start_cpu) / args.steps)
    print(f"conv4, {args.filters} filters, 5-way 1-shot, {args.inner_steps} inner steps, "
          f"{args.meta_batch} tasks per meta-step; median of {args.repeats} x "
          f"{args.steps} meta-steps")
    for name in names:
        line = f"{name:8s}"
        for label, values in (("wall", times), ("CPU", cpu)):
            median = statistics.median(values[name])
            line += f" {1000 * median:8.1f} ms {label}"
            if "maml" in values:
                line += f" (MAML / this {statistics.median(values['maml']) / median:.1f})"
        print(line + " per meta-step", flush=True)


if __name__ == "__main__":
    main()
