"""The README and the guides in `docs/` say only what still runs.

* README.md stays a front door (at most 15 KB).
* Its ```python blocks run, in order, in one namespace (the pretrained-model
  block continues the usage block), with training lengths shortened where
  the README gives realistic ones; each shortening must still match the
  README's text exactly once, so an edited snippet cannot slip past.
* Every ```python block of `docs/` compiles, and the self-contained ones run.
* Every `python examples/...` or `python benchmarks/...` command in README.md
  and `docs/` names a script that exists and whose argument parser accepts
  the command's flags; every `pip install -e ".[extra]"` names an extra of
  pyproject.toml; the README's test command is exactly `.ci/run`'s.
* Every relative link in README.md and `docs/` points to a file that exists
  (and, for a Markdown file, to a heading that exists).
* `docs/layout.md` has a row for every module of `keras_reptile/`.

The serving snippets of `docs/serving.md` run in `serving_clients_test.py`.
"""

import argparse
import contextlib
import glob
import importlib.util
import inspect
import io
import json
import os
import re
import shlex
import sys
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_reptile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
PAGES = [README] + DOCS
MAX_README_BYTES = 15 * 1024


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _rel(path):
    return os.path.relpath(path, ROOT)


def _fenced_blocks(text, languages):
    """(language, code) of each fenced block whose language is in `languages`."""
    return [
        (m.group(1), m.group(2))
        for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.S | re.M)
        if m.group(1) in languages
    ]


def _prose(text):
    """`text` without fenced code blocks (links and headings live in prose)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


# ----------------------------------------------------------------------
# Size


def test_readme_is_a_front_door():
    size = len(_read(README).encode("utf-8"))
    assert size <= MAX_README_BYTES, (
        f"README.md is {size:,} bytes, over {MAX_README_BYTES:,}: move the detail "
        "to a page in docs/ and link it.")


def test_readme_has_no_placeholders():
    text = _read(README)
    placeholders = sorted(set(re.findall(r"\bTBD[\w-]*", text)))
    assert not placeholders, (
        f"README.md still has placeholder cells {placeholders}: fill them in from "
        "the run they stand for before committing.")


# ----------------------------------------------------------------------
# The README's Python snippets, run

# Realistic lengths in the README -> what the test runs. Each key must occur
# exactly once in the README's Python blocks.
README_SHORTENINGS = {
    "steps_per_epoch=500": "steps_per_epoch=2",
    "epochs=4,": "epochs=1,",
    "validation_steps=50": "validation_steps=1",
    "eval_inner_steps=50,": "eval_inner_steps=3,",
    "num_tasks=1000": "num_tasks=5",
    # Without XLA: its compilation of the conv4 meta-step alone takes longer
    # than the rest of the test (XLA's meta-step is tested elsewhere).
    'metrics=["accuracy"],\n)': 'metrics=["accuracy"], jit_compile=False,\n)',
}


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = [code for _, code in _fenced_blocks(_read(README), {"python"})]
    assert len(blocks) >= 2, "the README's usage and pretrained-model snippets are gone"
    joined = "\n".join(blocks)
    for old in README_SHORTENINGS:
        assert joined.count(old) == 1, (
            f"README_SHORTENINGS expects `{old}` once in the README's Python "
            f"blocks; found {joined.count(old)}. Update the table to the snippet.")
    for code in blocks:
        compile(code, "README.md", "exec")
    # Relative paths in the snippets (the export) land in a scratch directory.
    monkeypatch.chdir(tmp_path)
    keras.utils.set_random_seed(0)
    namespace = {"__name__": "__readme__"}

    usage = blocks[0]
    for old, new in README_SHORTENINGS.items():
        usage = usage.replace(old, new)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(usage, "README.md (usage)", "exec"), namespace)

    model, adapted = namespace["model"], namespace["adapted"]
    support_x, support_y, query_x = (namespace[k] for k in ("support_x", "support_y", "query_x"))
    assert isinstance(model, keras_reptile.ReptileModel)
    assert int(model.optimizer.iterations.numpy()) == 2  # steps_per_epoch x epochs
    assert isinstance(adapted, keras.Model) and adapted is not model.model
    probs = keras.ops.convert_to_numpy(namespace["probs"])
    assert probs.shape == (5, 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    # The printed result is the paper's protocol over the shortened 5 tasks.
    assert re.search(r"\d+\.\d\d% ± \d+\.\d\d% \(95% CI, 5 tasks\)", stdout.getvalue()), (
        stdout.getvalue())
    # The export adapts per request as `adapt()` does.
    exported = tf.saved_model.load(str(tmp_path / "saved_models" / "my_model" / "1"))
    served = exported.signatures["adapt_and_predict"](
        support_x=tf.convert_to_tensor(support_x), support_y=tf.cast(support_y, tf.int32),
        query_x=tf.convert_to_tensor(query_x))
    np.testing.assert_allclose(served["outputs"].numpy(), adapted.predict(query_x, verbose=0),
                               rtol=1e-4, atol=1e-4)

    for i, code in enumerate(blocks[1:], start=2):
        exec(compile(code, f"README.md (Python block {i})", "exec"), namespace)
    # The shipped model adapts to the usage snippet's 5-way task.
    assert isinstance(namespace["model"], keras_reptile.ReptileModel)
    assert namespace["model"] is not model
    probs = keras.ops.convert_to_numpy(namespace["probs"])
    assert probs.shape == (5, 5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------
# The guides' Python snippets

# Blocks of docs/ that run, per page in this order in one namespace (a block
# may use what an earlier one defined), each found by a line it contains and
# shortened as given; every other block only has to compile (docs/tuning.md's
# search takes over a minute here; tuning_test.py covers ReptileHyperModel).
DOCS_RUNNABLE = {
    "docs/episodes.md": [("tasks = keras_reptile.episodes.from_arrays", {}),
                         ("augment = keras_reptile.augmentation", {})],
    "docs/algorithms.md": [("model.inner_steps = 10", {})],
    "docs/training.md": [("GracefulShutdown(backup)", {"steps_per_epoch=300": "steps_per_epoch=3"})],
}


def _docs_python_blocks():
    for path in DOCS:
        for i, (_, code) in enumerate(_fenced_blocks(_read(path), {"python"})):
            yield pytest.param(path, code, id=f"{_rel(path)}[{i}]")


@pytest.mark.parametrize("path, code", list(_docs_python_blocks()))
def test_docs_python_blocks_compile(path, code):
    compile(code, _rel(path), "exec")


@pytest.mark.parametrize("page", sorted(DOCS_RUNNABLE))
def test_docs_self_contained_blocks_run(page, tmp_path, monkeypatch):
    blocks = [code for _, code in _fenced_blocks(_read(os.path.join(ROOT, page)), {"python"})]
    monkeypatch.chdir(tmp_path)  # relative paths (backups, tuner projects) land here
    keras.utils.set_random_seed(0)
    namespace = {"__name__": "__docs__"}
    for marker, shortenings in DOCS_RUNNABLE[page]:
        found = [code for code in blocks if marker in code]
        assert len(found) == 1, f"{page}: expected one Python block with `{marker}`"
        code = found[0]
        for old, new in shortenings.items():
            assert code.count(old) == 1, f"{page}: `{old}` not once in its block"
            code = code.replace(old, new)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(code, page, "exec"), namespace)
        # A block that shows its output in a comment line prints exactly that.
        for shown in re.findall(r"^# (\{.*\})$", code, re.M):
            assert shown in stdout.getvalue().splitlines(), (page, shown, stdout.getvalue())


# ----------------------------------------------------------------------
# Commands


def _commands(path):
    """(command, where) of every shell command shown on a page."""
    text = _read(path)
    found = []
    for _, code in _fenced_blocks(text, {"shell", "bash", "sh", "console"}):
        for line in code.replace("\\\n", " ").splitlines():
            if re.match(r"(\S*/)?(python3?|pip) ", line.strip()):
                found.append((line.strip(), f"{_rel(path)} (code block)"))
    for span in re.findall(r"`([^`\n]*(?:\n[^`\n]*)?)`", _prose(text)):
        span = " ".join(span.split())
        if re.match(r"(\S*/)?python3? ", span):
            found.append((span, f"{_rel(path)} (inline)"))
    return found


def _segments(command):
    for segment in re.split(r"&&|\|\||;|\|", command):
        tokens = shlex.split(segment, comments=True)
        if tokens:
            yield tokens


_MODULES = {}


def _load(script):
    if script not in _MODULES:
        name = "_readme_" + re.sub(r"\W", "_", script)
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULES[script] = module
    return _MODULES[script]


class _Parsed(Exception):
    def __init__(self, namespace):
        super().__init__("parsed")
        self.namespace = namespace


def _parse(script, args):
    """The namespace `script`'s own parser makes of `args` (SystemExit if it refuses)."""
    module = _load(script)
    if hasattr(module, "parse_args"):
        return module.parse_args(args)
    # No parse_args(): run main() only until its parser has parsed.
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_and_stop), \
            mock.patch.object(sys, "argv", [script] + list(args)):
        try:
            if inspect.signature(module.main).parameters:
                module.main(list(args))
            else:
                module.main()
        except _Parsed as parsed:
            return parsed.namespace
    raise AssertionError(f"{script}: main() returned without parsing its arguments")


def _all_commands():
    for path in PAGES:
        for command, where in _commands(path):
            for tokens in _segments(command):
                yield pytest.param(tokens, where, id=f"{where}: {' '.join(tokens)}"[:150])


def _is_python(token):
    return re.fullmatch(r"(\S*/)?python3?", token) is not None


@pytest.mark.parametrize("tokens, where", list(_all_commands()))
def test_shown_commands_parse(tokens, where):
    program = tokens[0]
    if _is_python(program) and tokens[1:2] == ["-m"]:
        module, args = tokens[2], tokens[3:]
        if module == "pytest":
            for arg in args:
                if arg.startswith("tests/"):
                    assert os.path.exists(os.path.join(ROOT, arg.split("::")[0])), (where, arg)
        elif module == "pip":
            _check_pip(args, where)
        return
    if _is_python(program):
        script, args = tokens[1], tokens[2:]
        assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: no {script}"
        try:
            _parse(script, args)
        except SystemExit as exit:
            pytest.fail(f"{where}: `{' '.join(tokens)}` is refused by its parser "
                        f"(exit {exit.code})")
        return
    if program.endswith("/pip") or program == "pip":
        _check_pip(tokens[1:], where)


def _check_pip(args, where):
    # The names under [project.optional-dependencies] (no tomllib on Python 3.10).
    pyproject = _read(os.path.join(ROOT, "pyproject.toml"))
    section = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    extras = set(re.findall(r"^([\w-]+)\s*=", section, re.M))
    for arg in args:
        match = re.fullmatch(r"\.\[([\w,-]+)\]", arg)
        if match:
            for extra in match.group(1).split(","):
                assert extra in extras, f"{where}: no extra `{extra}` in pyproject.toml"


def test_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in _read(os.path.join(ROOT, ".ci", "run")).splitlines()]
    command = [line for line in ci if "pytest" in line and not line.startswith("#")]
    assert len(command) == 1, command
    shown = [code.strip() for _, code in _fenced_blocks(_read(README), {"shell"})]
    assert command[0] in shown, (
        f"README.md does not show `.ci/run`'s test command `{command[0]}` as a block")


def test_readme_main_job_needs_nothing_downloaded():
    # The quick start's job is the sine example (its task family is generated,
    # nothing to download); its flags parse.
    shown = [code.strip() for _, code in _fenced_blocks(_read(README), {"shell"})]
    jobs = [c for c in shown if c.endswith("examples/sine_regression.py")]
    assert jobs, "the README's quick start no longer runs examples/sine_regression.py"
    assert _parse("examples/sine_regression.py", []).meta_steps > 0


# ----------------------------------------------------------------------
# The README's numbers come from the files that hold them


def _table_after(text, heading):
    """{first cell: other cells} of the first table after `heading`."""
    start = text.index(heading)
    rows = {}
    for line in text[start:].splitlines()[1:]:
        if line.startswith("#"):
            break
        if line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0]] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def test_readme_challenge_tables_are_the_shipped_models_card():
    challenge_table = _load("examples/challenge_table.py")
    section = _read(README)
    section = section[section.index("### Omniglot, the challenge's split"):]
    section = section[:section.index("\n## ", 1)]
    # The tables are what the command shown beneath them prints for the
    # committed results ...
    (command,) = re.findall(r"^python examples/challenge_table\.py (.+)$", section, re.M)
    with open(os.path.join(ROOT, command)) as f:
        run = json.load(f)
    assert challenge_table.table(run) in section
    # ... of the run the shipped model came from, by the command shown.
    with open(os.path.join(ROOT, "saved_models", "omniglot", "card.json")) as f:
        card = json.load(f)["results"]
    assert card == run
    (ship,) = re.findall(r"^python examples/ship_omniglot\.py (.+)$", section, re.M)
    assert os.path.join(ROOT, ship, "results.json") == os.path.join(ROOT, command)
    assert f"--name {os.path.basename(ship)} " in run["command"] + " "
    assert run["command"] in section


def test_readme_paper_numbers_are_paper_tables():
    paper_table = _load("examples/paper_table.py")
    section = _read(README)
    section = section[section.index("### Omniglot, the paper's split"):]
    section = section[:section.index("\n### ", 1)]
    rows = _table_after(section, "### Omniglot, the paper's split")
    for protocol, (plain, transductive) in paper_table.PAPER_REPTILE.items():
        assert rows[protocol][0] == f"{plain:.2f} / {transductive:.2f}", protocol
    # The whole table is what the command shown beneath it prints for the
    # committed results.
    (command,) = re.findall(r"^python examples/paper_table\.py (.+)$", section, re.M)
    runs = []
    for path in command.split():
        with open(os.path.join(ROOT, path)) as f:
            runs.append(json.load(f))
    assert paper_table.table(runs) in section


# ----------------------------------------------------------------------
# Links


def _slug(heading):
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path):
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", _prose(_read(path)), re.M)}


def _links(path):
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", _prose(_read(path))):
        if not re.match(r"[a-z]+:", target):
            yield pytest.param(path, target, id=f"{_rel(path)} -> {target}")


@pytest.mark.parametrize("page, target", [p for page in PAGES for p in _links(page)])
def test_relative_links_resolve(page, target):
    file, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page
    assert os.path.exists(resolved), f"{_rel(page)} links to {target}, which does not exist"
    assert resolved.startswith(ROOT + os.sep), f"{_rel(page)} links outside the repository"
    if anchor and resolved.endswith(".md"):
        assert anchor in _anchors(resolved), (
            f"{_rel(page)} links to #{anchor}, not a heading of {_rel(resolved)}")


def test_every_page_in_docs_is_linked_from_somewhere():
    linked = set()
    for page in PAGES:
        for param in _links(page):
            file = param.values[1].partition("#")[0]
            if file:
                linked.add(os.path.normpath(os.path.join(os.path.dirname(page), file)))
    orphans = [_rel(page) for page in DOCS if page not in linked]
    assert not orphans, f"pages of docs/ no page links to: {orphans}"


# ----------------------------------------------------------------------
# The layout table


def test_layout_lists_every_module():
    layout = _read(os.path.join(ROOT, "docs", "layout.md"))
    listed = set(re.findall(r"\]\(\.\./(keras_reptile/[\w/]+\.py)\)", layout))
    package = os.path.join(ROOT, "keras_reptile")
    modules = {
        _rel(path) for path in glob.glob(os.path.join(package, "**", "*.py"), recursive=True)
        if os.path.basename(path) != "__init__.py"
    }
    missing = sorted(modules - listed)
    assert not missing, (
        f"docs/layout.md has no row for {missing}: add one per module, "
        "[`name.py`](../keras_reptile/name.py) | what it does (its docstring's first line)")
    gone = sorted(listed - modules)
    assert not gone, f"docs/layout.md lists modules that are gone: {gone}"
