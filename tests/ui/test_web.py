"""`medtune ui` end to end: a real server process, a tiny model, and headless Chromium filling the form.

Chromium is Debian's (`make browser` installs it); the test is skipped where it is absent.
Screenshots land in the test's tmp folder (`aria.png`, `chat.png`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from medtune.tasks.aria_rules import CONFIDENCES, LABELS

CHROMIUM = os.environ.get("MEDTUNE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: run `make browser`"),
    pytest.mark.slow,  # a server process and a browser: ~30 s for the module
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui_url(served_model_dir: Path) -> Iterator[str]:
    # The tiny model after a short SFT on aria-like answers: it writes visible text, not blank lines.
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "medtune.cli", "ui", "--model", str(served_model_dir), "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"medtune ui did not start: {proc.stderr.read()[-3000:]}")
            time.sleep(0.3)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def page(ui_url: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(ui_url)
        yield page
        browser.close()


def set_number(page, field: str, value: float) -> None:
    box = page.locator(f"#aria-{field} input")
    box.fill(str(value))
    box.press("Tab")  # Gradio commits a number on blur


def test_aria_form_gives_a_diagnosis_card(page, tmp_path: Path) -> None:
    values = {
        "inclinaison_tronc": 4.0,
        "valgus_genou": 13.5,
        "adduction_hanche": 6.0,
        "longueur_foulée": 1.2,
        "pronation_pied": 3.0,
        "heel_strike_index": 0.3,
        "dorsiflexion_max": 10.0,
    }
    for field, value in values.items():
        set_number(page, field, value)
    page.click("#aria-submit")
    pathology = page.locator("#aria-card .aria-pathology")
    pathology.wait_for()
    # An untrained model still answers within the schema: a known pathology and confidence.
    assert pathology.inner_text().strip() in LABELS
    assert page.locator("#aria-card .aria-confidence").inner_text().strip() in CONFIDENCES
    report = page.locator("#aria-report")
    report.get_by_text("Writing the report").wait_for(state="detached")
    assert report.inner_text().strip() and "Error" not in report.inner_text()
    page.screenshot(path=str(tmp_path / "aria.png"), full_page=True)


def test_an_impossible_measurement_is_named_on_the_card(page) -> None:
    set_number(page, "heel_strike_index", 3.0)
    page.click("#aria-submit")
    card = page.locator("#aria-card .aria-error")
    card.wait_for()
    assert "heel_strike_index" in card.inner_text() and "plausible range" in card.inner_text()
    set_number(page, "heel_strike_index", 0.3)


def test_headache_tab_answers_a_case(page) -> None:
    page.get_by_role("tab", name="Headache assistant").click()
    page.locator("#headache-case textarea").fill(
        "Patiente de 34 ans, céphalées depuis 3 jours, pas de fièvre."
    )
    page.click("#headache-submit")
    answer = page.locator("#headache-answer")
    page.wait_for_function("document.querySelector('#headache-answer').innerText.trim().length > 0")
    assert "Error" not in answer.inner_text()


def test_chat_tab_answers(page, tmp_path: Path) -> None:
    page.get_by_role("tab", name="Chat").click()
    page.locator("#chat-message textarea").fill("Bonjour")
    page.locator("#chat-message textarea").press("Enter")
    bubbles = page.locator("#chat-history .message")
    bubbles.nth(1).wait_for()
    assert "Bonjour" in bubbles.nth(0).inner_text()
    page.wait_for_function(
        "document.querySelectorAll('#chat-history .message')[1].innerText.trim().length > 0"
    )
    assert "Error" not in bubbles.nth(1).inner_text()
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)
