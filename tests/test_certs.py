"""``qgate.certs``: certificate inspection for ``qgate check`` / ``qgate up``, on generated certificates.

``issue`` below is the small local generator these tests and ``test_checks.py`` use (ECDSA P-256,
SHA-256), so that every layout (separate client CA, intermediates, odd extensions, dates) is built
here rather than taken from ``qgate.pki``.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from qgate import certs

NOW = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
DAY = datetime.timedelta(days=1)
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


@dataclass(frozen=True)
class Issued:
    """A generated certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def key_usage(*allowed: str) -> x509.KeyUsage:
    """A keyUsage allowing exactly ``allowed`` (``digital_signature``, ``key_cert_sign``, ...)."""
    names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment"]
    names += ["key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]
    return x509.KeyUsage(**{name: name in allowed for name in names})


def issue(
    cn: str,
    issuer: Issued | None = None,
    *,
    ca: bool = False,
    start: datetime.timedelta = -DAY,
    lifetime: datetime.timedelta = 365 * DAY,
    usage: x509.KeyUsage | None = None,
    eku: list[x509.ObjectIdentifier] | None = None,
    sans: list[x509.GeneralName] | None = None,
    basic_constraints: bool = True,
) -> Issued:
    """Generate a certificate for ``cn``, self-signed when ``issuer`` is None.

    Args:
        cn: subject CN.
        issuer: the signing CA, or None for a self-signed root.
        ca: basicConstraints CA:TRUE (CA certificates also get keyUsage keyCertSign + cRLSign
            unless ``usage`` says otherwise).
        start: not_valid_before relative to NOW.
        lifetime: not_valid_after - not_valid_before.
        usage: keyUsage to add (None: none for leaves).
        eku: extendedKeyUsage purposes (None: no extension).
        sans: subjectAltName entries (None: no extension).
        basic_constraints: add basicConstraints at all.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    signer = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + start)
        .not_valid_after(NOW + start + lifetime)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False
        )
    )
    if basic_constraints:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    if usage is None and ca:
        usage = key_usage("key_cert_sign", "crl_sign")
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return Issued(builder.sign(signer, hashes.SHA256()), key)


def sae(issuer: Issued, cn: str = "SAE_A", **kwargs: object) -> Issued:
    """An SAE client certificate as a KME operator would issue it (digitalSignature, clientAuth)."""
    options: dict[str, object] = {"usage": key_usage("digital_signature"), "eku": [CLIENT_AUTH]}
    options.update(kwargs)
    return issue(cn, issuer, **options)


# ----- validity windows (RFC 5280 section 4.1.2.5) ----------------------------------------------


def test_certificate_inside_its_window_has_no_finding() -> None:
    assert certs.validity(issue("x").cert, NOW) == certs.Findings()


def test_expired_certificate_is_an_error_naming_the_dates() -> None:
    cert = issue("x", start=-400 * DAY, lifetime=365 * DAY).cert
    (error,) = certs.validity(cert, NOW).errors
    end = (NOW - 35 * DAY).strftime("%Y-%m-%d")
    assert error.startswith(f"expired on {end}") and (NOW - 400 * DAY).strftime("%Y-%m-%d") in error


def test_not_yet_valid_certificate_is_an_error_naming_its_start() -> None:
    cert = issue("x", start=3 * DAY).cert
    (error,) = certs.validity(cert, NOW).errors
    assert error.startswith(f"not valid yet: valid from {(NOW + 3 * DAY).strftime('%Y-%m-%d')}")


def test_certificate_expiring_within_warn_days_is_a_warning_only() -> None:
    cert = issue("x", start=-DAY, lifetime=11 * DAY).cert  # ends NOW + 10 days
    found = certs.validity(cert, NOW, warn_days=30)
    assert found.errors == [] and found.warnings == [
        f"expires in 10 days, on {(NOW + 10 * DAY).strftime('%Y-%m-%d %H:%M:%S')} UTC"
    ]
    assert certs.validity(cert, NOW, warn_days=9) == certs.Findings()


# ----- CA and usage rules ------------------------------------------------------------------------


def test_ca_rules_need_basic_constraints_ca_and_key_cert_sign_when_key_usage_is_present() -> None:
    assert certs.ca_problems(issue("root", ca=True).cert) == []
    assert certs.ca_problems(issue("root", ca=True, usage=key_usage("digital_signature")).cert) == [
        "keyUsage does not allow keyCertSign"
    ]
    assert certs.ca_problems(issue("leaf").cert) == ["not a CA certificate (basicConstraints CA:FALSE)"]
    assert certs.ca_problems(issue("old", basic_constraints=False).cert) == [
        "not a CA certificate (no basicConstraints)"
    ]


def test_client_certificate_needs_digital_signature_and_client_auth_when_present() -> None:
    root = issue("root", ca=True)
    assert certs.client_usage_problems(sae(root).cert) == []
    assert certs.client_usage_problems(issue("bare", root).cert) == []  # no KU, no EKU: unrestricted
    (problem,) = certs.client_usage_problems(sae(root, usage=key_usage("key_encipherment")).cert)
    assert "digitalSignature" in problem
    (problem,) = certs.client_usage_problems(sae(root, eku=[SERVER_AUTH]).cert)
    assert problem == "extendedKeyUsage does not include clientAuth (it has serverAuth)"


def test_server_certificate_needs_server_auth_when_eku_is_present() -> None:
    root = issue("root", ca=True)
    assert certs.server_usage_problems(issue("kme", root, eku=[SERVER_AUTH, CLIENT_AUTH]).cert) == []
    assert certs.server_usage_problems(issue("kme", root, eku=[CLIENT_AUTH]).cert) != []


# ----- chains --------------------------------------------------------------------------------------


def test_certificate_from_a_separate_client_ca_verifies_against_that_ca_only() -> None:
    server_ca, client_ca = issue("KME server CA", ca=True), issue("SAE client CA", ca=True)
    leaf = sae(client_ca).cert
    assert certs.anchored([leaf], [client_ca.cert])
    assert certs.verify_chain([leaf], [client_ca.cert], NOW) is None
    assert not certs.anchored([leaf], [server_ca.cert])
    assert certs.verify_chain([leaf], [server_ca.cert], NOW) is not None


def test_leaf_and_intermediate_verify_against_the_root() -> None:
    root = issue("root", ca=True)
    intermediate = issue("intermediate", root, ca=True)
    leaf = sae(intermediate).cert
    assert certs.chain_order_problems([leaf, intermediate.cert]) == []
    assert certs.anchored([leaf, intermediate.cert], [root.cert])
    assert certs.verify_chain([leaf, intermediate.cert], [root.cert], NOW) is None
    assert certs.verify_chain([leaf], [root.cert], NOW) is not None  # intermediate missing


def test_chain_file_that_also_holds_the_root_verifies() -> None:
    root = issue("root", ca=True)
    intermediate = issue("intermediate", root, ca=True)
    chain = [sae(intermediate).cert, intermediate.cert, root.cert]
    assert certs.chain_order_problems(chain) == []
    assert certs.verify_chain(chain, [root.cert], NOW) is None


def test_intermediate_that_is_not_a_ca_breaks_the_chain() -> None:
    root = issue("root", ca=True)
    not_ca = issue("not a CA", root)
    reason = certs.verify_chain([sae(not_ca).cert, not_ca.cert], [root.cert], NOW)
    assert reason is not None and "basicConstraints" in reason


def test_chain_file_in_the_wrong_order_is_reported() -> None:
    root = issue("root", ca=True)
    intermediate = issue("intermediate", root, ca=True)
    (problem,) = certs.chain_order_problems([intermediate.cert, sae(intermediate).cert])
    assert problem.startswith("certificate 2 (CN=SAE_A) did not issue certificate 1 (CN=intermediate)")


def test_chain_is_checked_structurally_even_when_a_certificate_is_out_of_date() -> None:
    """Dates are ``validity``'s job: an expired leaf still links up, so it is not reported twice."""
    root = issue("root", ca=True, start=-500 * DAY, lifetime=3650 * DAY)
    expired = sae(root, start=-400 * DAY, lifetime=30 * DAY).cert
    assert certs.verify_chain([expired], [root.cert], NOW) is None
    assert certs.validity(expired, NOW).errors != []


# ----- names and pins --------------------------------------------------------------------------------


def test_san_matching_follows_openssl_host_and_ip_rules() -> None:
    root = issue("root", ca=True)
    sans: list[x509.GeneralName] = [x509.DNSName("kme.example"), x509.DNSName("*.qkd.example")]
    sans.append(x509.IPAddress(ipaddress.ip_address("10.0.0.1")))
    cert = issue("kme", root, sans=sans).cert
    assert certs.san_matches(cert, "KME.example") and certs.san_matches(cert, "a.qkd.example")
    assert certs.san_matches(cert, "10.0.0.1")
    assert not certs.san_matches(cert, "a.b.qkd.example") and not certs.san_matches(cert, "qkd.example")
    assert not certs.san_matches(cert, "10.0.0.2")
    assert certs.san_names(cert) == ["DNS:kme.example", "DNS:*.qkd.example", "IP:10.0.0.1"]
    no_san = issue("kme", root).cert
    assert not certs.san_matches(no_san, "kme") and certs.san_names(no_san) is None


def test_sha256_fingerprint_compares_in_openssl_colon_form() -> None:
    cert = issue("kme").cert
    fingerprint = certs.sha256_fingerprint(cert)
    colons = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    assert len(fingerprint) == 64 and certs.normalize_fingerprint(colons) == fingerprint


def test_key_matches_only_its_own_certificate() -> None:
    one, other = issue("one"), issue("other")
    assert certs.key_matches(one.cert, one.key) and not certs.key_matches(one.cert, other.key)


def test_pem_bundle_keeps_file_order_and_rejects_text_without_certificates() -> None:
    root, other = issue("root", ca=True), issue("other", ca=True)
    assert certs.load_pem_bundle(root.pem() + other.pem()) == [root.cert, other.cert]
    try:
        certs.load_pem_bundle(b"not a certificate\n")
    except ValueError:
        return
    raise AssertionError("no ValueError")


def test_expiry_warning_rounds_to_days_and_counts_hours_in_the_last_day() -> None:
    cert = issue("x", start=-DAY, lifetime=DAY + 5 * datetime.timedelta(hours=1)).cert
    (warning,) = certs.validity(cert, NOW).warnings
    assert warning.startswith("expires in 5 hours, on ")
