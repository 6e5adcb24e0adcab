"""Reptile on Omniglot with the paper's configurations and evaluation protocol.

Meta-trains `keras_reptile.ReptileModel` (the paper's conv4 network) on one
set of Omniglot alphabets with rotation augmentation, validates on held-out
characters during `fit`, and reports few-shot accuracy ± 95% CI over held-out
*alphabets* (1,000 tasks by default), non-transductive and transductive. With
`--baseline` it also trains the baseline a practitioner would try instead of
meta-learning — the same network as a plain classifier over all
meta-training classes (with rotations), for the same wall time, then
cosine nearest-neighbour on its penultimate features to the support set — and
evaluates it on the same tasks.

Data: the official Omniglot zips in `--data-dir` (default: the repository's
`../shared/data/omniglot`, which holds `images_background_small1.zip` and
`images_background_small2.zip`). By default the model meta-trains on small1's
five alphabets and is tested on the three alphabets only small2 has
(Japanese_(katakana), Sanskrit, Tagalog: 106 characters never seen in
training).

    python examples/omniglot.py --preset 5way1shot --meta-steps 2000
    python examples/omniglot.py --preset 20way1shot --meta-steps 200000   # paper length

The paper's own setting (all 50 alphabets, 1,200 training characters, the
presets' 100,000 or 200,000 meta-steps) through TensorFlow Datasets, which
downloads Omniglot on first use:

    python examples/omniglot.py --preset 5way1shot --train-on full --tfds --carry-inner-state

Writes `results.json`, `history.csv` and `learning_curve.png` to
`--output-dir/<preset>`, and a SavedModel that adapts per request to
`saved_models/omniglot_<preset>/<version>`.
"""

import argparse
import csv
import json
import os
import platform
import sys
import time

# TensorFlow turns its oneDNN CPU kernels on by default only on some x86 CPUs
# (not, e.g., on AMD EPYC without AVX-512); without them grouped convolutions
# fail and evaluation falls back to one task at a time, about 3x slower here.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_reptile  # noqa: E402
from keras_reptile.callbacks import BackupAndRestore  # noqa: E402
from keras_reptile.callbacks import GracefulShutdown  # noqa: E402
from keras_reptile.callbacks import MetaStepSizeLogger  # noqa: E402
from keras_reptile.evaluation import confidence_interval  # noqa: E402
from keras_reptile.evaluation import few_shot_accuracy  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SMALL1 = ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")
SMALL2_ONLY = ("Japanese_(katakana)", "Sanskrit", "Tagalog")
# The --train-on choices that test on alphabets never seen in meta-training.
WHOLE_ALPHABETS = ("small1", "background")

# The paper's Omniglot hyperparameters (Nichol et al., 2018, Table 3 and the
# commands of openai/supervised-reptile): train-shots 10, meta-batch 5,
# epsilon 1.0 annealed linearly to 0, Adam with beta_1 = 0 in the inner loop,
# 50 inner steps at evaluation.
PRESETS = {
    "5way1shot": dict(ways=5, shots=1, inner_batch_size=10, inner_steps=5,
                      inner_lr=1e-3, meta_steps=100_000, eval_inner_batch_size=5),
    "5way5shot": dict(ways=5, shots=5, inner_batch_size=10, inner_steps=5,
                      inner_lr=1e-3, meta_steps=100_000, eval_inner_batch_size=5),
    "20way1shot": dict(ways=20, shots=1, inner_batch_size=20, inner_steps=10,
                       inner_lr=5e-4, meta_steps=200_000, eval_inner_batch_size=10),
    "20way5shot": dict(ways=20, shots=5, inner_batch_size=20, inner_steps=10,
                       inner_lr=5e-4, meta_steps=200_000, eval_inner_batch_size=10),
}
# Test protocols by name: (ways, shots, all classes from one alphabet).
PROTOCOLS = {
    "5way1shot": (5, 1, False),
    "5way5shot": (5, 5, False),
    "20way1shot": (20, 1, False),
    "20way5shot": (20, 5, False),
    "20way1shot_within": (20, 1, True),
    "20way5shot_within": (20, 5, True),
}
TRAIN_SHOTS = 10
# The paper's Omniglot split (openai/supervised-reptile, after Vinyals et al.
# 2016): 1,200 randomly chosen characters of all 50 alphabets for training,
# the other 423 for testing.
PAPER_TRAIN_CHARACTERS = 1200
MAX_TEST_WAYS = max(ways for ways, _, _ in PROTOCOLS.values())
META_BATCH = 5
EVAL_INNER_STEPS = 50
# Ranges of the per-drawing distortions (rotation in degrees, shear, relative
# zoom, translation in pixels at 28x28).
AUGMENTATIONS = {
    "none": None,
    "koch": dict(rotation=10, shear=0.3, zoom=0.2, translation=2),
    "mild": dict(rotation=5, shear=0.15, zoom=0.1, translation=1),
}


def machine():
    """The CPU model, its cores and the TF/Keras versions, for results files."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f
                     if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} CPUs, TF {tf.__version__}, "
            f"Keras {keras.__version__}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="5way1shot")
    parser.add_argument("--meta-steps", type=int, default=None,
                        help="Meta-steps; default: the preset's (100k or 200k).")
    parser.add_argument("--data-dir",
                        default=os.path.join(REPO, "..", "shared", "data", "omniglot"))
    parser.add_argument("--tfds", action="store_true",
                        help="Load Omniglot through TensorFlow Datasets (downloaded on "
                        "first use) instead of the zip files in --data-dir.")
    parser.add_argument("--train-on", choices=["small1", "all", "full", "background"],
                        default="small1",
                        help="small1: meta-train on small1's 5 alphabets, test on "
                        "the 3 alphabets only small2 has. all: meta-train on all "
                        "8 distinct alphabets, test on held-out characters. full: "
                        "the paper's setting, all 50 alphabets (background and "
                        "evaluation sets), 1,200 characters for meta-training and "
                        "validation (1,050 + 150), the other 423 for testing. "
                        "background: the Omniglot challenge's setting, meta-train on "
                        "the background set's 30 alphabets, test on the evaluation "
                        "set's 20 alphabets, never seen.")
    parser.add_argument("--eval-shots", default=None,
                        help="Comma-separated shots to test, default '1,5' for "
                        "5-way presets and the preset's shots for 20-way.")
    parser.add_argument("--eval-tasks", type=int, default=1000)
    parser.add_argument("--val-tasks", type=int, default=50,
                        help="Validation tasks after each epoch.")
    parser.add_argument("--epochs", type=int, default=20,
                        help="Epochs the meta-steps are divided into (one "
                        "validation and one learning-curve point per epoch).")
    parser.add_argument("--baseline", action="store_true",
                        help="Also train and test the classifier + cosine-NN baseline.")
    parser.add_argument("--baseline-only", action="store_true",
                        help="Train and test only the baseline, for --time-budget "
                        "seconds of training batches (no meta-training): the "
                        "baseline as long as an earlier meta-training run.")
    parser.add_argument("--carry-inner-state", action="store_true",
                        help="Carry the inner Adam's state across tasks and "
                        "meta-steps, as the paper's code does "
                        "(ReptileModel(carry_inner_optimizer_state=True)).")
    parser.add_argument("--algorithm", choices=["reptile", "fomaml", "maml", "anil", "metasgd"],
                        default="reptile",
                        help="Meta-learning algorithm (ReptileModel(algorithm=...)).")
    parser.add_argument("--head", choices=["none", "prototype"], default="none",
                        help="prototype: the last Dense layer is set from each "
                        "task's support set before adapting (ReptileModel("
                        "head='prototype')); the network then has 20 outputs so "
                        "one model serves 5-way and 20-way tasks.")
    parser.add_argument("--inner-steps", type=int, default=None,
                        help="Inner steps in training; default: the preset's.")
    parser.add_argument("--inner-lr", type=float, default=None,
                        help="Inner Adam learning rate; default: the preset's.")
    parser.add_argument("--eval-inner-steps", type=int, default=EVAL_INNER_STEPS)
    parser.add_argument("--train-shots", type=int, default=TRAIN_SHOTS,
                        help="Support examples per class in training tasks.")
    parser.add_argument("--outer-lr", type=float, default=None,
                        help="Outer learning rate. Reptile: SGD epsilon, annealed "
                        "linearly to 0 (default 1.0). FOMAML/MAML: Adam, "
                        "annealed linearly to 0 (default 1e-3).")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="Stop meta-training after this many seconds of "
                        "meta-steps (validation not counted), for "
                        "equal-wall-time comparisons.")
    parser.add_argument("--anneal", choices=["steps", "time"], default="steps",
                        help="steps: the outer learning rate goes linearly to 0 "
                        "over --meta-steps. time: over --time-budget seconds of "
                        "meta-steps instead, so algorithms of different speeds "
                        "all finish their schedule within the same budget "
                        "(a resumed run restarts the clock).")
    parser.add_argument("--protocols", default=None,
                        help="Comma-separated test protocols among "
                        f"{', '.join(PROTOCOLS)}; default: the preset's ways at "
                        "--eval-shots, plus 5-way 1- and 5-shot with the "
                        "prototype head, plus 20-way within one alphabet for "
                        "20-way presets or the prototype head.")
    parser.add_argument("--name", default=None,
                        help="Output sub-directory (default: the preset, with the "
                        "algorithm and head appended when they are not the defaults).")
    parser.add_argument("--augment", choices=sorted(AUGMENTATIONS), default="none",
                        help="Per-drawing affine distortions of meta-training "
                        "tasks (keras_reptile.augmentation.affine_distortions): "
                        "koch = Koch et al. 2015's ranges, mild = half of them.")
    parser.add_argument("--interpolation", choices=["bilinear", "nearest"],
                        default="bilinear", help="Resampling of --augment.")
    parser.add_argument("--augment-per", choices=["image", "class"], default="image",
                        help="image: each drawing its own distortion. class: one "
                        "distortion per class of a task, applied to all its "
                        "drawings alike (new classes; episodes(augment_per=...)). "
                        "The baseline always distorts per image, since its "
                        "classes are fixed labels.")
    parser.add_argument("--image-size", type=int, default=28,
                        help="Side in pixels the 105x105 drawings are averaged "
                        "down to (28 is the meta-learning convention).")
    parser.add_argument("--filters", type=int, default=64,
                        help="Filters of every conv4 convolution (64 is the "
                        "field's standard).")
    parser.add_argument("--jit-compile", choices=["auto", "true", "false"], default="auto",
                        help="compile(jit_compile=...): auto compiles the meta-step "
                        "with XLA where it can and evaluates without it.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=os.path.join(REPO, "docs", "omniglot"))
    parser.add_argument("--backup-dir", default=None,
                        help="Backups for resuming after SIGTERM/Ctrl-C or a crash "
                        "(rerun the same command); default runs/omniglot_<preset>/backup.")
    parser.add_argument("--export-dir", default=None,
                        help="SavedModel base dir; default saved_models/omniglot_<preset>.")
    parser.add_argument("--verbose", type=int, default=1,
                        help="Keras progress bar: 0 silent, 1 bar, 2 one line per epoch.")
    return parser.parse_args(argv)


def load_splits(args, ways):
    if args.train_on == "background":
        train, test = (keras_reptile.datasets.omniglot(
            None if args.tfds else args.data_dir, splits=(split,), image_size=args.image_size)
            for split in ("background", "evaluation"))
        test_name = f"the evaluation set's {len(test.alphabet_names)} alphabets, never seen"
        train, val = train.split_by_character(train.num_classes // 8, seed=args.seed)
        return train, val, test, test_name
    splits = ("background", "evaluation") if args.train_on == "full" else ("small1", "small2")
    data = keras_reptile.datasets.omniglot(
        None if args.tfds else args.data_dir, splits=splits, image_size=args.image_size)
    if args.train_on == "full":
        if data.num_classes < PAPER_TRAIN_CHARACTERS + MAX_TEST_WAYS:
            raise SystemExit(
                f"--train-on full needs at least {PAPER_TRAIN_CHARACTERS + MAX_TEST_WAYS} "
                f"characters ({PAPER_TRAIN_CHARACTERS} to train, {MAX_TEST_WAYS} ways to "
                "test; full Omniglot has 1,623); the background and evaluation sets "
                f"loaded have {data.num_classes}.")
        train, test = data.split_by_character(
            data.num_classes - PAPER_TRAIN_CHARACTERS, seed=args.seed)
        test_name = "held-out characters of all 50 alphabets (the paper's split)"
    elif args.train_on == "small1":
        train = data.select_alphabets(SMALL1)
        test = data.select_alphabets(SMALL2_ONLY)
        test_name = "held-out alphabets " + ", ".join(SMALL2_ONLY)
    else:
        train, test = data.split_by_character(
            max(ways, data.num_classes // 5), seed=args.seed
        )
        test_name = "held-out characters of all 8 alphabets"
    # Validation during fit: held-out characters of the training alphabets.
    train, val = train.split_by_character(max(ways, train.num_classes // 8), seed=args.seed)
    return train, val, test, test_name


def outer_learning_rate(args):
    """The outer learning rate before annealing: Reptile's epsilon or Adam's."""
    return args.outer_lr or (1.0 if args.algorithm == "reptile" else 1e-3)


def build_model(config, args):
    # With the prototype head the output size only bounds the ways per task.
    outputs = max(20, config["ways"]) if args.head == "prototype" else config["ways"]
    backbone = keras_reptile.models.conv4(
        (args.image_size, args.image_size, 1), num_classes=outputs, filters=args.filters)
    outer_lr = outer_learning_rate(args)
    if args.anneal == "steps":
        # Otherwise TimeAnnealing sets the (variable) learning rate per meta-step.
        outer_lr = keras.optimizers.schedules.PolynomialDecay(
            outer_lr, config["meta_steps"], 0.0)
    if args.algorithm == "reptile":
        outer = keras.optimizers.SGD(outer_lr)
    else:
        outer = keras.optimizers.Adam(outer_lr)
    model = keras_reptile.ReptileModel(
        backbone,
        algorithm=args.algorithm,
        head=None if args.head == "none" else args.head,
        # Meta-SGD learns its own rates, starting from a plain SGD's.
        inner_optimizer=(keras.optimizers.SGD(config["inner_lr"]) if args.algorithm == "metasgd"
                         else keras.optimizers.Adam(config["inner_lr"], beta_1=0.0)),
        inner_steps=config["inner_steps"],
        inner_batch_size=config["inner_batch_size"],
        eval_inner_steps=args.eval_inner_steps,
        eval_inner_batch_size=config["eval_inner_batch_size"],
        carry_inner_optimizer_state=args.carry_inner_state,
    )
    model.compile(
        optimizer=outer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile={"auto": "auto", "true": True, "false": False}[args.jit_compile],
    )
    return model


def baseline_only(train, test, test_name, config, args, out_dir, argv):
    """--baseline-only: the baseline for --time-budget seconds, tested as the meta-learner is."""
    results = {
        "preset": args.preset,
        "command": "python examples/omniglot.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "augment": args.augment if args.augment == "none" else
        dict(AUGMENTATIONS[args.augment], interpolation=args.interpolation, per="image"),
        "image_size": args.image_size,
        "filters": args.filters,
        "time_budget": args.time_budget,
        "train_on": args.train_on,
        "train_classes": f"{train.num_classes} characters x 4 rotations "
                         f"({', '.join(train.alphabet_names)})",
        "test": f"{test_name} ({test.num_classes} characters)",
        "machine": machine(),
        "baseline": run_baseline(train, args.time_budget,
                                 test_protocols(config, args, test), args),
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


class MetaStepTimer(keras.callbacks.Callback):
    """Records the wall time spent in training batches (not validation).

    The first batch of each `fit` also traces and compiles the step; it is
    kept apart in `first_step_seconds` and not counted in `seconds`, so a
    time budget buys every algorithm the same seconds of meta-steps.
    """

    def __init__(self):
        super().__init__()
        self.seconds = 0.0
        self.steps = 0
        self.first_step_seconds = None

    def on_train_begin(self, logs=None):
        self._first = True

    def on_train_batch_begin(self, batch, logs=None):
        self._iteration = int(self.model.optimizer.iterations.numpy())
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        elapsed = time.perf_counter() - self._start
        if int(self.model.optimizer.iterations.numpy()) == self._iteration:
            return  # a step a resumed run skips (BackupAndRestore): no work
        if self._first:
            self._first = False
            self.first_step_seconds = elapsed
        else:
            self.seconds += elapsed
            self.steps += 1


def augment_layers(args):
    """The --augment distortions as Keras layers, or None."""
    if args.augment == "none":
        return None
    return keras_reptile.augmentation.affine_distortions(
        **AUGMENTATIONS[args.augment], interpolation=args.interpolation)


def train_baseline(train, seconds, args):
    """A conv4 classifier over all training classes x 4 rotations, for `seconds`.

    With --augment it sees the same distortions as the meta-learner (one per
    image), so the comparison stays fair.
    """
    x, y, _ = train.arrays()
    xs = np.concatenate([np.rot90(x, k, axes=(1, 2)) for k in range(4)])
    ys = np.concatenate([y * 4 + k for k in range(4)])
    network = keras_reptile.models.conv4(
        (args.image_size, args.image_size, 1), num_classes=train.num_classes * 4,
        filters=args.filters)
    network.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    stop = TimeBudget(seconds)
    data = (
        tf.data.Dataset.from_tensor_slices((xs, ys))
        .shuffle(len(ys), seed=args.seed)
        .repeat()
        .batch(64)
    )
    layers = augment_layers(args)
    if layers:
        # The layers draw from their own seed generators (seeded by
        # keras.utils.set_random_seed in main): a sequential map keeps the
        # draws in one order, so the run is reproducible.
        distort = keras.Sequential(layers)
        data = data.map(lambda x, y: (distort(x, training=True), y))
    data = data.prefetch(tf.data.AUTOTUNE)
    history = network.fit(data, steps_per_epoch=200, epochs=10_000, callbacks=[stop],
                          verbose=2 if args.verbose else 0)
    features = keras.Model(network.inputs, network.get_layer("flatten").output)
    return features, {
        "epochs": len(history.history["loss"]),
        "seconds": round(stop.seconds, 1),
        "final_train_accuracy": float(history.history["accuracy"][-1]),
    }


def run_baseline(train, seconds, protocols, args):
    """Trains the baseline for `seconds` and tests it on `protocols`."""
    features, info = train_baseline(train, seconds, args)
    results = {"training": info}
    for protocol, episodes in protocols:
        accuracy = cosine_nn_accuracy(features, episodes, args.eval_tasks)
        results[protocol] = {
            "accuracy": round(accuracy.mean, 4), "ci95": round(accuracy.ci95, 4),
            "tasks": accuracy.num_tasks,
        }
        print(f"Baseline (classifier + cosine NN) {protocol}: {accuracy}", flush=True)
    return results


class TimeBudget(MetaStepTimer):
    """Stops training after `seconds` of training batches (not validation or compiling)."""

    def __init__(self, seconds):
        super().__init__()
        self.budget = seconds

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.seconds >= self.budget:
            self.model.stop_training = True


class TimeAnnealing(keras.callbacks.Callback):
    """Anneals the outer learning rate linearly to 0 over a `TimeBudget`.

    Sets the rate of the next meta-step after each one (place it before
    `MetaStepSizeLogger`, which logs that rate).
    """

    def __init__(self, budget, initial):
        super().__init__()
        self.budget = budget
        self.initial = initial

    def on_train_begin(self, logs=None):
        self._set()

    def on_train_batch_end(self, batch, logs=None):
        self._set()

    def _set(self):
        remaining = max(0.0, 1.0 - self.budget.seconds / self.budget.budget)
        self.model.optimizer.learning_rate = self.initial * remaining


def cosine_nn_accuracy(features, episodes, num_tasks):
    """1-nearest-neighbour (cosine) of each query to the support set, per task."""
    per_task = []
    meta_batch = episodes.element_spec["query_y"].shape[0]
    for batch in episodes.take(-(-num_tasks // meta_batch)):
        for b in range(meta_batch):
            s = features.predict_on_batch(batch["support_x"][b])
            q = features.predict_on_batch(batch["query_x"][b])
            s /= np.linalg.norm(s, axis=1, keepdims=True) + 1e-12
            q /= np.linalg.norm(q, axis=1, keepdims=True) + 1e-12
            nearest = np.argmax(q @ s.T, axis=1)
            predicted = batch["support_y"][b].numpy()[nearest]
            per_task.append(np.mean(predicted == batch["query_y"][b].numpy()))
    return confidence_interval(per_task)


def protocol_specs(config, args):
    """The test protocols of this run, `(ways, shots, within_alphabet)`, in report order."""
    if args.protocols:
        return [PROTOCOLS[name] for name in args.protocols.split(",")]
    ways = config["ways"]
    if args.eval_shots:
        shots_list = [int(s) for s in args.eval_shots.split(",")]
    else:
        shots_list = [1, 5] if ways == 5 else [config["shots"]]
    specs = [(ways, shots, False) for shots in shots_list]
    if args.head == "prototype" and ways != 5:
        # The head fits any number of ways: also the field's 5-way protocols.
        specs = [(5, 1, False), (5, 5, False)] + specs
    # Only small1 and background hold out whole alphabets; the other splits
    # hold out characters, too few of an alphabet's for 20 ways within it.
    if (ways == 20 or args.head == "prototype") and args.train_on in WHOLE_ALPHABETS:
        specs.append((20, config["shots"], True))
    return specs


def test_protocols(config, args, test):
    """(name, episodes) pairs for the held-out evaluation, seeded identically for all models."""
    protocols = []
    for ways, shots, within in protocol_specs(config, args):
        if within:
            protocols.append((f"{ways}-way {shots}-shot within one alphabet", test.episodes(
                ways=ways, shots=shots, query_shots=1, meta_batch_size=META_BATCH,
                seed=args.seed + 200, within_alphabet=True)))
        else:
            protocols.append((f"{ways}-way {shots}-shot", test.episodes(
                ways=ways, shots=shots, query_shots=1, meta_batch_size=META_BATCH,
                seed=args.seed + 100 + shots)))
    return protocols


def check_args(args, config):
    """Refuses settings that could only fail after training, before any work."""
    if args.anneal == "time" and not args.time_budget:
        raise SystemExit("--anneal time needs --time-budget (the seconds to anneal over).")
    if args.baseline_only and not args.time_budget:
        raise SystemExit("--baseline-only needs --time-budget (the seconds to train it for).")
    if args.augment_per == "class" and args.augment == "none":
        raise SystemExit("--augment-per class needs --augment (the distortions to draw).")
    if args.protocols and args.eval_shots:
        raise SystemExit("Give either --protocols or --eval-shots, not both.")
    if args.protocols:
        for name in args.protocols.split(","):
            if name not in PROTOCOLS:
                raise SystemExit(f"Unknown protocol in --protocols: {name!r}; expected "
                                 f"some of {', '.join(PROTOCOLS)}.")
            if PROTOCOLS[name][2] and args.train_on not in WHOLE_ALPHABETS:
                raise SystemExit(
                    f"--protocols {name} needs whole alphabets held out; --train-on "
                    f"{args.train_on} holds out characters of every alphabet.")
            if args.head == "none" and PROTOCOLS[name][0] > config["ways"]:
                raise SystemExit(
                    f"--protocols {name} has {PROTOCOLS[name][0]} ways, more than "
                    f"the {config['ways']} outputs of a {args.preset} network "
                    "without --head prototype.")


def main(argv=None):
    args = parse_args(argv)
    config = dict(PRESETS[args.preset])
    for key in ("meta_steps", "inner_steps", "inner_lr"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    check_args(args, config)
    config["train_shots"] = args.train_shots
    name = args.name or "_".join(
        [args.preset]
        + ([f"train_on_{args.train_on}"] if args.train_on != "small1" else [])
        + ([args.algorithm] if args.algorithm != "reptile" else [])
        + (["prototype"] if args.head == "prototype" else [])
        + ([f"augment_{args.augment}"] if args.augment != "none" else [])
        + (["per_class"] if args.augment != "none" and args.augment_per == "class" else [])
        + ([f"{args.image_size}px"] if args.image_size != 28 else [])
        + ([f"{args.filters}filters"] if args.filters != 64 else [])
    )
    keras.utils.set_random_seed(args.seed)
    out_dir = os.path.join(args.output_dir, name)
    os.makedirs(out_dir, exist_ok=True)

    train, val, test, test_name = load_splits(args, config["ways"])
    if args.baseline_only:
        return baseline_only(train, test, test_name, config, args, out_dir, argv)
    train_tasks = train.episodes(
        ways=config["ways"], shots=args.train_shots, query_shots=1,
        meta_batch_size=META_BATCH, seed=args.seed, rotations=True,
        augment=augment_layers(args),
        augment_per=args.augment_per,
    )
    val_tasks = val.episodes(
        ways=config["ways"], shots=config["shots"], query_shots=1,
        meta_batch_size=META_BATCH, seed=args.seed + 1,
    )
    model = build_model(config, args)
    steps_per_epoch = max(1, config["meta_steps"] // args.epochs)
    timer = MetaStepTimer()
    # SIGTERM or Ctrl-C stops after the current meta-step with a backup
    # written; rerunning the same command resumes exactly where it stopped.
    backup_dir = args.backup_dir or os.path.join(
        REPO, "runs", f"omniglot_{name}", "backup"
    )
    resuming = os.path.isdir(backup_dir)
    backup = BackupAndRestore(backup_dir, save_freq=max(1, steps_per_epoch // 4))
    shutdown = GracefulShutdown(backup)
    history_path = os.path.join(out_dir, "history.csv")
    budget_callbacks = []
    if resuming and args.anneal == "time":
        print("Resuming with --anneal time: the time budget and the outer "
              "learning rate's annealing start again from the beginning.",
              file=sys.stderr, flush=True)
    if args.time_budget:
        budget = TimeBudget(args.time_budget)
        budget_callbacks.append(budget)
        if args.anneal == "time":
            budget_callbacks.append(TimeAnnealing(budget, outer_learning_rate(args)))
    model.fit(
        backup.resumable(train_tasks),
        epochs=args.epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=val_tasks,
        validation_steps=max(1, args.val_tasks // META_BATCH),
        callbacks=[
            timer,
            *budget_callbacks,  # TimeAnnealing before the logger, which logs its rate
            MetaStepSizeLogger(),  # before CSVLogger, which logs epsilon from it
            backup,
            shutdown,
            keras.callbacks.CSVLogger(history_path, append=resuming),
        ],
        verbose=args.verbose,
    )
    if shutdown.received_signal is not None:
        print(f"Stopped by signal {shutdown.received_signal}; backup written. Run the "
              "same command again to resume.", file=sys.stderr, flush=True)
        sys.exit(128 + shutdown.received_signal)
    results = {
        "preset": args.preset,
        "command": "python examples/omniglot.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "algorithm": args.algorithm,
        "head": args.head,
        "augment": args.augment if args.augment == "none" else
        dict(AUGMENTATIONS[args.augment], interpolation=args.interpolation,
             per=args.augment_per),
        "eval_inner_steps": args.eval_inner_steps,
        "image_size": args.image_size,
        "filters": args.filters,
        "anneal": args.anneal,
        "time_budget": args.time_budget,
        "config": config,
        "train_on": args.train_on,
        "carry_inner_state": args.carry_inner_state,
        "train_classes": f"{train.num_classes} characters x 4 rotations "
                         f"({', '.join(train.alphabet_names)})",
        "validation_classes": val.num_classes,
        "test": f"{test_name} ({test.num_classes} characters)",
        "meta_steps": int(model.optimizer.iterations.numpy()),
        "meta_training_seconds": round(timer.seconds, 1),
        # Excludes each fit's first step, which traces and compiles.
        "meta_steps_per_second": round(timer.steps / timer.seconds, 2) if timer.steps else None,
        "first_step_seconds": None if timer.first_step_seconds is None
        else round(timer.first_step_seconds, 1),
        "machine": machine(),
    }
    # Results are filed under the learner that produced them (e.g. "reptile",
    # "fomaml_prototype"); "learner" names the key for readers.
    learner = args.algorithm + ("" if args.head == "none" else f"_{args.head}")
    results["learner"] = learner
    results[learner] = {}
    # The CSV log covers the whole run, also when it was resumed.
    with open(history_path) as f:
        rows = list(csv.DictReader(f))
    history = {key: [float(row[key]) for row in rows] for key in rows[0]}
    plot_learning_curve(history, steps_per_epoch, os.path.join(out_dir, "learning_curve.png"),
                        f"{args.algorithm}, {args.head} head, {args.preset}")

    protocols = test_protocols(config, args, test)
    for protocol, episodes in protocols:
        for transductive in (False, True):
            started = time.perf_counter()
            accuracy = few_shot_accuracy(model, episodes, args.eval_tasks,
                                         transductive=transductive)
            key = f"{protocol}, {'transductive' if transductive else 'non-transductive'}"
            results[learner][key] = {
                "accuracy": round(accuracy.mean, 4), "ci95": round(accuracy.ci95, 4),
                "tasks": accuracy.num_tasks, "seconds": round(time.perf_counter() - started, 1),
            }
            print(f"{args.algorithm} ({args.head} head) {key}: {accuracy}", flush=True)

    if args.baseline:
        results["baseline"] = run_baseline(train, timer.seconds, protocols, args)

    export_dir = args.export_dir or os.path.join(REPO, "saved_models", f"omniglot_{name}")
    export_path = keras_reptile.export.next_version_path(export_dir)
    model.export(export_path, verbose=False)
    model.save(os.path.join(out_dir, "model.keras"))
    results["saved_model"] = os.path.relpath(export_path, REPO)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps(results, indent=2))
    return results


def plot_learning_curve(history, steps_per_epoch, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = steps_per_epoch * np.arange(1, len(history["loss"]) + 1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(steps, history["loss"], label="meta-train query loss (after adaptation)")
    left.plot(steps, history["val_loss"], label="validation query loss")
    left.set_xlabel("meta-step")
    left.legend()
    right.plot(steps, history["accuracy"], label="meta-train query accuracy (after adaptation)")
    right.plot(steps, history["val_accuracy"], label="validation few-shot accuracy")
    right.set_xlabel("meta-step")
    right.set_ylim(0, 1)
    right.legend(loc="lower right")
    fig.suptitle(f"Omniglot, {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
