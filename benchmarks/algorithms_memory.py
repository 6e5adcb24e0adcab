"""Peak memory and meta-steps/s of Reptile, FOMAML and MAML by inner steps.

MAML differentiates through the whole inner loop, so the meta-step keeps
every inner step's activations for its backward pass and its memory grows
with the number of inner steps (learn2learn#393 and others report the same
in PyTorch). `MAML(recompute_inner_steps=True)` keeps only each step's
inputs and recomputes its activations in the backward pass. This measures
what each costs and saves at the paper's Omniglot 5-way 1-shot meta-step
(conv4, 64 filters, BatchNorm; meta-batch 5 tasks of 50 support images,
inner batch 10, inner `Adam(1e-3, beta_1=0)`), at 1, 5 and 10 inner steps:

    python benchmarks/algorithms_memory.py
    python benchmarks/algorithms_memory.py --inner-steps 1,5 --algorithms maml

Each (algorithm, inner steps) runs in a fresh process (Linux: it reads
`/proc/self/status`). The process loads TensorFlow, builds the model and
dataset, runs two warm-up meta-steps (the first traces and compiles), resets
the peak statistics and runs `--steps` timed meta-steps with
`ReptileModel.fit` (default compile settings). Reported: meta-steps/s; the
peak tensor memory of a meta-step (TensorFlow's CPU allocator,
`tf.config.experimental.get_memory_info`: bytes of live tensors at the
peak, above those live before the steps; this is where activations kept for
the backward pass show); and the process's peak resident memory during the
first step (tracing and graph optimisation dominate it) and during the timed
steps (`VmHWM`, reset via `/proc/self/clear_refs`). Writes
`benchmarks/results/algorithms_memory-<timestamp>.json`.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ALGORITHMS = ("reptile", "fomaml", "maml", "maml_recompute")


def _status_mib(field):
    """`VmRSS` (resident now) or `VmHWM` (peak resident) of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def _reset_peak():
    # Linux: writing 5 to clear_refs resets VmHWM to the current RSS, so the
    # peak measured next is the meta-steps' own, not that of tracing and
    # graph optimisation in the first step.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(algorithm, inner_steps, steps):
    """One configuration, in this process. Returns a dict of numbers."""
    sys.path.insert(0, REPO)
    sys.path.insert(0, HERE)
    import keras
    import tensorflow as tf

    import keras_reptile
    import meta_step

    cfg = dict(meta_step.CONFIGS["5way1shot"], inner_steps=inner_steps)
    keras.utils.set_random_seed(0)
    chosen = {
        "maml_recompute": keras_reptile.algorithms.MAML(recompute_inner_steps=True),
    }.get(algorithm, algorithm)
    model = keras_reptile.ReptileModel(
        meta_step.make_backbone(cfg),
        algorithm=chosen,
        inner_optimizer=meta_step.make_inner_optimizer(cfg),
        inner_steps=inner_steps,
        inner_batch_size=cfg["inner_batch"],
    )
    model.compile(
        optimizer=keras.optimizers.SGD(meta_step.make_outer_schedule(cfg)),
        loss=meta_step.make_loss(),
    )
    dataset = meta_step.make_dataset(cfg, meta_step.random_omniglot())
    built = _status_mib("VmRSS")
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0)
    first = time.perf_counter() - start
    first_peak = _status_mib("VmHWM")
    model.fit(dataset, steps_per_epoch=1, epochs=1, verbose=0)
    _reset_peak()
    tf.config.experimental.reset_memory_stats("CPU:0")
    tensors_before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    start = time.perf_counter()
    model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    tensors = tf.config.experimental.get_memory_info("CPU:0")
    return dict(
        algorithm=algorithm, inner_steps=inner_steps, steps=steps,
        meta_steps_per_s=steps / seconds, first_step_s=first,
        rss_built_mib=built, first_step_peak_rss_mib=first_peak,
        peak_rss_mib=_status_mib("VmHWM"),
        step_peak_tensor_mib=(tensors["peak"] - tensors_before) / 2**20,
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--inner-steps", default="1,5,10")
    parser.add_argument("--steps", type=int, default=20,
                        help="Timed meta-steps per configuration.")
    parser.add_argument("--child", nargs=2, metavar=("ALGORITHM", "INNER_STEPS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.steps)))
        return None
    algorithms = args.algorithms.split(",")
    unknown = sorted(set(algorithms) - set(ALGORITHMS))
    if unknown:
        parser.error(f"Expected --algorithms among {list(ALGORITHMS)}. Received: {unknown}")
    rows = []
    for inner_steps in [int(s) for s in args.inner_steps.split(",")]:
        for algorithm in algorithms:
            result = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps),
                 "--child", algorithm, str(inner_steps)],
                capture_output=True, text=True,
            )
            if result.returncode:
                sys.exit(f"{algorithm} at {inner_steps} inner steps failed:\n"
                         + result.stderr[-3000:])
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"{algorithm:>15} {inner_steps:>3} inner steps: "
                  f"{row['meta_steps_per_s']:6.2f} meta-steps/s, peak tensor memory of "
                  f"a meta-step {row['step_peak_tensor_mib']:7.1f} MiB, process peak RSS "
                  f"{row['first_step_peak_rss_mib']:5.0f} MiB (first step, with "
                  f"compilation) / {row['peak_rss_mib']:5.0f} MiB (timed steps), first "
                  f"step {row['first_step_s']:.1f} s", flush=True)
    out_dir = os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, time.strftime("algorithms_memory-%Y%m%d-%H%M%S.json"))
    with open(path, "w") as f:
        json.dump({
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
            "load_average_at_end": list(os.getloadavg()),
            "steps": args.steps, "rows": rows,
        }, f, indent=2)
    print(f"Wrote {path}")
    return rows


if __name__ == "__main__":
    main()
