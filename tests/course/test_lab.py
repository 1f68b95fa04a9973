"""The course in JupyterLab, in a real browser: every release and solution notebook opens, its kernel starts, and its
setup cell and first check cell run through the UI (click the cell, Shift+Enter), as a student would run them.

A real JupyterLab server (the one in .venv) on a free localhost port with a token, serving a temporary copy of
notebooks/ and solutions/ (nothing in the repository is touched), with its own Jupyter config, data, runtime,
settings and workspace folders; Debian's chromium, headless, driven by Selenium through Debian's chromedriver (no
browser or driver is downloaded). A release notebook passes when the only error shown is the NotImplementedError of
the empty stub under its first check cell; a solution notebook must show no error at all. One screenshot per
notebook goes to the test's temporary folder (docs/ holds copies of two of them, see README "What a student sees").

Needs the Debian packages chromium and chromium-driver (``make browser``, run by ``make test`` where it is root with
apt) and selenium (requirements/course.lock); without them the tests skip and say so.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "notebooks").glob("*/*.ipynb")) + sorted(
    p.relative_to(ROOT).as_posix() for p in (ROOT / "solutions").glob("*/*.ipynb"))
SERVER_START_S = 90  # JupyterLab up and answering
RENDER_S = 60  # the notebook's cells in the page
KERNEL_START_S = 90  # the kernel idle after opening the notebook
CELL_S = 150  # one cell (the setup cell imports torch, transformers and peftlab; two shared cores in CI)
# The stub of a release notebook raises NotImplementedError where the student's code goes; a check cell that calls
# it reports that as peftlab.checks.core.call does: an AssertionError saying the function is not implemented yet.
STUB_MESSAGE = re.compile(r"is not implemented yet \(it raised NotImplementedError\)")


def _is_stub_error(ename: str, evalue: str) -> bool:
    return ename == "NotImplementedError" or (ename == "AssertionError" and bool(STUB_MESSAGE.search(evalue)))

pytestmark = pytest.mark.slow


def _executable(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name) or (name if os.path.isabs(name) and os.access(name, os.X_OK) else None)
        if found:
            return found
    return None


CHROMIUM = _executable("chromium", "/usr/lib/chromium/chromium")
CHROMEDRIVER = _executable("chromedriver", "/usr/lib/chromium/chromedriver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_cells(nb) -> tuple[int, int]:
    """Indices of the setup cell and of the first check cell (nbgrader's ``grade: true``) after it."""
    ids = [c.metadata.get("nbgrader", {}).get("grade_id") for c in nb.cells]
    if "setup" not in ids:
        raise AssertionError("the notebook has no cell with grade_id 'setup'")
    setup = ids.index("setup")
    for i in range(setup + 1, len(nb.cells)):
        if nb.cells[i].cell_type == "code" and nb.cells[i].metadata.get("nbgrader", {}).get("grade"):
            return setup, i
    raise AssertionError("the notebook has no check cell (nbgrader grade: true) after its setup cell")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server on a copy of notebooks/ and solutions/: (base url, token, its root folder)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing = " and ".join(n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if p is None)
        pytest.skip(f"{missing} not found: install Debian's chromium and chromium-driver (`make browser`, as root "
                    "with apt) to run the JupyterLab browser test")
    pytest.importorskip("selenium", reason="selenium is not installed (it comes from requirements/course.lock)")
    pytest.importorskip("jupyterlab", reason="jupyterlab is not installed (it comes from requirements/course.lock)")
    base = tmp_path_factory.mktemp("lab")
    root = base / "root"
    for part in ("notebooks", "solutions"):
        shutil.copytree(ROOT / part, root / part, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JUPYTER", "IPYTHON"))}
    for var, sub in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"), ("JUPYTER_RUNTIME_DIR", "run"),
                     ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"),
                     ("IPYTHONDIR", "ipython")):
        (base / sub).mkdir()
        env[var] = str(base / sub)
    env["JUPYTER_PLATFORM_DIRS"] = "1"
    # No news or update check: they would reach the network and pop up a notification over the notebook.
    notification = base / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (base / "config" / "jupyter_lab_config.json").write_text(json.dumps(
        {"LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate"}}))
    token, port = uuid.uuid4().hex, _free_port()
    log = open(base / "server.log", "w")  # noqa: SIM115 -- closed at teardown
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
         f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={root}"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            log.close()
            raise AssertionError(f"JupyterLab did not start on port {port}:\n{(base / 'server.log').read_text()}")
        time.sleep(0.5)
    try:
        yield url, token, root
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


@pytest.fixture(scope="module")
def browser(lab):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver or browser online
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--window-size=1440,1000", "--hide-scrollbars", "--disable-extensions",
                f"--user-data-dir={lab[2].parent / 'chromium-profile'}"):
        options.add_argument(arg)
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    except Exception as e:  # a broken chromium install: say why instead of a page of stack trace
        pytest.skip(f"chromium {CHROMIUM} with {CHROMEDRIVER} does not start: {type(e).__name__}: {e}".splitlines()[0])
    driver.set_page_load_timeout(RENDER_S)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    return tmp_path_factory.mktemp("lab-screenshots")


def _api(lab, method: str, path: str):
    url, token, _ = lab
    req = urllib.request.Request(f"{url}{path}", method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        body = r.read()
    return json.loads(body) if body else None


def _wait(driver, what: str, timeout: float, condition):
    """``condition(driver)`` truthy within ``timeout`` seconds, else fail naming ``what`` (and any dialog shown)."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25,
                             ignored_exceptions=(StaleElementReferenceException,)).until(condition)
    except TimeoutException:
        dialogs = [d.text for d in driver.find_elements("css selector", ".jp-Dialog")]
        shown = f"; dialog shown: {dialogs}" if dialogs else ""
        raise AssertionError(f"{what}: not within {timeout:.0f} s{shown}") from None


def _status(panel) -> str | None:
    found = panel.find_elements("css selector", ".jp-Notebook-ExecutionIndicator")
    return found[0].get_attribute("data-status") if found else None


def _shown_errors(cell) -> list[str]:
    """The exception names of the tracebacks rendered in ``cell``'s output area (what the student sees)."""
    names = []
    for out in cell.find_elements("css selector", ".jp-OutputArea-output"):
        text = out.text
        if "Traceback" not in text:
            continue
        # IPython's traceback: "NameError    Traceback (most recent call last)" ... and "NameError: message" last.
        m = re.search(r"^(\w[\w.]*)\s+Traceback \(most recent call last\)", text, re.M) or re.search(
            r"^(\w[\w.]*(?:Error|Exception|Exit|Interrupt))\b", text, re.M)
        names.append(m.group(1) if m else text.strip().splitlines()[-1])
    return names


@pytest.mark.parametrize("path", NOTEBOOKS)
def test_notebook_runs_in_jupyterlab(lab, browser, screenshots, path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    url, token, root = lab
    release = path.startswith("notebooks/")
    nb = nbformat.read(root / path, as_version=4)
    setup, check = _first_cells(nb)
    workspace = re.sub(r"\W", "-", path)
    t0 = time.monotonic()
    browser.get(f"{url}/lab/workspaces/{workspace}/tree/{path}?reset&token={token}")

    # renders: every cell in the page, the title's markdown rendered
    panel = _wait(browser, f"{path}: the notebook panel", RENDER_S, lambda d: next(iter(d.find_elements(
        "css selector", ".jp-NotebookPanel:not(.lm-mod-hidden)")), None))
    _wait(browser, f"{path}: all {len(nb.cells)} cells rendered", RENDER_S,
          lambda d: len(panel.find_elements("css selector", ".jp-Notebook .jp-Cell")) == len(nb.cells))
    cells = panel.find_elements("css selector", ".jp-Notebook .jp-Cell")
    title = re.sub(r"[`*_$]", "", nb.cells[0].source.splitlines()[0].lstrip("# ")).strip()  # as rendered
    _wait(browser, f"{path}: the title '{title}' rendered", RENDER_S,
          lambda d: title in cells[0].find_element("css selector", ".jp-RenderedMarkdown").text)

    # the kernel starts: the toolbar's kernel name, and the execution indicator idle
    _wait(browser, f"{path}: the kernel started (execution indicator idle)", KERNEL_START_S,
          lambda d: _status(panel) == "idle")
    kernel_name = panel.find_element("css selector", ".jp-KernelName").text
    assert kernel_name == nb.metadata.kernelspec.display_name, f"{path}: kernel {kernel_name!r}"
    t_kernel = time.monotonic() - t0

    # run the setup cell and the cells up to the first check cell: click the setup cell's prompt, then Shift+Enter
    cells[setup].find_element("css selector", ".jp-InputArea-prompt").click()
    _wait(browser, f"{path}: the setup cell selected", 10,
          lambda d: "jp-mod-active" in cells[setup].get_attribute("class"))
    ran = []
    for i in range(setup, check + 1):
        assert "jp-mod-active" in cells[i].get_attribute("class"), f"{path}: cell {i} should be the active one"
        ActionChains(browser).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        if nb.cells[i].cell_type != "code":
            continue
        ran.append(i)
        prompt = cells[i].find_element("css selector", ".jp-InputArea-prompt")
        _wait(browser, f"{path}: cell {i} ({nb.cells[i].metadata.get('nbgrader', {}).get('grade_id')}) executed",
              CELL_S, lambda d, p=prompt: re.fullmatch(r"\[\d+\]:", p.text.strip()))
        if _shown_errors(cells[i]):  # the kernel stops the queue after an error: so does the student
            break
    _wait(browser, f"{path}: the kernel idle after the cells ran", CELL_S, lambda d: _status(panel) == "idle")

    shown = {i: _shown_errors(cells[i]) for i in ran}
    setup_out = cells[setup].find_element("css selector", ".jp-OutputArea").text
    # the screenshot: the first check cell and what it printed, as a student sees it after running the first cells
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", cells[check])
    time.sleep(0.5)
    shot = screenshots / (path.replace("/", "__").removesuffix(".ipynb") + ".png")
    browser.save_screenshot(str(shot))

    # what the UI saved agrees with what it showed (Ctrl+S, then the file on disk)
    before = (root / path).stat().st_mtime_ns
    ActionChains(browser).key_down(Keys.CONTROL).send_keys("s").key_up(Keys.CONTROL).perform()
    _wait(browser, f"{path}: saved from the UI", 30, lambda d: (root / path).stat().st_mtime_ns != before)
    saved = nbformat.read(root / path, as_version=4)
    saved_errors = {i: [(o.ename, o.evalue) for o in saved.cells[i].get("outputs", []) if o.output_type == "error"]
                    for i in ran}

    # done with this notebook: leave the page and shut its kernel down before the next one starts
    browser.get("about:blank")
    for session in _api(lab, "GET", "/api/sessions"):
        _api(lab, "DELETE", f"/api/sessions/{session['id']}")
    elapsed = time.monotonic() - t0
    print(f"{path}: kernel idle after {t_kernel:.1f} s, cells {ran} in {elapsed:.1f} s; screenshot {shot}")

    assert "peftlab" in setup_out and "torch" in setup_out, f"{path}: the setup cell printed {setup_out!r}"
    assert shown == {i: [e for e, _ in errs] for i, errs in saved_errors.items()}, (
        f"{path}: tracebacks shown {shown} but saved {saved_errors}")
    unexpected = {i: errs for i, errs in saved_errors.items()
                  if errs and not (release and i == check and len(errs) == 1 and _is_stub_error(*errs[0]))}
    assert not unexpected, (f"{path}: errors in cells {unexpected} (cell -> [(exception, message)]); "
                            + ("only the first check cell may fail, saying the empty stub is not implemented"
                               if release else "a solution must run without error"))
    assert ran[-1] == check, f"{path}: stopped at cell {ran[-1]} before the check cell {check}"
    if release:
        assert len(saved_errors[check]) == 1 and _is_stub_error(*saved_errors[check][0]), (
            f"{path}: the empty stub should fail its check as not implemented, got {saved_errors[check]}")
