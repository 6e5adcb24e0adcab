"""`docs/errors.md` is true: every row's bad input raises what it says.

Each row of the table names a public entry point, a bad input, the error
type and a fragment of its message, and how it is tested:

* `here`: `TRIGGERS[row_id]` below makes the bad call; the test checks the
  error's type and that its message contains the documented fragment;
* `tests/<file>.py::<test>`: that test covers it; the test checks that the
  test exists and that its code, or a module-level helper or table it uses,
  mentions the fragment and the error type.

Every entry point must resolve to a real attribute of `keras_reptile` (or be
a signature name of the export), and every trigger must have a row.
"""

import ast
import functools
import importlib
import os
import re
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_reptile
from keras_reptile import ReptileModel
from keras_reptile import algorithms
from keras_reptile import augmentation
from keras_reptile import callbacks
from keras_reptile import datasets
from keras_reptile import episodes
from keras_reptile import evaluation
from keras_reptile import export as export_lib
from keras_reptile import heads
from keras_reptile import inner_loop
from keras_reptile import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE = os.path.join(REPO, "docs", "errors.md")
SIGNATURES = {
    export_lib.SERVING_SIGNATURE,
    export_lib.ADAPT_SIGNATURE,
    export_lib.ADAPT_STEPS_SIGNATURE,
}
COLUMNS = ["ID", "Entry point", "Bad input", "Raises", "Message contains", "Test"]


def _code(cell):
    """The text of a Markdown code span (single or double backticks)."""
    cell = cell.strip()
    match = re.fullmatch(r"``(.+?)``|`([^`]+)`", cell)
    assert match, f"expected a code span, got {cell!r}"
    return (match.group(1) or match.group(2)).strip()


def _rows():
    rows = []
    header = None
    with open(TABLE) as f:
        for number, line in enumerate(f, 1):
            if not line.startswith("|"):
                header = None
                continue
            cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
            if cells[0] == "ID":
                header = cells
                continue
            if set(line.strip()) <= {"|", "-"}:
                continue
            assert header == COLUMNS, f"errors.md:{number}: a row outside a table"
            assert len(cells) == len(COLUMNS), f"errors.md:{number}: {cells}"
            row = dict(zip(COLUMNS, cells))
            row["line"] = number
            row["ID"] = _code(row["ID"])
            row["Entry point"] = _code(row["Entry point"])
            row["Raises"] = _code(row["Raises"])
            row["Message contains"] = _code(row["Message contains"])
            row["Test"] = row["Test"] if row["Test"] == "here" else _code(row["Test"])
            rows.append(row)
    return rows


ROWS = _rows()
BY_ID = {row["ID"]: row for row in ROWS}


def _error_type(name):
    if name.startswith("tf.errors."):
        return getattr(tf.errors, name[len("tf.errors."):])
    if name == "keras_tuner.errors.FatalError":
        return importlib.import_module("keras_tuner").errors.FatalError
    if name == "OmniglotDownloadError":
        return datasets.OmniglotDownloadError
    import builtins

    error = getattr(builtins, name)
    assert issubclass(error, BaseException)
    return error


def _resolve(path):
    """The object a dotted `keras_reptile...` path names."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise AssertionError(f"cannot import {path}")


# ----------------------------------------------------------------------------
# The table itself


def test_the_table_is_well_formed():
    ids = [row["ID"] for row in ROWS]
    assert len(ROWS) > 100
    assert len(set(ids)) == len(ids), "duplicate IDs"
    for row in ROWS:
        _error_type(row["Raises"])
        assert row["Message contains"], row
        test = row["Test"]
        assert test == "here" or re.fullmatch(r"tests/\w+\.py::\w+", test), row


def test_every_trigger_has_a_row_and_every_here_row_a_trigger():
    here = {row["ID"] for row in ROWS if row["Test"] == "here"}
    assert set(TRIGGERS) == here, (
        f"rows without a trigger: {sorted(here - set(TRIGGERS))}; triggers "
        f"without a row: {sorted(set(TRIGGERS) - here)}"
    )


@pytest.mark.parametrize("entry", sorted({row["Entry point"] for row in ROWS}))
def test_every_entry_point_exists(entry):
    if entry in SIGNATURES:
        return
    assert entry.startswith("keras_reptile"), entry
    obj = _resolve(entry)
    assert callable(obj) or isinstance(obj, type(keras_reptile)), entry


# ----------------------------------------------------------------------------
# Rows covered by other tests


def _test_nodes(test_file, name):
    """The test `name` (decorators included) and the module-level helpers,
    tables and constants it refers to, and those they refer to."""
    path = os.path.join(REPO, test_file)
    with open(path) as f:
        source = f.read()
    tree = ast.parse(source)
    top = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            top[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    top[target.id] = node
    test = top.get(name)
    assert isinstance(test, ast.FunctionDef), f"no test {name} in {test_file}"
    nodes, names = [test], {name}
    for _ in range(2):  # The test, its helpers and theirs.
        used = {
            n.id for node in nodes for n in ast.walk(node)
            if isinstance(n, ast.Name) and n.id in top and n.id not in names
        }
        names |= used
        nodes += [top[n] for n in sorted(used)]
    return nodes, top


_REGEX_SPECIAL = set(".^$*+?{}[]|()")
_ANY = "\x00"  # an unescaped "." in a run: one character, any


def _covers(text, fragment):
    """Whether `fragment` appears in `text`, `_ANY` matching any character."""
    if _ANY not in text:
        return fragment in text
    width = len(fragment)
    return any(
        all(t == f or t == _ANY for t, f in zip(text[i:i + width], fragment))
        for i in range(len(text) - width + 1)
    )


def _regex_literals(pattern):
    """The runs of literal text a regular expression requires, in order
    (a quantified character is dropped from its run: it may be absent)."""
    runs, run, i = [], "", 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            nxt = pattern[i + 1]
            i += 2
            if nxt.isalnum():  # \d, \w, \s, \b, ...: not literal text.
                runs.append(run)
                run = ""
            else:
                run += nxt
            continue
        if c in "?*+{" and run:
            run = run[:-1]  # (for "+" the one required copy is already in run)
            if c == "+":
                run += pattern[i - 1]
        if c == "." and (i + 1 == len(pattern) or pattern[i + 1] not in "?*+{"):
            run += _ANY  # exactly one character
            i += 1
            continue
        if c == "[":
            i = pattern.find("]", i + 2) + 1 or len(pattern)
            runs.append(run)
            run = ""
            continue
        if c in _REGEX_SPECIAL:
            runs.append(run)
            run = ""
        else:
            run += c
        i += 1
    runs.append(run)
    return [r for r in runs if r]


def _is_raises(call):
    func = call.func
    return (isinstance(func, ast.Attribute) and func.attr == "raises") or (
        isinstance(func, ast.Name) and func.id == "raises")


def _is_regex_call(call):
    func = call.func
    return (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)
            and func.value.id == "re" and func.attr in ("search", "match", "fullmatch"))


def _asserted_messages(nodes, top):
    """The texts the test checks an error's message against: the literal runs
    of `pytest.raises(..., match=...)` and `re.search` patterns, and the
    strings of `assert ... == ...`, `assert ... in ...` and
    `assert message.startswith(...)` (or `endswith`).

    A name in those places is followed to what it holds: a parameter of the
    test (its `parametrize` values), a parameter of a helper (the arguments
    of the helper's calls), a local assignment or a module-level table."""
    functions = {n.name: n for n in nodes if isinstance(n, ast.FunctionDef)}
    calls = [c for node in nodes for c in ast.walk(node) if isinstance(c, ast.Call)]

    def strings(expr, regex, scope, depth=0):
        if depth > 12 or expr is None:
            return []
        if isinstance(expr, ast.Constant):
            if not isinstance(expr.value, str):
                return []
            return _regex_literals(expr.value) if regex else [expr.value]
        if isinstance(expr, ast.JoinedStr):
            return [p for v in expr.values for p in strings(v, regex, scope, depth + 1)]
        if isinstance(expr, ast.FormattedValue):
            return []
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) \
                and expr.func.attr == "escape":
            return [p for a in expr.args for p in strings(a, False, scope, depth + 1)]
        if isinstance(expr, ast.Name):
            return name_strings(expr.id, regex, scope, depth + 1)
        if isinstance(expr, ast.Subscript):
            return strings(expr.value, regex, scope, depth + 1)
        if isinstance(expr, (ast.GeneratorExp, ast.ListComp)):
            return strings(expr.elt, regex, scope, depth + 1)
        if isinstance(expr, (ast.Tuple, ast.List, ast.Dict, ast.BinOp)):
            return [p for child in ast.iter_child_nodes(expr)
                    for p in strings(child, regex, scope, depth + 1)]
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) \
                and expr.func.id in functions:
            # A helper's result: what it returns.
            return [p for n in ast.walk(functions[expr.func.id])
                    if isinstance(n, ast.Return)
                    for p in strings(n.value, regex, expr.func.id, depth + 1)]
        if isinstance(expr, ast.Call):
            # str(error), error.args[0], message.format(...): the texts of
            # their arguments and receiver.
            parts = list(expr.args) + [k.value for k in expr.keywords]
            if isinstance(expr.func, ast.Attribute):
                parts.append(expr.func.value)
            return [p for part in parts for p in strings(part, regex, scope, depth + 1)]
        if isinstance(expr, ast.Attribute):
            return strings(expr.value, regex, scope, depth + 1)
        return []

    def name_strings(name, regex, scope, depth):
        found = []
        function = functions.get(scope)
        if function is not None:
            params = [a.arg for a in function.args.args + function.args.kwonlyargs]
            for node in ast.walk(function):
                if isinstance(node, ast.Assign) and any(
                        isinstance(n, ast.Name) and n.id == name
                        for t in node.targets for n in ast.walk(t)):
                    found += strings(node.value, regex, scope, depth)
                if isinstance(node, (ast.For, ast.comprehension)) and isinstance(
                        node.target, (ast.Name, ast.Tuple)) and name in {
                        n.id for n in ast.walk(node.target) if isinstance(n, ast.Name)}:
                    found += strings(node.iter, regex, scope, depth)
            if name in params:
                for decorator in function.decorator_list:
                    found += [p for n in ast.walk(decorator)
                              for p in strings(n, regex, scope, depth)
                              if isinstance(n, ast.Constant)]
                index = params.index(name)
                for call in calls:
                    if isinstance(call.func, ast.Name) and call.func.id == scope:
                        caller = _enclosing(call)
                        if index < len(call.args):
                            found += strings(call.args[index], regex, caller, depth)
                        found += [p for k in call.keywords if k.arg == name
                                  for p in strings(k.value, regex, caller, depth)]
        if name in top and not isinstance(top[name], ast.FunctionDef):
            found += [p for n in ast.walk(top[name]) for p in strings(n, regex, scope, depth)
                      if isinstance(n, ast.Constant)]
        return found

    parents = {}
    for function in functions.values():
        for n in ast.walk(function):
            parents[id(n)] = function.name

    def _enclosing(node):
        return parents.get(id(node))

    texts = []
    for function in functions.values():
        for node in ast.walk(function):
            if isinstance(node, ast.Call) and _is_raises(node):
                for keyword in node.keywords:
                    if keyword.arg == "match":
                        texts += strings(keyword.value, True, function.name)
            elif isinstance(node, ast.Call) and _is_regex_call(node) and node.args:
                texts += strings(node.args[0], True, function.name)
            elif isinstance(node, ast.Assert):
                for call in ast.walk(node.test):
                    if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) \
                            and call.func.attr in ("startswith", "endswith"):
                        texts += [p for a in call.args
                                  for p in strings(a, False, function.name)]
                for compare in ast.walk(node.test):
                    if isinstance(compare, ast.Compare) and all(
                            isinstance(op, (ast.Eq, ast.In)) for op in compare.ops):
                        for operand in [compare.left] + compare.comparators:
                            texts += strings(operand, False, function.name)
    return texts


def _names(nodes):
    """Every name and attribute the test's code uses (comments excluded)."""
    return {
        n.id if isinstance(n, ast.Name) else n.attr
        for node in nodes for n in ast.walk(node)
        if isinstance(n, (ast.Name, ast.Attribute))
    }


REFERENCED = [row["ID"] for row in ROWS if row["Test"] != "here"]


@pytest.mark.parametrize("row_id", REFERENCED)
def test_referenced_test_covers_the_row(row_id):
    row = BY_ID[row_id]
    test_file, name = row["Test"].split("::")
    nodes, top = _test_nodes(test_file, name)
    fragment = row["Message contains"]
    texts = _asserted_messages(nodes, top)
    assert any(_covers(text, fragment) for text in texts), (
        f"errors.md:{row['line']}: {row['Test']} does not assert that an error's "
        f"message contains {fragment!r} (in a `pytest.raises(match=...)`, "
        "`re.search`, `assert ... == / in ...` or `startswith`/`endswith`)"
    )
    error_name = row["Raises"].split(".")[-1]
    # Its name in the code, or in a script the test runs (a string).
    code_strings = [n.value for node in nodes for n in ast.walk(node)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert error_name in _names(nodes) or any(error_name in s for s in code_strings), (
        f"errors.md:{row['line']}: {row['Test']} does not check {error_name}"
    )


CHECKER_CASES = '''
import pytest

def test_docstring():
    """Expected `x` to be positive"""
    with pytest.raises(ValueError, match="Expected"):
        f()

def test_comment():
    # Expected `x` to be positive
    with pytest.raises(ValueError, match="Expected"):
        f()

def test_unrelated_string():
    with pytest.raises(ValueError, match="Expected"):
        f({"Expected `x` to be positive": 1})

def test_wildcard():
    with pytest.raises(ValueError, match="Expected .* positive"):
        f()

def test_other_type():
    with pytest.raises(TypeError, match="Expected `x` to be positive"):
        f()

def test_match():
    with pytest.raises(ValueError, match=r"Expected `x` to be positive\\. Received"):
        f()

@pytest.mark.parametrize("message", ["Expected `x` to be positive"])
def test_parametrized(message):
    with pytest.raises(ValueError) as info:
        f()
    assert message in str(info.value)
'''


@pytest.mark.parametrize("name, covers", [
    ("test_docstring", False), ("test_comment", False), ("test_unrelated_string", False),
    ("test_wildcard", False), ("test_other_type", False), ("test_match", True),
    ("test_parametrized", True),
])
def test_the_coverage_check_reads_only_assertions_on_the_message(
        name, covers, tmp_path, monkeypatch):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "cases_test.py").write_text(CHECKER_CASES)
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    monkeypatch.setitem(BY_ID, "checker-case", {
        "Test": f"tests/cases_test.py::{name}", "Message contains": "Expected `x` to be positive",
        "Raises": "ValueError", "line": 0})
    if covers:
        test_referenced_test_covers_the_row("checker-case")
    else:
        with pytest.raises(AssertionError, match="does not"):
            test_referenced_test_covers_the_row("checker-case")


# ----------------------------------------------------------------------------
# Rows triggered here

SCCE = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _images(num_classes=6, per_class=4):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(num_classes), per_class).astype("int32")
    x = rng.normal(size=(len(y), 8, 8, 1)).astype("float32")
    return x, y


def _conv_net(num_classes=3):
    keras.utils.set_random_seed(0)
    return models.conv4((8, 8, 1), num_classes=num_classes, filters=4, num_blocks=2)


def _dense_net(units=3, features=4):
    return keras.Sequential([keras.Input((features,)), keras.layers.Dense(units)])


def _compiled(net, loss=SCCE, optimizer=None, **kwargs):
    model = ReptileModel(
        net, inner_steps=1, inner_batch_size=3, eval_inner_steps=1, **kwargs
    )
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.5), loss=loss)
    return model


@functools.cache
def _classifier():
    return _compiled(_conv_net())


def _flat_tasks(meta_batch_size=2, ways=3):
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(6), 3)
    x = rng.normal(size=(len(y), 4)).astype("float32")
    return episodes.from_arrays(
        x, y, ways=ways, shots=1, query_shots=1, meta_batch_size=meta_batch_size,
        seed=0,
    )


def _flat_episode(**changes):
    """One in-memory meta-batch of 2 three-way tasks on 4 features."""
    episode = {k: v.numpy() for k, v in next(iter(_flat_tasks())).items()}
    episode.update(changes)
    return episode


def _task_fn(**changes):
    def task_fn(seed):
        x = tf.random.stateless_uniform([4, 1], seed)
        task = {"support_x": x[:3], "support_y": x[:3, 0], "query_x": x[3:],
                "query_y": x[3:, 0]}
        task.update(changes)
        return {k: v for k, v in task.items() if v is not None}

    return task_fn


class _Uncopyable(keras.Model):
    """A subclassed model whose constructor argument cannot be serialised."""

    def __init__(self, activation):
        super().__init__()
        self.dense = keras.layers.Dense(3, activation=activation)

    def call(self, inputs):
        return self.dense(inputs)


def _uncopyable_model():
    net = _Uncopyable(activation=lambda t: t)
    net(np.zeros((1, 4), "float32"))
    return _compiled(net)


def _head_model(layers):
    return ReptileModel(keras.Sequential(layers), head="prototype")


def _frozen_head_adapt():
    net = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(3)]
    )
    net.layers[-1].trainable = False
    model = _compiled(net, head="prototype")
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    model.adapt(x, np.array([0, 1, 2]))


def _carried_state_changed():
    net = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8), keras.layers.Dense(3)]
    )
    model = _compiled(net, carry_inner_optimizer_state=True)
    net.layers[0].trainable = False
    model.fit(_flat_tasks(), steps_per_epoch=1, verbose=0)


def _reduce_lr_with_schedule():
    schedule = keras.optimizers.schedules.PolynomialDecay(0.5, 10, 0.0)
    model = _compiled(_dense_net(), optimizer=keras.optimizers.SGD(schedule))
    model.fit(
        _flat_tasks(), steps_per_epoch=1, verbose=0,
        callbacks=[keras.callbacks.ReduceLROnPlateau(monitor="loss")],
    )


def _meta_update(algorithm, *args):
    model = _compiled(_dense_net(), algorithm=algorithm)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    model.meta_update(x, np.array([0, 1, 2]), *args)


def _two_output_net():
    inputs = keras.Input((4,))
    return keras.Model(
        inputs, [keras.layers.Dense(1)(inputs), keras.layers.Dense(2)(inputs)]
    )


def _two_input_net():
    a, b = keras.Input((2,)), keras.Input((2,))
    joined = keras.layers.Concatenate()([a, b])
    return keras.Model([a, b], keras.layers.Dense(1)(joined))


def _export_to_a_file(tmp_path):
    path = tmp_path / "1"
    path.write_text("not a directory")
    model = _compiled(_dense_net(units=1), loss="mse")
    export_lib.export_saved_model(model, path, verbose=False)


def _unbuilt_export(tmp_path):
    model = ReptileModel(keras.Sequential([keras.layers.Dense(1)]))
    model.compile(optimizer="sgd", loss="mse")
    export_lib.export_saved_model(model, tmp_path / "1")


def _set_inner_steps():
    model = ReptileModel(_dense_net())
    model.inner_steps = 0


def _groups(y, groups, ways):
    x = np.zeros((len(y), 2), "float32")
    episodes.from_arrays(x, np.asarray(y), ways=ways, shots=1, groups=groups)


def _uneven_generator():
    examples = [(np.zeros(2, "float32"), 0), (np.zeros(3, "float32"), 1)]
    return tf.data.Dataset.from_generator(
        lambda: iter(examples),
        output_signature=(tf.TensorSpec([None], tf.float32),
                          tf.TensorSpec([], tf.int64)),
    )


def _omniglot_container(num_classes=3):
    images = np.zeros((num_classes, 2, 4, 4, 1), "float32")
    return datasets.Omniglot(
        images, ["a"] * num_classes, [f"c{i}" for i in range(num_classes)]
    )


def _hypermodel(**kwargs):
    tuning = importlib.import_module("keras_reptile.tuning")
    return tuning.ReptileHyperModel(lambda hp: None, lambda n: None, **kwargs)


_X, _Y = _images()

TRIGGERS = {
    # ReptileModel: construction and settings.
    "rm-model-nested": lambda: ReptileModel(_classifier()),
    "rm-model-outputs": lambda: ReptileModel(_two_output_net()),
    "rm-parallel-tasks": lambda: ReptileModel(_dense_net(), parallel_tasks="yes"),
    "rm-batched-tasks": lambda: ReptileModel(_dense_net(), batched_tasks="yes"),
    "rm-batched-unsupported": lambda: ReptileModel(
        _dense_net(), batched_tasks=True,
        inner_optimizer=keras.optimizers.Adam(1e-3, clipnorm=1.0)),
    "rm-steps": _set_inner_steps,
    "rm-eval-batch": lambda: ReptileModel(_dense_net(), eval_inner_batch_size=0),
    "rm-algorithm": lambda: ReptileModel(_dense_net(), algorithm="sgd"),
    "rm-head": lambda: ReptileModel(_dense_net(), head="linear"),
    "rm-head-last-layer": lambda: _head_model(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.Activation("relu")]
    ),
    "rm-head-activation": lambda: _head_model(
        [keras.Input((4,)), keras.layers.Dense(3, activation="relu")]
    ),
    "rm-head-embedding": lambda: _head_model(
        [keras.Input((2, 4)), keras.layers.Dense(3)]
    ),
    "rm-head-frozen": _frozen_head_adapt,
    "rm-inner-optimizer": lambda: ReptileModel(
        _dense_net(), inner_optimizer=keras.optimizers.Ftrl()
    ),
    "rm-inner-option": lambda: ReptileModel(
        _dense_net(), inner_optimizer=keras.optimizers.SGD(use_ema=True)
    ),
    # fit, evaluate, train_on_batch.
    "fit-not-compiled": lambda: ReptileModel(_dense_net()).fit(
        _flat_tasks(), steps_per_epoch=1, verbose=0
    ),
    "fit-episode-keys": lambda: _compiled(_dense_net()).train_on_batch(
        {k: v for k, v in _flat_episode().items() if k != "query_y"}
    ),
    "fit-episode-rank": lambda: _compiled(_dense_net()).train_on_batch(
        _flat_episode(query_x=np.zeros((2, 3, 4, 1), "float32"))
    ),
    "fit-episode-batch": lambda: _compiled(_dense_net()).fit(
        _flat_tasks(meta_batch_size=1).unbatch().batch(2), steps_per_epoch=1,
        verbose=0,
    ),
    "fit-episode-targets": lambda: _compiled(_dense_net()).train_on_batch(
        _flat_episode(support_y=np.zeros((2, 2), "int32"))
    ),
    "fit-episode-examples": lambda: _compiled(_dense_net()).train_on_batch(
        _flat_episode(query_x=np.zeros((2, 3, 5), "float32"))
    ),
    "fit-reduce-lr": _reduce_lr_with_schedule,
    "fit-carried-state": _carried_state_changed,
    # adapt, adapt_and_predict, meta_update.
    "ad-empty": lambda: _classifier().adapt(_X[:0], _Y[:0]),
    "ad-shape": lambda: _classifier().adapt(
        np.zeros((3, 9, 9, 1), "float32"), [0, 1, 2]
    ),
    "ad-query-shape": lambda: _classifier().adapt_and_predict(
        _X[:3], [0, 1, 2], np.zeros((2, 9, 9, 1), "float32")
    ),
    "ad-targets-count": lambda: _classifier().adapt(_X[:3], [0, 1]),
    "ad-labels-range": lambda: _classifier().adapt(_X[:3], [0, 1, 3]),
    "ad-steps": lambda: _classifier().adapt(_X[:3], [0, 1, 2], steps=0),
    "ad-clone": lambda: _uncopyable_model().adapt(
        np.zeros((3, 4), "float32"), [0, 1, 2]
    ),
    "mu-query-needed": lambda: _meta_update("fomaml"),
    "mu-query-pair": lambda: _meta_update(
        "reptile", np.zeros((2, 4), "float32")
    ),
    "mu-query-targets": lambda: _meta_update(
        "reptile", np.zeros((2, 4), "float32"), np.array([0])
    ),
    # Export.
    "ex-unbuilt": _unbuilt_export,
    "ex-file": _export_to_a_file,
    "ex-signature-type": lambda tmp_path: export_lib.export_saved_model(
        _compiled(_dense_net(units=1), loss="mse"), tmp_path / "1",
        input_signature={"x": tf.TensorSpec((None, 4))},
    ),
    "ex-signature-rank": lambda tmp_path: export_lib.export_saved_model(
        _compiled(_dense_net(units=1), loss="mse"), tmp_path / "1",
        input_signature=tf.TensorSpec((), tf.float32),
    ),
    "ex-two-inputs": lambda tmp_path: export_lib.export_saved_model(
        _compiled(_two_input_net(), loss="mse"), tmp_path / "1"
    ),
    # Episodes.
    "ep-seed": lambda: episodes.from_arrays(_X, _Y, ways=2, shots=1, seed="0"),
    "ep-x-shape": lambda: episodes.from_arrays(
        np.float32(1.0), [0], ways=1, shots=1
    ),
    "ep-ways": lambda: episodes.from_arrays(_X[:8], _Y[:8], ways=3, shots=1),
    "ep-groups-span": lambda: _groups([0, 0, 1, 1], [0, 1, 0, 0], ways=1),
    "ep-groups-small": lambda: _groups(
        np.repeat(np.arange(4), 2), np.repeat([0, 0, 1, 1], 2), ways=4
    ),
    "fd-type": lambda: episodes.from_dataset([1, 2], ways=1, shots=1),
    "fd-spec": lambda: episodes.from_dataset(
        tf.data.Dataset.from_tensor_slices(_X), ways=1, shots=1
    ),
    "fd-batched": lambda: episodes.from_dataset(
        tf.data.Dataset.from_tensor_slices((_X, _Y)).batch(2), ways=1, shots=1
    ),
    "fd-infinite": lambda: episodes.from_dataset(
        tf.data.Dataset.from_tensor_slices((_X, _Y)).repeat(), ways=1, shots=1
    ),
    "fd-shapes": lambda: episodes.from_dataset(
        _uneven_generator(), ways=1, shots=1
    ),
    "tf-callable": lambda: episodes.from_task_fn(3),
    "tf-not-dict": lambda: episodes.from_task_fn(lambda seed: tf.zeros([2])),
    "tf-keys": lambda: episodes.from_task_fn(_task_fn(query_y=None)),
    "tf-not-tensor": lambda: episodes.from_task_fn(
        _task_fn(support_x=(tf.zeros([3, 1]), tf.zeros([3, 1])))
    ),
    "tf-lengths": lambda: episodes.from_task_fn(
        _task_fn(support_y=tf.zeros([2]))
    ),
    "au-interpolation": lambda: augmentation.affine_distortions(
        interpolation="cubic"
    ),
    # Data sets.
    "sine-positive": lambda: datasets.sine(shots=0),
    "om-splits-type": lambda: datasets.omniglot(splits=3),
    "om-names": lambda: datasets.Omniglot(
        np.zeros((2, 2, 4, 4, 1), "float32"), ["a"], ["x", "y"]
    ),
    "om-split-count": lambda: _omniglot_container().split_by_character(5),
    # Evaluation.
    "ev-static": lambda: evaluation.few_shot_accuracy(
        _compiled(_dense_net()),
        _flat_tasks(meta_batch_size=1).unbatch().batch(2), num_tasks=2,
    ),
    "ev-no-tasks": lambda: evaluation.confidence_interval([]),
    # Callbacks.
    "cb-logger-name": lambda: callbacks.MetaStepSizeLogger(name=""),
    "cb-backup-dir": lambda: callbacks.BackupAndRestore(""),
    "cb-save-freq": lambda tmp_path: callbacks.BackupAndRestore(
        tmp_path, save_freq=0
    ),
    "cb-resumable-type": lambda tmp_path: callbacks.BackupAndRestore(
        tmp_path
    ).resumable([1, 2]),
    # Tuning.
    "tu-meta-steps-needed": lambda: _hypermodel(),
    # Building blocks.
    "he-get": lambda: heads.get("linear"),
    "al-get": lambda: algorithms.get("sgd"),
    "al-maml": lambda: algorithms.MAML(first_order="yes"),
    "al-maml-recompute-type": lambda: algorithms.MAML(recompute_inner_steps=1),
    "al-maml-recompute-fo": lambda: algorithms.MAML(first_order=True,
                                                    recompute_inner_steps=True),
    "io-type": lambda: inner_loop.get_optimizer(keras.optimizers.Ftrl()),
    "io-option": lambda: inner_loop.get_optimizer(
        keras.optimizers.SGD(gradient_accumulation_steps=2)
    ),
    "mo-input-shape": lambda: models.conv4((28, 28), num_classes=5),
    "mo-positive": lambda: models.conv4((8, 8, 1), num_classes=0),
}

@pytest.mark.parametrize("row_id", sorted(TRIGGERS))
def test_triggered_row_raises_what_the_table_says(row_id, tmp_path):
    row = BY_ID[row_id]
    trigger = TRIGGERS[row_id]
    needs_path = "tmp_path" in trigger.__code__.co_varnames[
        : trigger.__code__.co_argcount
    ]
    with pytest.raises(_error_type(row["Raises"])) as info:
        trigger(tmp_path) if needs_path else trigger()
    assert row["Message contains"] in str(info.value), (
        f"errors.md:{row['line']}: the message does not contain "
        f"{row['Message contains']!r}: {info.value}"
    )
