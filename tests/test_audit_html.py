"""The audit's HTML page (issue 19, item 6), rendered in a real headless chromium.

Databases are built with sqlite3 from ddiscan/auditing/schema.sql and filled with real
scores (ddiscan.scan of the bundled fixture, of an adapter written by PEFT itself and of
one laid out by tests/safetensors_builders.py) plus error rows. The page is loaded from a
file:// URL in Debian's chromium through selenium, and the DOM, the network and a
screenshot are checked. Without chromium the browser tests skip, except under CI=1 or
DDISCAN_REQUIRE_BROWSER=1 (.ci/run sets it and installs chromium), where they fail.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest

import ddiscan
from ddiscan.auditing.html import write_html
from ddiscan.errors import InputError, UsageError, printable
from ddiscan.render import grid

from safetensors_builders import llama_peft_tensors, peft_config, write_llama_pair

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "ddiscan" / "auditing" / "schema.sql"
REQUIRED = any(os.environ.get(name, "").lower() not in ("", "0", "false") for name in ("CI", "DDISCAN_REQUIRE_BROWSER"))
WAIT_S = 20
HOSTILE = [
    "</script><script>window.pwned=1</script>",
    '<img src=x onerror="window.pwned=1">',
    "\"'><svg onload=window.pwned=1>",
    "<!-- ]]> &amp; &lt;b&gt; \\u003c",
    "line\nbreak\r\x1b[31m\x00\u2028\u2029\x07",
    "very-long-" + "x" * 4000,
]
SCORE_COLUMNS = {"scale": "scale", "S": "sharpness", "O": "deviation", "M": "magnitude", "M_norm": "magnitude_norm",
                 "ddi": "ddi", "ddi_norm": "ddi_norm", "delta_norm": "delta_norm", "base_norm": "base_norm"}


# ---------------------------------------------------------------------------------------
# Databases of real scores


def new_db(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path)
    connection.execute("PRAGMA journal_mode = WAL")
    connection.executescript(SCHEMA.read_text(encoding="utf-8"))
    connection.execute("INSERT INTO bases (fingerprint, path) VALUES ('f00d', 'fixtures/tiny-llama')")
    return connection


def add_adapter(connection, path: str, report=None, *, error: str | None = None, names=None, kinds=None) -> int:
    """One adapters row (and its modules rows when ``report`` is given); ``names`` and
    ``kinds`` replace the modules' names and kinds (hostile ones)."""
    modules = report.modules if report is not None else []
    finite = [m.ddi for m in modules if m.finite]
    digest = hashlib.sha256(f"{path}{error}{len(modules)}".encode()).hexdigest()
    cursor = connection.execute(
        "INSERT INTO adapters (key, path, sha256, size, base, status, error, n_modules, max_ddi, parameters,"
        " scanned_at, ddiscan_version) VALUES (?, ?, ?, 1, 'f00d', ?, ?, ?, ?, '{}', '2026-12-02T00:00:00Z', ?)",
        (digest, path, digest, "error" if error else "ok",
         error, None if error else len(modules), max(finite) if finite else None, ddiscan.__version__))
    for i, m in enumerate(modules):
        scores = [getattr(m, field) for field in SCORE_COLUMNS.values()]
        connection.execute(
            f"INSERT INTO modules (adapter_id, module, kind, block, d, k, r, t, {', '.join(SCORE_COLUMNS)})"
            f" VALUES ({', '.join('?' * (8 + len(SCORE_COLUMNS)))})",
            (cursor.lastrowid, names[i] if names else m.name, kinds[i % len(kinds)] if kinds else m.kind, m.block,
             m.d, m.k, m.r, m.t, *scores))
    return cursor.lastrowid


def peft_adapter(tmp: Path) -> tuple[Path, Path]:
    """A tiny LLaMA saved by transformers and a LoRA on every linear layer saved by PEFT
    (B initialised at random, so every module has a nonzero update)."""
    torch = pytest.importorskip("torch")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    model.save_pretrained(tmp / "llama")
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    get_peft_model(model, config).save_pretrained(tmp / "peft")
    return tmp / "llama", tmp / "peft"


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """path → Report: the bundled fixture, a PEFT-written adapter, two builders' adapters (one
    with a NaN in one module: not finite)."""
    tmp = tmp_path_factory.mktemp("adapters")
    llama, peft = peft_adapter(tmp)
    base, built = write_llama_pair(tmp / "built", layers=3, r=2, config=peft_config(2, 4))
    tensors = llama_peft_tensors(2, 2)
    tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"][0, 0] = np.nan
    nan_base, nan = write_llama_pair(tmp / "nan", layers=2, r=2, config=peft_config(2, 4), adapter_tensors=tensors)
    nan_report = ddiscan.scan(nan_base, nan)
    assert [m.finite for m in nan_report.modules].count(False) == 1
    return {str(ROOT / "fixtures" / "tiny-lora"): ddiscan.scan(ROOT / "fixtures" / "tiny-llama",
                                                               ROOT / "fixtures" / "tiny-lora"),
            str(peft): ddiscan.scan(llama, peft), str(built): ddiscan.scan(base, built), str(nan): nan_report}


ERRORS = {"broken.safetensors": "broken.safetensors: not a safetensors file (header length 0)",
          "lonely/adapter_model.safetensors": "lonely: no LoRA A/B pair"}


@pytest.fixture(scope="module")
def audit_page(reports, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    connection = new_db(tmp / "audit.sqlite")
    with connection:
        for path, report in reports.items():
            add_adapter(connection, path, report)
        for path, error in ERRORS.items():
            add_adapter(connection, path, error=error)
    connection.close()
    write_html(tmp / "audit.sqlite", tmp / "audit.html")
    return tmp / "audit.html"


# ---------------------------------------------------------------------------------------
# The browser


def _require(what: str):
    if REQUIRED:
        pytest.fail(f"{what} (CI=1 or DDISCAN_REQUIRE_BROWSER=1: the browser tests must run)")
    pytest.skip(what)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _require("selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        _require("chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1400",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    try:
        driver.set_page_load_timeout(WAIT_S)
        driver.set_script_timeout(WAIT_S)
        yield driver
    finally:
        driver.quit()


def load(driver, page: Path, scored: int) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.as_uri())
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && document.querySelectorAll('details.adapter').length"
    ) == scored)


def column(driver, name: str) -> list:
    return driver.execute_script(
        "const i = [...document.querySelectorAll('#adapters th')].findIndex(th => th.textContent.startsWith("
        "arguments[0])); return [...document.querySelectorAll('#adapters tbody tr')].map(r => r.cells[i].dataset.v"
        " === undefined ? r.cells[i].textContent : r.cells[i].dataset.v)", name)


def click_header(driver, name: str) -> str:
    from selenium.webdriver.common.by import By

    header = driver.find_element(By.XPATH, f"//table[@id='adapters']//th[button[text()='{name}']]")
    header.find_element(By.TAG_NAME, "button").click()
    return header.get_attribute("aria-sort")


def open_all(driver) -> None:
    """Click every closed adapter's summary, and wait for its charts (drawn on the toggle
    event, which comes after the click)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    for details in driver.find_elements(By.CSS_SELECTOR, "details.adapter"):
        if details.get_attribute("open") is None:
            details.find_element(By.TAG_NAME, "summary").click()
    WebDriverWait(driver, WAIT_S).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('details.adapter')].every(x => x.open && x.querySelector('.charts'))"))


def charts(driver) -> dict:
    """Per drawn adapter (by its summary's path): the heatmap's cells by state, the
    curve's points' DDI (from their titles) and y coordinates, the heatmap's titles."""
    return driver.execute_script("""
        const out = {};
        for (const d of document.querySelectorAll('details.adapter')) {
          const cells = [...d.querySelectorAll('svg.heatmap rect.cell')];
          out[d.querySelector('summary').textContent.split(' \u2014 ')[0]] = {
            cells: cells.length, states: cells.map(c => c.dataset.state),
            kinds: [...d.querySelectorAll('svg.heatmap > text > title')].map(t => t.textContent),
            titles: cells.map(c => c.querySelector('title').textContent),
            ddi: [...d.querySelectorAll('svg.curve-plot circle.point')].map(
              c => Number(c.querySelector('title').textContent.split('DDI ')[1])),
            y: [...d.querySelectorAll('svg.curve-plot circle.point')].map(c => Number(c.getAttribute('cy')))};
        }
        return out;""")


# ---------------------------------------------------------------------------------------
# The page in the browser


def test_the_table_has_one_row_per_adapter_and_sorts_numbers_as_numbers(browser, audit_page, reports):
    load(browser, audit_page, len(reports))
    assert len(column(browser, "path")) == len(reports) + len(ERRORS)
    expected = sorted(max(m.ddi for m in r.modules if m.finite) for r in reports.values())
    assert click_header(browser, "max_ddi") == "descending"
    shown = column(browser, "max_ddi")
    assert [float(v) for v in shown[:len(reports)]] == pytest.approx(expected[::-1], rel=1e-12)
    assert shown[len(reports):] == [""] * len(ERRORS)  # errors have no score: last either way
    assert click_header(browser, "max_ddi") == "ascending"
    shown = column(browser, "max_ddi")
    assert [float(v) for v in shown[:len(reports)]] == pytest.approx(expected, rel=1e-12)
    assert shown[len(reports):] == [""] * len(ERRORS)
    assert click_header(browser, "n_modules") == "descending"
    counts = [int(v) for v in column(browser, "n_modules") if v]
    assert counts == sorted((len(r.modules) for r in reports.values()), reverse=True)
    assert counts[0] >= 10 > counts[-1]  # 21 > 8: numeric, where text order would put "8" first
    assert click_header(browser, "path") == "ascending"
    assert column(browser, "path") == sorted([*reports, *ERRORS])
    errors = dict(zip(column(browser, "path"), column(browser, "error")))
    assert {p: errors[p] for p in ERRORS} == ERRORS


def test_each_adapter_has_its_heatmap_and_its_sorted_curve(browser, audit_page, reports):
    load(browser, audit_page, len(reports))
    open_all(browser)
    drawn = charts(browser)
    assert sorted(drawn) == sorted(reports)
    for path, report in reports.items():
        blocks, kinds, values = grid(report)
        chart = drawn[path]
        assert chart["cells"] == len(blocks) * len(kinds), path
        assert sorted(chart["kinds"]) == sorted(kinds)
        assert chart["states"].count("value") == len({(m.block, m.kind) for m in report.modules if m.finite})
        assert chart["states"].count("nan") == len({(m.block, m.kind) for m in report.modules if not m.finite})
        assert chart["states"].count("empty") == len(blocks) * len(kinds) - len(report.modules)
        ddi = sorted((m.ddi for m in report.modules if m.finite), reverse=True)
        assert chart["ddi"] == pytest.approx(ddi, rel=1e-5)  # six significant digits in the titles
        assert chart["y"] == sorted(chart["y"])  # highest DDI first: drawn from the top down
        top = f"DDI {float(f'{max(ddi):.6g}'):g}"
        assert any(title.endswith(top) for title in chart["titles"])


def test_the_page_loads_nothing_and_its_policy_forbids_remote_loads(browser, audit_page, reports):
    browser.get_log("performance")  # drop what earlier tests logged
    load(browser, audit_page, len(reports))
    open_all(browser)
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0
    requests = [json.loads(entry["message"])["message"] for entry in browser.get_log("performance")]
    urls = {m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"}
    assert urls == {audit_page.as_uri()}
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []  # no CSP violation of our own
    blocked = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        document.addEventListener('securitypolicyviolation', e => done(e.violatedDirective + ' ' + e.blockedURI));
        const img = document.createElement('img');
        img.src = 'http://127.0.0.1:9/x.png';
        document.body.appendChild(img);""")
    assert blocked.startswith("img-src http://127.0.0.1:9")


def test_the_screenshot_is_a_picture(browser, audit_page, reports, tmp_path):
    Image = pytest.importorskip("PIL.Image")
    load(browser, audit_page, len(reports))
    open_all(browser)
    png = browser.get_screenshot_as_png()
    (tmp_path / "audit.png").write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.size[0] >= 1000
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) >= 20  # text, borders and the heatmap's viridis shades, not a blank page
    assert max(count for count, _ in colours) < 0.95 * image.size[0] * image.size[1]


@pytest.fixture(scope="module")
def hostile_page(reports, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    connection = new_db(tmp / "audit.sqlite")
    report = next(iter(reports.values()))
    names = [f"{HOSTILE[i % len(HOSTILE)]}#{i}" for i in range(len(report.modules))]
    with connection:
        for text in HOSTILE:
            add_adapter(connection, text, report, names=names, kinds=HOSTILE)
            add_adapter(connection, "error/" + text, error=text)
    connection.close()
    write_html(tmp / "audit.sqlite", tmp / "audit.html")
    return tmp / "audit.html"


ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "table", "thead", "tbody", "tr",
                "th", "td", "button", "a", "section", "details", "summary", "div", "script", "svg", "text", "rect",
                "line", "polyline", "circle"}


def test_hostile_names_are_shown_as_text_and_inject_nothing(browser, hostile_page):
    load(browser, hostile_page, len(HOSTILE))
    open_all(browser)
    page = browser.execute_script("""
        const all = [...document.querySelectorAll('*')];
        return {pwned: window.pwned === undefined ? null : window.pwned, scripts: document.scripts.length,
                tags: [...new Set(all.map(e => e.localName))],
                handlers: all.flatMap(e => [...e.attributes].map(a => a.name)).filter(n => n.startsWith('on')),
                overflow: document.documentElement.scrollWidth - window.innerWidth}""")
    assert page["pwned"] is None
    assert page["scripts"] == 2  # the JSON data block and the page's own script
    assert set(page["tags"]) <= ALLOWED_TAGS
    assert page["handlers"] == []
    assert page["overflow"] <= 0  # a 4,000-character name wraps
    paths = column(browser, "path")
    assert sorted(paths) == sorted([printable(t) for t in HOSTILE] + [printable("error/" + t) for t in HOSTILE])
    errors = {p: e for p, e in zip(paths, column(browser, "error")) if p.startswith("error/")}
    assert errors == {printable("error/" + t): printable(t) for t in HOSTILE}
    drawn = charts(browser)
    assert sorted(drawn) == sorted(printable(t) for t in HOSTILE)
    for chart in drawn.values():
        assert sorted(chart["kinds"]) == sorted(printable(k) for k in HOSTILE)


# ---------------------------------------------------------------------------------------
# Bad databases and outputs (no browser)


def test_the_page_is_written_atomically_and_the_database_is_only_read(audit_page):
    database = audit_page.parent / "audit.sqlite"
    before = hashlib.sha256(database.read_bytes()).hexdigest()
    write_html(database, audit_page)
    assert hashlib.sha256(database.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in audit_page.parent.iterdir() if "ddiscan-tmp" in p.name) == []
    text = audit_page.read_text(encoding="utf-8")
    assert "default-src 'none'" in text and "http" not in text.split("<style>")[1].split("</style>")[0]


def _one_line_error(kind, call, *needles):
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(n in message for n in needles), message


def test_bad_databases_are_one_line_input_errors(tmp_path):
    out = tmp_path / "page.html"
    _one_line_error(InputError, lambda: write_html(tmp_path / "missing.sqlite", out), "missing.sqlite", "no such")
    (tmp_path / "garbage.sqlite").write_bytes(b"not a database at all, really" * 100)
    _one_line_error(InputError, lambda: write_html(tmp_path / "garbage.sqlite", out), "garbage.sqlite")
    sqlite3.connect(tmp_path / "empty.sqlite").execute("CREATE TABLE t (x)").connection.close()
    _one_line_error(InputError, lambda: write_html(tmp_path / "empty.sqlite", out), "schema version 1", "is 0")
    connection = sqlite3.connect(tmp_path / "no-modules.sqlite")
    connection.executescript(SCHEMA.read_text(encoding="utf-8") + "DROP TABLE modules;")
    connection.close()
    _one_line_error(InputError, lambda: write_html(tmp_path / "no-modules.sqlite", out), "no such table: modules")
    assert not out.exists() and list(tmp_path.glob(".page.html.*")) == []  # nothing half-written


def test_the_page_never_replaces_its_database(audit_page, reports, tmp_path):
    odd = tmp_path / "a dir ?#%"
    odd.mkdir()
    database = shutil.copy(audit_page.parent / "audit.sqlite", odd / "audit.sqlite")
    before = Path(database).read_bytes()
    _one_line_error(UsageError, lambda: write_html(database, database), "input")
    assert Path(database).read_bytes() == before
    write_html(database, odd / "page.html")  # a path with URI metacharacters opens as itself
    assert (odd / "page.html").read_text(encoding="utf-8").count("<tr>") == 1 + len(reports) + len(ERRORS)


@pytest.mark.parametrize("required", [True, False])
def test_without_a_browser_the_tests_fail_when_required_and_skip_otherwise(tmp_path, required):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("CI", "DDISCAN_REQUIRE_BROWSER")}
    env.update(PATH=str(tmp_path), PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    if required:
        env["DDISCAN_REQUIRE_BROWSER"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs", f"--basetemp={tmp_path / 'run'}",
         f"{__file__}::test_the_page_loads_nothing_and_its_policy_forbids_remote_loads"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ("1 error" in result.stdout or "1 failed" in result.stdout) is required, result.stdout
    assert ("1 skipped" in result.stdout) is not required, result.stdout
    assert "chromium and chromedriver are not installed" in result.stdout


def test_the_page_is_one_snapshot_of_a_database_being_written(audit_page, reports, tmp_path, monkeypatch):
    """An audit commits while the page is written: the page shows the database as it was
    when writing began, its counts and its rows alike."""
    import ddiscan.auditing.html as page

    database = Path(shutil.copy(audit_page.parent / "audit.sqlite", tmp_path / "audit.sqlite"))
    real = page.write_atomic_stream

    def commit_meanwhile(path, fill):
        writer = sqlite3.connect(database)
        with writer:
            add_adapter(writer, "arrived-meanwhile", next(iter(reports.values())))
        writer.close()
        real(path, fill)

    monkeypatch.setattr(page, "write_atomic_stream", commit_meanwhile)
    write_html(database, tmp_path / "page.html")
    text = (tmp_path / "page.html").read_text(encoding="utf-8")
    total = len(reports) + len(ERRORS)
    assert f"{total} adapters" in text and text.count("<tr>") == 1 + total and "arrived-meanwhile" not in text
