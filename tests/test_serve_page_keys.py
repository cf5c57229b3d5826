"""The web page of a server that wants API keys, in headless Chromium over a real socket: the page is
public, the API is not; the page asks for the key on the first 401 and then searches and shows the
indexed images (fetched with the key: an <img> cannot send a header)."""

import socket
import threading
import time
from pathlib import Path

import pytest

from _toy import replicas
from anybind.cli import main

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'anybind[serve]'")
pytest.importorskip("faiss", reason="the serve extra is not installed: pip install 'anybind[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
KEY = "page-key-0123456789abcdef"


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """uvicorn serving a tiny bundle + index with a key file; the page and /health public."""
    import uvicorn

    from anybind.serve.app import create_app

    root = tmp_path_factory.mktemp("page-keys")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANYBIND_CACHE", str(root / "cache"))
        karpathy, *_ = replicas(root)
        assert main(["train", "--recipe", "default", "--store", f"image=random:image+karpathy:{karpathy}",
                     "--store", f"text=random:text+karpathy:{karpathy}", "--set", "train.max_steps=5",
                     "--set", "train.batch_size=32", "--out", str(root / "run"), "-q"]) == 0
        assert main(["export", "--run", str(root / "run"), "--out", str(root / "bundle"), "-q"]) == 0
        assert main(["index", "--bundle", str(root / "bundle"), "--data", f"karpathy:{karpathy}",
                     "--out", str(root / "index"), "-q"]) == 0
    keys = root / "keys.txt"
    keys.write_text(f"tester:{KEY}\n")
    keys.chmod(0o600)
    app = create_app(root / "bundle", root / "index", api_keys=keys, public=["/", "/health", "/ready"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(10)


@pytest.mark.skipif(not CHROMIUM.exists() or not CHROMEDRIVER.exists(),
                    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
def test_the_page_asks_for_the_key_then_searches_with_it(keyed_server, tmp_path):
    import httpx
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    assert httpx.get(keyed_server + "search", params={"q": "red"}).status_code == 401  # the API is closed
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        driver.set_page_load_timeout(30)
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
