import pytest

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
