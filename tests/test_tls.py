"""TLS: a hub serving HTTPS with a certificate the test makes (a private CA, with `cryptography`);
nodes and the CLI that trust that CA connect, one given another CA refuses at once, and plain HTTP
to the TLS hub fails with a clear message."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gridswarm.identity import Identity
from gridswarm.node.client import CA_ENV, HubClient, HubTLSError
from gridswarm.protocol import RegisterRequest
from gridswarm.swarm import Swarm, free_port
from tests.conftest import tiny_run, wait_for

pytestmark = pytest.mark.slow


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(folder: Path, name: str) -> tuple[Path, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    path = folder / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(folder: Path, ca_key, ca_cert) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("gridswarm hub"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = folder / "hub.crt", folder / "hub.key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def tls_hub(tmp_path_factory):
    """One hub serving HTTPS for the module's tests (started once: it is the slow part)."""
    folder = tmp_path_factory.mktemp("tls")
    ca, ca_key, ca_cert = make_ca(folder, "test-ca")
    other_ca, _, _ = make_ca(folder, "other-ca")
    cert, key = make_server_cert(folder, ca_key, ca_cert)
    swarm = Swarm(folder / "swarm", free_port())
    swarm.workdir.mkdir()
    swarm.hub_extra = ["--tls-cert", str(cert), "--tls-key", str(key)]
    swarm.url = swarm.url.replace("http://", "https://")
    swarm.env[CA_ENV] = str(ca)  # the hub's health check trusts the test CA
    swarm.start_hub()
    yield swarm, ca, other_ca
    swarm.stop()


def cli(*args: str, env_extra: dict | None = None, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GRIDSWARM_HOME": str(home)}
    env.pop(CA_ENV, None)
    return subprocess.run(
        [sys.executable, "-m", "gridswarm.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env | (env_extra or {}),
    )


def test_nodes_and_cli_that_trust_the_ca_connect(tls_hub, tmp_path):
    swarm, ca, _ = tls_hub
    client = HubClient(swarm.url, Identity.generate(), retry_for_s=5, ca=ca)
    node_id = client.register(RegisterRequest(probe_tokens_per_s=1000.0, probe_numel=1000))
    assert len(node_id) == 16
    # a real node process, given the CA through --ca, trains on a run over TLS
    run_id = client.create_run(tiny_run(budget={"rounds": 1})).run_id
    swarm.env.pop(CA_ENV)
    swarm.start_node("tls-node", run_id, extra=["--ca", str(ca)])
    wait_for(lambda: client.run_status(run_id)["status"] == "finished", 120, "a round over TLS")
    # the CLI, with --ca anywhere on the line
    done = cli("run", "status", "--hub", swarm.url, "--ca", str(ca), home=tmp_path / "cli")
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


def test_a_client_given_another_ca_refuses_at_once(tls_hub, tmp_path):
    swarm, _, other_ca = tls_hub
    client = HubClient(swarm.url, Identity.generate(), retry_for_s=30, ca=other_ca)
    with pytest.raises(HubTLSError, match="does not trust"):
        client.healthz()
    done = cli("run", "status", "--hub", swarm.url, "--ca", str(other_ca), home=tmp_path / "c")
    assert done.returncode != 0
    assert "does not trust" in done.stderr and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not trust" in errors[0]


def test_plain_http_to_a_tls_hub_fails_clearly(tls_hub):
    swarm, ca, _ = tls_hub
    plain = swarm.url.replace("https://", "http://")
    client = HubClient(plain, Identity.generate(), retry_for_s=30, ca=ca)
    with pytest.raises(HubTLSError, match="serves TLS: use https://"):
        client.healthz()
