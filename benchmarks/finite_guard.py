"""What the non-finite guard costs per meta-step.

Every meta-step of `ReptileModel.fit` snapshots the variables it writes,
checks them for new NaN/Inf after the update (undoing the step if it broke
one) and reads a flag on the host after each call of the train function.
This times the paper's Omniglot 5-way 1-shot meta-step (the configuration
of `benchmarks/meta_step.py`) with the guard and with it replaced by a
pass-through, in one process, alternating the two over `--repeats` rounds:

    python benchmarks/finite_guard.py
    python benchmarks/finite_guard.py --config 20way1shot --steps 10

Prints the median milliseconds per meta-step of each and the difference.
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import keras  # noqa: E402

import keras_reptile  # noqa: E402
import meta_step  # noqa: E402
from keras_reptile._finite_guard import NonFiniteGuard  # noqa: E402


class _PassThrough(NonFiniteGuard):
    """Runs the meta-step's updates, checks nothing."""

    def run(self, variables, iterations, step_fn):
        step_fn()

    def check(self, variables_fn, context_fn):
        pass


def _model(cfg, guarded, jit):
    keras.utils.set_random_seed(0)
    model = keras_reptile.ReptileModel(
        meta_step.make_backbone(cfg),
        inner_optimizer=meta_step.make_inner_optimizer(cfg),
        inner_steps=cfg["inner_steps"], inner_batch_size=cfg["inner_batch"],
    )
    model.compile(optimizer=keras.optimizers.SGD(meta_step.make_outer_schedule(cfg)),
                  loss=meta_step.make_loss(), jit_compile=jit)
    if not guarded:
        # The model creates its guard in its first `make_train_function`
        # only if it has none.
        model._finite_guard = _PassThrough(model.distribute_strategy)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["5way1shot", "20way1shot"], default="5way1shot")
    parser.add_argument("--steps", type=int, default=30, help="Meta-steps per timed call.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--jit-compile", action="store_true")
    args = parser.parse_args(argv)
    cfg = meta_step.CONFIGS[args.config]
    data = meta_step.random_omniglot()
    runs = {}
    for guarded in (True, False):
        model = _model(cfg, guarded, args.jit_compile)
        dataset = meta_step.make_dataset(cfg, data)
        model.fit(dataset, steps_per_epoch=1, verbose=0)  # trace and compile
        runs[guarded] = (model, dataset)
    times = {True: [], False: []}
    for _ in range(args.repeats):
        for guarded, (model, dataset) in runs.items():
            start = time.perf_counter()
            model.fit(dataset, steps_per_epoch=args.steps, verbose=0)
            times[guarded].append(1e3 * (time.perf_counter() - start) / args.steps)
    with_guard = statistics.median(times[True])
    without = statistics.median(times[False])
    print(f"{args.config}{' (XLA)' if args.jit_compile else ''}, median of "
          f"{args.repeats} x {args.steps} meta-steps: {with_guard:.1f} ms with the guard, "
          f"{without:.1f} ms without; the guard costs {with_guard - without:+.1f} ms "
          f"({100 * (with_guard / without - 1):+.1f}%) per meta-step")
    print("all rounds (ms per meta-step): with", [round(t, 1) for t in times[True]],
          "without", [round(t, 1) for t in times[False]])


if __name__ == "__main__":
    main()
