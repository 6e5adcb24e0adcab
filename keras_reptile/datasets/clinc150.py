"""CLINC150: few-shot intent recognition on raw text.

CLINC150 (Larson et al., 2019, "An Evaluation Dataset for Intent
Classification and Out-of-Scope Prediction"; CC BY 3.0) holds 150 intents
of a task-oriented assistant in 10 domains (banking, travel, small talk,
...), with 100 training, 20 validation and 30 test utterances each, plus
utterances that belong to no intent (out of scope). `clinc150(data_dir)`
reads the authors' `data_full.json` and `domains.json` from `data_dir`
(nothing is downloaded) and checks them; the result selects domains and
builds episodes of raw strings for a model that takes text, e.g. one whose
first layer is `keras.layers.TextVectorization`.

Example:

```python
from keras_reptile.datasets import clinc150

data = clinc150("../shared/data/clinc150")
test = data.select_domains(["work", "small_talk", "meta"])
tasks = test.episodes("test", ways=5, shots=1, query_shots=5, seed=0)
```
"""

import json
import os

import numpy as np
import tensorflow as tf

from keras_reptile import episodes as episodes_lib
from keras_reptile._validation import check_positive_int

__all__ = ["Clinc150", "clinc150", "string_episodes", "SPLITS"]

SPLITS = ("train", "val", "test")
_FILES = ("data_full.json", "domains.json")
# The label CLINC gives its out-of-scope utterances.
_OOS = "oos"


class Clinc150:
    """The in-scope utterances of CLINC150 (or of some of its domains).

    Attributes:
        x: Array of shape `[N]` of utterances (Python `str`), in the files'
            order: all of `train`, then `val`, then `test`.
        y: int32 array `[N]`: the intent id of each utterance, an index
            into `intent_names` (ids are the same in every selection).
        split: Array `[N]`: `"train"`, `"val"` or `"test"`.
        intent_names: Names of all 150 intents, grouped by domain in the
            order of `domains.json`.
        intent_domains: The domain of each intent in `intent_names`.
        domains: The domains of this selection, in `domains.json`'s order.
        intents: Sorted ids of the intents of this selection.
        oos: Dict `split -> array` of the out-of-scope utterances (the same
            in every selection: they belong to no domain).

    Example:

    >>> import json, os, tempfile
    >>> root = tempfile.mkdtemp()
    >>> rows = [[f"{w} number {i}", w] for w in ("hi", "bye") for i in range(4)]
    >>> with open(os.path.join(root, "data_full.json"), "w") as f:
    ...     json.dump({"train": rows, "val": rows, "test": rows,
    ...                "oos_train": [["x", "oos"]], "oos_val": [["y", "oos"]],
    ...                "oos_test": [["z", "oos"]]}, f)
    >>> with open(os.path.join(root, "domains.json"), "w") as f:
    ...     json.dump({"chat": ["hi", "bye"]}, f)
    >>> data = clinc150(root)
    >>> data.intent_names, data.arrays("train")[0].shape
    (('hi', 'bye'), (8,))
    """

    def __init__(self, x, y, split, intent_names, intent_domains, domains, oos):
        self.x = x
        self.y = y
        self.split = split
        self.intent_names = intent_names
        self.intent_domains = intent_domains
        self.domains = domains
        self.intents = tuple(int(i) for i in np.unique(y))
        self.oos = oos

    def __repr__(self):
        return (f"<Clinc150: {len(self.intents)} intents in {len(self.domains)} "
                f"domains, {len(self.x)} utterances>")

    def select_domains(self, domains):
        """The intents and utterances of some domains.

        Args:
            domains: A domain name or a list of them (see `domains`).

        Returns:
            A `Clinc150` holding only those domains' intents.

        Raises:
            TypeError: If `domains` is not a string or a list of strings.
            ValueError: If a domain is not in this selection, or the list
                is empty.
        """
        if isinstance(domains, str):
            domains = [domains]
        if not isinstance(domains, (list, tuple)) or not all(
            isinstance(d, str) for d in domains
        ):
            raise TypeError(
                "Expected `domains` to be a domain name or a list of them. "
                f"Received: domains={domains!r}"
            )
        unknown = [d for d in domains if d not in self.domains]
        if unknown or not domains:
            raise ValueError(
                f"Expected `domains` to be a non-empty list of {list(self.domains)}. "
                f"Received: domains={list(domains)!r}"
            )
        chosen = [d for d in self.domains if d in domains]
        keep = np.isin(
            self.y, [i for i, d in enumerate(self.intent_domains) if d in chosen]
        )
        return Clinc150(self.x[keep], self.y[keep], self.split[keep],
                        self.intent_names, self.intent_domains, tuple(chosen),
                        self.oos)

    def arrays(self, split):
        """The utterances and intent ids of one split.

        Args:
            split: `"train"`, `"val"` or `"test"`.

        Returns:
            A tuple `(x, y)`: the utterances `[n]` and their intent ids `[n]`.

        Raises:
            ValueError: If `split` is not one of `SPLITS`.
        """
        keep = self.split == _check_split(split)
        return self.x[keep], self.y[keep]

    def episodes(self, split, *, ways, shots, query_shots=1, meta_batch_size=1,
                 seed=None):
        """N-way K-shot episodes of raw strings from one split's utterances.

        Each task draws `ways` distinct intents of this selection, then
        `shots` support and `query_shots` query utterances of each, all
        distinct, labelled `0..ways-1` in a random order (as
        `keras_reptile.episodes.from_arrays` does for numeric features).
        The support and the query set are each shuffled.

        Args:
            split: Which utterances: `"train"`, `"val"` or `"test"`.
            ways: Intents per task.
            shots: Support utterances per intent.
            query_shots: Query utterances per intent.
            meta_batch_size: Tasks per dataset element.
            seed: Integer seed for reproducible episodes, or None.

        Returns:
            An infinite `tf.data.Dataset` of episode dicts: `support_x`
            `[meta_batch_size, ways * shots]` and `query_x`
            `[meta_batch_size, ways * query_shots]` (`tf.string`),
            `support_y` and `query_y` (int32) of the same shapes.

        Raises:
            ValueError: If an argument is not a positive integer, `split` is
                unknown, there are fewer than `ways` intents, or an intent
                has fewer than `shots + query_shots` utterances in `split`.
            TypeError: If `seed` is not an integer or None.
        """
        x, y = self.arrays(split)
        return string_episodes(x, y, ways=ways, shots=shots,
                               query_shots=query_shots,
                               meta_batch_size=meta_batch_size, seed=seed,
                               names=self.intent_names, split=split)


def string_episodes(x, y, *, ways, shots, query_shots=1, meta_batch_size=1,
                    seed=None, names=None, split=None):
    """N-way K-shot episodes of raw strings from labelled texts (yours or CLINC's).

    `keras_reptile.episodes.from_arrays` holds numeric features; this
    samples strings the same way, with `episodes.from_task_fn`: each task
    draws `ways` distinct classes, then `shots + query_shots` distinct texts
    of each, from stateless random ops keyed by the task's seed, labels
    them `0..ways-1` in a random order and shuffles the support and the
    query set.

    Args:
        x: The texts, a 1-D sequence of `str`.
        y: Their class ids, a 1-D sequence of integers of the same length.
        ways: Classes per task.
        shots: Support texts per class.
        query_shots: Query texts per class.
        meta_batch_size: Tasks per dataset element.
        seed: Integer seed for reproducible episodes, or None.
        names: Optional class names indexed by class id, for error messages.
        split: Optional name of the texts' split, for error messages.

    Returns:
        An infinite `tf.data.Dataset` of episode dicts: `support_x`
        `[meta_batch_size, ways * shots]` and `query_x`
        `[meta_batch_size, ways * query_shots]` (`tf.string`), `support_y`
        and `query_y` (int32) of the same shapes.

    Raises:
        ValueError: If an argument is not a positive integer, `x` and `y`
            differ in length or are not 1-D, there are fewer than `ways`
            classes, or a class has fewer than `shots + query_shots` texts.

    Example:

    >>> texts = ["hi", "hello", "hey", "bye", "see you", "ciao"]
    >>> tasks = string_episodes(texts, [0, 0, 0, 1, 1, 1], ways=2, shots=1,
    ...                         query_shots=2, seed=0)
    >>> tasks.element_spec["support_x"].dtype.name
    'string'
    """
    ways = check_positive_int("ways", ways)
    shots = check_positive_int("shots", shots)
    query_shots = check_positive_int("query_shots", query_shots)
    meta_batch_size = check_positive_int("meta_batch_size", meta_batch_size)
    if np.ndim(x) != 1 or np.ndim(y) != 1 or len(x) != len(y):
        raise ValueError(
            "Expected `x` (texts) and `y` (their class ids) to be 1-D and of the "
            f"same length. Received: x.shape={np.shape(x)}, y.shape={np.shape(y)}"
        )
    x = np.asarray(x, dtype=object)
    classes, class_of, sizes = np.unique(y, return_inverse=True, return_counts=True)
    where = f" in split {split!r}" if split else ""
    if ways > classes.size:
        raise ValueError(
            "Expected `ways` to be at most the number of intents, "
            f"{classes.size}{where}. Received: ways={ways}"
        )
    per_class = shots + query_shots
    small = np.flatnonzero(sizes < per_class)
    if small.size:
        c = classes[small[0]]
        name = repr(names[c]) if names is not None else str(c)
        raise ValueError(
            f"Expected every intent to have at least `shots + query_shots` = "
            f"{per_class} utterances{where}. Received: intent {name} has "
            f"{sizes[small[0]]}"
        )
    order = np.argsort(class_of, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    table = tf.constant(x[order].astype(str))
    starts = tf.constant(starts, tf.int32)
    sizes_t = tf.constant(sizes, tf.int32)
    most = int(sizes.max())
    num_classes = classes.size

    def task_fn(seed):
        seeds = tf.random.experimental.stateless_split(seed, 4)
        chosen = tf.argsort(tf.random.stateless_uniform([num_classes], seeds[0]))[:ways]
        # Positions past a class's size sort last, so the first `per_class`
        # are distinct utterances of that class.
        keys = tf.random.stateless_uniform([ways, most], seeds[1])
        count = tf.gather(sizes_t, chosen)
        keys = tf.where(tf.range(most)[None, :] < count[:, None], keys, 2.0)
        picks = tf.argsort(keys, axis=1)[:, :per_class]
        rows = tf.gather(starts, chosen)[:, None] + picks
        labels = tf.broadcast_to(tf.range(ways, dtype=tf.int32)[:, None],
                                 [ways, per_class])

        def part(cols, shuffle_seed, n):
            r = tf.reshape(rows[:, cols], [-1])
            lab = tf.reshape(labels[:, cols], [-1])
            perm = tf.argsort(tf.random.stateless_uniform([n], shuffle_seed))
            return (tf.ensure_shape(tf.gather(table, tf.gather(r, perm)), [n]),
                    tf.ensure_shape(tf.gather(lab, perm), [n]))

        support_x, support_y = part(slice(0, shots), seeds[2], ways * shots)
        query_x, query_y = part(slice(shots, per_class), seeds[3], ways * query_shots)
        return {"support_x": support_x, "support_y": support_y,
                "query_x": query_x, "query_y": query_y}

    return episodes_lib.from_task_fn(task_fn, meta_batch_size=meta_batch_size,
                                     seed=seed)


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(
            f"Expected `split` to be one of {list(SPLITS)}. Received: split={split!r}"
        )
    return split


def clinc150(data_dir):
    """Reads CLINC150 from `data_dir`, checking its files first.

    Args:
        data_dir: A directory (string or path-like) holding the authors'
            `data_full.json` (keys `train`, `val`, `test`, `oos_train`,
            `oos_val`, `oos_test`, each a list of `[utterance, intent]`
            pairs) and `domains.json` (each domain's list of intents).

    Returns:
        A `Clinc150` with every domain.

    Raises:
        TypeError: If `data_dir` is not a path.
        FileNotFoundError: If `data_dir` or one of the files is missing.
        ValueError: If a file is not valid JSON or not laid out as above
            (the message names the file and what is wrong), or an utterance
            names an intent that `domains.json` does not list.

    Example:

    ```python
    data = keras_reptile.datasets.clinc150("../shared/data/clinc150")
    x, y = data.select_domains("banking").arrays("train")
    ```
    """
    if not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(
            "Expected `data_dir` to be a path (a string or `os.PathLike`) to a "
            "directory with CLINC150's data_full.json and domains.json. "
            f"Received: data_dir={data_dir!r} of type {type(data_dir).__name__}"
        )
    data_dir = os.fspath(data_dir)
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            "Expected `data_dir` to be a directory with CLINC150's "
            f"data_full.json and domains.json. Received: data_dir={data_dir!r}, "
            "which is not a directory"
        )
    full_path, domains_path = (os.path.join(data_dir, f) for f in _FILES)
    data, domains = (_read_json(p) for p in (full_path, domains_path))

    if not isinstance(domains, dict) or not domains or not all(
        isinstance(v, list) and v and all(isinstance(i, str) for i in v)
        for v in domains.values()
    ):
        raise ValueError(
            f"Expected {domains_path} to hold a JSON object mapping each domain "
            "to a non-empty list of intent names. Received: "
            f"{_describe(domains)}"
        )
    intent_names, intent_domains = [], []
    for domain, intents in domains.items():
        for intent in intents:
            if intent in intent_names:
                raise ValueError(
                    f"Expected every intent in {domains_path} to belong to one "
                    f"domain. Received: intent {intent!r} listed twice"
                )
            intent_names.append(intent)
            intent_domains.append(domain)
    ids = {name: i for i, name in enumerate(intent_names)}

    if not isinstance(data, dict):
        raise ValueError(
            f"Expected {full_path} to hold a JSON object with keys "
            f"{list(SPLITS)} and their 'oos_' versions. Received: {_describe(data)}"
        )
    keys = list(SPLITS) + [f"{_OOS}_{s}" for s in SPLITS]
    missing = [k for k in keys if k not in data]
    if missing:
        raise ValueError(
            f"Expected {full_path} to hold the keys {keys}. Received: missing "
            f"keys {missing}"
        )
    xs, ys, splits, oos = [], [], [], {}
    for key in keys:
        rows = data[key]
        bad = _first_bad_row(rows)
        if bad is not None:
            raise ValueError(
                f"Expected {full_path} {key!r} to be a list of [utterance, intent] "
                f"string pairs. Received: {bad}"
            )
        if key.startswith(_OOS + "_"):
            oos[key[len(_OOS) + 1:]] = np.array([u for u, _ in rows], dtype=object)
            continue
        for utterance, intent in rows:
            if intent not in ids:
                raise ValueError(
                    f"Expected every intent of {full_path} {key!r} to be listed "
                    f"in {domains_path}. Received: intent {intent!r} "
                    f"(utterance {utterance!r})"
                )
            xs.append(utterance)
            ys.append(ids[intent])
            splits.append(key)
    return Clinc150(np.array(xs, dtype=object), np.array(ys, dtype=np.int32),
                    np.array(splits), tuple(intent_names), tuple(intent_domains),
                    tuple(domains), oos)


def _read_json(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Expected CLINC150's {os.path.basename(path)} at {path}. Received: "
            "no such file (CLINC150 is read from a local copy, never downloaded)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(
            f"Expected {path} to be a JSON file. Received: a file that is not "
            f"({type(e).__name__}: {e}); truncated or damaged?"
        ) from e


def _first_bad_row(rows):
    if not isinstance(rows, list):
        return _describe(rows)
    for i, row in enumerate(rows):
        if not (isinstance(row, list) and len(row) == 2
                and all(isinstance(v, str) for v in row)):
            return f"row {i} = {row!r}"
    return None


def _describe(value):
    text = repr(value)
    return f"a {type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"
