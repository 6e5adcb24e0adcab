"""An `examples/omniglot.py` run on the Omniglot challenge's split, beside its anchors.

Reads the `results.json` of a run meta-trained on the background set only
(`examples/omniglot.py --train-on background`) and prints two Markdown
tables: the run's accuracy on the evaluation set's 20 alphabets for each
protocol it measured (± the 95% confidence interval over its test tasks),
and its error on 20-way 1-shot tasks within one alphabet beside the
published results on that protocol.

    python examples/challenge_table.py docs/omniglot/challenge_background_fomaml_prototype/results.json

The anchors are Table 1 of Lake, Salakhutdinov & Tenenbaum (2019), "The
Omniglot challenge: a 3-year progress report" (error on the challenge's 20
within-alphabet 20-way 1-shot runs, evaluation alphabets). This repository's
number comes from 1,000 tasks drawn at random the same way (all 20 classes
from one evaluation alphabet, one drawing each to adapt on, one to classify),
not from the challenge's 20 fixed runs.
"""

import argparse
import json

# The protocols, in report order, as `examples/omniglot.py` names them.
PROTOCOLS = ("20-way 1-shot within one alphabet", "5-way 1-shot", "5-way 5-shot",
             "20-way 1-shot")
WITHIN = PROTOCOLS[0]
# Published error (%) on 20-way 1-shot within one alphabet.
ANCHORS = {
    "Bayesian Program Learning": 3.3,
    "humans": 4.5,
    "Siamese ConvNet": 8.0,
    "a plain ConvNet": 13.5,
    "Prototypical Networks": 13.7,
}
GOAL_ERROR = 8.0
MODES = ("non-transductive", "transductive")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("results", help="results.json of an examples/omniglot.py "
                        "--train-on background run.")
    return parser.parse_args(argv)


def _cell(entry):
    return f"{100 * entry['accuracy']:.1f} ± {100 * entry['ci95']:.1f}"


def table(run):
    """The two Markdown tables for `run`, a parsed `results.json` dict."""
    if run.get("train_on") != "background":
        raise ValueError(
            "Expected the results of a run meta-trained on the background set only "
            "(`--train-on background`). Received: a run with "
            f"train_on={run.get('train_on')!r} ({run.get('command', 'no command recorded')}).")
    scores = run[run["learner"]]
    lines = [
        "| evaluation alphabets, never seen | non-transductive | transductive | tasks |",
        "|---|---|---|---|",
    ]
    for protocol in PROTOCOLS:
        keys = [f"{protocol}, {mode}" for mode in MODES]
        if all(key in scores for key in keys):
            lines.append(f"| {protocol} | {_cell(scores[keys[0]])} "
                         f"| {_cell(scores[keys[1]])} | {scores[keys[0]]['tasks']:,} |")
    if len(lines) == 2:
        raise ValueError(
            f"Expected the run to have measured some of {list(PROTOCOLS)}. "
            f"Received: a run with results for {sorted(scores)}.")
    lines += [
        "",
        "| 20-way 1-shot within one alphabet | error (%) |",
        "|---|---|",
    ]
    ours = {}
    for mode in MODES:
        entry = scores.get(f"{WITHIN}, {mode}")
        if entry is not None:
            ours[f"keras_reptile ({run['learner']}), {mode}"] = (
                f"{100 * (1 - entry['accuracy']):.1f} ± {100 * entry['ci95']:.1f}",
                100 * (1 - entry["accuracy"]))
    rows = [(name, f"{error:.1f}", error) for name, error in ANCHORS.items()]
    rows += [(name, cell, error) for name, (cell, error) in ours.items()]
    for name, cell, _ in sorted(rows, key=lambda row: row[2]):
        lines.append(f"| {name} | {cell} |")
    lines.append(f"| goal | ≤ {GOAL_ERROR:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    with open(args.results) as f:
        print(table(json.load(f)))


if __name__ == "__main__":
    main()
