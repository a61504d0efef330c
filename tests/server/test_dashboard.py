"""The dashboard in a real browser: headless Chromium, driven by Selenium, against a real
`corral serve` on a free port. Chromium and chromedriver come from Debian (`make test`
installs them); without them these tests fail, saying how to get them."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

HERE = Path(__file__).parent
CORRAL = [sys.executable, "-m", "corral"]
INSTALL = ("install them with `DEBIAN_FRONTEND=noninteractive apt-get install -y chromium "
           "chromium-driver` (make test does it)")


@dataclass
class Served:
    url: str
    key: str
    log: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module", params=["embedded", "temporal"])
def served(request: pytest.FixtureRequest,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """`corral serve` with the dashboard's workflows, and an API key of a tenant of its own; on
    the embedded engine, or on Temporal (the suite's dev server, whose namespace the other
    tests' servers share: the tenant keeps their runs out of this dashboard)."""
    engine: list[str] = []
    if request.param == "temporal":
        address = request.getfixturevalue("temporal_server").address
        engine = ["--engine", f"temporal://{address}?task_queue=dash-{uuid.uuid4().hex[:8]}"]
    folder = tmp_path_factory.mktemp("dashboard")
    db, log, port = folder / "corral.db", folder / "serve.log", _free_port()
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_CONFIG"}
    env["CORRAL_DB"] = str(db)
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*CORRAL, "serve", "--port", str(port), "--db", str(db),
             "--workflows", str(HERE / "dashboard_workflows.py"), *engine],
            env=env, cwd=folder, stdout=out, stderr=subprocess.STDOUT)
    try:
        _until(lambda: _answers(url + "/healthz") == 200, 60,
               lambda: f"corral serve did not come up: {log.read_text()}", process)
        # `corral keys create` prints the key once; the server reloads keys every 2 s
        created = subprocess.run([*CORRAL, "keys", "create", "--tenant",
                                  f"dash-{uuid.uuid4().hex[:8]}", "--json"],
                                 env=env, cwd=folder, capture_output=True, text=True)
        assert created.returncode == 0, created.stderr
        key = json.loads(created.stdout)["key"]
        _until(lambda: _answers(url + "/v1/runs", key) == 200, 30,
               lambda: "the server never accepted the new key", process)
        yield Served(url, key, log)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _answers(url: str, key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        return httpx.get(url, headers=headers, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def _until(done: Callable[[], bool], seconds: float, why: Callable[[], str],
           process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + seconds
    while not done():
        assert process.poll() is None, why()
        assert time.monotonic() < deadline, why()
        time.sleep(0.05)


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium with its own fresh profile (so its own localStorage)."""
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
    driver_path = shutil.which("chromedriver")
    if chromium is None or driver_path is None:
        missing = " and ".join(n for n, p in (("chromium", chromium),
                                               ("chromedriver", driver_path)) if p is None)
        pytest.fail(f"the dashboard tests need {missing}: {INSTALL}", pytrace=False)
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the dashboard tests need selenium: pip install -e '.[dev]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium  # (and the driver's path below: no Selenium Manager)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-default-apps"):
        options.add_argument(flag)
    # every request the page makes, from Chrome's DevTools log
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: Any, served: Served, condition: Callable[[Any], Any], what: str,
          seconds: float = 30) -> Any:
    """Wait on the page's DOM; on a timeout, say what the page and the server said."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.1).until(condition)
    except TimeoutException:
        notices = driver.execute_script(
            "return ['auth-message', 'error-message'].map(id => document.getElementById(id))"
            ".filter(n => n && !n.hidden).map(n => n.textContent).join(' | ')")
        raise AssertionError(f"timed out waiting for {what}; page says: {notices or '-'}; "
                             f"server log: {served.log.read_text()[-2000:]}") from None


def _css(selector: str) -> Callable[[Any], Any]:
    from selenium.webdriver.common.by import By

    def find(driver: Any) -> Any:
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        return found[0] if found and found[0].is_displayed() else False
    return find


def _text(selector: str, text: str) -> Callable[[Any], bool]:
    def check(driver: Any) -> bool:
        element = _css(selector)(driver)
        try:
            return bool(element) and element.text.strip() == text
        except Exception:  # replaced by a refresh between finding and reading it
            return False
    return check


def _use_key(driver: Any, served: Served, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(served.url + "/")  # redirected to /dashboard/
    _wait(driver, served, _css("#api-key"), "the key field")
    driver.execute_script("performance.setResourceTimingBufferSize(100000)")
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    field.send_keys(key)
    driver.find_element(By.ID, "key-save").click()


def test_approve_a_run_and_see_its_trace(browser: Any, served: Served, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    with httpx.Client(base_url=served.url, timeout=30,
                      headers={"Authorization": f"Bearer {served.key}"}) as client:
        submitted = client.post("/v1/runs", json={"workflow": "approval",
                                                  "input": {"service": "billing"}})
        assert submitted.status_code == 201, submitted.text
    run_id = submitted.json()["id"]
    row = f'#runs-body tr[data-run="{run_id}"]'

    _use_key(browser, served, served.key)
    assert urlsplit(browser.current_url).path == "/dashboard/"
    _wait(browser, served, _text(f"{row} [data-testid=run-status]", "waiting"),
          "the run listed as waiting")
    assert browser.find_element(By.CSS_SELECTOR, f"{row} [data-testid=run-workflow]").text \
        == "approval"

    browser.find_element(By.CSS_SELECTOR, "[data-testid=nav-approvals]").click()
    approve = _wait(browser, served,
                    _css(f'button[data-action=approve][data-run="{run_id}"]'), "Approve")
    assert browser.find_element(
        By.CSS_SELECTOR, f'button[data-action=deny][data-run="{run_id}"]').is_enabled()
    approve.click()
    _wait(browser, served, lambda d: not d.find_elements(
        By.CSS_SELECTOR, f'[data-testid=approval][data-run="{run_id}"]'),
        "the approval to leave the list")

    browser.find_element(By.CSS_SELECTOR, "[data-testid=nav-runs]").click()
    _wait(browser, served, _text(f"{row} [data-testid=run-status]", "completed"),
          "the run listed as completed")
    browser.find_element(By.CSS_SELECTOR, row).click()

    root = '.wf-row[data-span-name="invoke_workflow approval"]'
    wait = '.wf-row[data-span-name="wait_for approval"]'
    _wait(browser, served, _css(f"{wait} [data-testid=span-bar]"), "the wait's bar")
    _wait(browser, served, _text("#run-header [data-testid=run-status]", "completed"),
          "the detail's status")
    assert browser.find_element(By.CSS_SELECTOR, "[data-testid=run-id]").text == run_id
    assert not browser.find_elements(By.ID, "cancel-run")  # (it has ended)
    top = browser.find_element(By.CSS_SELECTOR, root)
    assert (top.get_attribute("data-depth"), top.get_attribute("data-component")) == \
        ("0", "workflow")
    waited = browser.find_element(By.CSS_SELECTOR, wait)
    assert (waited.get_attribute("data-depth"), waited.get_attribute("data-component")) == \
        ("1", "waiting")
    root_bar = top.find_element(By.CSS_SELECTOR, "[data-testid=span-bar]")
    wait_bar = waited.find_element(By.CSS_SELECTOR, "[data-testid=span-bar]")
    assert root_bar.size["width"] > 0 and wait_bar.size["width"] > 0
    assert wait_bar.location["x"] >= root_bar.location["x"]  # positioned inside the root's
    assert wait_bar.location["x"] + wait_bar.size["width"] <= \
        root_bar.location["x"] + root_bar.size["width"] + 1
    # the agent's model and tool calls, one level further in
    components = {(r.get_attribute("data-component"), r.get_attribute("data-depth"))
                  for r in browser.find_elements(By.CSS_SELECTOR, "[data-testid=span-row]")}
    assert {("agent", "1"), ("model", "2"), ("tool", "2"), ("steps", "1")} <= components

    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000

    # every request went to this server: none to a CDN, a font host or anywhere else
    urls = browser.execute_script(
        "return [location.href, ...performance.getEntriesByType('resource').map(e => e.name)]")
    urls += [message["params"]["request"]["url"] for message in
             (json.loads(entry["message"])["message"] for entry in browser.get_log("performance"))
             if message["method"] == "Network.requestWillBeSent"]
    fetched = [u for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss")]
    assert any("/dashboard/app.js" in u for u in fetched)
    assert any("/v1/runs" in u for u in fetched)
    elsewhere = sorted({u for u in fetched if urlsplit(u).hostname != "127.0.0.1"})
    assert not elsewhere, f"the dashboard fetched from other hosts: {elsewhere}"
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def test_a_wrong_key_says_how_to_get_one(browser: Any, served: Served) -> None:
    from selenium.webdriver.common.by import By

    browser.get(served.url + "/dashboard/")
    notice = _wait(browser, served, _css("#auth-message"), "the no-key notice")
    assert "enter an api key (corral keys create" in notice.text.lower()

    _use_key(browser, served, "sk-corral-not-a-key")
    _wait(browser, served, lambda d: "not authorized" in
          d.find_element(By.ID, "auth-message").text.lower(), "the 401 notice")
    text = browser.find_element(By.ID, "auth-message").text.lower()
    assert "enter an api key (corral keys create" in text, text
    assert not browser.find_elements(By.CSS_SELECTOR, "#runs-body tr")
    assert browser.execute_script("return localStorage.getItem('corral.apiKey')") == \
        "sk-corral-not-a-key"
