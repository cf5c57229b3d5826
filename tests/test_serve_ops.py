"""Operating the server: /metrics in the Prometheus text format (parsed strictly here, and by
prometheus_client's parser when it is installed), JSON access-log lines, and a graceful shutdown
of `anybind serve` (a real process) that finishes the request in flight and exits 0.

One tiny real bundle: random encoders trained 10 steps on the Karpathy replica, exported.
"""

import contextlib
import json
import math
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

import anybind
from _serving import free_port, live, tiny_bundle
from anybind.cli import main

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'anybind[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install 'anybind[serve]'")

from anybind.serve import ops  # noqa: E402
from anybind.serve.app import ApiError, create_app  # noqa: E402

ALICE, BOB = "alice-0123456789abcdefXYZ", "bob-9876543210fedcbaQRS"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(the bundle folder, the loaded bundle, a key file with alice and bob)."""
    made = tiny_bundle(tmp_path_factory.mktemp("ops"))
    keys = made.root / "keys.txt"
    keys.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    keys.chmod(0o600)
    return made.bundle, anybind.load(made.bundle), keys


# ---- a strict reader of the text format ----------------------------------------------------------------
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


def parse_exposition(text: str) -> dict[str, dict]:
    """{family: {"type", "help", "samples": {(sample name, sorted labels): value}}}, refusing anything
    the format does not allow: an undeclared family, a bad name or label, a duplicate, a bad number,
    histogram buckets that are not cumulative or disagree with _count."""
    assert text.endswith("\n") and "\r" not in text
    families: dict[str, dict] = {}
    for line in text.splitlines():
        if m := re.fullmatch(rf"# (HELP|TYPE) ({_NAME}) (.+)", line):
            fam = families.setdefault(m.group(2), {"samples": {}})
            assert m.group(1).lower() not in fam, f"declared twice: {line}"
            fam[m.group(1).lower()] = m.group(3)
            assert m.group(1) == "HELP" or m.group(3) in ("counter", "gauge", "histogram", "summary", "untyped")
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels = m.group(1), _parse_labels(m.group(3) or "")
        value = float(m.group(4).replace("+Inf", "inf"))
        fam = next((f for f in (name, re.sub(r"_(bucket|sum|count)$", "", name)) if f in families), None)
        assert fam is not None and "type" in families[fam], f"sample of an undeclared family: {line}"
        assert (name, labels) not in families[fam]["samples"], f"duplicate sample: {line}"
        families[fam]["samples"][(name, labels)] = value
    for fam, data in families.items():
        if data.get("type") == "histogram":
            _check_histogram(fam, data["samples"])
    return families


def _parse_labels(body: str) -> tuple:
    pairs, pos = [], 0
    while pos < len(body):
        m = _LABEL.match(body, pos)
        assert m, f"bad labels: {body!r}"
        value = re.sub(r"\\(.)", lambda x: {"n": "\n"}.get(x.group(1), x.group(1)), m.group(2))
        pairs.append((m.group(1), value))
        pos = m.end()
    assert len({k for k, _ in pairs}) == len(pairs)
    return tuple(sorted(pairs))


def _check_histogram(fam: str, samples: dict) -> None:
    series: dict[tuple, list] = {}
    for (name, labels), value in samples.items():
        if name == f"{fam}_bucket":
            rest = tuple(kv for kv in labels if kv[0] != "le")
            series.setdefault(rest, []).append((float(dict(labels)["le"].replace("+Inf", "inf")), value))
    for rest, buckets in series.items():
        buckets.sort()
        counts = [c for _, c in buckets]
        assert buckets[-1][0] == math.inf and counts == sorted(counts), f"{fam}{rest}: not cumulative"
        assert samples[(f"{fam}_count", rest)] == counts[-1] and (f"{fam}_sum", rest) in samples


def _value(families, family: str, sample: str | None = None, **labels) -> float:
    return families[family]["samples"].get((sample or family, tuple(sorted(labels.items()))), 0.0)


def _cross_check(text: str, families: dict) -> None:
    """prometheus_client's own parser reads the same families and values (when it is installed)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return
    theirs = {(s.name, tuple(sorted(s.labels.items()))): s.value
              for f in text_string_to_metric_families(text) for s in f.samples}
    ours = {k: v for fam in families.values() for k, v in fam["samples"].items()}
    assert theirs == ours


# ---- /metrics ---------------------------------------------------------------------------------------
def test_metrics_over_a_real_socket_count_the_requests_made(bundle):
    _, model, keys = bundle
    app = create_app(model, api_keys=keys)

    @app.get("/busy")
    async def busy():  # a 5xx answered cleanly (uvicorn drops the connection after an unhandled error)
        raise ApiError(503, "busy for a test")

    alice = {"x-api-key": ALICE}
    with live(app) as url, httpx.Client(base_url=url) as http:
        assert [http.get("/health").status_code for _ in range(3)] == [200] * 3
        assert [http.post("/embed", json={"texts": ["red", "blue"]}, headers=alice).status_code
                for _ in range(2)] == [200] * 2
        assert http.post("/embed", json={"texts": ["red"]}).status_code == 401
        assert http.get("/nope", headers=alice).status_code == 404
        assert http.get("/images/1000", headers=alice).status_code == 404  # no index here
        assert http.get("/busy", headers=alice).status_code == 503
        r = http.get("/metrics", headers=alice)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    fams = parse_exposition(r.text)
    _cross_check(r.text, fams)
    total = "anybind_http_requests_total"
    assert fams[total]["type"] == "counter" and fams["anybind_http_request_duration_seconds"]["type"] == "histogram"
    want = {("/health", "GET", "200"): 3, ("/embed", "POST", "200"): 2, ("/embed", "POST", "401"): 1,
            ("unmatched", "GET", "404"): 1, ("/images/{item_id:path}", "GET", "404"): 1, ("/busy", "GET", "503"): 1}
    got = {(dict(lab)["route"], dict(lab)["method"], dict(lab)["status"]): v
           for (_, lab), v in fams[total]["samples"].items()}
    assert got == want  # the /metrics request itself is counted once it is answered
    assert _value(fams, "anybind_http_errors_total", route="/busy", status="503") == 1
    assert sum(fams["anybind_http_errors_total"]["samples"].values()) == 1
    hist = "anybind_http_request_duration_seconds"
    for route, n in (("/health", 3), ("/embed", 3), ("/busy", 1)):
        assert _value(fams, hist, f"{hist}_count", route=route) == n
        assert 0 < _value(fams, hist, f"{hist}_sum", route=route) < 30
    assert _value(fams, "anybind_http_requests_in_flight") == 1  # this one
    b = "anybind_batch_size"  # fed by the micro-batcher: two requests one after the other, two texts each
    assert (_value(fams, b, f"{b}_count", modality="text"), _value(fams, b, f"{b}_sum", modality="text")) == (2, 4)
    assert "/images/1000" not in r.text  # routes, never raw paths


def test_a_request_that_raises_is_counted_as_a_500_error(bundle):
    from fastapi.testclient import TestClient

    app = create_app(bundle[1])

    @app.get("/crash")
    async def crash():
        raise RuntimeError("a bug")

    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/crash").status_code == 500 and "a bug" in c.get("/crash").json()["error"]
    fams = parse_exposition(app.state.metrics.exposition())
    assert _value(fams, "anybind_http_errors_total", route="/crash", status="500") == 2
    assert _value(fams, "anybind_http_requests_in_flight") == 0


def test_batch_sizes_and_label_escaping_in_the_exposition():
    metrics = ops.Metrics()
    for modality, size in (("text", 3), ("text", 40), ("image", 1)):
        metrics.observe_batch(modality, size)
    metrics.started()
    metrics.observe_request('/we"ird\\path\nx', "GET", 503, 0.2)
    text = metrics.exposition()
    fams = parse_exposition(text)
    _cross_check(text, fams)
    b = "anybind_batch_size"
    assert fams[b]["type"] == "histogram"
    assert [_value(fams, b, f"{b}_bucket", modality="text", le=le) for le in ("2.0", "4.0", "32.0", "64.0", "+Inf")] \
        == [0, 1, 1, 2, 2]
    assert _value(fams, b, f"{b}_sum", modality="text") == 43 and _value(fams, b, f"{b}_count", modality="image") == 1
    weird = '/we"ird\\path\nx'
    assert _value(fams, "anybind_http_errors_total", route=weird, status="503") == 1
    assert _value(fams, "anybind_http_requests_total", route=weird, method="GET", status="503") == 1
    assert _value(fams, "anybind_http_requests_in_flight") == 0


def test_a_strict_reader_refuses_what_the_format_does_not_allow():
    good = "# TYPE x_total counter\nx_total{a=\"1\"} 2\n"
    assert _value(parse_exposition(good), "x_total", a="1") == 2
    for bad in ("x_total 1\n", good + 'x_total{a="1"} 3\n', "# TYPE x counter\nx{a=1} 1\n", good.rstrip("\n"),
                "# TYPE h histogram\nh_bucket{le=\"1.0\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_count 1\nh_sum 1\n"):
        with pytest.raises(AssertionError):
            parse_exposition(bad)


# ---- the access log -----------------------------------------------------------------------------------
def test_access_log_lines_over_a_real_socket_are_json_with_key_names_never_keys(bundle, tmp_path):
    _, model, keys = bundle
    log = tmp_path / "access.jsonl"
    handler = ops.configure_access_log(str(log))
    try:
        with live(create_app(model, api_keys=keys)) as url, httpx.Client(base_url=url) as http:
            assert http.get("/openapi.json", params={"q": "my-private-query"},
                            headers={"authorization": f"Bearer {ALICE}"}).status_code == 200
            assert http.post("/embed", json={"texts": ["x"]}, headers={"x-api-key": BOB}).status_code == 200
            assert http.get("/openapi.json").status_code == 401
            assert http.get("/openapi.json", headers={"x-api-key": ALICE[:-1] + "Q"}).status_code == 403
    finally:
        ops.ACCESS_LOG.removeHandler(handler)
        handler.close()
        ops.ACCESS_LOG.propagate, ops.ACCESS_LOG.level = True, 0
    text = log.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert [(x["method"], x["path"], x["route"], x["status"], x["key"]) for x in lines] == [
        ("GET", "/openapi.json", "/openapi.json", 200, "alice"), ("POST", "/embed", "/embed", 200, "bob"),
        ("GET", "/openapi.json", "/openapi.json", 401, None), ("GET", "/openapi.json", "/openapi.json", 403, None)]
    for x in lines:
        assert set(x) == {"time", "method", "path", "route", "status", "ms", "bytes", "client", "key"}
        assert x["client"] == "127.0.0.1" and 0 < x["ms"] < 30_000 and x["bytes"] > 0 and x["time"].endswith("+00:00")
    for secret in (ALICE, BOB, ALICE[:-1], "my-private-query"):
        assert secret not in text


def test_serve_refuses_a_bad_access_log_or_shutdown_timeout_before_listening(bundle, tmp_path, capsys):
    folder = str(bundle[0])
    assert main(["serve", "--bundle", folder, "--access-log", str(tmp_path / "no" / "such" / "log")]) == 2
    assert "cannot be opened" in capsys.readouterr().err
    assert main(["serve", "--bundle", folder, "--shutdown-timeout", "0"]) == 2
    assert "--shutdown-timeout" in capsys.readouterr().err


# ---- graceful shutdown --------------------------------------------------------------------------------
def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def _wait_ready(port: int, proc, deadline: float) -> None:
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2)
            if r.status_code == 200 or (r.status_code == 404 and httpx.get(f"http://127.0.0.1:{port}/health").is_success):
                return
        time.sleep(0.1)
    raise AssertionError("anybind serve did not become ready")


def _wait_in_flight(port: int, count: int) -> None:
    """Until /metrics says `count` requests are being answered (the one asking included)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"x-api-key": BOB}).text
        if _value(parse_exposition(text), "anybind_http_requests_in_flight") >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} requests in flight")


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_refuses_new_connections_and_exits_0(bundle, tmp_path):
    """`anybind serve` as a process: a request whose body is still arriving when SIGTERM comes is
    answered 200, the listening socket is closed at once, and the process exits 0."""
    folder, model, keys = bundle
    port, log = free_port(), tmp_path / "access.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "anybind.cli", "serve", "--bundle", str(folder), "--port", str(port),
                             "--api-key-file", str(keys), "--rate-limit", "100/s", "--access-log", str(log),
                             "--shutdown-timeout", "20", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_ready(port, proc, time.monotonic() + 120)
        body = json.dumps({"texts": [f"a red square number {i}" for i in range(50)]}).encode()
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        conn.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"X-API-Key: {ALICE}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        _wait_in_flight(port, 2)  # the request is in the app (its headers in, its body not), besides this one
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while not _refused(port) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _refused(port), "still accepting connections after SIGTERM"
        assert proc.poll() is None  # still finishing the request
        conn.sendall(body[100:])
        raw = b""
        while chunk := conn.recv(1 << 16):
            raw += chunk
        conn.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), raw[:300]
        assert len(json.loads(payload)["embeddings"]) == 50  # whole, and then the server closed the connection
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert {"path": "/embed", "status": 200, "key": "alice"}.items() <= lines[-1].items()
    assert ALICE not in log.read_text()
