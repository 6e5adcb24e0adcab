"""Reptile, FOMAML, MAML, ANIL and Meta-SGD, with and without the prototype head, at equal wall time.

Runs `examples/omniglot.py` once per algorithm x head (each in its own
process, one after the other) on the same data, episodes and budget of
meta-training seconds, with the outer learning rate annealed linearly to 0
over that budget (`--anneal time`), so a slow algorithm finishes its schedule
too; the first run also trains the supervised baseline (classifier + cosine
nearest neighbour) for the same seconds. Every model is then tested on the
same 1,000 held-out-alphabet tasks per protocol (5-way 1-shot, and 20-way
1-shot within one alphabet), transductive and not, and the table is written
to `--output-dir/table.md` and `summary.json`.

    python examples/compare_algorithms.py --time-budget 300

`--image-size` and `--filters` change the drawings' resolution and conv4's
width for every run, for the same comparison at another size, e.g.

    python examples/compare_algorithms.py --time-budget 300 --algorithms fomaml \
        --heads prototype --image-size 56 --output-dir docs/omniglot/resolution_56

Common settings: 20-way training tasks of 5 train-shots, 5 inner Adam steps
(5e-4, beta_1 = 0) of 20, 10 inner steps of 10 at evaluation; Reptile's outer
SGD epsilon 1 -> 0, the others' outer Adam 1e-3 -> 0. ANIL adapts only the
final layer; Meta-SGD's inner SGD rates start at 0.1 (Li et al. drew them from
[0.005, 0.1]) and are learned. Without the
head the network has 20 outputs, so on 5-way tasks the 15 unused outputs stay
in the softmax (the head removes that limit).
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
ALGORITHMS = ("reptile", "fomaml", "maml", "anil", "metasgd")
# Meta-SGD's inner optimizer is a plain SGD whose rate starts its learned rates.
META_SGD_INITIAL_RATE = 0.1
HEADS = ("none", "prototype")
PROTOCOLS = (("5-way 1-shot", "5way1shot"),
             ("20-way 1-shot within one alphabet", "20way1shot_within"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--time-budget", type=float, default=300,
                        help="Seconds of meta-steps per model (validation not counted).")
    parser.add_argument("--eval-tasks", type=int, default=1000)
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--data-dir", default=None,
                        help="Omniglot zips; default: examples/omniglot.py's.")
    parser.add_argument("--output-dir",
                        default=os.path.join(REPO, "docs", "omniglot", "algorithms"))
    parser.add_argument("--image-size", type=int, default=28,
                        help="Side in pixels of the drawings (omniglot.py's --image-size).")
    parser.add_argument("--filters", type=int, default=64,
                        help="Filters of conv4's convolutions (omniglot.py's --filters).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--add", action="store_true",
                        help="Add these runs' rows to the comparison already in "
                        "--output-dir (its other rows and its baseline are kept, "
                        "no baseline is trained); each row keeps the command and "
                        "machine it was measured with.")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.algorithms.split(",")) - set(ALGORITHMS))
    if unknown:
        parser.error(f"--algorithms: unknown {unknown}; choose among {list(ALGORITHMS)}")
    return args


def run_name(algorithm, head):
    return algorithm + ("_prototype" if head == "prototype" else "")


def command(args, algorithm, head, baseline):
    # Backups and exports per output directory, so that a comparison at
    # another size never resumes from this one's backup.
    runs = os.path.join(REPO, "runs", "compare_algorithms",
                        os.path.basename(os.path.normpath(args.output_dir)),
                        run_name(algorithm, head))
    argv = [
        sys.executable, os.path.join(HERE, "omniglot.py"),
        "--preset", "20way1shot", "--algorithm", algorithm, "--head", head,
        "--inner-steps", "5", "--train-shots", "5", "--eval-inner-steps", "10",
        # --meta-steps only bounds the run; the budget ends it first.
        "--meta-steps", "100000", "--epochs", "400",
        "--time-budget", str(args.time_budget), "--anneal", "time",
        "--protocols", ",".join(key for _, key in PROTOCOLS),
        "--eval-tasks", str(args.eval_tasks), "--val-tasks", "20",
        "--seed", str(args.seed), "--verbose", "2",
        "--output-dir", args.output_dir, "--name", run_name(algorithm, head),
        "--image-size", str(args.image_size), "--filters", str(args.filters),
        "--backup-dir", os.path.join(runs, "backup"),
        "--export-dir", os.path.join(runs, "saved_model"),
    ]
    if algorithm == "metasgd":
        argv += ["--inner-lr", str(META_SGD_INITIAL_RATE)]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    if baseline:
        argv.append("--baseline")
    return argv


def cell(entry, key):
    return f"{100 * entry[key]['accuracy']:.1f}% ± {100 * entry[key]['ci95']:.1f}"


def table(results):
    lines = [
        "| model | meta-steps in the budget | " + " | ".join(
            f"{name}, non-transductive | {name}, transductive" for name, _ in PROTOCOLS)
        + " |",
        "|---" * (2 + 2 * len(PROTOCOLS)) + "|",
    ]
    baseline_row = None
    for name, result in results.items():
        row = [name, f"{result['meta_steps']:,} ({result['meta_steps_per_second']}/s)"]
        for protocol, _ in PROTOCOLS:
            for mode in ("non-transductive", "transductive"):
                row.append(cell(result[result.get("learner", "reptile")], f"{protocol}, {mode}"))
        lines.append("| " + " | ".join(row) + " |")
        if "baseline" in result:
            baseline = result["baseline"]
            row = ["supervised baseline: classifier + cosine NN",
                   f"{baseline['training']['epochs']} epochs of 200 batches"]
            for protocol, _ in PROTOCOLS:
                row += [cell(baseline, protocol), "–"]
            baseline_row = "| " + " | ".join(row) + " |"
    if baseline_row:
        lines.append(baseline_row)
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    summary_path = os.path.join(args.output_dir, "summary.json")
    results, commands = {}, []
    if args.add:
        if not os.path.exists(summary_path):
            raise SystemExit(f"--add: no comparison to add to in {args.output_dir}")
        with open(summary_path) as f:
            earlier = json.load(f)
        results = earlier["results"]
        commands = earlier.get("commands", [earlier.get("command")])
    # The baseline is trained once per comparison, beside its first run.
    first = not args.add
    for algorithm in args.algorithms.split(","):
        for head in args.heads.split(","):
            argv_run = command(args, algorithm, head, baseline=first)
            print("$", " ".join(argv_run[1:]), flush=True)
            subprocess.run(argv_run, check=True)
            first = False
            with open(os.path.join(args.output_dir, run_name(algorithm, head),
                                   "results.json")) as f:
                results[f"{algorithm}, {head} head"] = json.load(f)
    commands.append("python examples/compare_algorithms.py " + " ".join(
        sys.argv[1:] if argv is None else argv))
    summary = {
        "commands": commands,
        "time_budget": args.time_budget,
        "results": results,
    }
    with open(summary_path, "w") as f:
        json.dump(summary, f, indent=2)
    with open(os.path.join(args.output_dir, "table.md"), "w") as f:
        f.write(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
