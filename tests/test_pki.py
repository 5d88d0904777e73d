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
