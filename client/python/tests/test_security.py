"""Bearer tokens and TLS against real paramd processes: a token-protected
server refuses calls without the token or with a wrong one (UNAUTHENTICATED,
`paramd.Unauthenticated`, the server's message kept, nothing changed) and
serves the right one, given as an argument, a file or the environment as
paramctl takes it; a mutual-TLS two-shard cluster with a token replays a
golden trace through the Python client, and clients without the CA, with
another CA, without a client certificate or in plaintext cannot connect.
The CA and certificates are made here with the `cryptography` package."""

import datetime
import ipaddress
import time
from pathlib import Path

import numpy as np
import pytest

import paramd
from conftest import CHUNK_BYTES, Cluster
from test_golden import GOLDEN, replay

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TOKEN = "s3cret-Token_0123456789"


class Pki:
    """A CA, and certificates it signs, as PEM files in `dir`."""

    def __init__(self, dir: Path):
        self.dir = dir
        dir.mkdir(parents=True, exist_ok=True)
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "paramd test CA")])
        self.cert = (
            self._builder(name, name, self.key.public_key())
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.ca = dir / "ca.pem"
        self.ca.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject, issuer, public_key):
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
        )

    def issue(self, stem: str, names):
        """A certificate for `names` (DNS names or IP addresses), good for
        servers and clients (shards present theirs to each other): the
        paths of its PEM certificate and key."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans = []
        for n in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
        cert = (
            self._builder(subject, self.cert.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        c, k = self.dir / (stem + ".pem"), self.dir / (stem + ".key")
        c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        k.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return c, k


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("token") / "token"
    p.write_text(TOKEN + "\n")
    return p


@pytest.fixture(scope="module")
def token_server(paramd_bin, token_file):
    c = Cluster(paramd_bin, 1, CHUNK_BYTES + ["--auth-token-file", str(token_file)])
    yield c
    c.stop()


@pytest.fixture
def no_credentials_in_env(monkeypatch):
    for name in ("PARAMD_TOKEN", "PARAMD_TOKEN_FILE", "PARAMD_CA_CERT", "PARAMD_CERT", "PARAMD_KEY"):
        monkeypatch.delenv(name, raising=False)


W = {"w": np.array([1.0, 2.0], np.float32)}


def test_a_missing_or_wrong_token_is_refused_and_changes_nothing(
    token_server, token_file, job_name, no_credentials_in_env
):
    none = token_server.client(timeout=10)
    with pytest.raises(paramd.Unauthenticated) as e:
        none.status()
    # The server's own message, the code kept; a PermissionError too.
    assert "authorization: Bearer <token>" in e.value.message
    assert e.value.code.name == "UNAUTHENTICATED" and isinstance(e.value, PermissionError)
    # A wrong token (a prefix of the right one): refused, nothing created.
    wrong = token_server.client(token=TOKEN[:-1], timeout=10)
    with pytest.raises(paramd.Unauthenticated):
        wrong.init(job_name, W, paramd.SGD(lr=1.0), workers=1)

    # The right token, from a file as paramctl --token-file reads it.
    right = token_server.client(token_file=token_file, timeout=10)
    assert right.init(job_name, W, paramd.SGD(lr=1.0), workers=1).created
    # A wrong-token push of the first round is refused; nothing is counted.
    with pytest.raises(paramd.Unauthenticated):
        wrong.push(job_name, 0, 0, {"w": np.ones(2, np.float32)})
    with pytest.raises(paramd.Unauthenticated):
        none.delete_job(job_name)
    s = right.job_status(job_name)
    assert (s.round, s.workers_pushed) == (0, 0)
    right.push(job_name, 0, 0, {"w": np.ones(2, np.float32)})
    np.testing.assert_array_equal(right.pull(job_name, 1).params["w"], [0.0, 1.0])
    for c in (none, wrong, right):
        c.close()


def test_the_token_comes_from_the_environment_as_for_paramctl(
    token_server, token_file, job_name, monkeypatch, no_credentials_in_env
):
    monkeypatch.setenv("PARAMD_TOKEN", TOKEN)
    with token_server.client(timeout=10) as c:
        assert c.init(job_name, W, paramd.SGD(), workers=1).created
    monkeypatch.delenv("PARAMD_TOKEN")
    monkeypatch.setenv("PARAMD_TOKEN_FILE", str(token_file))
    with token_server.client(timeout=10) as c:
        assert c.job_status(job_name).round == 0
        # An argument wins over the environment.
        with pytest.raises(paramd.Unauthenticated):
            paramd.Client(token_server.url, token="another-token", timeout=10).status()
    monkeypatch.setenv("PARAMD_TOKEN", TOKEN)
    with pytest.raises(paramd.InvalidArgument, match="PARAMD_TOKEN_FILE and PARAMD_TOKEN are both set"):
        token_server.client()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"token": "two words"}, "token: a token is visible ASCII without spaces, found ' '"),
        ({"token": ""}, "token holds an empty token"),
        ({"token": "a", "token_file": "/x"}, "give token or token_file, not both"),
        ({"token_file": "/nonexistent/token"}, "token_file: cannot read '/nonexistent/token'"),
        ({"tls": paramd.TLS}, "tls must be a paramd.TLS"),
        ({"tls": True}, "is plaintext \\(http://\\) but tls= is given: use https://"),
    ],
)
def test_credential_arguments_are_checked(kwargs, match, no_credentials_in_env):
    with pytest.raises(paramd.InvalidArgument, match=match) as e:
        paramd.Client("http://127.0.0.1:1", **kwargs)
    assert "two words" not in str(e.value)


def test_tls_settings_are_checked(tmp_path, monkeypatch, no_credentials_in_env):
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(paramd.InvalidArgument, match="token_file %s holds an empty token" % empty):
        paramd.Client("http://127.0.0.1:1", token_file=empty)
    with pytest.raises(paramd.InvalidArgument, match="TLS cert is given without key"):
        paramd.TLS(cert=b"pem")
    with pytest.raises(paramd.InvalidArgument, match="TLS ca_cert: cannot read '/nonexistent/ca.pem'"):
        paramd.TLS(ca_cert="/nonexistent/ca.pem")
    monkeypatch.setenv("PARAMD_CERT", "/x.pem")
    with pytest.raises(paramd.InvalidArgument, match="PARAMD_CERT and PARAMD_KEY go together"):
        paramd.Client("https://127.0.0.1:1")
    monkeypatch.setenv("PARAMD_KEY", "/x.key")
    with pytest.raises(paramd.InvalidArgument, match="TLS cert: cannot read '/x.pem'"):
        paramd.Client("https://127.0.0.1:1")
    # TLS settings from the environment are for https:// servers only.
    paramd.Client("http://127.0.0.1:1").close()


@pytest.fixture(scope="module")
def mtls(paramd_bin, tmp_path_factory, token_file):
    """Two shards serving TLS, requiring client certificates and the token;
    they present their certificate to each other."""
    pki = Pki(tmp_path_factory.mktemp("pki"))
    server_cert, server_key = pki.issue("server", ["localhost", "127.0.0.1"])
    client_cert, client_key = pki.issue("client", ["worker"])
    peer_token = token_file.parent / "peer-token"
    peer_token.write_text("peer-s3cret\n")
    flags = ["--chunk-bytes", "16", "--auth-token-file", str(token_file), "--peer-token-file", str(peer_token)]
    flags += ["--tls-cert", str(server_cert), "--tls-key", str(server_key), "--tls-client-ca", str(pki.ca)]
    cluster = Cluster(paramd_bin, 2, flags, scheme="https", host="localhost")
    cluster.pki = pki
    cluster.tls = paramd.TLS(ca_cert=pki.ca, cert=client_cert, key=client_key)
    yield cluster
    cluster.stop()


def test_a_mutual_tls_cluster_with_a_token_replays_a_golden_trace(mtls, token_file, job_name, no_credentials_in_env):
    assert mtls.url.startswith("https://localhost:")
    for d in mtls.daemons:
        assert not any(TOKEN in line for line in d.log), "the token is in a shard's log"

    def client():
        return paramd.Client(mtls.url, token_file=token_file, tls=mtls.tls, timeout=60)

    replay(GOLDEN / "adamw_param_groups.safetensors", job_name, client)
    with client() as c:
        layout = c.layout(job_name)
        assert len(layout.shards) == 2 and set(layout.owners) == {0, 1}, "both shards hold chunks"
        assert all(s.up for s in c.job_status(job_name).shards)

    # The same credentials from the environment, as paramctl reads them.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PARAMD_TOKEN_FILE", str(token_file))
        env.setenv("PARAMD_CA_CERT", str(mtls.pki.ca))
        env.setenv("PARAMD_CERT", str(mtls.pki.dir / "client.pem"))
        env.setenv("PARAMD_KEY", str(mtls.pki.dir / "client.key"))
        with paramd.Client(mtls.url, timeout=10) as c:
            assert c.job_status(job_name).round > 0

    # TLS without the token: the server's refusal.
    with paramd.Client(mtls.url, tls=mtls.tls, timeout=10) as c:
        with pytest.raises(paramd.Unauthenticated, match="authorization: Bearer <token>"):
            c.status()


def test_clients_without_the_ca_or_a_client_certificate_cannot_connect(
    mtls, tmp_path, token_file, no_credentials_in_env
):
    other = Pki(tmp_path / "other")
    client_cert, client_key = mtls.pki.dir / "client.pem", mtls.pki.dir / "client.key"
    attempts = {
        "the system's roots": (mtls.url, paramd.TLS(cert=client_cert, key=client_key)),
        "another CA": (mtls.url, paramd.TLS(ca_cert=other.ca, cert=client_cert, key=client_key)),
        "no client certificate": (mtls.url, paramd.TLS(ca_cert=mtls.pki.ca)),
        "plaintext": (mtls.url.replace("https://", "http://"), None),
    }
    for what, (url, tls) in attempts.items():
        # A server certificate the client cannot verify fails at once, not
        # retried until the deadline; the server's refusals of the client
        # look like a dropped connection, so these are not retried here.
        retries = None if tls is not None and tls.cert is not None else 0
        start = time.monotonic()
        with paramd.Client(url, token_file=token_file, tls=tls, timeout=30, retries=retries) as c:
            with pytest.raises(paramd.Unavailable) as e:
                c.status()
        took = time.monotonic() - start
        print("%s: refused after %.2f s: %s" % (what, took, e.value))
        assert took < 10, "%s: refused only after %.1f s" % (what, took)
        if retries is None:
            assert "certificate" in e.value.message.lower(), e.value
