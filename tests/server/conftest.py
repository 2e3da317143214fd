"""Fixtures of the tests that drive the page in Chromium (`browser.py`): one Playwright and one
English browser per module, and a fresh page on the module's own `base_url` (each such module
serves its own models folder) that fails the test if the page threw."""

from __future__ import annotations

import pytest

from .browser import chromium, open_page


@pytest.fixture(scope="module")
def playwright():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        yield pw


@pytest.fixture(scope="module")
def browser(playwright):
    # English whatever the machine's LANG says: the page follows the browser's language
    with chromium(playwright, "en-US") as ctx:
        yield ctx


@pytest.fixture
def page(browser, base_url):
    page, errors = open_page(browser, base_url)
    yield page
    page.close()
    assert not errors, errors
