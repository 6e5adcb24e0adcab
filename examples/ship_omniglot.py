"""Ships a meta-trained Omniglot model into `saved_models/omniglot/`.

Takes the output directory of an `examples/omniglot.py` run (its
`model.keras` and `results.json`) and writes, for
`keras_reptile.pretrained.load("omniglot")`:

* `model.keras`, the meta-trained `ReptileModel`;
* `saved_model/1/`, its SavedModel with the adaptation signatures;
* `card.json` and `MODEL_CARD.md`: the run's data, command, steps, wall time
  and held-out accuracies (± 95% CI), plus the accuracy on a fixed set of
  held-out tasks that `tests/pretrained_test.py` re-measures, so a change
  that breaks the shipped model fails CI.

    python examples/omniglot.py --preset 20way1shot --train-on background --algorithm fomaml --head prototype ...
    python examples/ship_omniglot.py docs/omniglot/<that run's name>
"""

import argparse
import json
import os
import shutil

import keras

import keras_reptile
from keras_reptile.evaluation import few_shot_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The fixed check: tasks the test re-measures (small enough for CI), from the
# evaluation set's 20 alphabets, which the shipped model never saw.
CHECK = {"ways": 5, "shots": 1, "tasks": 300, "seed": 2024, "split": "evaluation"}


def check_tasks(data_dir):
    """The held-out alphabets' tasks of the CI check."""
    test = keras_reptile.datasets.omniglot(data_dir, splits=CHECK["split"])
    return test.episodes(ways=CHECK["ways"], shots=CHECK["shots"], query_shots=1,
                         meta_batch_size=5, seed=CHECK["seed"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="An examples/omniglot.py output directory.")
    parser.add_argument("--data-dir",
                        default=os.path.join(REPO, "..", "shared", "data", "omniglot"))
    parser.add_argument("--out", default=os.path.join(REPO, "saved_models", "omniglot"))
    parser.add_argument("--command", default=None,
                        help="The training command, for runs whose results.json "
                        "predates its `command` field.")
    args = parser.parse_args(argv)
    with open(os.path.join(args.run_dir, "results.json")) as f:
        results = json.load(f)
    if results.get("train_on") != "background":
        # The check's and the demo's alphabets must be unseen by the model.
        raise SystemExit(
            f"{args.run_dir} was meta-trained with --train-on "
            f"{results.get('train_on')}; ship a model meta-trained on the background "
            "set only (--train-on background), so the evaluation alphabets stay unseen.")
    if args.command:
        results.setdefault("command", args.command)
    model = keras.saving.load_model(os.path.join(args.run_dir, "model.keras"))

    accuracy = few_shot_accuracy(model, check_tasks(args.data_dir), CHECK["tasks"],
                                 transductive=False)
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    shutil.copy(os.path.join(args.run_dir, "model.keras"), args.out)
    model.export(os.path.join(args.out, "saved_model", "1"), verbose=False)
    card = {
        "results": results,
        "check": dict(CHECK, transductive=False, accuracy=round(accuracy.mean, 4),
                      ci95=round(accuracy.ci95, 4)),
    }
    with open(os.path.join(args.out, "card.json"), "w") as f:
        json.dump(card, f, indent=2)
    with open(os.path.join(args.out, "MODEL_CARD.md"), "w") as f:
        f.write(model_card(card, model))
    print(f"Shipped to {args.out}; check: {accuracy}")


def describe_network(net):
    """One line on the wrapped network: its layers' kinds and sizes."""
    parts = []
    for layer in net.layers[1:]:
        if isinstance(layer, keras.layers.Conv2D):
            parts.append(f"Conv2D {layer.filters} {layer.kernel_size[0]}x"
                         f"{layer.kernel_size[1]}/{layer.strides[0]}")
        elif isinstance(layer, keras.layers.Dense):
            parts.append(f"Dense {layer.units}")
        else:
            parts.append(type(layer).__name__)
    return (f"{net.name} ({net.count_params():,} weights): "
            + ", ".join(parts))


def model_card(card, model):
    r = card["results"]
    network = describe_network(model.model)
    units = model.model.output_shape[-1]
    augment = r.get("augment", "none")
    if isinstance(augment, dict):
        augment = ", ".join(f"{k} {v}" for k, v in augment.items())
    rows = "\n".join(
        f"| {name} | {v['accuracy']:.1%} ± {v['ci95']:.1%} | {v['tasks']} |"
        for name, v in r[r.get("learner", "reptile")].items()
    )
    config = ", ".join(f"{k}={v}" for k, v in r["config"].items())
    c = card["check"]
    return f"""# Omniglot few-shot model (keras_reptile)

Load: `keras_reptile.pretrained.load("omniglot")` (a `ReptileModel`);
serve: `saved_model/1/` (signatures `serving_default`, `adapt_and_predict`,
`adapt_and_predict_steps`).

## What it is
- Network: {network}; meta-trained with {r['algorithm']} and the {r['head']}
  head: before adapting, the last layer is set from the support set's
  class-mean embeddings, so a task may have any 2 to {units} ways. Adapts with {r['eval_inner_steps']} inner Adam steps.
- Input: 28×28×1 drawings, strokes 1.0 on a 0.0 background (Omniglot's
  105×105 drawings area-resampled), labels 0..ways−1.

## Data and training
- Meta-trained on {r['train_classes']}; validated on {r['validation_classes']}
  held-out characters of those alphabets.
- Tested on {r['test']}.
- Settings: preset {r['preset']}, {config}; augmentation: {augment}.
- {r['meta_steps']} meta-steps in {r['meta_training_seconds']:.0f} s
  ({r['meta_steps_per_second']} steps/s) on {r['machine']}.
- Command: `{r.get('command', 'see docs/omniglot/')}`, then
  `python examples/ship_omniglot.py <its output directory>`.

## Held-out accuracy (± 95% CI over tasks)
| protocol | accuracy | tasks |
|---|---|---|
{rows}

CI check (`tests/pretrained_test.py`): {c['ways']}-way {c['shots']}-shot, {c['tasks']}
tasks with seed {c['seed']}, non-transductive: {c['accuracy']:.2%} ± {c['ci95']:.2%}.

## Limits
- Trained on Omniglot's background set only ({r['train_classes'].split(' (')[0]});
  expect lower accuracy on symbols unlike pen strokes, on drawings not centred
  or scaled like Omniglot's, and when all classes of a task come from one
  alphabet (similar characters; see the within-alphabet row).
- Up to {units} ways per task (the head's size); accuracy falls with more ways.
- Adaptation runs {r['eval_inner_steps']} inner steps per request (tens of ms on a CPU).
"""


if __name__ == "__main__":
    main()
