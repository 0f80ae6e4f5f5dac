"""The playground page in a real headless browser: Playwright driving the system's Chromium (Playwright's own
browser download is not used). Skipped when no Chromium is installed; `.ci/run` installs it."""

from __future__ import annotations

import re
import shutil

import pytest

from blackmamba import generate

from .conftest import INTERVAL, start_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)"),
]
PROMPT = "the old river"


@pytest.fixture(scope="module")
def server(model_dir):
    srv = start_server(model_dir)
    yield srv
    srv.stop()


def test_playground_streams_the_greedy_completion_and_shows_speed(server, model, tokenizer):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    want = tokenizer.decode(
        generate(model, [tokenizer.encode(PROMPT).ids], 12, eos_token_id=0, prefill_chunk_size=INTERVAL)[0]
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(60_000)
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('tiny')")
            page.fill("#prompt", PROMPT)
            page.fill("#max_tokens", "12")
            page.fill("#temperature", "0")
            page.click("#generate")
            page.wait_for_function("['done', 'stopped'].includes(document.getElementById('status').textContent) || "
                                   "document.getElementById('status').textContent.startsWith('error')")  # fmt: skip
            assert page.inner_text("#status") == "done"
            assert page.text_content("#completion") == want
            assert re.fullmatch(r"\d+ ms", page.inner_text("#ttft"))
            assert float(page.inner_text("#tps")) > 0
            assert 1 <= int(page.inner_text("#ntokens")) <= 12
        finally:
            browser.close()
