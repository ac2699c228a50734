"""The HTML leaderboard in a real browser: Debian's headless Chromium driven by Selenium through Debian's
chromedriver loads the page from disk, sorts columns, filters rows and checks what is shown.

``.ci/run`` installs the packages (``chromium``, ``chromium-driver``) when missing and sets
``CPT_BENCH_REQUIRE_BROWSER=1`` once they are there, which turns a missing browser into a failure; without it
(a machine where they cannot be installed) the test skips and says what is missing.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cpt_bench.report import write_leaderboard

from .test_leaderboard import _results_with, config_with

CHROMEDRIVER = Path("/usr/bin/chromedriver")
REQUIRED = os.environ.get("CPT_BENCH_REQUIRE_BROWSER") == "1"


def _missing() -> str | None:
    """What keeps the browser test from running, None when nothing does."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if shutil.which("chromium") is None:
        return "no chromium on PATH (apt-get install chromium)"
    if not CHROMEDRIVER.is_file():
        return f"no {CHROMEDRIVER} (apt-get install chromium-driver)"
    return None


@pytest.fixture(scope="module")
def browser():
    missing = _missing()
    if missing:
        if REQUIRED:
            pytest.fail(f"CPT_BENCH_REQUIRE_BROWSER=1 but {missing}")
        pytest.skip(f"browser test needs Debian's Chromium and chromedriver and selenium: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1600,1200"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page_url(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("board")
    results = _results_with(root, config_with(name="short"), config_with(name="other", model="other-model"),
                            config_with(name="long", ppl_seqlen=512))
    return write_leaderboard(results)[1].resolve().as_uri()


def _section(driver, protocol: str):
    """The section of the column whose protocol line contains ``protocol``."""
    from selenium.webdriver.common.by import By

    return next(section for section in driver.find_elements(By.CSS_SELECTOR, "section.board")
                if protocol in section.find_element(By.CSS_SELECTOR, "p.protocol").text)


def _shown(section, header: str) -> list[str]:
    """The text of column ``header`` in the rows the section shows, top to bottom."""
    from selenium.webdriver.common.by import By

    headers = [th.text for th in section.find_elements(By.CSS_SELECTOR, "thead th")]
    index = headers.index(header)
    return [row.find_elements(By.TAG_NAME, "td")[index].text
            for row in section.find_elements(By.CSS_SELECTOR, "tbody tr") if row.is_displayed()]


def _click_header(section, header: str) -> None:
    from selenium.webdriver.common.by import By

    next(th for th in section.find_elements(By.CSS_SELECTOR, "thead th") if th.text == header).click()


def _choose(driver, key: str, value: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.CSS_SELECTOR, f'select[data-key="{key}"]')).select_by_value(value)


def test_page_loads_with_a_table_and_a_plot_per_column(browser, page_url):
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    sections = browser.find_elements(By.CSS_SELECTOR, "section.board")
    titles = [section.find_element(By.TAG_NAME, "h2").text for section in sections]
    assert sorted(titles) == ["cpt_piqa: acc ↑"] + ["cpt_ppl_wikipedia: token_perplexity ↓"] * 3
    protocols = {section.find_element(By.CSS_SELECTOR, "p.protocol").text.split(", ")[0] for section in sections}
    assert protocols == {"protocol: 4 windows of 512 tokens of smollm2-135m-instruct",
                         "protocol: 4 windows of 256 tokens of smollm2-135m-instruct",
                         "protocol: 4 windows of 256 tokens of other-model",  # another tokenizer: its own column
                         "protocol: 10 items"}
    piqa = _section(browser, "10 items")  # items are the same for every model: one column for the three runs
    assert piqa.find_element(By.CSS_SELECTOR, "p.protocol").text.endswith("36 of 36 rows shown")  # 3 runs x 3 x 4
    assert set(_shown(piqa, "run")) == {"short (i)", "other (i)", "long (i)"}
    assert set(_shown(_section(browser, "512 tokens"), "run")) == {"long (i)"}
    circles = piqa.find_elements(By.CSS_SELECTOR, "svg.pareto circle.point")
    assert len(circles) == 36 and all(circle.is_displayed() for circle in circles)


def test_sorting_a_column_orders_the_rows_both_ways(browser, page_url):
    browser.get(page_url)
    section = _section(browser, "256 tokens of smollm2")
    ranked = [float(text.split(" ± ")[0]) for text in _shown(section, "value ± stderr")]
    assert len(ranked) == 12 and ranked == sorted(ranked)  # ranked best (lowest perplexity) first
    _click_header(section, "stored MB")
    sizes = [float(text) for text in _shown(section, "stored MB")]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]
    _click_header(section, "stored MB")
    assert [float(text) for text in _shown(section, "stored MB")] == sorted(sizes, reverse=True)
    for header in ("gap closed", "gap closed vs trivial"):
        _click_header(section, header)
        gaps = _shown(section, header)
        known = [int(text.rstrip("%")) for text in gaps if text != "–"]
        assert known and known == sorted(known) and gaps[len(known):] == ["–"] * (len(gaps) - len(known))  # – last
    _click_header(section, "compression")
    names = _shown(section, "compression")
    assert names == sorted(names)


def test_filters_hide_rows_and_markers_and_redraw_the_frontier(browser, page_url):
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    section = _section(browser, "10 items")
    frontier = section.find_element(By.CSS_SELECTOR, "polyline.frontier").get_attribute("points")
    _choose(browser, "kind", "none")  # the frontier without prompts runs through the unprompted markers only
    unprompted = {(c.get_attribute("cx"), c.get_attribute("cy")) for c in section.find_elements(
        By.CSS_SELECTOR, "svg.pareto circle.point") if c.is_displayed()}
    redrawn = section.find_element(By.CSS_SELECTOR, "polyline.frontier").get_attribute("points")
    assert redrawn != frontier and len(unprompted) == 3  # three levels, the same in every run
    corners = [tuple(point.split(",")) for point in redrawn.split()]
    assert set(corners[::2]) <= {(f"{float(x):g}", f"{float(y):g}") for x, y in unprompted}
    _choose(browser, "kind", "soft")
    prompts = _shown(section, "prompt")
    assert prompts and all(text.startswith("soft:") or text == "trivial" for text in prompts)  # (an untrained one)
    assert len(prompts) == 2 * 3 * 3  # a soft prompt and the trivial control at three levels, in three runs
    assert section.find_element(By.CSS_SELECTOR, "p.protocol").text.endswith(f"{len(prompts)} of 36 rows shown")
    shown = [c for c in section.find_elements(By.CSS_SELECTOR, "svg.pareto circle.point") if c.is_displayed()]
    assert len(shown) == len(prompts)
    _choose(browser, "model", "other-model")
    assert set(_shown(section, "model")) == {"other-model"} and len(_shown(section, "prompt")) == 6
    assert _shown(_section(browser, "512 tokens"), "model") == []  # the long run is another model
    _choose(browser, "family", "pruning")
    assert _shown(section, "compression") == ["sparsegpt-50"] * 2
    _choose(browser, "kind", "")
    _choose(browser, "model", "")
    _choose(browser, "family", "")
    assert len(_shown(section, "prompt")) == 36


def test_recovery_plots_render_and_follow_the_filters(browser, page_url):
    from selenium.webdriver.common.by import By

    browser.get(page_url)
    section = browser.find_elements(By.CSS_SELECTOR, "section.recovery")[0]  # the first column's first level
    svg = section.find_element(By.CSS_SELECTOR, "svg.recovery")
    assert svg.is_displayed() and svg.size["width"] > 400 and svg.size["height"] > 250
    assert _shown(section, "method") == ["soft prompt", "no prompt", "hard prompt"]  # ranked; no trivial control
    assert all(c.is_displayed() for c in section.find_elements(By.CSS_SELECTOR, "circle.point"))
    assert len(section.find_element(By.CSS_SELECTOR, "polyline.frontier").get_attribute("points").split()) == 3
    _choose(browser, "kind", "soft")
    assert _shown(section, "method") == ["soft prompt"]
    shown = [c for c in section.find_elements(By.CSS_SELECTOR, "circle.point") if c.is_displayed()]
    assert len(shown) == 1  # and the frontier is that marker alone
    assert section.find_element(By.CSS_SELECTOR, "polyline.frontier").get_attribute("points") == \
        f"{float(shown[0].get_attribute('cx')):g},{float(shown[0].get_attribute('cy')):g}"
    _choose(browser, "kind", "")
