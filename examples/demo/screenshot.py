"""Writes `docs/demo.png`: a real adaptation in the demo page.

Starts `serve.py` on a free port, opens the page in headless Chromium, draws
three symbols of three examples each with mouse strokes (vertical bars,
horizontal bars, circles), presses "Learn", draws a test symbol (a
horizontal bar in a new place), presses "Classify" and saves a screenshot
of the page with the drawn examples and the prediction bars.

    python examples/demo/screenshot.py --model saved_models/omniglot

Needs the `playwright` Python package (`pip install playwright`, in the
`test` extras) and a Chromium: Debian's (`apt-get install chromium`,
`/usr/bin/chromium`) is used as it is, so `playwright install` (which
downloads a browser) is not needed. `tests/demo_test.py` drives the page
with the same functions.
"""

import argparse
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CHROMIUM = "/usr/bin/chromium"
DEFAULT_OUTPUT = os.path.join(REPO, "docs", "demo.png")


# Symbols as strokes, lists of (x, y) points on the pad's 105x105 grid.


def vertical_bar(x, top=22, bottom=83):
    """One vertical stroke at `x`."""
    return [[(x, top), (x, (top + bottom) / 2), (x, bottom)]]


def horizontal_bar(y, left=22, right=83):
    """One horizontal stroke at `y`."""
    return [[(left, y), ((left + right) / 2, y), (right, y)]]


def circle(cx, cy, r, points=36):
    """One closed round stroke of radius `r` around (`cx`, `cy`)."""
    return [[
        (cx + r * math.sin(2 * math.pi * i / points),
         cy - r * math.cos(2 * math.pi * i / points))
        for i in range(points + 1)
    ]]


# The scene of the screenshot and of tests/demo_test.py: three examples of
# each symbol, in slightly different places and sizes, as a person draws
# the same symbol, and a test symbol like the second one but not a copy of
# any of its examples.
CLASSES = [
    ("Bar", [vertical_bar(44), vertical_bar(52, 24, 80), vertical_bar(60)]),
    ("Dash", [horizontal_bar(44), horizontal_bar(52, 25, 81), horizontal_bar(60)]),
    ("Ring", [circle(52, 52, 26), circle(51, 53, 30), circle(53, 52, 34)]),
]
TEST_SYMBOL = horizontal_bar(49, 24, 80)
TEST_CLASS = 1


def start_server(model, *, name=None, timeout=120.0, extra_args=()):
    """Starts `serve.py` on a free port.

    Args:
        model: The `--model` directory.
        name: Optional `--name`.
        timeout: Seconds to wait for the server to be ready.
        extra_args: More command-line arguments.

    Returns:
        A tuple `(process, url)`, `url` the page's address.

    Raises:
        RuntimeError: If the server exits or is not ready in time, with its
            output.
    """
    command = [
        sys.executable, os.path.join(HERE, "serve.py"), "--model", os.fspath(model),
        "--port", "0", "--quiet", *extra_args,
    ]
    if name is not None:
        command += ["--name", name]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = queue.Queue()

    def pump():
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    output = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        output.append(line)
        found = re.search(r"Open (http://\S+/) in a browser", line)
        if found:
            return process, found.group(1)
    process.kill()
    process.wait()
    raise RuntimeError(
        f"serve.py did not start within {timeout:.0f} s (exit code "
        f"{process.returncode}). Its output:\n" + "".join(output)
    )


def stop_server(process):
    """Stops a server from `start_server`."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def launch_browser(playwright):
    """Launches Debian's headless Chromium through Playwright."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True)


def open_page(browser, url, width=1240, height=640):
    """Opens the demo and waits until it has read the model's metadata."""
    page = browser.new_page(viewport={"width": width, "height": height})
    page.goto(url)
    page.wait_for_function("window.demo && window.demo.state.ready")
    return page


def draw(page, strokes):
    """Draws strokes on the pad with mouse events.

    Args:
        page: The demo page.
        strokes: Lists of (x, y) points on the 105x105 grid.
    """
    left, top, side = page.evaluate(
        """() => {
            const pad = document.getElementById("pad");
            const r = pad.getBoundingClientRect();
            return [r.left + pad.clientLeft, r.top + pad.clientTop, pad.clientWidth];
        }"""
    )
    scale = side / 105.0
    for stroke in strokes:
        (x0, y0), rest = stroke[0], stroke[1:]
        page.mouse.move(left + x0 * scale, top + y0 * scale)
        page.mouse.down()
        for x, y in rest:
            # Intermediate moves, as a hand makes: several pointer events
            # per segment.
            page.mouse.move(left + x * scale, top + y * scale, steps=4)
        page.mouse.up()


def teach(page, classes):
    """Names the symbols and draws and adds their examples.

    Args:
        page: The demo page, in its initial state (two symbols).
        classes: A list of `(name, examples)`, `examples` a list of
            drawings, each a list of strokes.
    """
    while page.locator("#classes .class-row").count() < len(classes):
        page.click("#add-class")
    for c, (name, examples) in enumerate(classes):
        row = page.locator(f'#classes .class-row[data-class="{c}"]')
        row.locator("input").fill(name)
        row.locator(".swatch").click()
        for strokes in examples:
            draw(page, strokes)
            page.click("#add-example")


def _wait_for_result(page, count, timeout):
    page.wait_for_function(
        f"window.demo.state.requests >= {count} && !window.demo.state.busy",
        timeout=timeout * 1000,
    )
    result = page.evaluate("window.demo.state.lastResult")
    if result.get("error"):
        raise RuntimeError(f"The page reports: {result['error']}")
    return result


def learn(page, timeout=120.0):
    """Presses "Learn" and returns the page's result (support-set fit)."""
    count = page.evaluate("window.demo.state.requests") + 1
    page.click("#learn")
    return _wait_for_result(page, count, timeout)


def classify(page, strokes, timeout=120.0):
    """Draws a test symbol, presses "Classify" and returns the result.

    Returns:
        The page's result: `probabilities` (one per symbol), `query` (the
        28x28 image sent, row-major) and `seconds`.
    """
    if page.is_enabled("#clear"):
        page.click("#clear")  # the previous test symbol
    draw(page, strokes)
    count = page.evaluate("window.demo.state.requests") + 1
    page.click("#classify")
    return _wait_for_result(page, count, timeout)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", default=os.path.join(REPO, "saved_models", "omniglot"),
        help="the --model of serve.py",
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    args = parser.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        parser.exit(2, "error: needs `pip install playwright` (no browser "
                    "download: Debian's chromium is used).\n")
    if not os.access(CHROMIUM, os.X_OK):
        parser.exit(2, f"error: needs Chromium at {CHROMIUM} "
                    "(`apt-get install -y chromium`).\n")
    process, url = start_server(args.model)
    try:
        with sync_playwright() as playwright:
            browser = launch_browser(playwright)
            page = open_page(browser, url)
            teach(page, CLASSES)
            fit = learn(page)
            result = classify(page, TEST_SYMBOL)
            os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
            page.screenshot(path=args.output, full_page=True)
            browser.close()
    finally:
        stop_server(process)
    names = [name for name, _ in CLASSES]
    probabilities = ", ".join(
        f"{n} {p:.1%}" for n, p in zip(names, result["probabilities"])
    )
    right = sum(
        max(range(len(p)), key=p.__getitem__) == label
        for p, label in zip(
            fit["probabilities"],
            [c for c, (_, ex) in enumerate(CLASSES) for _ in ex],
        )
    )
    print(f"Learn: {right} of {len(fit['probabilities'])} examples fitted. "
          f"Test symbol (a {names[TEST_CLASS]}): {probabilities}. "
          f"Wrote {args.output}")


if __name__ == "__main__":
    main()
