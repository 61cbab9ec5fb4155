import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from gridswarm.home import HomeInUse, lock_home
from gridswarm.identity import AuthError, Identity, sign_request, verify_request


def test_key_is_created_once_and_kept(tmp_path):
    first = Identity.load_or_create(tmp_path / "node.key")
    again = Identity.load_or_create(tmp_path / "node.key")
    assert first.node_id == again.node_id
    assert (tmp_path / "node.key").stat().st_mode & 0o777 == 0o600


def test_signed_request_verifies_and_names_its_sender():
    ident = Identity.generate()
    headers = sign_request(ident, "POST", "/v1/x", b"body", now_s=1000.0)
    verified = verify_request(headers, "POST", "/v1/x", b"body", now_s=1001.0)
    assert verified.node_id == ident.node_id
    # the body's hash, computed once for the signature, names the body (an upload's blob)
    assert verified.body_sha256 == hashlib.sha256(b"body").hexdigest()


@pytest.mark.parametrize(
    ("method", "path", "body", "now", "message"),
    [
        ("POST", "/v1/x", b"tampered", 1000.0, "bad signature"),
        ("POST", "/v1/y", b"body", 1000.0, "bad signature"),
        ("GET", "/v1/x", b"body", 1000.0, "bad signature"),
        ("POST", "/v1/x", b"body", 2000.0, "stale"),
    ],
)
def test_altered_or_stale_requests_are_refused(method, path, body, now, message):
    headers = sign_request(Identity.generate(), "POST", "/v1/x", b"body", now_s=1000.0)
    with pytest.raises(AuthError, match=message):
        verify_request(headers, method, path, body, now_s=now)


def test_signature_of_another_key_is_a_forgery():
    victim, forger = Identity.generate(), Identity.generate()
    headers = sign_request(forger, "POST", "/v1/x", b"b", now_s=10.0)
    headers["x-gridswarm-key"] = victim.public_key.hex()
    with pytest.raises(AuthError, match="bad signature"):
        verify_request(headers, "POST", "/v1/x", b"b", now_s=10.0)


def test_missing_and_malformed_headers():
    with pytest.raises(AuthError, match="unsigned") as exc:
        verify_request({}, "POST", "/", b"", now_s=0)
    assert exc.value.status == 401
    headers = sign_request(Identity.generate(), "POST", "/", b"", now_s=0)
    headers["x-gridswarm-signature"] = "zz"
    with pytest.raises(AuthError, match="malformed") as exc:
        verify_request(headers, "POST", "/", b"", now_s=0)
    assert exc.value.status == 400


def test_nodes_starting_at_once_share_one_complete_key(tmp_path):
    """Creation is atomic: racing creators all end up with the key that won, none crashes."""
    for attempt in range(20):
        path = tmp_path / f"home{attempt}" / "node.key"
        barrier = threading.Barrier(8)

        def create(p=path, b=barrier):
            b.wait()
            return Identity.ensure(p)

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda _: create(), range(8)))
        assert len({ident.node_id for ident, _ in results}) == 1
        assert sum(created for _, created in results) == 1
        assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temporary left


def test_a_second_process_on_one_home_is_refused_by_name(tmp_path):
    with (
        lock_home(tmp_path / "home"),
        pytest.raises(HomeInUse, match=rf"pid {os.getpid()}\).*own --home"),
        lock_home(tmp_path / "home"),
    ):
        pass
    with lock_home(tmp_path / "home"):  # released with its holder
        pass
