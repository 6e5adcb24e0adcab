"""How long does one `ReptileModel.adapt()` call take?

`adapt()` adapts the meta-weights to one support set (the paper's 5-way
1-shot Omniglot evaluation by default: conv4, 50 inner steps of 5 images)
and returns a copy of the wrapped model holding the adapted weights. This
times whole calls after a first (tracing) call, and separately the copy
alone (`keras.models.clone_model` and assigning the weights), so the rest is
the compiled adaptation:

    python benchmarks/adapt_call.py
    python benchmarks/adapt_call.py --ways 20 --batch 10

Prints milliseconds per call (median of `--calls`) and writes them to
`benchmarks/results/adapt_call-<time>.json`. Only public API is used, so the
script also runs against older checkouts of the library.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import keras_reptile  # noqa: E402


def median_ms(fn, calls):
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--calls", type=int, default=15)
    parser.add_argument("--output-dir", default=os.path.join(HERE, "results"))
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(0)
    model = keras_reptile.ReptileModel(
        keras_reptile.models.conv4((28, 28, 1), num_classes=args.ways),
        eval_inner_steps=args.steps, eval_inner_batch_size=args.batch)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.random((args.ways * args.shots, 28, 28, 1)).astype("float32")
    y = np.repeat(np.arange(args.ways), args.shots)

    start = time.perf_counter()
    adapted = model.adapt(x, y)
    first_s = time.perf_counter() - start

    def copy():
        clone = keras.models.clone_model(model.model)
        for variable, value in zip(clone.weights, adapted.weights):
            variable.assign(value)

    adapt_ms = median_ms(lambda: model.adapt(x, y), args.calls)
    copy_ms = median_ms(copy, args.calls)
    print(f"adapt() on {args.ways}-way {args.shots}-shot, {args.steps} steps of "
          f"{args.batch}: first call {first_s:.1f} s; then {adapt_ms:.0f} ms per call "
          f"(median of {args.calls}), of which the copy {copy_ms:.0f} ms and the "
          f"adaptation about {adapt_ms - copy_ms:.0f} ms")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"adapt_call-{time.strftime('%Y%m%d-%H%M%S')}.json")
    with open(path, "w") as f:
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        json.dump(dict(args=vars(args), commit=commit,
                       first_s=first_s, adapt_ms=adapt_ms, copy_ms=copy_ms), f, indent=2)
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()
