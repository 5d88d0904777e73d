"""Lab PKI (qgate.pki.make_pki): CA, KME and SAE certificates, key file modes, link secret."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qgate.errors import ConfigError
from qgate.pki import LINK_SECRET_SIZE, make_pki


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def cn(cert: x509.Certificate) -> str:
    (attr,) = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attr.value)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    out = tmp_path / "pki"
    make_pki(out, kmes={"KME_A": ["10.99.0.1"], "KME_B": ["10.99.0.2", "fd00::2"]}, saes=["SAE_A", "SAE_B"])
    return out


def test_make_pki_writes_every_file_with_private_files_0600(pki: Path) -> None:
    names = {p.name for p in pki.iterdir()}
    expected = {"ca.pem", "ca.key", "link.secret"} | {
        f"{i}.{ext}" for i in ("KME_A", "KME_B", "SAE_A", "SAE_B") for ext in ("pem", "key")
    }
    assert names == expected
    for name in names:
        private = name.endswith(".key") or name == "link.secret"
        assert (mode(pki / name) == 0o600) == private, name
    assert len((pki / "link.secret").read_bytes()) == LINK_SECRET_SIZE


def test_certificates_are_p256_signed_by_the_ca_with_cn_the_id(pki: Path) -> None:
    ca = load(pki / "ca.pem")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for entity in ("KME_A", "KME_B", "SAE_A", "SAE_B"):
        cert = load(pki / f"{entity}.pem")
        cert.verify_directly_issued_by(ca)
        assert cn(cert) == entity
        public = cert.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_kme_certificates_carry_ip_sans_and_both_usages(pki: Path) -> None:
    cert = load(pki / "KME_B.pem")
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.99.0.2"),
        ipaddress.ip_address("fd00::2"),
    }
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_sae_certificates_are_client_only(pki: Path) -> None:
    cert = load(pki / "SAE_A.pem")
    usages = list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_make_pki_refuses_to_overwrite_unless_forced(pki: Path) -> None:
    old = (pki / "link.secret").read_bytes()
    with pytest.raises(ConfigError, match=r"overwrite .*\(use --force\)"):
        make_pki(pki, kmes={"KME_A": []}, saes=["SAE_A"])
    make_pki(pki, kmes={"KME_A": []}, saes=["SAE_A"], force=True)
    assert (pki / "link.secret").read_bytes() != old
    assert mode(pki / "SAE_A.key") == 0o600


@pytest.mark.parametrize(
    ("kmes", "saes"),
    [
        ({"KME A": []}, ["SAE_A"]),  # space
        ({"KME_A": []}, ["../SAE"]),  # path
        ({"KME_A": []}, ["ca"]),  # would clash with ca.pem
        ({"KME_A": []}, ["KME_A"]),  # repeated
        ({"KME_A": ["10.99.0"]}, ["SAE_A"]),  # bad IP
        ({"KME_A": []}, [""]),
    ],
)
def test_make_pki_rejects_bad_ids_and_addresses(
    tmp_path: Path, kmes: dict[str, list[str]], saes: list[str]
) -> None:
    with pytest.raises(ConfigError):
        make_pki(tmp_path / "out", kmes=kmes, saes=saes)
    assert not (tmp_path / "out" / "ca.pem").exists()


# --- options for deployment-shaped tests ------------------------------------------------------------


def test_no_san_kme_certificate_has_cn_only_and_stays_a_server(tmp_path: Path) -> None:
    make_pki(tmp_path, kmes={"KME_A": ["10.99.0.1"], "KME_B": []}, saes=["SAE_A"], no_san_kmes=["KME_A"])
    cert = load(tmp_path / "KME_A.pem")
    assert cn(cert) == "KME_A"
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert load(tmp_path / "KME_B.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    with pytest.raises(ConfigError, match="no_san_kmes names no KME: SAE_A"):
        make_pki(tmp_path / "x", kmes={"KME_A": []}, saes=["SAE_A"], no_san_kmes=["SAE_A"])


def test_client_ca_issues_sae_certificates_apart_from_the_kme_servers(tmp_path: Path) -> None:
    make_pki(tmp_path, kmes={"KME_A": []}, saes=["SAE_A"], client_ca=True)
    ca, client_ca = load(tmp_path / "ca.pem"), load(tmp_path / "client-ca.pem")
    assert cn(client_ca) == "qgate lab client CA" and client_ca.subject != ca.subject
    load(tmp_path / "KME_A.pem").verify_directly_issued_by(ca)
    sae = load(tmp_path / "SAE_A.pem")
    sae.verify_directly_issued_by(client_ca)
    with pytest.raises(ValueError):
        sae.verify_directly_issued_by(ca)
    bundle = x509.load_pem_x509_certificates((tmp_path / "ca-bundle.pem").read_bytes())
    assert bundle == [ca, client_ca]
    assert mode(tmp_path / "client-ca.key") == 0o600


def tls_handshake(server_files: tuple[Path, Path, Path], client_files: tuple[Path, Path, Path]) -> str | None:
    """Run one mutual-TLS handshake over a socket pair; return the client CN the server saw."""
    import socket
    import ssl
    import threading

    server_ca, server_cert, server_key = server_files
    client_ca, client_cert, client_key = client_files
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    server_ctx.load_verify_locations(cafile=str(server_ca))
    server_ctx.load_cert_chain(str(server_cert), str(server_key))
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cafile=str(client_ca))
    client_ctx.load_cert_chain(str(client_cert), str(client_key))
    left, right = socket.socketpair()
    seen: list[object] = []

    def serve() -> None:
        with server_ctx.wrap_socket(left, server_side=True) as tls:
            seen.append(tls.getpeercert())
            tls.recv(1)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with client_ctx.wrap_socket(right, server_hostname="localhost") as tls:
        tls.sendall(b"x")
    thread.join(5)
    cert = seen[0]
    assert isinstance(cert, dict)
    names = [str(value) for rdn in cert["subject"] for attr, value in rdn if attr == "commonName"]
    return names[0] if names else None


def test_intermediate_ca_leaf_files_carry_the_chain_that_verifies_to_the_root(tmp_path: Path) -> None:
    make_pki(tmp_path, kmes={"KME_A": []}, saes=["SAE_A"], intermediate=True, client_ca=True)
    root, inter = load(tmp_path / "ca.pem"), load(tmp_path / "intermediate.pem")
    inter.verify_directly_issued_by(root)
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 1
    assert inter.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    kme_chain = x509.load_pem_x509_certificates((tmp_path / "KME_A.pem").read_bytes())
    assert [cn(c) for c in kme_chain] == ["KME_A", "qgate lab intermediate CA"]
    kme_chain[0].verify_directly_issued_by(inter)
    sae_chain = x509.load_pem_x509_certificates((tmp_path / "SAE_A.pem").read_bytes())
    assert [cn(c) for c in sae_chain] == ["SAE_A", "qgate lab client intermediate CA"]
    sae_chain[1].verify_directly_issued_by(load(tmp_path / "client-ca.pem"))
    kme = (tmp_path / "ca-bundle.pem", tmp_path / "KME_A.pem", tmp_path / "KME_A.key")
    sae = (tmp_path / "ca.pem", tmp_path / "SAE_A.pem", tmp_path / "SAE_A.key")
    assert tls_handshake(kme, sae) == "SAE_A"  # both sides trust roots only; the chains fill the gap


def test_options_refuse_ids_that_would_overwrite_a_ca_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="intermediate clash with the CA files"):
        make_pki(tmp_path, kmes={"KME_A": []}, saes=["intermediate"], intermediate=True)
    make_pki(tmp_path, kmes={"KME_A": []}, saes=["intermediate"])  # without the option: just an ID


def test_default_pki_has_one_ca_signing_every_leaf_alone(pki: Path) -> None:
    ca = load(pki / "ca.pem")
    assert cn(ca) == "qgate lab CA"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.path_length == 0
    for entity in ("KME_A", "SAE_A"):
        assert len(x509.load_pem_x509_certificates((pki / f"{entity}.pem").read_bytes())) == 1
