"""The web page of a server that wants API keys, in headless Chromium over a real socket: the page is
public, the API is not; the page asks for the key on the first 401 and then searches and shows the
indexed images (fetched with the key: an <img> cannot send a header)."""


import pytest

from _serving import HAS_CHROMIUM, NO_CHROMIUM, headless_chromium, live, tiny_bundle

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'anybind[serve]'")
pytest.importorskip("faiss", reason="the serve extra is not installed: pip install 'anybind[serve]'")
pytest.importorskip("selenium.webdriver", reason="pip install selenium")

KEY = "page-key-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """uvicorn serving a tiny bundle + index with a key file; the page and /health public."""
    from anybind.serve.app import create_app

    made = tiny_bundle(tmp_path_factory.mktemp("page-keys"), steps=5, index=True)
    keys = made.root / "keys.txt"
    keys.write_text(f"tester:{KEY}\n")
    keys.chmod(0o600)
    with live(create_app(made.bundle, made.index, api_keys=keys, public=["/", "/health", "/ready"])) as base:
        yield base


@pytest.mark.skipif(not HAS_CHROMIUM, reason=NO_CHROMIUM)
def test_the_page_asks_for_the_key_then_searches_with_it(keyed_server, tmp_path):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert httpx.get(keyed_server + "search", params={"q": "red"}).status_code == 401  # the API is closed
    driver = headless_chromium(tmp_path / "profile")
    try:
        driver.get(keyed_server)
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: "60 image items" in d.find_element(By.ID, "info").text)  # /health is public
        assert not driver.find_element(By.ID, "key-bar").is_displayed()
        driver.find_element(By.ID, "q").send_keys("a red square")
        driver.find_element(By.ID, "q").submit()
        wait.until(lambda d: d.find_element(By.ID, "key-bar").is_displayed())  # the 401 asks for the key
        assert "this API needs a key" in driver.find_element(By.ID, "search-status").text
        driver.find_element(By.ID, "api-key").send_keys(KEY)
        driver.find_element(By.ID, "key-btn").click()
        assert not driver.find_element(By.ID, "key-bar").is_displayed()
        driver.find_element(By.ID, "q").submit()
        loaded = ("return Array.from(document.querySelectorAll('#gallery img'))"
                  ".filter(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:')).length")
        wait.until(lambda d: d.execute_script(loaded) >= 10)  # images fetched with the key, shown from blobs
        assert "results for" in driver.find_element(By.ID, "search-status").text
    finally:
        driver.quit()
