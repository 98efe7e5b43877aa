"""Every notebook, the way a learner uses it: opened in JupyterLab in Chromium, then Run All.

The notebooks run as a learner sees them, stubs and all: an exercise's checker cell prints a ✗
verdict for the unfilled stub and never raises, so a notebook with stubs still runs to the end
(the solutions swap of ``make test`` is off here). For each notebook the test checks, in order:

1. it opens unmodified: right after the kernel has started, JupyterLab does not mark it dirty
   (a saved kernelspec or language_info that differs from the installed kernel's would), and each
   saved explorer output (a widget view with a PNG of its default state) shows as that PNG until
   the notebook runs, as in a fresh clone, where every notebook opens untrusted;
2. Run All (the Run menu's command) runs every code cell, and no cell shows an error output or a
   traceback or warning on stderr;
3. every explorer (an element of class ``kvlab-explorer``) shows its ipywidgets controls and a
   loaded ``<img>`` (class ``kvlab-explorer-figure``, or inside an element of that class); there
   is one per saved explorer output, and at least one in every notebook;
4. moving one control of each explorer (arrow key on a slider, another option of a dropdown or of
   toggle buttons) changes the figure's image bytes;
5. a learner's loop on the notebook's exercises: in an exercise's stub cell the answer is typed
   through the editor (select all, then keys), the stub and its checker cell are run with
   Shift+Enter, and the checker prints its verdict: a wrong answer first where one is scripted
   (``LEARNER_TRIES``: ✗ naming the failing case, and what the checker explains, a figure for a
   kernel), then a right one (in 01 a kernel typed line by line, which must also compile for a
   GPU from the notebook's own source), or ``solution(name)``'s for the notebook's first
   exercise (✓);
6. the browser console has no errors (level SEVERE).

It saves a screenshot of each notebook (and of each explorer after its move) under build/browser/,
and build/browser/summary.{json,md} with what was checked and how long each step took.
"""
import json
import re
import time

import pytest
from selenium.common.exceptions import JavascriptException
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select

OPEN_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300
RENDER_TIMEOUT_S = 60
REDRAW_TIMEOUT_S = 60
# Time for JupyterLab to apply the kernel's spec and language_info to the notebook's metadata
# (which is what would make it dirty) after both have arrived.
SETTLE_S = 1.5
CONTROLS = (".widget-slider, .widget-dropdown, .widget-toggle-buttons, .widget-radio-box, "
            ".widget-checkbox, .widget-button, .widget-play, .widget-select, .widget-text")
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# The notebook panel JupyterLab shows, once its kernel is up (null until then).
JS_PANEL = """
const app = window.jupyterapp;
const panel = app && app.shell.currentWidget;
if (!panel || !panel.context || !panel.context.isReady || !panel.content || !panel.sessionContext)
    return null;
const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
if (!kernel || kernel.status !== 'idle') return null;
return {path: panel.context.path, cells: panel.content.widgets.length};
"""

# Dirty state once the kernel's info and spec have been applied to the notebook.
JS_OPEN_STATE = """
const done = arguments[arguments.length - 1];
const panel = window.jupyterapp.shell.currentWidget;
const kernel = panel.sessionContext.session.kernel;
Promise.all([kernel.info, kernel.spec]).then(() => setTimeout(() => done({
    dirty: panel.context.model.dirty,
    tab_dirty: document.querySelector('.lm-TabBar-tab.jp-mod-current.jp-mod-dirty') !== null,
    metadata: panel.context.model.metadata,
}), arguments[0] * 1000), (err) => done({error: String(err)}));
"""

# What each saved output that has a widget view shows before anything ran: the form JupyterLab's
# renderers pick, as its output area does (an untrusted output, as in a fresh clone, gets only
# the safe renderers: a PNG, never the widget renderer). Asked of the registry rather than read
# off the page, because JupyterLab renders a long notebook's cells only as they scroll into view.
JS_SAVED_WIDGET_OUTPUTS = """
const mime = arguments[0];
const panel = window.jupyterapp.shell.currentWidget;
const rendermime = panel.content.rendermime;
const shown = [];
panel.content.widgets.forEach((cell, i) => {
    if (cell.model.type !== 'code') return;
    const outputs = cell.model.outputs;
    for (let j = 0; j < outputs.length; j++) {
        const output = outputs.get(j);
        if (!(mime in output.data)) continue;
        shown.push({cell: i, mime_types: Object.keys(output.data), trusted: output.trusted,
                    shown_as: rendermime.preferredMimeType(output.data,
                                                           output.trusted ? 'any' : 'ensure')});
    }
});
return shown;
"""

JS_RUN_ALL = """
const done = arguments[arguments.length - 1];
window.jupyterapp.commands.execute('notebook:run-all-cells')
    .then((ok) => done({ok: ok}), (err) => done({error: String(err)}));
"""

JS_KERNEL_STATUS = """
const panel = window.jupyterapp.shell.currentWidget;
return panel.sessionContext.session.kernel.status;
"""

# Per code cell: did it run, its error outputs, its stderr text, and the DOM's stderr tracebacks.
JS_CELLS = """
const panel = window.jupyterapp.shell.currentWidget;
return panel.content.widgets.filter((cell) => cell.model.type === 'code').map((cell) => {
    const outputs = [];
    for (let j = 0; j < cell.model.outputs.length; j++) outputs.push(cell.model.outputs.get(j).toJSON());
    const stderrNodes = cell.node.querySelectorAll(
        '.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]');
    return {
        source: cell.model.sharedModel.getSource(),
        execution_count: cell.model.executionCount,
        errors: outputs.filter((o) => o.output_type === 'error').map((o) => o.ename + ': ' + o.evalue),
        stderr: outputs.filter((o) => o.output_type === 'stream' && o.name === 'stderr')
                       .map((o) => Array.isArray(o.text) ? o.text.join('') : o.text),
        stderr_shown: Array.from(stderrNodes).map((n) => n.innerText),
    };
});
"""

# What a learner types into a stub cell, and what its checker must then print, by exercise. Typed
# as a learner types: the editor closes brackets and quotes itself (and steps over the closing
# ones) and indents a new line as the line before, one level more after a colon, so an answer's
# lines are typed without their indentation, which may therefore never decrease. A notebook not
# listed gets its first exercise answered with solution(name).
LEARNER_TRIES = {
    "00_tour": [
        ("00.kv_bytes_per_token",
         "def kv_bytes_per_token(model, kv_dtype): "
         "return model.num_layers * model.num_kv_heads * model.head_dim * 2",
         ["✗ 00.kv_bytes_per_token: fails on case", "what you get with only one of K and V"]),
        ("00.kv_bytes_per_token",
         "def kv_bytes_per_token(model, kv_dtype): return 2 * model.num_layers * "
         "model.num_kv_heads * (2 * model.head_dim if kv_dtype == 'fp16' else model.head_dim + 2)",
         ["✓ 00.kv_bytes_per_token"]),
    ],
    "01_paging": [
        ("01.slot_mapping",
         "def slot_mapping(block_table, positions, block_size): return positions",
         ["✗ 01.slot_mapping: fails on case", "token by token", "<- yours: 0"]),
        ("01.slot_mapping",
         "def slot_mapping(block_table, positions, block_size): return "
         "block_table[positions // block_size] * block_size + positions % block_size",
         ["✓ 01.slot_mapping"]),
        ("01.write_kv_kernel",
         "write_kv_kernel = cuda.jit(lambda k, v, k_pool, v_pool, slots: None)",
         ["✗ 01.write_kv_kernel: fails on case", "image/png"]),
        ("01.write_kv_kernel",  # typed line by line: the editor indents after each colon
         "@cuda.jit\n"
         "def write_kv_kernel(k, v, k_pool, v_pool, slots):\n"
         "    token = cuda.blockIdx.x\n"
         "    slot = slots[token]\n"
         "    if slot >= 0:\n"
         "        head = cuda.threadIdx.x // k.shape[2]\n"
         "        dim = cuda.threadIdx.x % k.shape[2]\n"
         "        block, offset = slot // k_pool.shape[1], slot % k_pool.shape[1]\n"
         "        k_pool[block, offset, head, dim] = k[token, head, dim]\n"
         "        v_pool[block, offset, head, dim] = v[token, head, dim]",
         ["✓ 01.write_kv_kernel", "and it compiles for a GPU"]),
        ("01.gather_kv_torch",  # right, but a loop on the host: passes, and is told so
         "def gather_kv_torch(k_pool, v_pool, block_tables, context_lens): bs = k_pool.shape[1]; "
         "s = [int(block_tables[q, p // bs]) * bs + p % bs for q, n in "
         "enumerate(context_lens.tolist()) for p in range(n)]; "
         "return k_pool.flatten(0, 1)[s], v_pool.flatten(0, 1)[s]",
         ["✓ 01.gather_kv_torch", "it uses .tolist(), a Python loop and int() of an element"]),
    ],
    "02_quantization": [
        ("02.scale_kernel",  # thread 0 reads the partials with no barrier after they are written
         "@cuda.jit\n"
         "def scale_kernel(x, scales):\n"
         "    token, head, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x\n"
         "    local = np.float32(0)\n"
         "    for d in range(tid, x.shape[2], THREADS): "
         "local = max(local, abs(x[token, head, d]))\n"
         "    partial = cuda.shared.array(THREADS, np.float32)\n"
         "    partial[tid] = local\n"
         "    if tid == 0: scales[token, head] = max(max(partial[0], partial[1], partial[2], "
         "partial[3], partial[4], partial[5], partial[6], partial[7]), np.float32(1e-8)) / 127",
         ["✗ 02.scale_kernel: fails on case", "(SharedMemoryRaceError): in block (0, 0, 0), "
          "thread 0 read shared partial[1]", "Put a cuda.syncthreads() between them"]),
        ("02.fake_quant_torch",  # always per token: the checker names the axes it used
         "def fake_quant_torch(x, granularity): s = x.abs().amax(dim=-1, keepdim=True).clamp("
         "min=1e-8) / 127; return torch.round(x / s).clamp(-127, 127) * s.half().float()",
         ["✗ 02.fake_quant_torch: fails on case", "what you get with per token's scales"]),
        ("02.fake_quant_torch", 'fake_quant_torch = solution("02.fake_quant_torch")',
         ["✓ 02.fake_quant_torch"]),
    ],
    "03_rope": [
        ("03.rope_kernel", "rope_kernel = cuda.jit(lambda x, cos, sin, positions, out: None)",
         ["✗ 03.rope_kernel: fails on case", "image/png"]),
        ("03.rope_kernel", 'rope_kernel = solution("03.rope_kernel")', ["✓ 03.rope_kernel"]),
        ("03.rope_partial_torch", 'rope_partial_torch = solution("03.rope_partial_torch")',
         ["✓ 03.rope_partial_torch"]),
    ],
    "04_fused_write": [
        ("04.fused_write_kernel",
         "from numba import cuda; fused_write_kernel = cuda.jit(lambda qkv, cos, sin, block_table, "
         "pos_offset, q_out, k_pool, v_pool: None)",
         ["✗ 04.fused_write_kernel: fails on case", "q_out differs at token 0", "image/png"]),
        ("04.fused_write_kernel", 'fused_write_kernel = solution("04.fused_write_kernel")',
         ["✓ 04.fused_write_kernel"]),
        ("04.fused_write_torch", 'fused_write_torch = solution("04.fused_write_torch")',
         ["✓ 04.fused_write_torch"]),
    ],
    "05_attention": [
        ("05.paged_decode_torch", 'paged_decode_torch = solution("05.paged_decode_torch")',
         ["def paged_decode_torch_solution", "✓ 05.paged_decode_torch"]),
    ],
}

# The cells of the open notebook: type and source.
JS_SOURCES = """
return window.jupyterapp.shell.currentWidget.content.widgets.map(
    (cell) => ({type: cell.model.type, source: cell.model.sharedModel.getSource()}));
"""

# Make cell i the active one in command mode, scrolled into view; returns its editor's element.
JS_SELECT_CELL = """
const notebook = window.jupyterapp.shell.currentWidget.content;
notebook.mode = 'command';
notebook.activeCellIndex = arguments[0];
const cell = notebook.widgets[arguments[0]];
cell.node.scrollIntoView({block: 'center'});
return cell.node.querySelector('.cm-content');
"""

# Cell i's execution count, and its outputs: stream text joined, and every output's MIME types.
JS_CELL_RESULT = """
const cell = window.jupyterapp.shell.currentWidget.content.widgets[arguments[0]];
const texts = [], mimes = [];
for (let j = 0; j < cell.model.outputs.length; j++) {
    const output = cell.model.outputs.get(j).toJSON();
    if (output.output_type === 'stream') texts.push([].concat(output.text).join(''));
    else mimes.push(...Object.keys(output.data || {}));
}
return {count: cell.model.executionCount, text: texts.join(''), mimes: mimes};
"""

# A fingerprint of an explorer's figure: SHA-256 of the image's bytes (blob: or data: URL alike).
JS_FIGURE_DIGEST = """
const done = arguments[arguments.length - 1];
const img = arguments[0].querySelector('img.kvlab-explorer-figure, .kvlab-explorer-figure img');
if (!img || !img.complete || img.naturalWidth === 0) { done(null); return; }
fetch(img.src).then((r) => r.arrayBuffer()).then((bytes) => crypto.subtle.digest('SHA-256', bytes))
    .then((hash) => done(Array.from(new Uint8Array(hash), (b) => b.toString(16).padStart(2, '0'))
                         .join('')), (err) => done('error: ' + err));
"""

def _wait(what: str, timeout_s: float, probe, interval_s: float = 0.25):
    """Polls ``probe()`` until it returns something other than None; fails naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = probe()
        except JavascriptException:
            value = None
        if value is not None:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def _explorers(driver):
    return driver.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .kvlab-explorer")


def _digest(driver, explorer):
    digest = driver.execute_async_script(JS_FIGURE_DIGEST, explorer)
    return digest if digest and not digest.startswith("error") else None


def _rendered_explorers(driver, expected: int, seen: list[int]):
    """The explorers once there are at least ``expected``, each shows an image, and their number
    has held for a second."""
    found = _explorers(driver)
    if len(found) < expected or not all(_digest(driver, e) for e in found):
        return None
    seen.append(len(found))
    steady = len(seen) >= 5 and len(set(seen[-5:])) == 1
    return found if steady else None


def _move_one_control(driver, explorer) -> str:
    """Moves the first control a learner would reach for; returns what it did."""
    handles = explorer.find_elements(By.CSS_SELECTOR, ".widget-slider .noUi-handle")
    if handles:
        handle = handles[0]
        value = handle.get_attribute("aria-valuenow")
        at_max = value == handle.get_attribute("aria-valuemax")
        driver.execute_script("arguments[0].focus();", handle)
        handle.send_keys(Keys.ARROW_LEFT if at_max else Keys.ARROW_RIGHT)
        return f"slider one step {'left' if at_max else 'right'} from {value}"
    selects = explorer.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")
    if selects:
        select = Select(selects[0])
        current = select.first_selected_option.text
        other = next(o.text for o in select.options if o.text != current)
        select.select_by_visible_text(other)
        return f"dropdown {current!r} -> {other!r}"
    toggles = explorer.find_elements(By.CSS_SELECTOR,
                                     ".widget-toggle-buttons button:not(.mod-active)")
    if toggles:
        label = toggles[0].text
        toggles[0].click()
        return f"toggle button {label!r}"
    buttons = explorer.find_elements(By.CSS_SELECTOR, "button.widget-button")
    if buttons:
        label = buttons[0].text
        buttons[0].click()
        return f"button {label!r}"
    pytest.fail("explorer has no slider, dropdown, toggle buttons or button to move")


def _exercise_cells(driver) -> dict[str, int]:
    """Exercise name -> index of its stub cell: the code cell right before the cell that calls
    ``check(name, ...)`` (every notebook lays its exercises out so)."""
    cells = driver.execute_script(JS_SOURCES)
    stubs = {}
    for i, cell in enumerate(cells):
        found = re.search(r'check\("(\d\d\.\w+)"', cell["source"])
        if found and cell["type"] == "code" and i > 0 and cells[i - 1]["type"] == "code":
            stubs.setdefault(found.group(1), i - 1)
    return stubs


def _stub_name(driver, stub: int) -> str:
    """The name the stub cell defines (its ``def``), which the checker cell passes."""
    source = driver.execute_script(JS_SOURCES)[stub]["source"]
    return re.search(r"^def (\w+)", source, re.M).group(1)


def _try_an_answer(driver, stub: int, answer: str) -> dict:
    """As a learner: replace the stub cell's text by typing ``answer``, then Shift+Enter twice
    (the stub, then its checker); returns the checker cell's result once the kernel is idle, and
    what the stub cell printed (``stub_text``)."""
    indents = [len(line) - len(line.lstrip()) for line in answer.split("\n")]
    assert indents == sorted(indents), f"typed answers may not dedent (see LEARNER_TRIES): {answer}"
    before = driver.execute_script(JS_CELL_RESULT, stub + 1)["count"]
    editor = driver.execute_script(JS_SELECT_CELL, stub)
    editor.click()
    keys = ActionChains(driver)
    keys.key_down(Keys.CONTROL).send_keys("a").key_up(Keys.CONTROL)
    for number, line in enumerate(answer.split("\n")):
        keys.send_keys(Keys.ENTER if number else "", line.lstrip())  # the editor indents
    keys.key_down(Keys.SHIFT).send_keys(Keys.ENTER).send_keys(Keys.ENTER).key_up(Keys.SHIFT)
    keys.perform()

    def finished():
        result = driver.execute_script(JS_CELL_RESULT, stub + 1)
        idle = driver.execute_script(JS_KERNEL_STATUS) == "idle"
        return result if idle and result["count"] not in (None, before) else None

    result = _wait("the checker to run after typing an answer", RUN_TIMEOUT_S, finished)
    typed = driver.execute_script(JS_SOURCES)[stub]["source"]
    assert typed == answer, f"the editor holds {typed!r} after typing {answer!r}"
    return {**result, "stub_text": driver.execute_script(JS_CELL_RESULT, stub)["text"]}


def _console_errors(driver) -> list[str]:
    """Every console error since the page loaded (none is known to be harmless: none is skipped)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_notebook_runs_in_jupyterlab(notebook_name, lab, chromium, out_dir, summary):
    driver, stem = chromium, notebook_name.removesuffix(".ipynb")
    row = summary.setdefault(notebook_name, {})
    started = time.monotonic()
    try:
        driver.set_script_timeout(RUN_TIMEOUT_S)
        driver.get(f"{lab.url}/lab/tree/{notebook_name}?reset&token={lab.token}")
        opened = _wait("the notebook to open with an idle kernel", OPEN_TIMEOUT_S,
                       lambda: driver.execute_script(JS_PANEL))
        assert opened["path"] == notebook_name

        state = driver.execute_async_script(JS_OPEN_STATE, SETTLE_S)
        assert "error" not in state, state
        row["open_s"] = round(time.monotonic() - started, 1)
        row["clean_on_open"] = not (state["dirty"] or state["tab_dirty"])
        if not row["clean_on_open"]:
            saved = json.loads(lab.api("GET", f"/api/contents/{notebook_name}"))["content"]
            changed = {key: {"saved": saved["metadata"].get(key), "now": state["metadata"].get(key)}
                       for key in saved["metadata"].keys() | state["metadata"].keys()
                       if saved["metadata"].get(key) != state["metadata"].get(key)}
            pytest.fail(f"JupyterLab marks the notebook modified on open; metadata it changed: "
                        f"{changed or 'none (something else changed)'}")
        row["saved_widget_outputs"] = driver.execute_script(JS_SAVED_WIDGET_OUTPUTS, WIDGET_VIEW)
        saved_explorers = [o for o in row["saved_widget_outputs"] if "image/png" in o["mime_types"]]
        unseen = [o for o in saved_explorers if o["shown_as"] != "image/png"]
        assert not unseen, f"saved explorer outputs not shown as their PNG before running: {unseen}"

        run_started = time.monotonic()
        result = driver.execute_async_script(JS_RUN_ALL)
        assert result.get("ok") is not None, f"Run All failed: {result}"
        _wait("the kernel to be idle after Run All", RUN_TIMEOUT_S,
              lambda: driver.execute_script(JS_KERNEL_STATUS) == "idle" or None)
        row["run_s"] = round(time.monotonic() - run_started, 1)

        cells = [c for c in driver.execute_script(JS_CELLS) if c["source"].strip()]
        row["code_cells"] = len(cells)
        row["cells_run"] = sum(c["execution_count"] is not None for c in cells)
        row["stderr"] = [text for c in cells for text in c["stderr"]]
        not_run = [c["source"][:80] for c in cells if c["execution_count"] is None]
        errors = [e for c in cells for e in c["errors"]]
        # the model's stderr text and what the page shows on stderr (an error output included)
        bad_stderr = sorted({text[:300] for c in cells for text in c["stderr"] + c["stderr_shown"]
                             if any(word in text for word in ("Traceback", "Error", "Warning"))})
        assert not errors, f"error outputs: {errors}"
        assert not bad_stderr, f"stderr with a traceback, error or warning: {bad_stderr}"
        assert not not_run, f"cells that did not run: {not_run}"

        render_started, counts = time.monotonic(), []
        explorers = _wait("the explorers to render their figures", RENDER_TIMEOUT_S,
                          lambda: _rendered_explorers(driver, len(saved_explorers), counts))
        assert explorers, "the notebook has no explorer (an element of class kvlab-explorer)"
        assert len(explorers) == len(saved_explorers), (
            f"{len(explorers)} live explorers, but {len(saved_explorers)} saved explorer outputs "
            "(a widget view with a PNG): rerun and save the notebook")
        row["render_s"] = round(time.monotonic() - render_started, 1)
        row["explorers_found"], row["explorers_moved"], row["moves"] = len(explorers), 0, []
        for k, explorer in enumerate(explorers):
            controls = explorer.find_elements(By.CSS_SELECTOR, CONTROLS)
            assert controls, f"explorer {k} shows no controls"
            driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", explorer)
            before = _digest(driver, explorer)
            move_started = time.monotonic()
            move = _move_one_control(driver, explorer)
            _wait(f"explorer {k}'s figure to change after {move}", REDRAW_TIMEOUT_S,
                  lambda: (_digest(driver, explorer) or before) != before or None)
            row["moves"].append({"explorer": k, "controls": len(controls), "move": move,
                                 "redraw_s": round(time.monotonic() - move_started, 2)})
            row["explorers_moved"] += 1
            explorer.screenshot(str(out_dir / f"{stem}.explorer{k}.png"))

        stubs = _exercise_cells(driver)
        tries = LEARNER_TRIES.get(stem)
        if tries is None and stubs:
            first = min(stubs, key=stubs.get)
            tries = [(first, f'{_stub_name(driver, stubs[first])} = solution("{first}")',
                      [f"✓ {first}"])]
        row["learner_tries"] = []
        for name, answer, expected in tries or []:
            assert name in stubs, f"no stub cell followed by check({name!r}, ...) in {stem}"
            tried = time.monotonic()
            result = _try_an_answer(driver, stubs[name], answer)
            shown = " ".join([result["stub_text"], result["text"], *result["mimes"]])
            missing = [part for part in expected if part not in shown]
            assert not missing, f"after typing {answer!r}, the checker showed {shown[:600]!r}"
            row["learner_tries"].append({"exercise": name, "typed": answer,
                                         "verdict": result["text"].splitlines()[0],
                                         "figures": result["mimes"].count("image/png"),
                                         "s": round(time.monotonic() - tried, 1)})

        if explorers:
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'});", explorers[0])
        row["console_errors"] = _console_errors(driver)
        assert not row["console_errors"], f"browser console errors: {row['console_errors']}"
    finally:
        driver.save_screenshot(str(out_dir / f"{stem}.png"))
        row["total_s"] = round(time.monotonic() - started, 1)
        lab.shut_down_kernels()
