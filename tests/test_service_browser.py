"""The editor page in a real headless browser: Debian's chromium driven by Playwright.

Load the page, give a field an invalid value, see the error beside it, fix it, download the JSON and
validate that file with the CLI; open a file with a misspelled key and remove it. `make test` installs
chromium; without it this test fails (it never skips: a browser check that does not run checks nothing).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from conftest import run_cli
from playwright.sync_api import BrowserContext, expect, sync_playwright
from test_service import serve

from bioconf.schema import load_config

CHROMIUM = Path("/usr/bin/chromium")
# As root on a machine with no outside network: no sandbox, and no background calls to Google's hosts.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser(tmp_path) -> Iterator[BrowserContext]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "profile",  # a fresh user-data-dir
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            accept_downloads=True,
            viewport={"width": 1280, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


def test_edit_see_the_error_fix_it_download_and_validate_with_the_cli(browser, tmp_path):
    expect.set_options(timeout=20_000)  # a loaded CI machine; each wait ends as soon as it holds
    with serve() as url:
        page = browser.new_page()
        requests: list[str] = []
        page.on("request", lambda request: requests.append(request.url))
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        expect(page.locator("body")).to_have_attribute("data-ready", "true")

        # The form comes from the schema: groups in x-groups order, basic fields only until asked.
        legends = page.locator("fieldset > legend").all_inner_texts()
        assert legends[:3] == ["Architecture", "Attention", "Parallelism"]
        expect(page.locator("#help-num_layers")).to_contain_text("Number of transformer layers")
        advanced = page.locator('[data-field="rotary_base"]')
        expect(advanced).to_be_hidden()
        page.check("#advanced")
        expect(advanced).to_be_visible()
        page.uncheck("#advanced")

        page.fill("#field-num_layers", "2")
        page.fill("#field-hidden_size", "64")
        page.fill("#field-num_attention_heads", "4")
        page.select_option("#field-normalization", '"RMSNorm"')
        expect(page.locator("#status")).to_have_text(re.compile(r"^valid · sha256:[0-9a-f]{16}$"))

        # An invalid value: the service's message appears beside the field, and download is off.
        page.fill("#field-num_layers", "3.7")
        error = page.locator("#error-num_layers")
        expect(error).to_have_text("Input should be a valid integer (got 3.7)")
        expect(page.locator("#field-num_layers")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#download")).to_be_disabled()

        # A megatron rule: shown beside every field it involves.
        page.fill("#field-num_layers", "2")
        page.fill("#field-tensor_model_parallel_size", "3")
        expect(page.locator("#error-num_attention_heads")).to_contain_text(
            "divisible by tensor_model_parallel_size"
        )
        expect(page.locator("#error-tensor_model_parallel_size")).to_contain_text("divisible")
        expect(error).to_be_empty()

        page.fill("#field-tensor_model_parallel_size", "")
        expect(page.locator("#error-num_attention_heads")).to_be_empty()
        expect(page.locator("#download")).to_be_enabled()
        fingerprint = page.locator("#status").get_attribute("data-fingerprint")

        with page.expect_download() as download:
            page.click("#download")
        saved = tmp_path / download.value.suggested_filename
        download.value.save_as(saved)

        # Opening a file fills the form; a key the schema does not know is reported and can be removed.
        opened = tmp_path / "opened.json"
        opened.write_bytes(
            orjson.dumps({"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "hiden_dropout": 0.1})
        )
        page.set_input_files("#open", opened)
        expect(page.locator("#field-num_layers")).to_have_value("4")
        expect(page.locator("#field-normalization")).to_have_value("")
        unknown = page.locator("#messages li.error")
        expect(unknown).to_contain_text("unknown field 'hiden_dropout'; did you mean 'hidden_dropout'?")
        unknown.get_by_role("button", name="remove").click()
        expect(page.locator("#messages li.error")).to_have_count(0)
        expect(page.locator("#download")).to_be_enabled()

    assert saved.name == "model-config.json"
    assert orjson.loads(saved.read_bytes()) == {
        "hidden_size": 64,
        "normalization": "RMSNorm",
        "num_attention_heads": 4,
        "num_layers": 2,
    }
    result = run_cli("validate", str(saved), "--format", "json")
    assert result.returncode == 0, result.stdout
    assert orjson.loads(result.stdout)["files"][0]["fingerprint"] == fingerprint
    assert load_config(saved).fingerprint() == fingerprint
    assert errors == []
    assert requests and all(request.startswith(url) for request in requests)  # nothing from elsewhere
