"""The `train inspect` site in a real headless browser (Chromium driven by selenium), opened from
file:// with no server: the index lists the latents, sorting and the token search work, clicking a
latent shows the top example that Python computes, links load other latents' chunks on demand.

Skipped where chromium / chromedriver / selenium are absent (CI installs Debian's `chromium` and
`chromium-driver`). A screenshot goes to the test's tmp folder, and also to
$SAEFORGE_INSPECT_SCREENSHOT when that is set.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
import torch

from shared.cache import Cache
from tests.helpers import cfg_for
from train.inspector.build import inspect_checkpoint
from train.training import train_sae

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM),
    reason="needs chromium, chromedriver and selenium (apt-get install -y chromium chromium-driver; "
           f"pip install selenium); found chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}, selenium={HAVE_SELENIUM}")

TIMEOUT = 20


def _scale(cfg, cache) -> float:
    """The factor the run multiplied raw rows by, from the cache statistics (1 without normalize)."""
    return float(cache.stats(cfg.site).norm_scaling_factor) if cfg.normalize else 1.0


@pytest.fixture(scope="module")
def built(reference_cache, tmp_path_factory):
    """(site folder, run folder): a TopK run on the tiny Llama harvest, inspected over all 5 shards."""
    tmp = tmp_path_factory.mktemp("inspect_browser")
    cfg = cfg_for(reference_cache, tmp / "runs", arch="topk", batch_size=64, tokens=64 * 30,
                  checkpoint_every=64 * 30, dead_tokens_threshold=256)
    run = train_sae(None, cfg, progress=False)[1]
    site, _ = inspect_checkpoint(run, tmp / "site", shards="0-4", top=8, progress=False)
    return site, run


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="inspect-chromium-")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1500,1300"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(TIMEOUT)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _python_top_example(run, cache_dir):
    """(latent with the largest activation, that activation, the token there) by a dense encode of
    every encoded row (position 0 skipped, as the run trained)."""
    from train.runs import load_sae_checkpoint

    loaded = load_sae_checkpoint(run)
    cache = Cache.open(cache_dir)
    s = _scale(loaded.cfg, cache)
    x = np.concatenate([np.asarray(cache.read_acts(loaded.cfg.site, k)) for k in range(5)])
    pos = np.concatenate([cache.read_vector("positions", k) for k in range(5)])
    tok = np.concatenate([cache.read_vector("tokens", k) for k in range(5)])
    rows = np.flatnonzero(pos != 0)
    with torch.no_grad():
        f = loaded.sae.encode(torch.from_numpy(x[rows]) * s).numpy()
    i, j = np.unravel_index(np.argmax(f), f.shape)
    return int(j), float(f[i, j]), int(tok[rows[i]])


def _wait(driver, css, text=None):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, TIMEOUT)
    if text is None:
        return wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))
    wait.until(EC.text_to_be_present_in_element((By.CSS_SELECTOR, css), text))
    return driver.find_element(By.CSS_SELECTOR, css)


def test_index_click_shows_the_top_example_computed_in_python(browser, built, reference_cache, tmp_path, tiny_tokenizer):
    from selenium.webdriver.common.by import By

    site, run = built
    latent, value, token = _python_top_example(run, reference_cache)
    browser.get((site / "index.html").as_uri())
    _wait(browser, "#table tbody tr")
    assert browser.find_element(By.ID, "title").text.startswith("SAE feature browser")
    # sort by max activation, descending: the first row is the latent with the largest activation
    browser.find_element(By.CSS_SELECTOR, 'th[data-key="max"]').click()
    first = _wait(browser, "#table tbody tr")
    assert first.get_attribute("data-id") == str(latent)
    first.click()
    _wait(browser, "#detail h2", f"Latent {latent}")
    top = _wait(browser, "#top .ex")
    shown_value = float(top.find_element(By.CSS_SELECTOR, ".val").text)
    assert shown_value == pytest.approx(value, rel=1e-3)
    max_token = top.find_element(By.CSS_SELECTOR, ".tok.max")
    assert max_token.get_attribute("textContent") == tiny_tokenizer.decode([token]).replace("\n", "\u21b5")
    assert f"token {token} " in max_token.get_attribute("title")
    assert browser.find_elements(By.CSS_SELECTOR, ".hist svg rect")
    assert len(browser.find_elements(By.CSS_SELECTOR, ".logits .pos tr")) == 10
    assert "selected" in browser.find_element(By.CSS_SELECTOR, f'#table tbody tr[data-id="{latent}"]').get_attribute("class")
    shot = tmp_path / "inspect.png"
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    if os.environ.get("SAEFORGE_INSPECT_SCREENSHOT"):
        shutil.copy(shot, os.environ["SAEFORGE_INSPECT_SCREENSHOT"])
    errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not errors, errors


def test_links_load_other_chunks_and_search_filters_by_token(browser, built, tiny_tokenizer):
    from selenium.webdriver.common.by import By

    site, _ = built
    browser.get("about:blank")  # a fresh page (a new hash alone would not reload it)
    browser.get((site / "index.html").as_uri() + "#100")  # chunk 1 (latents 64..127), loaded on demand
    _wait(browser, "#detail h2", "Latent 100")
    link = _wait(browser, ".near a")
    target = link.get_attribute("href").rsplit("#", 1)[1]
    link.click()
    _wait(browser, "#detail h2", f"Latent {target}")
    # search for the top token of a latent: exactly the latents whose top-example tokens or promoted
    # tokens contain that text stay listed
    index, vocab = _read_js(site / "data/index.js"), _read_js(site / "data/vocab.js")
    some = next(i for i, t in enumerate(index["top"]) if t >= 0 and vocab[str(t)].strip())
    word = vocab[str(index["top"][some])].strip().lower()
    hits = {int(t) for t, text in vocab.items() if word in text.lower()}
    expect = [i for i in range(len(index["top"]))
              if index["count"][i] and hits & set(index["toks"][i] + index["promotes"][i])]
    assert some in expect and len(expect) < sum(c > 0 for c in index["count"])
    browser.find_element(By.ID, "search").send_keys(word)
    _wait(browser, "#count", f"{len(expect)} of {len(index['top'])} latents")
    ids = [int(tr.get_attribute("data-id")) for tr in browser.find_elements(By.CSS_SELECTOR, "#table tbody tr")]
    assert ids == expect[:100]


def _read_js(path):
    import json

    text = path.read_text(encoding="utf-8")
    return json.loads(text[text.index(" = ", text.index("SAE_DATA.")) + 3 : text.rindex(";")])
