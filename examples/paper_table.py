"""The Omniglot results of `examples/omniglot.py` runs beside Reptile's paper.

Reads the `results.json` of one or more runs on the paper's split
(`examples/omniglot.py --train-on full`) and prints a Markdown table: for
each of the paper's four protocols, the paper's Reptile accuracy
(non-transductive / transductive) and the run's, ± the 95% confidence
interval over its test tasks, with the meta-steps the run actually took.
A protocol no run measured stays "not run" — nothing is extrapolated.

    python examples/paper_table.py docs/omniglot/5way_reptile_paper_split/results.json

The paper's numbers are Table 1 of Nichol, Achiam & Schulman (2018), "On
First-Order Meta-Learning Algorithms" (arXiv:1803.02999), Reptile on
Omniglot, each from a model meta-trained on its own preset (100,000
meta-steps for 5-way, 200,000 for 20-way).
"""

import argparse
import json

# Protocol -> (non-transductive, transductive) accuracy in percent.
PAPER_REPTILE = {
    "5-way 1-shot": (95.39, 97.68),
    "5-way 5-shot": (98.90, 99.48),
    "20-way 1-shot": (88.14, 89.43),
    "20-way 5-shot": (96.65, 97.12),
}
PAPER_STEPS = {"5-way": 100_000, "20-way": 200_000}
MODES = ("non-transductive", "transductive")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("results", nargs="+",
                        help="results.json files of examples/omniglot.py runs; for a "
                        "protocol measured by several, the first given wins.")
    return parser.parse_args(argv)


def _cell(entry):
    return f"{100 * entry['accuracy']:.2f} ± {100 * entry['ci95']:.2f}"


def table(runs):
    """Markdown rows for `runs`, a list of parsed `results.json` dicts."""
    for run in runs:
        if run.get("train_on") != "full":
            raise ValueError(
                "Expected results of runs on the paper's split (`--train-on full`). "
                f"Received: a run with train_on={run.get('train_on')!r} "
                f"({run.get('command', 'no command recorded')}).")
    lines = [
        "| protocol | paper's Reptile | keras_reptile, non-transductive "
        "| keras_reptile, transductive | meta-steps (paper's) | learner |",
        "|---|---|---|---|---|---|",
    ]
    for protocol, (paper_plain, paper_trans) in PAPER_REPTILE.items():
        paper = f"{paper_plain:.2f} / {paper_trans:.2f}"
        paper_steps = PAPER_STEPS[protocol.split()[0]]
        for run in runs:
            scores = run[run.get("learner", "reptile")]
            keys = [f"{protocol}, {mode}" for mode in MODES]
            if all(key in scores for key in keys):
                learner = run.get("learner", "reptile")
                if run.get("carry_inner_state"):
                    learner += ", inner Adam state carried"
                lines.append(
                    f"| {protocol} | {paper} | {_cell(scores[keys[0]])} "
                    f"| {_cell(scores[keys[1]])} "
                    f"| {run['meta_steps']:,} ({paper_steps:,}) | {learner} |")
                break
        else:
            lines.append(f"| {protocol} | {paper} | not run | not run "
                         f"| – ({paper_steps:,}) | – |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    runs = []
    for path in args.results:
        with open(path) as f:
            runs.append(json.load(f))
    print(table(runs))


if __name__ == "__main__":
    main()
