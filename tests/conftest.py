import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    """A private cache root per test (ANYBIND_CACHE), so tests never share stores."""
    root = tmp_path / "cache"
    monkeypatch.setenv("ANYBIND_CACHE", str(root))
    return root
