"""What the serving tests share: a tiny real bundle and uvicorn on a free loopback port.

    made = tiny_bundle(tmp_path_factory.mktemp("x"), index=True)   # random encoders, the Karpathy replica
    with live(create_app(made.bundle, made.index)) as base:         # "http://127.0.0.1:PORT/"
        httpx.get(base + "health")
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from _toy import replicas


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live(app, log_level: str = "warning"):
    """`app` served by uvicorn on a free loopback port, in a thread: yields its base URL (with a final /)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(10)


def tiny_bundle(root: Path, steps: int = 10, index: bool = False, train_args: tuple[str, ...] = ()) -> SimpleNamespace:
    """A bundle of `random:` encoders trained `steps` steps on the Karpathy replica (60 coloured squares),
    exported, and with `index` a flat index over its images; everything (the cache too) under `root`."""
    import pytest

    from anybind.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ANYBIND_CACHE", str(root / "cache"))
        karpathy, *_ = replicas(root)
        run, bundle, folder = root / "run", root / "bundle", root / "index"
        assert main(["train", "--recipe", "default", "--store", f"image=random:image+karpathy:{karpathy}",
                     "--store", f"text=random:text+karpathy:{karpathy}", "--set", f"train.max_steps={steps}",
                     "--set", "train.batch_size=32", *train_args, "--out", str(run), "-q"]) == 0
        assert main(["export", "--run", str(run), "--out", str(bundle), "-q"]) == 0
        if index:
            assert main(["index", "--bundle", str(bundle), "--data", f"karpathy:{karpathy}", "--out", str(folder),
                         "-q"]) == 0
    return SimpleNamespace(root=root, karpathy=karpathy, run=run, bundle=bundle, index=folder if index else None)


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
HAS_CHROMIUM = CHROMIUM.exists() and CHROMEDRIVER.exists()
NO_CHROMIUM = "needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"


def headless_chromium(profile: Path, *flags: str):
    """A headless Chromium (selenium) in which every host but the loopback fails to resolve, so a page
    that needs the network stays blank; `flags` are added (a fake microphone, say). Quit it after use."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}",
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", *flags):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(30)
    return driver
