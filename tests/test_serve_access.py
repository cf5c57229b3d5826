"""Access control of the HTTP API: API keys (401/403), public paths, CORS, per-key and per-address
rate limits (429 with Retry-After). The features are each tested over a real socket (uvicorn on a
loopback port, in a thread), the rest through the app itself (TestClient).

One tiny real bundle: random encoders trained 10 steps on the Karpathy replica, exported.
"""

import os
import time

import pytest

import anybind
from _serving import live, tiny_bundle
from anybind.cli import main

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'anybind[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install 'anybind[serve]'")

from anybind.serve import access  # noqa: E402
from anybind.serve.access import AccessConfigError, ApiKeys, RateLimit, TokenBuckets  # noqa: E402
from anybind.serve.app import create_app  # noqa: E402

ALICE, BOB, ANON = "alice-0123456789abcdefXYZ", "bob-9876543210fedcbaQRS", "nameless-key-0000111122223333"
ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(the bundle folder, the loaded bundle, a key file with alice, bob and a nameless key)."""
    made = tiny_bundle(tmp_path_factory.mktemp("access"))
    keys = made.root / "keys.txt"
    keys.write_text(f"# who may call\nalice:{ALICE}\n\n  bob : {BOB}\n{ANON}\n")
    keys.chmod(0o600)
    return made.bundle, anybind.load(made.bundle), keys


def _one_off(key: str) -> list[str]:
    """Keys wrong by one character: the last changed, one dropped, one added, the first changed."""
    flip = {c: d for c, d in zip("aA0", "bB1")}
    return [key[:-1] + flip.get(key[-1], "a"), key[:-1], key + "x", flip.get(key[0], "a") + key[1:]]


# ---- API keys -----------------------------------------------------------------------------------------
def test_keys_over_a_real_socket_401_403_and_200_with_either_header(bundle):
    _, model, keys = bundle
    with live(create_app(model, api_keys=keys, cors_origins=[ORIGIN])) as url, httpx.Client(base_url=url) as http:
        texts = {"texts": ["a red square"]}
        r = http.post("/embed", json=texts)
        assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="anybind"'
        assert "X-API-Key" in r.json()["error"] and "Bearer" in r.json()["error"]
        for wrong in _one_off(ALICE):
            for headers in ({"authorization": f"Bearer {wrong}"}, {"x-api-key": wrong}):
                r = http.post("/embed", json=texts, headers=headers)
                assert r.status_code == 403 and r.json() == {"error": "the API key is not valid"}, (wrong, r.text)
        for headers in ({"authorization": f"Bearer {ALICE}"}, {"authorization": f"bearer {BOB}"}, {"x-api-key": ANON}):
            r = http.post("/embed", json=texts, headers=headers)
            assert r.status_code == 200 and len(r.json()["embeddings"][0]) == model.dim
        # a key is never read from the URL (it would end up in logs), nor from another scheme
        assert http.post("/embed", params={"api_key": ALICE}, json=texts).status_code == 401
        assert http.post("/embed", json=texts, headers={"authorization": f"Basic {ALICE}"}).status_code == 401
        # the defaults: probes are public, the page and the rest are not
        assert http.get("/health").status_code == 200
        assert http.get("/").status_code == 401 and http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers={"x-api-key": BOB}).status_code == 200


def test_every_key_is_compared_whichever_matches(bundle, monkeypatch):
    keys = ApiKeys.load(bundle[2])
    calls = []
    real = access.hmac.compare_digest
    monkeypatch.setattr(access.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for presented, name in ((ALICE, "alice"), (BOB, "bob"), (ANON, "key-5"), (ALICE[:-1] + "Q", None), ("", None)):
        calls.clear()
        assert keys.name_of(presented) == name
        assert len(calls) == 3  # no early exit: the time does not tell which key matched
    assert keys.names == ["alice", "bob", "key-5"]


@pytest.mark.parametrize("text,mode,words", [
    ("", 0o600, "holds no key"),
    ("# only a comment\n\n", 0o600, "holds no key"),
    (f"alice:{ALICE}\n", 0o640, "chmod 600"),
    (f"alice:{ALICE}\n", 0o604, "chmod 600"),
    ("alice:short\n", 0o600, "at least 16 characters"),
    (f"alice:{ALICE}\nalice:{BOB}\n", 0o600, "used twice"),
    (f"alice:{ALICE}\nbob:{ALICE}\n", 0o600, "listed twice"),
    (f"al ice:{ALICE}\n", 0o600, "a key's name"),
    (f"alice:{ALICE} {BOB}\n", 0o600, "no spaces"),
])
def test_a_key_file_is_refused_clearly(tmp_path, text, mode, words):
    path = tmp_path / "keys"
    path.write_text(text)
    path.chmod(mode)
    with pytest.raises(AccessConfigError, match=words):
        ApiKeys.load(path)


def test_a_missing_or_unreadable_key_file_is_refused_and_the_cli_says_why(bundle, tmp_path, capsys):
    with pytest.raises(AccessConfigError, match="does not exist"):
        ApiKeys.load(tmp_path / "nope")
    with pytest.raises(AccessConfigError, match="not a file"):
        ApiKeys.load(tmp_path)
    unreadable = tmp_path / "locked"
    unreadable.write_text(f"{ALICE}\n")
    unreadable.chmod(0o000)
    if os.geteuid() != 0:  # root reads any file
        with pytest.raises(AccessConfigError, match="cannot be read"):
            ApiKeys.load(unreadable)
    assert main(["serve", "--bundle", str(bundle[0]), "--api-key-file", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--bundle", str(bundle[0]), "--rate-limit", "fast"]) == 2
    assert "10/s" in capsys.readouterr().err


def test_public_paths_are_configurable_and_docs_bring_their_assets(bundle):
    from fastapi.testclient import TestClient

    app = create_app(bundle[1], api_keys=bundle[2], public="/, /health, /docs, /images/*")
    with TestClient(app) as c:
        for path in ("/", "/health", "/docs", "/openapi.json", "/docs-assets/swagger-ui.css"):
            assert c.get(path).status_code == 200, path
        assert c.get("/images/1000").status_code == 404  # open, and this server has no index
        assert c.get("/redoc").status_code == 401 and c.get("/ready").status_code == 401  # not listed now
        assert c.post("/embed", json={"texts": ["x"]}).status_code == 401
    with pytest.raises(AccessConfigError, match="starts with '/'"):
        create_app(bundle[1], api_keys=bundle[2], public="health")


def test_the_openapi_schema_says_how_to_send_a_key_so_docs_can(bundle):
    from fastapi.testclient import TestClient

    with TestClient(create_app(bundle[1], api_keys=bundle[2], public="/health,/docs")) as c:
        schema = c.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {"type": "apiKey", "in": "header", "name": "X-API-Key"}
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert schema["security"] == [{"bearer": []}, {"apiKey": []}]
    assert schema["paths"]["/health"]["get"]["security"] == []  # public
    assert "security" not in schema["paths"]["/embed"]["post"]  # the global requirement applies
    with TestClient(create_app(bundle[1])) as c:  # no keys: no scheme
        assert "securitySchemes" not in c.get("/openapi.json").json().get("components", {})


# ---- CORS ---------------------------------------------------------------------------------------------
def test_cors_over_a_real_socket_allowed_disallowed_and_preflight(bundle):
    _, model, keys = bundle
    with live(create_app(model, api_keys=keys, cors_origins=[ORIGIN, "http://localhost:3000"])) as url, \
            httpx.Client(base_url=url) as http:
        ok = http.get("/health", headers={"origin": ORIGIN})
        assert ok.headers["access-control-allow-origin"] == ORIGIN and "Origin" in ok.headers["vary"]
        assert "Retry-After" in ok.headers["access-control-expose-headers"]
        other = http.get("/health", headers={"origin": "https://evil.example.com"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers
        # a refusal still carries the header: the page's script can read why
        r = http.post("/embed", json={"texts": ["x"]}, headers={"origin": "http://localhost:3000"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "http://localhost:3000"
        ask = {"origin": ORIGIN, "access-control-request-method": "POST",
               "access-control-request-headers": "authorization, content-type"}
        pre = http.options("/embed", headers=ask)  # no key: browsers never send one on a preflight
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert {"authorization", "x-api-key", "content-type"} <= {
            h.strip().lower() for h in pre.headers["access-control-allow-headers"].split(",")}
        assert int(pre.headers["access-control-max-age"]) > 0
        bad = http.options("/embed", headers={**ask, "origin": "https://evil.example.com"})
        assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers
        assert "may not call" in bad.json()["error"]
        r = http.post("/embed", json={"texts": ["x"]}, headers={"origin": ORIGIN, "x-api-key": ALICE})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN


def test_cors_origins_are_checked(bundle):
    for bad in ("https://app.example.com/", "app.example.com", "https://x.com/path", "ftp://x.com"):
        with pytest.raises(AccessConfigError, match="scheme://host"):
            create_app(bundle[1], cors_origins=[bad])
    from fastapi.testclient import TestClient

    with TestClient(create_app(bundle[1], cors_origins=["*"])) as c:  # any origin, no key needed
        assert c.get("/health", headers={"origin": "https://a.b"}).headers["access-control-allow-origin"] == "*"


# ---- rate limits --------------------------------------------------------------------------------------
def test_rate_limit_over_a_real_socket_per_key_with_retry_after_and_recovery(bundle):
    _, model, keys = bundle
    with live(create_app(model, api_keys=keys, rate_limit="2/s,burst=2")) as url, httpx.Client(base_url=url) as http:
        alice, bob = {"x-api-key": ALICE}, {"authorization": f"Bearer {BOB}"}
        assert [http.get("/openapi.json", headers=alice).status_code for _ in range(2)] == [200, 200]
        r = http.get("/openapi.json", headers=alice)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "2 a second (bursts of 2) per API key" in r.json()["error"]
        # bob's bucket is his own; probes are never limited
        assert [http.get("/openapi.json", headers=bob).status_code for _ in range(2)] == [200, 200]
        assert {http.get("/health").status_code for _ in range(10)} == {200}
        time.sleep(float(r.headers["retry-after"]) + 0.05)
        assert http.get("/openapi.json", headers=alice).status_code == 200


def test_rate_limit_over_a_real_socket_per_client_address_without_keys(bundle):
    with live(create_app(bundle[1], rate_limit="60/min,burst=3")) as url:
        here = httpx.Client(base_url=url)
        there = httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        with here, there:
            assert [here.get("/openapi.json").status_code for _ in range(4)] == [200, 200, 200, 429]
            assert int(here.get("/openapi.json").headers["retry-after"]) == 1
            assert "per client address" in here.get("/openapi.json").json()["error"]
            assert [there.get("/openapi.json").status_code for _ in range(3)] == [200, 200, 200]


def test_a_wrong_key_is_limited_by_address_so_guessing_is_slow(bundle):
    from fastapi.testclient import TestClient

    with TestClient(create_app(bundle[1], api_keys=bundle[2], rate_limit="1/min,burst=2")) as c:
        codes = [c.get("/openapi.json", headers={"x-api-key": k}).status_code for k in _one_off(ALICE)]
        assert codes == [403, 403, 429, 429]
        assert c.get("/openapi.json", headers={"x-api-key": ALICE}).status_code == 200  # alice's own bucket


def test_token_buckets_refill_at_the_rate_and_stay_bounded():
    now = [0.0]
    buckets = TokenBuckets(RateLimit(2.0, 3), clock=lambda: now[0], max_buckets=2)
    assert [buckets.take("a") for _ in range(3)] == [0, 0, 0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token comes back in half a second
    now[0] = 0.25
    assert buckets.take("a") == pytest.approx(0.25)  # a refused request costs nothing
    now[0] = 0.5
    assert buckets.take("a") == 0 and buckets.take("a") > 0
    now[0] = 100.0
    assert [buckets.take("a") for _ in range(4)][-1] > 0  # refilled to the burst, not beyond
    buckets.take("b"), buckets.take("c")
    assert len(buckets._buckets) == 2 and "a" not in buckets._buckets


@pytest.mark.parametrize("text,per_second,burst", [
    ("10/s", 10, 10), ("600/min", 10, 10), ("2/s,burst=5", 2, 5), ("1/min", 1 / 60, 1), ("3600/hour", 1, 1),
    (" 2.5 / second , burst = 4 ", 2.5, 4),
])
def test_rate_limits_parse(text, per_second, burst):
    limit = RateLimit.parse(text)
    assert limit.per_second == pytest.approx(per_second) and limit.burst == burst


@pytest.mark.parametrize("text", ["", "10", "10/day", "0/s", "-1/s", "10/s,burst=0", "10/s burst 5", "ten/s"])
def test_bad_rate_limits_are_refused(text):
    with pytest.raises(AccessConfigError, match="COUNT/UNIT"):
        RateLimit.parse(text)
