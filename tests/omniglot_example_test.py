"""The Omniglot example's helpers: protocols, time budgets, the comparison table.

The training runs themselves are the README's commands; these check the
parts that decide what a run measures, without training.
"""

import os
import sys

import keras
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "examples"))

import compare_algorithms  # noqa: E402
import omniglot  # noqa: E402

keras_reptile_datasets = omniglot.keras_reptile.datasets


def _specs(*argv):
    args = omniglot.parse_args(list(argv))
    config = dict(omniglot.PRESETS[args.preset])
    omniglot.check_args(args, config)
    return omniglot.protocol_specs(config, args)


def test_protocols_by_default_by_name_and_by_shots():
    assert _specs("--preset", "5way1shot") == [(5, 1, False), (5, 5, False)]
    assert _specs("--preset", "20way1shot") == [(20, 1, False), (20, 1, True)]
    # The head takes any ways: the 5-way protocols too.
    assert _specs("--preset", "20way1shot", "--head", "prototype") == [
        (5, 1, False), (5, 5, False), (20, 1, False), (20, 1, True)]
    assert _specs("--preset", "20way1shot", "--protocols", "5way1shot,20way1shot_within") == [
        (5, 1, False), (20, 1, True)]
    # Any shots, not only the named protocols'.
    assert _specs("--preset", "5way1shot", "--eval-shots", "10") == [(5, 10, False)]


@pytest.mark.parametrize("argv, message", [
    (["--protocols", "5way2shot"], "Unknown protocol in --protocols: '5way2shot'"),
    (["--protocols", "20way1shot"], "more than the 5 outputs of a 5way1shot network"),
    (["--protocols", "5way1shot", "--eval-shots", "1"], "either --protocols or --eval-shots"),
    (["--anneal", "time"], "--anneal time needs --time-budget"),
    (["--augment-per", "class"], "--augment-per class needs --augment"),
    (["--baseline-only"], "--baseline-only needs --time-budget"),
    (["--train-on", "full", "--head", "prototype", "--protocols", "20way1shot_within"],
     "needs whole alphabets held out; --train-on full"),
    (["--train-on", "all", "--head", "prototype", "--protocols", "20way1shot_within"],
     "needs whole alphabets held out; --train-on all"),
])
def test_settings_that_could_only_fail_after_training_are_refused_first(argv, message):
    with pytest.raises(SystemExit, match=message):
        _specs("--preset", "5way1shot", *argv)


@pytest.mark.parametrize("train_on", ["full", "all"])
def test_splits_by_character_have_no_within_alphabet_tasks(train_on):
    # Held-out characters leave too few per alphabet for 20 ways within one.
    assert _specs("--preset", "20way1shot", "--train-on", train_on) == [(20, 1, False)]
    assert _specs("--preset", "20way1shot", "--train-on", train_on, "--head", "prototype") == [
        (5, 1, False), (5, 5, False), (20, 1, False)]


def test_the_challenges_setting_holds_out_whole_alphabets():
    # The background set's alphabets are never tested: within-alphabet tasks too.
    assert _specs("--preset", "20way1shot", "--train-on", "background", "--head",
                  "prototype") == [(5, 1, False), (5, 5, False), (20, 1, False), (20, 1, True)]
    assert _specs("--preset", "20way1shot", "--train-on", "background",
                  "--protocols", "20way1shot_within") == [(20, 1, True)]


def _fake_omniglot(calls, characters_per_alphabet):
    """Stands in for `keras_reptile.datasets.omniglot`: one alphabet per split."""

    def load(data_dir, *, splits, image_size):
        calls.append(dict(data_dir=data_dir, splits=splits, image_size=image_size))
        alphabets = [f"{split}_alphabet" for split in splits
                     for _ in range(characters_per_alphabet)]
        characters = [f"character{i:02d}" for _ in splits
                      for i in range(1, characters_per_alphabet + 1)]
        images = np.zeros((len(alphabets), 2, image_size, image_size, 1), np.float32)
        return keras_reptile_datasets.Omniglot(images, alphabets, characters)

    return load


@pytest.mark.parametrize("tfds", [False, True])
def test_the_papers_setting_holds_out_all_but_1200_characters(monkeypatch, tfds):
    # 2 splits x 11 characters = 22 characters; with 15 for training (1,200 in
    # the paper) the other 7 are the test set, and max(5 ways, 15 // 8) = 5 of
    # the 15 validate (150 of 1,200 in the paper's setting).
    calls = []
    monkeypatch.setattr(omniglot, "PAPER_TRAIN_CHARACTERS", 15)
    monkeypatch.setattr(omniglot, "MAX_TEST_WAYS", 5)
    monkeypatch.setattr(keras_reptile_datasets, "omniglot", _fake_omniglot(calls, 11))
    argv = ["--preset", "5way1shot", "--train-on", "full", "--data-dir", "/zips",
            "--image-size", "4"] + (["--tfds"] if tfds else [])
    train, val, test, test_name = omniglot.load_splits(omniglot.parse_args(argv), 5)
    assert calls == [dict(data_dir=None if tfds else "/zips",
                          splits=("background", "evaluation"), image_size=4)]
    assert (train.num_classes, val.num_classes, test.num_classes) == (10, 5, 7)
    keys = [set(zip(d.alphabets, d.characters)) for d in (train, val, test)]
    assert not keys[0] & keys[1] and not keys[0] & keys[2] and not keys[1] & keys[2]
    assert len(keys[0] | keys[1] | keys[2]) == 22
    assert "the paper's split" in test_name


def test_the_challenges_setting_trains_on_the_background_set_and_tests_on_the_evaluation_set(
        monkeypatch):
    # 16 characters per split: 16 // 8 = 2 background characters validate,
    # the other 14 meta-train; all 16 evaluation characters test.
    calls = []
    monkeypatch.setattr(keras_reptile_datasets, "omniglot", _fake_omniglot(calls, 16))
    argv = ["--preset", "20way1shot", "--train-on", "background", "--data-dir", "/zips",
            "--image-size", "4"]
    train, val, test, test_name = omniglot.load_splits(omniglot.parse_args(argv), 20)
    assert calls == [dict(data_dir="/zips", splits=(split,), image_size=4)
                     for split in ("background", "evaluation")]
    assert (train.num_classes, val.num_classes, test.num_classes) == (14, 2, 16)
    assert set(train.alphabets) == set(val.alphabets) == {"background_alphabet"}
    assert set(test.alphabets) == {"evaluation_alphabet"}
    assert not set(train.characters) & set(val.characters)
    assert "never seen" in test_name


def test_the_papers_setting_refuses_a_data_set_without_enough_characters(monkeypatch):
    # 2 x 609 = 1,218 characters: 1,200 to train would leave 18, fewer than
    # the 20 ways of a 20-way test task.
    monkeypatch.setattr(keras_reptile_datasets, "omniglot", _fake_omniglot([], 609))
    args = omniglot.parse_args(["--train-on", "full", "--image-size", "4"])
    with pytest.raises(SystemExit, match="at least 1220 characters.*have 1218"):
        omniglot.load_splits(args, 5)


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Model:
    """What the callbacks use of a model: its optimizer and `stop_training`."""

    def __init__(self):
        self.optimizer = keras.optimizers.SGD(1.0)
        self.optimizer.build([])
        self.stop_training = False


def test_time_budget_counts_meta_steps_only_and_annealing_follows_it(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(omniglot.time, "perf_counter", clock)
    model = _Model()
    budget = omniglot.TimeBudget(10.0)
    annealing = omniglot.TimeAnnealing(budget, initial=0.5)
    callbacks = [budget, annealing]
    for callback in callbacks:
        callback.set_model(model)
        callback.on_train_begin()
    assert float(model.optimizer.learning_rate) == pytest.approx(0.5)

    def batch(seconds, works=True):
        for callback in callbacks:
            callback.on_train_batch_begin(0)
        clock.now += seconds
        if works:
            model.optimizer.iterations.assign_add(1)
        for callback in callbacks:
            callback.on_train_batch_end(0)

    batch(30.0)  # the first step traces and compiles: kept apart
    assert budget.first_step_seconds == 30.0 and budget.seconds == 0.0
    batch(0.001, works=False)  # a step a resumed run replays without work
    assert budget.seconds == 0.0 and budget.steps == 0
    batch(4.0)
    # 4 of 10 seconds spent: the next step's rate is 0.5 * (1 - 0.4) = 0.3.
    assert float(model.optimizer.learning_rate) == pytest.approx(0.3)
    assert not model.stop_training
    batch(4.0)
    assert float(model.optimizer.learning_rate) == pytest.approx(0.1)
    batch(4.0)  # 12 >= 10 seconds: stop, at rate 0
    assert model.stop_training
    assert float(model.optimizer.learning_rate) == 0.0
    assert budget.steps == 3 and budget.seconds == pytest.approx(12.0)


def _result(accuracy, baseline=None):
    entry = {"accuracy": accuracy, "ci95": 0.01}
    result = {
        "meta_steps": 1234,
        "meta_steps_per_second": 4.1,
        "reptile": {f"{p}, {m}": entry for p, _ in compare_algorithms.PROTOCOLS
                    for m in ("non-transductive", "transductive")},
    }
    if baseline is not None:
        result["baseline"] = {"training": {"epochs": 7},
                              **{p: {"accuracy": baseline, "ci95": 0.02}
                                 for p, _ in compare_algorithms.PROTOCOLS}}
    return result


def test_comparison_table_has_a_row_per_model_and_the_baseline_last():
    table = compare_algorithms.table({
        "reptile, none head": _result(0.5, baseline=0.4),
        "fomaml, prototype head": _result(0.75),
    }).splitlines()
    assert len(table) == 5
    assert table[2] == ("| reptile, none head | 1,234 (4.1/s) | 50.0% ± 1.0 | 50.0% ± 1.0 "
                        "| 50.0% ± 1.0 | 50.0% ± 1.0 |")
    assert table[3].startswith("| fomaml, prototype head | 1,234 (4.1/s) | 75.0% ± 1.0")
    assert table[4] == ("| supervised baseline: classifier + cosine NN | 7 epochs of 200 "
                        "batches | 40.0% ± 2.0 | – | 40.0% ± 2.0 | – |")
    # Without a baseline run: the models only.
    assert len(compare_algorithms.table({"maml, none head": _result(0.6)}).splitlines()) == 3


def test_image_size_and_filters_reach_the_network_and_the_comparison(tmp_path):
    args = omniglot.parse_args(["--preset", "20way1shot", "--image-size", "56",
                                "--filters", "16", "--head", "prototype"])
    model = omniglot.build_model(dict(omniglot.PRESETS["20way1shot"]), args)
    assert model.model.input_shape == (None, 56, 56, 1)
    # 56 -> 28 -> 14 -> 7 -> 4 pixels per side after the four stride-2 blocks.
    assert model.model.get_layer("conv1").kernel.shape == (3, 3, 1, 16)
    assert model.model.get_layer("flatten").output.shape == (None, 4 * 4 * 16)
    # No --jit-compile: the library's choice (XLA for the meta-step).
    assert model.get_compile_config()["jit_compile"] == "auto"

    compare = compare_algorithms.parse_args(
        ["--image-size", "56", "--filters", "16", "--output-dir", str(tmp_path / "res56")])
    argv = compare_algorithms.command(compare, "fomaml", "prototype", baseline=False)
    assert argv[argv.index("--image-size") + 1] == "56"
    assert argv[argv.index("--filters") + 1] == "16"
    # Another comparison's backup is never resumed: one directory per output.
    backup = argv[argv.index("--backup-dir") + 1]
    assert backup.endswith(os.path.join("res56", "fomaml_prototype", "backup"))


def test_paper_table_sets_our_runs_beside_the_papers_and_never_fills_a_gap():
    import paper_table

    run = {
        "train_on": "full", "learner": "reptile", "carry_inner_state": True,
        "meta_steps": 64321, "command": "python examples/omniglot.py ...",
        "reptile": {
            "5-way 1-shot, non-transductive": {"accuracy": 0.95123, "ci95": 0.00612},
            "5-way 1-shot, transductive": {"accuracy": 0.9701, "ci95": 0.0049},
            # Only one mode of 5-shot: the row is not filled from half a run.
            "5-way 5-shot, non-transductive": {"accuracy": 0.99, "ci95": 0.003},
        },
    }
    rows = paper_table.table([run]).splitlines()
    assert rows[2] == ("| 5-way 1-shot | 95.39 / 97.68 | 95.12 ± 0.61 | 97.01 ± 0.49 "
                       "| 64,321 (100,000) | reptile, inner Adam state carried |")
    assert rows[3] == "| 5-way 5-shot | 98.90 / 99.48 | not run | not run | – (100,000) | – |"
    assert rows[5] == "| 20-way 5-shot | 96.65 / 97.12 | not run | not run | – (200,000) | – |"
    with pytest.raises(ValueError, match="Expected results of runs on the paper's split"):
        paper_table.table([dict(run, train_on="small1")])


def test_challenge_table_sets_the_within_alphabet_error_among_its_anchors():
    import challenge_table

    run = {
        "train_on": "background", "learner": "fomaml_prototype",
        "fomaml_prototype": {
            "20-way 1-shot within one alphabet, non-transductive":
                {"accuracy": 0.9123, "ci95": 0.0081, "tasks": 1000},
            "20-way 1-shot within one alphabet, transductive":
                {"accuracy": 0.871, "ci95": 0.0093, "tasks": 1000},
            "5-way 1-shot, non-transductive": {"accuracy": 0.98, "ci95": 0.004, "tasks": 1000},
            "5-way 1-shot, transductive": {"accuracy": 0.985, "ci95": 0.0032, "tasks": 1000},
            # Only one mode of 20-way 1-shot: no row from half a protocol.
            "20-way 1-shot, non-transductive": {"accuracy": 0.9, "ci95": 0.01, "tasks": 1000},
        },
    }
    lines = challenge_table.table(run).splitlines()
    assert lines[2:5] == [
        "| 20-way 1-shot within one alphabet | 91.2 ± 0.8 | 87.1 ± 0.9 | 1,000 |",
        "| 5-way 1-shot | 98.0 ± 0.4 | 98.5 ± 0.3 | 1,000 |",
        "",
    ]
    # Errors: 100 - 91.23 = 8.77 sorts between the Siamese ConvNet (8.0) and
    # a plain ConvNet (13.5); 100 - 87.1 = 12.9 before 13.5 too.
    assert lines[7:] == [
        "| Bayesian Program Learning | 3.3 |",
        "| humans | 4.5 |",
        "| Siamese ConvNet | 8.0 |",
        "| keras_reptile (fomaml_prototype), non-transductive | 8.8 ± 0.8 |",
        "| keras_reptile (fomaml_prototype), transductive | 12.9 ± 0.9 |",
        "| a plain ConvNet | 13.5 |",
        "| Prototypical Networks | 13.7 |",
        "| goal | ≤ 8.0 |",
    ]
    with pytest.raises(ValueError, match="meta-trained on the background set only"):
        challenge_table.table(dict(run, train_on="full"))
    with pytest.raises(ValueError, match="Expected the run to have measured some of"):
        challenge_table.table(dict(run, fomaml_prototype={}))
