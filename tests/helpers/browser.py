"""A real browser for the UI tests: Debian's ``chromium`` driven by the ``playwright`` package.

Playwright cannot download its own browsers here, so it launches the system chromium
(``executable_path=shutil.which("chromium")``) headless, with the flags a sandboxless
container needs. Without playwright or chromium the tests skip with the reason — or fail
under CI (``CI`` set), where they must run.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"browser tests need it under CI: {reason}")
    pytest.skip(reason)


def require_browser() -> str:
    """The chromium executable, after checking playwright imports (skips/fails otherwise)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        _unavailable(f"the playwright package is not installed ({exc}); pip install -e '.[dev]'")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        _unavailable("no chromium on PATH (Debian: apt-get install chromium)")
    return exe


@contextmanager
def browser_page(shots: Path, width: int = 1400, height: int = 1200):
    """A fresh page of a headless chromium; ``page.shot(name)`` saves ``shots/<name>.png``."""
    from playwright.sync_api import sync_playwright

    exe = require_browser()
    shots.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(30_000)

            def shot(name: str) -> Path:
                path = shots / f"{name}.png"
                page.screenshot(path=str(path), full_page=True)
                (shots / f"{name}.html").write_text(page.content())
                return path

            page.shot = shot
            yield page
        finally:
            browser.close()


def log_in(page, url: str, email: str, password: str) -> None:
    """Label Studio's login form."""
    page.goto(url + "/user/login/")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(lambda u: "/user/login" not in u)


def choice_box(page, label: str):
    """The checkbox of one ``<Choice>`` in Label Studio's labelling view."""
    return page.locator(f"input.ant-checkbox-input[name='{label}']")


def ticked(page, labels) -> list[str]:
    return [n for n in labels if choice_box(page, n).is_checked()]
