"""An encrypted, authenticated mesh (CurveZMQ), and tokens that never reach a log line."""

from __future__ import annotations

import subprocess
import time

import requests

from conftest import BIN, SMOLLM2


def make_keys(directory, name):
    subprocess.run([str(BIN / "velesio-keys"), str(directory), name], check=True, capture_output=True)
    return directory / f"{name}.key", directory / f"{name}.key_secret"


def test_curve_admits_allowed_worker_and_refuses_unknown(start_router, start_worker, tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    router_pub, router_secret = make_keys(keys, "router")
    good_pub, good_secret = make_keys(keys, "good")
    _bad_pub, bad_secret = make_keys(keys, "bad")
    (allowed / "good.key").write_bytes(good_pub.read_bytes())
    router = start_router({"curve": {"secret_key": str(router_secret), "allowed_workers": str(allowed)}})
    assert "plain TCP" not in router.proc.log

    start_worker(router, "trusted", [SMOLLM2],
                 worker_cfg={"curve": {"secret_key": str(good_secret), "router_public_key": str(router_pub)}})
    r = router.post("/completion", {"prompt": "Hi", "max_tokens": 3})
    assert r.status_code == 200, r.text

    intruder = start_worker(router, "intruder", [SMOLLM2], wait=False,
                            worker_cfg={"curve": {"secret_key": str(bad_secret),
                                                  "router_public_key": str(router_pub)}})
    plain = start_worker(router, "plaintext", [SMOLLM2], wait=False)
    deadline = time.monotonic() + 20
    while "refused a worker with unknown CURVE key" not in router.proc.log and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(2)
    names = {w["id"] for w in router.health()["workers"]}
    assert names == {"trusted"}
    assert "refused a worker with unknown CURVE key" in router.proc.log
    assert intruder.alive() and plain.alive()


def test_plain_tcp_is_announced(start_router):
    router = start_router()
    assert "plain TCP" in router.proc.log


def test_tokens_never_logged(start_router, start_worker):
    secret = "sk-very-secret-token-4242"
    router = start_router(token=secret, extra_args=["--log-level", "DEBUG"])
    start_worker(router, "log-scan", [SMOLLM2])
    headers = {"Authorization": f"Bearer {secret}"}
    requests.post(router.url + "/completion", json={"prompt": "Hello", "max_tokens": 2}, headers=headers, timeout=30)
    requests.post(router.url + "/completion", json={"prompt": "Hello"}, timeout=30,
                  headers={"Authorization": f"Bearer {secret[:-1]}"})
    requests.post(router.url + "/completion", json="bad", headers=headers, timeout=30)
    requests.get(router.url + "/models", auth=("user", secret), timeout=30)
    time.sleep(0.5)
    log = router.proc.wait_for_log("listening")
    assert "listening" in log
    for fragment in (secret, secret[:12], secret[-8:]):
        assert fragment not in log


def test_curve_with_two_routers_of_their_own_keys(start_router, start_worker, tmp_path):
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    allowed.mkdir()
    a_pub, a_secret = make_keys(keys, "router-a")
    b_pub, b_secret = make_keys(keys, "router-b")
    w_pub, w_secret = make_keys(keys, "w")
    (allowed / "w.key").write_bytes(w_pub.read_bytes())
    a = start_router({"curve": {"secret_key": str(a_secret), "allowed_workers": str(allowed)}})
    b = start_router({"curve": {"secret_key": str(b_secret), "allowed_workers": str(allowed)}})
    start_worker(a, "two-keys", [SMOLLM2], more_routers=[b], wait=False,
                 worker_cfg={"curve": {"secret_key": str(w_secret), "router_public_key": [str(a_pub), str(b_pub)]}})
    for router in (a, b):
        router.wait_workers({"two-keys"}, timeout=60)
        assert router.post("/completion", {"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_cors_origins_localhost_means_this_machine():
    """``cors_origins: ["localhost"]`` allows any origin on this machine (any port), as llama.cpp's
    ``--cors-origins localhost``, and nothing else."""
    from velesio.router.middleware import origin_allowed

    local = ["http://localhost", "http://localhost:8080", "http://127.0.0.1:3000", "http://[::1]",
             "https://localhost:8443"]
    assert all(origin_allowed(o, ["localhost"]) for o in local)
    foreign = ["http://web.mydomain.fr", "http://notlocalhost", "http://localhost.evil.com", "http://127.0.0.2"]
    assert not any(origin_allowed(o, ["localhost"]) for o in foreign)
    assert origin_allowed("http://web.mydomain.fr", ["*"]) and origin_allowed("http://a.b", ["http://a.b"])
    assert not origin_allowed("http://a.c", ["http://a.b"])
