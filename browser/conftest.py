"""Set-up for ``make test-browser``: a headless JupyterLab over a copy of the notebooks, and
headless Chromium driven through Debian's chromedriver.

The notebooks are copied into a temporary folder first, so that running them (and JupyterLab's
autosave) never writes outputs into the repository. The server gets its own empty config,
runtime, settings and workspace folders, so nothing of the user's JupyterLab set-up leaks in.

The kernel sees the environment ``make lab`` gives a learner: the variables that the repo-root
conftest.py sets for ``make test`` (the CUDA simulator switch, the exercise solutions swap) are
removed, so kvlab picks its CUDA mode itself and the exercise stubs stay stubs.
"""
import json
import os
import shutil
from pathlib import Path

import pytest

from kvlab.headless_lab import Lab, running_lab

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Set by the repo-root conftest.py for `make test`; a learner's `make lab` has neither.
TEST_ONLY_VARIABLES = ("NUMBA_ENABLE_CUDASIM", "KVLAB_SOLUTIONS")
SERVER_START_S = 120


def pytest_addoption(parser):
    parser.addoption("--notebook-dir", default=str(ROOT / "notebooks"),
                     help="folder whose *.ipynb are opened and run (default: notebooks/)")
    parser.addoption("--browser-out", default=str(ROOT / "build" / "browser"),
                     help="where screenshots and the summary go (default: build/browser/)")


def pytest_generate_tests(metafunc):
    if "notebook_name" in metafunc.fixturenames:
        folder = Path(metafunc.config.getoption("--notebook-dir"))
        names = sorted(p.name for p in folder.glob("*.ipynb"))
        metafunc.parametrize("notebook_name", names)


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


@pytest.fixture(scope="session")
def out_dir(pytestconfig) -> Path:
    out = Path(pytestconfig.getoption("--browser-out"))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


@pytest.fixture(scope="session")
def lab(pytestconfig, tmp_path_factory) -> Lab:
    home = tmp_path_factory.mktemp("jupyter")
    root = home / "notebooks"
    shutil.copytree(pytestconfig.getoption("--notebook-dir"), root,
                    ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    # No news feed, no update check: the machine may have no internet, and a failed fetch
    # would show up as a console error. An empty notebook-signature store: every notebook opens
    # untrusted, as in a fresh clone, whatever this machine's user once ran and saved.
    _write_json(home / "config" / "jupyter_server_config.json",
                {"LabApp": {"news_url": None,
                            "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"},
                 "NotebookNotary": {"db_file": ":memory:"}})
    _write_json(home / "settings" / "@jupyterlab" / "apputils-extension"
                / "notification.jupyterlab-settings",
                {"fetchNews": "false", "checkForUpdates": False})
    # window.jupyterapp: the test asks the app (not the pixels) whether a notebook is dirty,
    # which cells ran, and runs the same command as the Run menu's "Run All Cells".
    env = {k: v for k, v in os.environ.items() if k not in TEST_ONLY_VARIABLES}
    env |= {"JUPYTER_CONFIG_DIR": str(home / "config"),
            "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    try:
        with running_lab(root, env, home / "server.log", SERVER_START_S,
                         extra_args=["--LabApp.expose_app_in_browser=True"]) as running:
            yield running
    except RuntimeError as error:  # it did not start: the log says why
        pytest.fail(str(error))


@pytest.fixture
def chromium(tmp_path):
    """A fresh headless Chromium (own profile, own console log) for one notebook.

    ``Service(executable_path=...)`` and ``binary_location`` name Debian's driver and browser, so
    Selenium Manager (which would download them) never runs.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for needed in (CHROMIUM, CHROMEDRIVER):
        if not needed.is_file():
            pytest.fail(f"{needed} is missing: `make test-browser` installs chromium and "
                        "chromium-driver with apt-get")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def summary(out_dir):
    """Per-notebook results, written to build/browser/summary.{json,md} when the session ends."""
    rows: dict[str, dict] = {}
    yield rows
    (out_dir / "summary.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| notebook | opened clean | code cells run | explorers found / moved | what moved "
             "(redraw s) | answers typed: the checker's verdict | console errors | open s | "
             "run s | total s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        moves = "; ".join(f"{m['move']} ({m['redraw_s']})" for m in row.get("moves", []))
        tries = "; ".join(f"{t['verdict'][:60]}" + (f" + {t['figures']} figure(s)"
                                                     if t["figures"] else "")
                          for t in row.get("learner_tries", []))
        lines.append(
            f"| {name} | {row.get('clean_on_open', '-')} | {row.get('cells_run', '-')}"
            f"/{row.get('code_cells', '-')} | {row.get('explorers_found', '-')} / "
            f"{row.get('explorers_moved', '-')} | {moves or '-'} | {tries or '-'} | "
            f"{len(row['console_errors']) if 'console_errors' in row else '-'} | "
            f"{row.get('open_s', '-')} | {row.get('run_s', '-')} | {row.get('total_s', '-')} |")
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
