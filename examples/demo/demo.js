// Draw, adapt, classify: the page's logic (served by serve.py, see there).
//
// The page talks TF Serving's REST API and nothing else, so it works
// against serve.py and against a real TF Serving alike:
//   POST {server}/v1/models/{model}:predict
//     {"signature_name": "adapt_and_predict",
//      "inputs": {"support_x": [S][28][28][1], "support_y": [S],
//                 "query_x": [Q][28][28][1]}}
//   GET  {server}/v1/models/{model}/metadata   (number of output classes)
// `?server=` (default: this page's origin) and `?model=` (default: the
// model serve.py serves) pick the model.
"use strict";

(function () {
  // Omniglot's drawings are 105x105 1-bit images, which
  // keras_reptile.datasets.omniglot inverts (ink 1.0 on 0.0) and
  // area-averages to 28x28; the pad is the same 105x105 grid.
  const SIZE = 105;
  const IMAGE = 28;
  // Omniglot's strokes are about 6 grid cells wide: twice the distance from
  // the middle of a stroke to the background is 5.7-6.0 (5th-95th
  // percentile, median 6.0) on 303 drawings of images_background_small1.zip;
  // tests/demo_test.py checks the pad's strokes against that range.
  const STROKE_WIDTH = 6;
  // Canvas strokes are anti-aliased; Omniglot's PNGs are 1-bit, so a cell
  // is ink when the stroke covers at least half of it.
  const INK_THRESHOLD = 128;
  const MIN_CLASSES = 2;
  const MAX_CLASSES = 5;
  const MAX_SHOTS = 5;
  const COLORS = ["#2f6fde", "#e07a10", "#12a150", "#c2338a", "#7a52cc"];
  const ADAPT_SIGNATURE = "adapt_and_predict";

  const params = new URLSearchParams(window.location.search);
  const server = (params.get("server") || "").replace(/\/+$/, "");
  const modelName =
    params.get("model") ||
    document.querySelector('meta[name="model-name"]').content;
  const modelUrl = `${server}/v1/models/${encodeURIComponent(modelName)}`;

  // ---------------------------------------------------------------------
  // Strokes -> Omniglot-style 28x28 image.

  function renderStrokes(ctx, strokes, scale, color) {
    ctx.save();
    ctx.scale(scale, scale);
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = STROKE_WIDTH;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    for (const stroke of strokes) {
      if (stroke.length === 1) {
        // A tap leaves a dot as wide as a stroke.
        ctx.beginPath();
        ctx.arc(stroke[0][0], stroke[0][1], STROKE_WIDTH / 2, 0, 2 * Math.PI);
        ctx.fill();
        continue;
      }
      ctx.beginPath();
      ctx.moveTo(stroke[0][0], stroke[0][1]);
      for (let i = 1; i < stroke.length; i++) {
        ctx.lineTo(stroke[i][0], stroke[i][1]);
      }
      ctx.stroke();
    }
    ctx.restore();
  }

  // Strokes (lists of [x, y] points on the 105x105 grid) -> 1-bit ink,
  // a Uint8Array of SIZE * SIZE cells in row-major order, 1 = ink.
  function strokesToInk(strokes) {
    const canvas = document.createElement("canvas");
    canvas.width = SIZE;
    canvas.height = SIZE;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    renderStrokes(ctx, strokes, 1, "#000");
    const rgba = ctx.getImageData(0, 0, SIZE, SIZE).data;
    const ink = new Uint8Array(SIZE * SIZE);
    for (let i = 0; i < ink.length; i++) {
      ink[i] = rgba[4 * i + 3] >= INK_THRESHOLD ? 1 : 0;
    }
    return ink;
  }

  // The weights of an area (box-filter) resize from n to out cells along one
  // axis: output cell o averages input span [o * n / out, (o + 1) * n / out),
  // partly covered cells weighted by the covered fraction. This is what
  // tf.image.resize(method="area") computes, the resize of the Omniglot loader.
  function boxWeights(n, out) {
    const scale = n / out;
    const weights = [];
    for (let o = 0; o < out; o++) {
      const lo = o * scale;
      const hi = (o + 1) * scale;
      const row = [];
      for (let i = Math.floor(lo); i < Math.min(Math.ceil(hi), n); i++) {
        row.push([i, Math.min(hi, i + 1) - Math.max(lo, i)]);
      }
      weights.push(row);
    }
    return weights;
  }

  // Ink (SIZE * SIZE values in [0, 1], row-major) -> a Float64Array of
  // out * out values in [0, 1]: the fraction of each output cell's area
  // that is ink.
  function inkToImage(ink, size = SIZE, out = IMAGE) {
    const weights = boxWeights(size, out);
    const scale = size / out;
    const rows = new Float64Array(size * out); // resized along x only
    for (let y = 0; y < size; y++) {
      for (let ox = 0; ox < out; ox++) {
        let sum = 0;
        for (const [x, w] of weights[ox]) sum += w * ink[y * size + x];
        rows[y * out + ox] = sum;
      }
    }
    const image = new Float64Array(out * out);
    for (let oy = 0; oy < out; oy++) {
      for (let ox = 0; ox < out; ox++) {
        let sum = 0;
        for (const [y, w] of weights[oy]) sum += w * rows[y * out + ox];
        image[oy * out + ox] = Math.min(1, Math.max(0, sum / (scale * scale)));
      }
    }
    return image;
  }

  // A 28x28 image -> the nested [28][28][1] lists of the REST request.
  function nested(image) {
    const rows = [];
    for (let y = 0; y < IMAGE; y++) {
      const row = [];
      for (let x = 0; x < IMAGE; x++) row.push([image[y * IMAGE + x]]);
      rows.push(row);
    }
    return rows;
  }

  // ---------------------------------------------------------------------
  // The REST calls.

  async function callJson(url, options) {
    let response;
    try {
      response = await fetch(url, options);
    } catch (error) {
      throw new Error(`could not reach ${url} (${error.message})`);
    }
    let payload = null;
    try {
      payload = await response.json();
    } catch (error) {
      payload = null;
    }
    if (!response.ok) {
      const detail = payload && payload.error ? payload.error : response.statusText;
      throw new Error(`the server answered ${response.status}: ${detail}`);
    }
    return payload;
  }

  async function adaptAndPredict(supportImages, supportLabels, queryImages) {
    const body = {
      signature_name: ADAPT_SIGNATURE,
      inputs: {
        support_x: supportImages.map(nested),
        support_y: supportLabels,
        query_x: queryImages.map(nested),
      },
    };
    state.lastRequest = body;
    const payload = await callJson(`${modelUrl}:predict`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    return classProbabilities(payload.outputs, numClasses());
  }

  // The answer's rows -> probabilities over the user's `k` classes.
  // `outputs` holds logits for a model compiled with `from_logits=True`,
  // and then `probabilities` is their softmax over all of the network's
  // classes; units beyond the user's k classes take no part, so this is the
  // softmax of the first k logits. A model compiled on probabilities exports
  // `probabilities` as an exact copy of `outputs`: those are renormalised.
  function classProbabilities(outputs, k) {
    const logits = Array.isArray(outputs) ? outputs : outputs.outputs;
    const given = Array.isArray(outputs) ? null : outputs.probabilities;
    return logits.map((row, r) => {
      const z = row.slice(0, k);
      if (given && given[r].every((p, i) => p === row[i])) {
        const total = z.reduce((a, b) => a + b, 0);
        return z.map((p) => p / total);
      }
      const top = Math.max(...z);
      const e = z.map((v) => Math.exp(v - top));
      const total = e.reduce((a, b) => a + b, 0);
      return e.map((v) => v / total);
    });
  }

  // ---------------------------------------------------------------------
  // State and rendering.

  const state = {
    mode: "teach", // "teach": drawing examples; "test": classifying
    classes: [],
    selected: 0,
    strokes: [], // the pad's drawing
    learned: null, // the support set "Learn" adapted to
    maxClasses: MAX_CLASSES,
    busy: false,
    lastRequest: null,
    lastResult: null, // {kind, probabilities, seconds} or {kind, error}
    requests: 0,
  };
  let nextName = 1;

  const $ = (id) => document.getElementById(id);
  const pad = $("pad");
  const padCtx = pad.getContext("2d");

  function numClasses() {
    return state.learned ? state.learned.names.length : state.classes.length;
  }

  function addClass() {
    if (state.classes.length >= state.maxClasses) return;
    state.classes.push({ name: `Symbol ${nextName++}`, examples: [] });
    state.selected = state.classes.length - 1;
    render();
  }

  function removeSelectedClass() {
    if (state.classes.length <= MIN_CLASSES) return;
    state.classes.splice(state.selected, 1);
    state.selected = Math.min(state.selected, state.classes.length - 1);
    render();
  }

  function drawImage(canvas, image) {
    const ctx = canvas.getContext("2d");
    const pixels = ctx.createImageData(IMAGE, IMAGE);
    for (let i = 0; i < IMAGE * IMAGE; i++) {
      const level = Math.round(255 * (1 - image[i]));
      pixels.data.set([level, level, level, 255], 4 * i);
    }
    ctx.putImageData(pixels, 0, 0);
  }

  function color(i) {
    return COLORS[i % COLORS.length];
  }

  function renderPad() {
    const dpr = window.devicePixelRatio || 1;
    const side = Math.round(pad.clientWidth * dpr);
    if (pad.width !== side) {
      pad.width = side;
      pad.height = side;
    }
    padCtx.clearRect(0, 0, pad.width, pad.height);
    const ink = state.mode === "teach" ? color(state.selected) : "#1d2430";
    renderStrokes(padCtx, state.strokes, pad.width / SIZE, ink);
  }

  function renderClasses() {
    const box = $("classes");
    box.replaceChildren();
    box.classList.toggle("locked", state.mode !== "teach");
    state.classes.forEach((cls, c) => {
      const row = document.createElement("div");
      row.className = "class-row" + (state.mode === "teach" && c === state.selected ? " selected" : "");
      row.dataset.class = String(c);
      row.style.setProperty("--color", color(c));
      row.addEventListener("click", () => {
        if (state.mode !== "teach") return;
        state.selected = c;
        render();
      });
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      const name = document.createElement("input");
      name.value = cls.name;
      name.setAttribute("aria-label", "symbol name");
      name.addEventListener("input", () => {
        cls.name = name.value;
        renderTitle();
        renderBars();
      });
      const thumbs = document.createElement("div");
      thumbs.className = "thumbs";
      cls.examples.forEach((example, e) => {
        const thumb = document.createElement("div");
        thumb.className = "thumb";
        const canvas = document.createElement("canvas");
        canvas.width = IMAGE;
        canvas.height = IMAGE;
        drawImage(canvas, example.image);
        const remove = document.createElement("button");
        remove.className = "remove";
        remove.textContent = "×";
        remove.title = "remove this example";
        remove.addEventListener("click", (event) => {
          event.stopPropagation();
          cls.examples.splice(e, 1);
          render();
        });
        thumb.append(canvas, remove);
        thumbs.append(thumb);
      });
      for (let e = cls.examples.length; e < MAX_SHOTS; e++) {
        const slot = document.createElement("div");
        slot.className = "slot";
        thumbs.append(slot);
      }
      row.append(swatch, name, thumbs);
      box.append(row);
    });
  }

  function renderTitle() {
    const teach = state.mode === "teach";
    pad.classList.toggle("teach", teach);
    pad.style.setProperty("--class-color", color(state.selected));
    $("pad-title").firstChild.textContent = teach ? "Draw an example of " : "Draw a test symbol";
    $("pad-target").textContent = teach ? (state.classes[state.selected] || {}).name || "" : "";
    $("pad-hint").textContent = teach
      ? "Enter adds the drawing; the pad is Omniglot's 105×105 grid."
      : "Enter classifies the drawing; Clear draws another one.";
  }

  function renderButtons() {
    const teach = state.mode === "teach";
    const drawn = state.strokes.length > 0;
    const cls = state.classes[state.selected];
    $("add-example").hidden = !teach;
    $("add-example").disabled = state.busy || !drawn || !cls || cls.examples.length >= MAX_SHOTS;
    $("classify").hidden = teach;
    $("classify").disabled = state.busy || !drawn;
    $("undo").disabled = state.busy || !drawn;
    $("clear").disabled = state.busy || !drawn;
    $("add-class").hidden = !teach;
    $("remove-class").hidden = !teach;
    $("add-class").disabled = state.busy || state.classes.length >= state.maxClasses;
    $("remove-class").disabled = state.busy || state.classes.length <= MIN_CLASSES;
    $("learn").hidden = !teach;
    $("learn").disabled = state.busy || state.classes.some((c) => c.examples.length === 0);
    $("edit").hidden = teach;
    $("edit").disabled = state.busy;
  }

  function renderBars() {
    const bars = $("bars");
    bars.replaceChildren();
    const result = state.lastResult;
    const show = result && result.kind === "classify" && result.probabilities;
    $("query-row").hidden = !show;
    if (!show) return;
    const p = result.probabilities;
    const top = p.indexOf(Math.max(...p));
    const names = state.classes.map((c) => c.name);
    $("prediction").textContent = `Looks like ${names[top]} (${(100 * p[top]).toFixed(0)}%)`;
    p.forEach((value, c) => {
      const row = document.createElement("div");
      row.className = "bar-row" + (c === top ? " top" : "");
      row.dataset.class = String(c);
      row.dataset.probability = String(value);
      row.style.setProperty("--color", color(c));
      const name = document.createElement("span");
      name.className = "bar-name";
      name.textContent = names[c];
      const track = document.createElement("div");
      track.className = "bar-track";
      const fill = document.createElement("div");
      fill.className = "bar-fill";
      fill.style.width = `${(100 * value).toFixed(2)}%`;
      track.append(fill);
      const label = document.createElement("span");
      label.className = "bar-value";
      label.textContent = `${(100 * value).toFixed(1)}%`;
      row.append(name, track, label);
      bars.append(row);
    });
  }

  function render() {
    renderPad();
    renderClasses();
    renderTitle();
    renderButtons();
    renderBars();
  }

  function setStatus(text, isError = false) {
    const status = $("status");
    status.textContent = text;
    status.classList.toggle("error", isError);
  }

  // ---------------------------------------------------------------------
  // Actions.

  function addExample() {
    const cls = state.classes[state.selected];
    if (state.mode !== "teach" || !state.strokes.length || cls.examples.length >= MAX_SHOTS) return;
    const strokes = state.strokes;
    const ink = strokesToInk(strokes);
    cls.examples.push({ strokes, ink, image: inkToImage(ink) });
    state.strokes = [];
    render();
  }

  async function run(kind, work) {
    state.busy = true;
    state.requests++;
    document.body.dataset.busy = "1";
    renderButtons();
    const started = performance.now();
    try {
      const result = await work();
      result.kind = kind;
      result.seconds = (performance.now() - started) / 1000;
      state.lastResult = result;
      return result;
    } catch (error) {
      state.lastResult = { kind, error: error.message };
      setStatus(`Could not ${kind === "learn" ? "learn" : "classify"}: ${error.message}`, true);
      return null;
    } finally {
      state.busy = false;
      delete document.body.dataset.busy;
      render();
    }
  }

  async function learn() {
    const support = [];
    const labels = [];
    state.classes.forEach((cls, c) => {
      for (const example of cls.examples) {
        support.push(example.image);
        labels.push(c);
      }
    });
    setStatus(`Adapting to ${support.length} drawings of ${state.classes.length} symbols…`);
    const learned = { images: support, labels, names: state.classes.map((c) => c.name) };
    state.learned = learned;
    // The same adaptation as every later request, asked to classify the
    // examples themselves: shows how well the adapted network fits them.
    const result = await run("learn", async () => {
      const probabilities = await adaptAndPredict(support, labels, support);
      return { probabilities };
    });
    if (!result) {
      state.learned = null;
      render();
      return;
    }
    const right = result.probabilities.filter((p, i) => p.indexOf(Math.max(...p)) === labels[i]).length;
    state.mode = "test";
    state.strokes = [];
    setStatus(
      `Adapted to ${support.length} drawings of ${state.classes.length} symbols in ` +
        `${result.seconds.toFixed(1)} s; the adapted network gets ${right} of ` +
        `${support.length} of them right. Now draw a test symbol and press Classify.`
    );
    render();
  }

  async function classify() {
    if (state.mode !== "test" || !state.strokes.length) return;
    const query = inkToImage(strokesToInk(state.strokes));
    drawImage($("query-thumb"), query);
    const { images, labels } = state.learned;
    const result = await run("classify", async () => {
      const [probabilities] = await adaptAndPredict(images, labels, [query]);
      return { probabilities, query };
    });
    if (result) {
      setStatus(
        `Adapted to your ${images.length} drawings and classified the test ` +
          `symbol in ${result.seconds.toFixed(1)} s.`
      );
    }
  }

  function edit() {
    state.mode = "teach";
    state.learned = null;
    state.lastResult = null;
    state.strokes = [];
    setStatus("Edit your symbols, then press Learn again.");
    render();
  }

  // ---------------------------------------------------------------------
  // Drawing with a mouse, a pen or a finger.

  let current = null;

  function gridPoint(event) {
    const rect = pad.getBoundingClientRect();
    const x = ((event.clientX - rect.left - pad.clientLeft) / pad.clientWidth) * SIZE;
    const y = ((event.clientY - rect.top - pad.clientTop) / pad.clientHeight) * SIZE;
    return [Math.min(SIZE, Math.max(0, x)), Math.min(SIZE, Math.max(0, y))];
  }

  pad.addEventListener("pointerdown", (event) => {
    if (state.busy || event.button > 0) return;
    pad.setPointerCapture(event.pointerId);
    current = [gridPoint(event)];
    state.strokes.push(current);
    render();
  });
  pad.addEventListener("pointermove", (event) => {
    if (!current) return;
    const events = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
    for (const e of events.length ? events : [event]) current.push(gridPoint(e));
    renderPad();
  });
  const endStroke = () => {
    if (!current) return;
    current = null;
    renderButtons();
  };
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);

  $("add-example").addEventListener("click", addExample);
  $("classify").addEventListener("click", classify);
  $("undo").addEventListener("click", () => {
    state.strokes.pop();
    render();
  });
  $("clear").addEventListener("click", () => {
    state.strokes = [];
    render();
  });
  $("add-class").addEventListener("click", addClass);
  $("remove-class").addEventListener("click", removeSelectedClass);
  $("learn").addEventListener("click", learn);
  $("edit").addEventListener("click", edit);
  document.addEventListener("keydown", (event) => {
    if (event.target.tagName === "INPUT" || state.busy) return;
    if (event.key === "Enter") {
      event.preventDefault();
      if (state.mode === "teach") addExample();
      else classify();
    } else if ((event.ctrlKey || event.metaKey) && event.key === "z") {
      state.strokes.pop();
      render();
    }
  });
  window.addEventListener("resize", renderPad);

  async function readMetadata() {
    try {
      const payload = await callJson(`${modelUrl}/metadata`);
      const signature = payload.metadata.signature_def.signature_def[ADAPT_SIGNATURE];
      if (!signature) throw new Error(`the model has no ${ADAPT_SIGNATURE} signature`);
      const dims = signature.outputs.outputs.tensor_shape.dim;
      const classes = Number(dims[dims.length - 1].size);
      state.maxClasses = Math.max(MIN_CLASSES, Math.min(MAX_CLASSES, classes));
      setStatus(
        `Model “${modelName}” (version ${payload.model_spec.version}, ` +
          `${classes} output classes) at ${server || window.location.origin}. ` +
          "Draw on the pad, then press Add example."
      );
    } catch (error) {
      setStatus(`Model “${modelName}”: ${error.message}`, true);
    }
    state.ready = true;
    render();
  }

  for (let c = 0; c < MIN_CLASSES; c++) addClass();
  state.selected = 0;
  render();
  readMetadata();

  // For tests and the screenshot script (and curious readers).
  window.demo = { SIZE, IMAGE, STROKE_WIDTH, state, strokesToInk, inkToImage, boxWeights, classProbabilities };
})();
