"""`keras_reptile.datasets.clinc150`: reading, checking, selecting, episodes of strings."""

import collections
import json
import os

import numpy as np
import pytest

from keras_reptile.datasets import clinc150
from keras_reptile.datasets import string_episodes

REAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "..", "shared", "data", "clinc150")

# Two domains: food (pizza, salad) and chat (hi, bye, thanks). Utterance
# `"<intent> <split> <i>"` says where it belongs, so each check can read it.
DOMAINS = {"food": ["pizza", "salad"], "chat": ["hi", "bye", "thanks"]}
SIZES = {"train": 6, "val": 3, "test": 4}


def _rows(split):
    return [[f"{intent} {split} {i}", intent] for intents in DOMAINS.values()
            for intent in intents for i in range(SIZES[split])]


def _write(root, data=None, domains=None):
    if data is None:
        data = {s: _rows(s) for s in SIZES}
        data.update({f"oos_{s}": [[f"oos {s} {i}", "oos"] for i in range(2)] for s in SIZES})
    with open(os.path.join(root, "data_full.json"), "w") as f:
        json.dump(data, f)
    with open(os.path.join(root, "domains.json"), "w") as f:
        json.dump(DOMAINS if domains is None else domains, f)
    return str(root)


def test_reads_utterances_intents_domains_splits_and_out_of_scope(tmp_path):
    data = clinc150(_write(tmp_path))
    assert data.intent_names == ("pizza", "salad", "hi", "bye", "thanks")
    assert data.intent_domains == ("food", "food", "chat", "chat", "chat")
    assert data.domains == ("food", "chat")
    assert data.intents == (0, 1, 2, 3, 4)
    assert len(data.x) == 5 * (6 + 3 + 4)
    for utterance, intent, split in zip(data.x, data.y, data.split):
        name, where, _ = utterance.split()
        assert (name, where) == (data.intent_names[intent], split)
    x, y = data.arrays("val")
    assert x.shape == (15,) and y.dtype == np.int32
    assert collections.Counter(y.tolist()) == {i: 3 for i in range(5)}
    assert list(data.oos["test"]) == ["oos test 0", "oos test 1"]
    assert list(data.oos["train"]) == ["oos train 0", "oos train 1"]


def test_select_domains_keeps_ids_and_names(tmp_path):
    data = clinc150(_write(tmp_path))
    chat = data.select_domains(["chat"])
    assert chat.domains == ("chat",)
    assert chat.intents == (2, 3, 4)
    assert {u.split()[0] for u in chat.x} == {"hi", "bye", "thanks"}
    assert chat.intent_names == data.intent_names
    assert data.select_domains("food").intents == (0, 1)
    with pytest.raises(ValueError, match=r"Expected `domains` to be a non-empty list of "
                                         r"\['chat'\]. Received: domains=\['food'\]"):
        chat.select_domains(["food"])
    with pytest.raises(TypeError, match="Expected `domains` to be a domain name or a list"):
        data.select_domains(3)
    with pytest.raises(ValueError, match=r"Expected `split` to be one of \['train', 'val', "
                                         r"'test'\]. Received: split='dev'"):
        data.arrays("dev")


def test_episodes_hold_strings_of_distinct_utterances_of_ways_intents(tmp_path):
    data = clinc150(_write(tmp_path))
    tasks = data.episodes("train", ways=3, shots=2, query_shots=3, meta_batch_size=4, seed=1)
    spec = tasks.element_spec
    assert spec["support_x"].shape == (4, 6) and spec["support_x"].dtype.name == "string"
    assert spec["query_y"].shape == (4, 9) and spec["query_y"].dtype.name == "int32"
    seen_intents = set()
    for episode in tasks.take(10).as_numpy_iterator():
        for b in range(4):
            support = [s.decode() for s in episode["support_x"][b]]
            query = [s.decode() for s in episode["query_x"][b]]
            assert len(set(support + query)) == 15  # all distinct
            assert all(u.split()[1] == "train" for u in support + query)
            # Each label is one intent, the same in support and query.
            intent_of = {}
            for u, label in zip(support + query,
                                list(episode["support_y"][b]) + list(episode["query_y"][b])):
                assert intent_of.setdefault(label, u.split()[0]) == u.split()[0]
            assert sorted(intent_of) == [0, 1, 2]
            assert len(set(intent_of.values())) == 3
            assert collections.Counter(episode["support_y"][b].tolist()) == {0: 2, 1: 2, 2: 2}
            assert collections.Counter(episode["query_y"][b].tolist()) == {0: 3, 1: 3, 2: 3}
            seen_intents |= set(intent_of.values())
            # Shuffled: not in label blocks every time is checked over all tasks below.
    assert seen_intents == {"pizza", "salad", "hi", "bye", "thanks"}
    # A seed gives the same episodes; another seed others.
    first = next(iter(data.episodes("train", ways=3, shots=2, seed=1)))
    again = next(iter(data.episodes("train", ways=3, shots=2, seed=1)))
    other = next(iter(data.episodes("train", ways=3, shots=2, seed=2)))
    np.testing.assert_array_equal(first["support_x"], again["support_x"])
    assert not np.array_equal(first["support_x"], other["support_x"])


def test_episodes_draw_every_utterance_and_shuffle_labels(tmp_path):
    data = clinc150(_write(tmp_path)).select_domains("chat")
    tasks = data.episodes("test", ways=2, shots=1, query_shots=1, meta_batch_size=50, seed=0)
    episode = next(iter(tasks))
    drawn = {u.decode() for u in np.concatenate([episode["support_x"].numpy().ravel(),
                                                 episode["query_x"].numpy().ravel()])}
    # 3 intents x 4 test utterances, drawn uniformly: 50 tasks reach them all.
    assert drawn == {f"{i} test {k}" for i in ("hi", "bye", "thanks") for k in range(4)}
    firsts = episode["support_y"].numpy()[:, 0]
    assert 0 < firsts.sum() < 50  # label 0 does not always come first


def test_episode_arguments_are_checked(tmp_path):
    data = clinc150(_write(tmp_path))
    with pytest.raises(ValueError, match=r"Expected every intent to have at least `shots \+ "
                                         r"query_shots` = 5 utterances in split 'test'. "
                                         r"Received: intent 'pizza' has 4"):
        data.episodes("test", ways=2, shots=4, query_shots=1)
    with pytest.raises(ValueError, match=r"Expected `ways` to be at most the number of "
                                         r"intents, 2 in split 'train'. Received: ways=3"):
        data.select_domains("food").episodes("train", ways=3, shots=1)
    with pytest.raises(ValueError, match="Expected `ways` to be a positive integer"):
        data.episodes("train", ways=0, shots=1)


def test_missing_or_malformed_files_are_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="Expected `data_dir` to be a directory with "
                                                "CLINC150's data_full.json"):
        clinc150(missing)
    with pytest.raises(TypeError, match="Expected `data_dir` to be a path"):
        clinc150(3)
    root = _write(tmp_path)
    os.remove(os.path.join(root, "domains.json"))
    with pytest.raises(FileNotFoundError, match=r"Expected CLINC150's domains.json at "
                                                r".*domains.json. Received: no such file"):
        clinc150(root)
    _write(tmp_path)
    with open(os.path.join(root, "data_full.json"), "w") as f:
        f.write('{"train": [["cut')
    with pytest.raises(ValueError, match=r"Expected .*data_full.json to be a JSON file. "
                                         r"Received: a file that is not \(JSONDecodeError"):
        clinc150(root)


def test_string_episodes_of_your_own_texts():
    texts = ["hi", "hello", "hey", "bye", "see you", "ciao"]
    episode = next(iter(string_episodes(texts, [0, 0, 0, 1, 1, 1], ways=2, shots=1,
                                        query_shots=2, seed=0)))
    support = [t.decode() for t in episode["support_x"][0].numpy()]
    greeting = {"hi", "hello", "hey"}
    # The label of a greeting is the same in support and query.
    label = {t in greeting: int(l) for t, l in zip(support, episode["support_y"][0])}
    for t, l in zip(episode["query_x"][0].numpy(), episode["query_y"][0]):
        assert label[t.decode() in greeting] == int(l)
    with pytest.raises(ValueError, match=r"Expected `x` \(texts\) and `y` \(their class ids\) "
                                         r"to be 1-D and of the same length. Received: "
                                         r"x.shape=\(3,\), y.shape=\(2,\)"):
        string_episodes(texts[:3], [0, 1], ways=2, shots=1)


@pytest.mark.parametrize("data, domains, message", [
    ({"train": []}, None, r"Expected .*data_full.json to hold the keys \['train', 'val', "
                          r"'test', 'oos_train', 'oos_val', 'oos_test'\]. Received: missing "
                          r"keys \['val'"),
    ("rows", None, r"Expected .*data_full.json to hold a JSON object with keys"),
    ("bad-row", None, r"Expected .*data_full.json 'val' to be a list of \[utterance, intent\] "
                      r"string pairs. Received: row 1 = \['only one'\]"),
    ("unknown", None, r"Expected every intent of .*data_full.json 'train' to be listed in "
                      r".*domains.json. Received: intent 'weather'"),
    (None, {"food": "pizza"}, r"Expected .*domains.json to hold a JSON object mapping each "
                              r"domain to a non-empty list of intent names"),
    (None, {"food": ["pizza"], "more": ["pizza"]},
     r"Expected every intent in .*domains.json to belong to one domain. Received: intent "
     r"'pizza' listed twice"),
])
def test_malformed_contents_are_named(tmp_path, data, domains, message):
    if data in ("bad-row", "unknown"):
        kind = data
        data = {s: _rows(s) for s in SIZES}
        data.update({f"oos_{s}": [] for s in SIZES})
        if kind == "bad-row":
            data["val"][1] = ["only one"]
        else:
            data["train"].append(["will it rain", "weather"])
    elif data == "rows":
        data = [["a", "b"]]
    with pytest.raises(ValueError, match=message):
        clinc150(_write(tmp_path, data, domains))


def test_the_real_clinc150():
    if not os.path.isfile(os.path.join(REAL, "data_full.json")):
        pytest.skip(f"CLINC150 is not in {REAL}")
    data = clinc150(REAL)
    assert len(data.intent_names) == 150 and len(data.domains) == 10
    for split, n in (("train", 100), ("val", 20), ("test", 30)):
        _, y = data.arrays(split)
        assert np.bincount(y, minlength=150).tolist() == [n] * 150
    assert {s: len(v) for s, v in data.oos.items()} == {"train": 100, "val": 100, "test": 1000}
    test = data.select_domains(["work", "small_talk", "meta"])
    assert len(test.intents) == 45
    episode = next(iter(test.episodes("test", ways=15, shots=5, query_shots=5, seed=0)))
    assert episode["support_x"].shape == (1, 75)
    names = {data.intent_names[i] for i in test.intents}
    assert {"greeting", "meeting_schedule", "change_language"} <= names
