"""YAML policy -> validated, frozen policy objects; every error names the file, line and field.

The dataclasses below are the contract the rest of qgate uses. Paths in a policy file are
resolved relative to the directory of that file.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, TypeVar, cast, get_args

import yaml

from qgate import constants as C
from qgate.errors import PolicyError
from qgate.policy_schema import (
    BAD,
    NO_ALIASES,
    STR_TAG,
    AliasRefused,
    Boolean,
    Choice,
    CipherList,
    Context,
    Default,
    Field,
    FieldDoc,
    FilePath,
    HostName,
    HttpsUrl,
    Incomplete,
    Integer,
    Interface,
    IPAddress,
    Networks,
    NumberedChoice,
    PolicyYamlLoader,
    Real,
    Section,
    SectionList,
    Sha256Fingerprint,
    SocketAddress,
    Text,
    Values,
    field_docs,
    fmt_number,
    line_of,
)

__all__ = [
    "Endpoint",
    "FailMode",
    "FieldDoc",
    "GatewayPolicy",
    "IPInterface",
    "IPNetwork",
    "KemName",
    "KmePolicy",
    "PeerPolicy",
    "PpkPolicy",
    "QkdRole",
    "RekeyPolicy",
    "TlsVersion",
    "TunPolicy",
    "describe_schema",
    "load_policy",
    "parse_policy",
    "schema",
]

T = TypeVar("T")

KemName = Literal["ml-kem-768", "ml-kem-1024"]
FailMode = Literal["qkd_and_pqc", "pqc_only_if_qkd_down"]
QkdRole = Literal["master", "slave"]
TlsVersion = Literal["1.2", "1.3"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


@dataclass(frozen=True)
class Endpoint:
    """A UDP or HTTPS endpoint: literal IP address (v4 or v6) and port (1-65535)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class TunPolicy:
    """The TUN device: name (1-15 chars), optional address, inner MTU in bytes (576-9000), offloads.

    ``offload`` False forces the plain data path (no virtio-net header, no UDP GSO/GRO): the same
    wire format, one packet per system call; for kernels or setups where offloads misbehave.
    """

    name: str = "qg0"
    address: IPInterface | None = None
    mtu: int = C.DEFAULT_TUN_MTU
    offload: bool = True


@dataclass(frozen=True)
class KmePolicy:
    """The local KME (ETSI GS QKD 014) and this gateway's SAE credentials.

    Attributes:
        url: base URL, ``https://host:port`` (the API lives under /api/v1/keys).
        sae_id: this gateway's SAE ID; must equal the subject CN of ``cert``.
        ca: PEM file of the CA that signed the KME's server certificate.
        cert: PEM client certificate of this SAE.
        key: PEM private key of ``cert``.
        timeout: seconds per HTTPS request (0.1-60, default 5).
        tls_min_version: lowest TLS version offered, ``"1.2"`` (default) or ``"1.3"``.
        tls_ciphers: OpenSSL cipher list for TLS 1.2; None (default) = qgate's secure set (ECDHE
            with AES-GCM or ChaCha20-Poly1305). TLS 1.3 suites are always OpenSSL's defaults.
        server_name: the name the KME's certificate must match instead of the URL host (and the
            SNI sent), or None.
        server_cn: pin: the KME certificate's subject CN must equal this, or None.
        server_sha256: pin: SHA-256 of the KME's leaf certificate (DER) as 64 lowercase hex
            digits (normalized at load), or None. A pin replaces the name check; the chain is
            always verified against ``ca``.
        client_ca: PEM file of the CA that issued ``cert`` when it is not ``ca`` (``qgate check``
            verifies ``cert`` against it), or None.
    """

    url: str
    sae_id: str
    ca: Path
    cert: Path
    key: Path
    timeout: float = 5.0
    tls_min_version: TlsVersion = "1.2"
    tls_ciphers: str | None = None
    server_name: str | None = None
    server_cn: str | None = None
    server_sha256: str | None = None
    client_ca: Path | None = None


@dataclass(frozen=True)
class RekeyPolicy:
    """Rekey timing, all in seconds.

    Attributes:
        interval: QKD ratchet step period (0.1-86400, default 10).
        kem_interval: full ML-KEM handshake period (>= interval, default 120).
        max_key_age: hard lifetime of a traffic key (> interval, default 3 x interval).
        max_interval: the longest the ratchet period may stretch to when QKD key stock runs low
            (interval <= max_interval < max_key_age; default halfway between the two).
    """

    interval: float = C.REKEY_INTERVAL_DEFAULT
    kem_interval: float = C.KEM_INTERVAL_DEFAULT
    max_key_age: float = 3 * C.REKEY_INTERVAL_DEFAULT
    max_interval: float = 2 * C.REKEY_INTERVAL_DEFAULT


@dataclass(frozen=True)
class PpkPolicy:
    """A post-quantum preshared key shared with one peer (RFC 8784 style), mixed into its handshakes.

    Attributes:
        file: the raw secret: 32-64 bytes, mode 0600, the same bytes at the peer
            (read by :func:`qgate.keyfiles.load_ppk`, not by the policy loader).
        id: names the PPK to the peer: 1-64 printable ASCII characters without space, sent in
            the clear (never put anything secret in it).
        mandatory: refuse any handshake without this PPK; False (default) lets a peer that
            offers none in.
    """

    file: Path
    id: str
    mandatory: bool = False


@dataclass(frozen=True)
class PeerPolicy:
    """One peer gateway.

    Attributes:
        name: a label for logs (1-32 chars of [A-Za-z0-9_.-]).
        public_key: PEM file of the peer's pinned ML-DSA identity public key.
        endpoint: the peer's UDP address and port on the WAN.
        sae_id: the peer's SAE ID at its KME.
        qkd_role: this gateway's SAE role toward this peer: ``master`` calls enc_keys and
            starts every handshake; ``slave`` calls dec_keys and answers.
        subnets: the peer's inner networks: routed into the tunnel, and the only source
            addresses accepted from this peer.
        kem: ML-KEM parameter set for the handshake (FIPS 203).
        x25519: also mix an X25519 secret into each handshake (default true).
        fail_mode: what happens when QKD keys stop: ``qkd_and_pqc`` (fail closed) or
            ``pqc_only_if_qkd_down`` (degraded, ML-KEM and X25519 only, until QKD keys return).
        qkd_key_bits: bits of QKD key per rekey (ETSI 014 ``size``, 64-4096, multiple of 8).
        qkd_prefetch: QKD keys fetched ahead of need (master only; 0-1024, 0 = fetch at each
            rekey), so a slow KME never stalls a rekey.
        rekey: timing.
        ppk: the post-quantum preshared key with this peer, or None (default: no PPK).
    """

    name: str
    public_key: Path
    endpoint: Endpoint
    sae_id: str
    qkd_role: QkdRole
    subnets: tuple[IPNetwork, ...]
    kem: KemName = "ml-kem-768"
    x25519: bool = True
    fail_mode: FailMode = "qkd_and_pqc"
    qkd_key_bits: int = C.QKD_KEY_BITS_DEFAULT
    qkd_prefetch: int = C.QKD_PREFETCH_DEFAULT
    rekey: RekeyPolicy = field(default_factory=RekeyPolicy)
    ppk: PpkPolicy | None = None


@dataclass(frozen=True)
class GatewayPolicy:
    """A whole policy file.

    Attributes:
        name: this gateway's label for logs.
        identity: PEM file of this gateway's ML-DSA private key (``qgate keygen``).
        listen: UDP address and port the gateway binds on the WAN.
        tun: the TUN device.
        kme: the local KME.
        peers: one or more peers (v1 gateways run with exactly one or more; subnets must not overlap).
        source: the policy file this was read from.
        metrics: address:port of the Prometheus exporter (``metrics.listen``); None (default) = off.
    """

    name: str
    identity: Path
    listen: Endpoint
    tun: TunPolicy
    kme: KmePolicy
    peers: tuple[PeerPolicy, ...]
    source: Path | None = None
    metrics: Endpoint | None = None


# --- The schema: one table per section; the validator and the docs both read it ----------

_NAME_MAX: Final = 32
_INTERVAL_MAX: Final = 86400.0
"""Seconds: the slowest QKD ratchet a policy may ask for (one day)."""
_KEM_INTERVAL_MAX: Final = 7 * 86400.0
"""Seconds: the longest a policy may go without a fresh ML-KEM handshake (one week)."""
_POLICY_MAX_BYTES: Final = 1 << 20
"""Bytes: larger policy files are refused unread."""

_LABEL: Final = Text(r"[A-Za-z0-9_.-]{1,32}", f"1-{_NAME_MAX} characters of A-Z a-z 0-9 _ . -")
_SAE_ID: Final = Text(
    r'[!"$&-.0->@-~]{1,128}', "1-128 printable ASCII characters, no space and none of / ? # %"
)
_SECONDS: Final = Real(C.REKEY_INTERVAL_MIN, _INTERVAL_MAX, "seconds")

TUN_NAME: Final = Field(
    "name",
    Text(r"(?!\.\.?$)[A-Za-z0-9_.-]{1,15}", "1-15 characters of A-Z a-z 0-9 _ . - (not . or ..)"),
    "Linux name of the TUN device the gateway creates",
    TunPolicy.name,
)
TUN_ADDRESS: Final[Field[IPInterface | None]] = Field(
    "address", Interface(), "address/prefix put on the TUN device (optional)", TunPolicy.address
)
TUN_MTU: Final = Field(
    "mtu", Integer(576, 9000, "bytes"), "inner MTU: largest IP packet carried", TunPolicy.mtu
)

TUN_OFFLOAD: Final = Field(
    "offload",
    Boolean(),
    "use kernel offloads (TUN TSO super-packets, UDP GSO/GRO); false forces the plain path, same wire format",
    TunPolicy.offload,
)

GW_NAME: Final = Field("name", _LABEL, "this gateway's label in logs and status")
GW_IDENTITY: Final = Field("identity", FilePath(), "this gateway's ML-DSA private key, PEM (qgate keygen)")
GW_LISTEN: Final = Field(
    "listen",
    SocketAddress(C.DEFAULT_UDP_PORT, remote=False),
    "local UDP address:port for tunnel traffic on the WAN",
)
GW_TUN: Final = Field(
    "tun",
    Section((TUN_NAME, TUN_ADDRESS, TUN_MTU, TUN_OFFLOAD)),
    "the TUN device",
    Default.DERIVED,
    "all defaults",
)

KME_URL: Final = Field(
    "url", HttpsUrl(C.ETSI014_API_PREFIX), "base URL of the local KME (ETSI GS QKD 014, mutual TLS)"
)
KME_SAE_ID: Final = Field("sae_id", _SAE_ID, "this gateway's SAE ID; must equal the subject CN of cert")
KME_CA: Final = Field("ca", FilePath(), "PEM CA certificate that signed the KME's server certificate")
KME_CERT: Final = Field("cert", FilePath(), "PEM client certificate of this SAE")
KME_KEY: Final = Field("key", FilePath(), "PEM private key of cert")
KME_TIMEOUT: Final = Field(
    "timeout",
    Real(0.1, 60.0, "seconds"),
    "limit per HTTPS request, connect to the answer's last byte",
    KmePolicy.timeout,
)
KME_TLS_MIN_VERSION: Final = Field(
    "tls_min_version",
    NumberedChoice(
        cast("tuple[TlsVersion, ...]", get_args(TlsVersion)),
        refused={v: "is not allowed: TLS 1.0 and 1.1 are deprecated (RFC 8996)" for v in ("1.0", "1.1")},
    ),
    "lowest TLS version offered to the KME (TLS 1.3 is always offered)",
    KmePolicy.tls_min_version,
)
KME_TLS_CIPHERS: Final[Field[str | None]] = Field(
    "tls_ciphers",
    CipherList(),
    "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are always OpenSSL's defaults); allowing non-AEAD"
    " (CBC) suites is a downgrade, logged as a warning at start",
    KmePolicy.tls_ciphers,
    "ECDHE with AES-GCM or ChaCha20-Poly1305 only",
    rule='only with tls_min_version "1.2"',
)
KME_SERVER_NAME: Final[Field[str | None]] = Field(
    "server_name",
    HostName(),
    "name the KME's server certificate must match instead of the URL host (also sent as SNI)",
    KmePolicy.server_name,
    "the URL host",
)
_CN_BOUNDS: Final = "1-64 characters, no control characters, no space at either end"
KME_SERVER_CN: Final[Field[str | None]] = Field(
    "server_cn",
    Text(r"[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]{0,62}[^\s\x00-\x1f\x7f])?", _CN_BOUNDS),
    "pin: the KME certificate's subject CN must equal this; replaces the name check (the chain is still"
    " verified against ca), so a certificate without subjectAltName works",
    KmePolicy.server_cn,
)
KME_SERVER_SHA256: Final[Field[str | None]] = Field(
    "server_sha256",
    Sha256Fingerprint(),
    "pin: SHA-256 of the KME's leaf certificate (DER); replaces the name check (the chain is still"
    " verified against ca)",
    KmePolicy.server_sha256,
)
KME_CLIENT_CA: Final[Field[Path | None]] = Field(
    "client_ca",
    FilePath(),
    "PEM CA that issued cert, when it is not ca (qgate check verifies cert against it)",
    KmePolicy.client_ca,
    "ca",
)
_KME_FIELDS: Final[tuple[Field[object], ...]] = (
    KME_URL,
    KME_SAE_ID,
    KME_CA,
    KME_CERT,
    KME_KEY,
    KME_TIMEOUT,
    KME_TLS_MIN_VERSION,
    KME_TLS_CIPHERS,
    KME_SERVER_NAME,
    KME_SERVER_CN,
    KME_SERVER_SHA256,
    KME_CLIENT_CA,
)

REKEY_INTERVAL: Final = Field(
    "interval", _SECONDS, "QKD ratchet period: a fresh QKD key is mixed in this often", RekeyPolicy.interval
)
REKEY_KEM_INTERVAL: Final = Field(
    "kem_interval",
    Real(C.REKEY_INTERVAL_MIN, _KEM_INTERVAL_MAX, "seconds"),
    "full handshake period, with a fresh ML-KEM (and X25519) exchange",
    RekeyPolicy.kem_interval,
    rule=">= interval",
)
REKEY_MAX_KEY_AGE: Final = Field(
    "max_key_age",
    Real(C.REKEY_INTERVAL_MIN, 3 * _INTERVAL_MAX, "seconds"),
    "hard lifetime of a traffic key: traffic stops rather than use an older key",
    Default.DERIVED,
    "3 x interval",
    rule="> interval",
)

REKEY_MAX_INTERVAL: Final = Field(
    "max_interval",
    Real(C.REKEY_INTERVAL_MIN, 3 * _INTERVAL_MAX, "seconds"),
    "longest ratchet period when QKD key stock runs low (the interval stretches, max_key_age does not)",
    Default.DERIVED,
    "halfway between interval and max_key_age",
    rule=">= interval and < max_key_age",
)

PPK_FILE: Final = Field(
    "file", FilePath(), "the raw PPK secret: 32-64 bytes, mode 0600, the same bytes at the peer"
)
PPK_ID: Final = Field(
    "id",
    Text(r"[!-~]{1,64}", "1-64 printable ASCII characters, no space"),
    "names the PPK to the peer; sent in the clear, so nothing secret",
)
PPK_MANDATORY: Final = Field(
    "mandatory",
    Boolean(),
    "refuse any handshake without this PPK (false: a peer offering none still gets in)",
    PpkPolicy.mandatory,
)

PEER_NAME: Final = Field("name", _LABEL, "the peer's label in logs and status; unique")
PEER_PUBLIC_KEY: Final = Field("public_key", FilePath(), "the peer's pinned ML-DSA public key, PEM")
PEER_ENDPOINT: Final = Field(
    "endpoint", SocketAddress(C.DEFAULT_UDP_PORT, remote=True), "the peer's UDP address:port on the WAN"
)
PEER_SAE_ID: Final = Field("sae_id", _SAE_ID, "the peer's SAE ID at its KME; not this gateway's own")
PEER_QKD_ROLE: Final = Field(
    "qkd_role",
    Choice(cast("tuple[QkdRole, ...]", get_args(QkdRole))),
    "this side's SAE role: master calls enc_keys and starts handshakes; slave calls dec_keys",
)
PEER_SUBNETS: Final = Field(
    "subnets", Networks(), "the peer's inner networks: routed into the tunnel, only sources accepted"
)
PEER_KEM: Final = Field(
    "kem",
    Choice(cast("tuple[KemName, ...]", get_args(KemName))),
    "ML-KEM parameter set (FIPS 203)",
    PeerPolicy.kem,
)
PEER_X25519: Final = Field(
    "x25519", Boolean(), "also mix an X25519 secret into each handshake", PeerPolicy.x25519
)
PEER_FAIL_MODE: Final = Field(
    "fail_mode",
    Choice(cast("tuple[FailMode, ...]", get_args(FailMode))),
    "when QKD keys stop: qkd_and_pqc stops traffic at max_key_age (fail closed); pqc_only_if_qkd_down"
    " keeps the tunnel up on ML-KEM (+ X25519) alone, marked degraded, alarmed and counted, and returns to"
    " hybrid by itself (both peers must allow it)",
    PeerPolicy.fail_mode,
)
PEER_QKD_KEY_BITS: Final = Field(
    "qkd_key_bits",
    Integer(64, 4096, "bits", step=8),
    "QKD key size asked per rekey (ETSI GS QKD 014 size)",
    PeerPolicy.qkd_key_bits,
)
PEER_QKD_PREFETCH: Final = Field(
    "qkd_prefetch",
    Integer(0, 1024, "keys"),
    "QKD keys fetched ahead of need by the master (one enc_keys answer, at most the KME's"
    " max_key_per_request), so a slow KME never stalls a rekey (0 = off)",
    PeerPolicy.qkd_prefetch,
)
PEER_REKEY: Final = Field(
    "rekey",
    Section((REKEY_INTERVAL, REKEY_KEM_INTERVAL, REKEY_MAX_KEY_AGE, REKEY_MAX_INTERVAL)),
    "rekey timing",
    Default.DERIVED,
    "all defaults",
)
PEER_PPK: Final = Field(
    "ppk",
    Section((PPK_FILE, PPK_ID, PPK_MANDATORY)),
    "post-quantum preshared key mixed into every handshake with this peer (RFC 8784 style)",
    Default.DERIVED,
    "none",
)
_PEER_FIELDS: Final[tuple[Field[object], ...]] = (
    PEER_NAME,
    PEER_PUBLIC_KEY,
    PEER_ENDPOINT,
    PEER_SAE_ID,
    PEER_QKD_ROLE,
    PEER_SUBNETS,
    PEER_KEM,
    PEER_X25519,
    PEER_FAIL_MODE,
    PEER_QKD_KEY_BITS,
    PEER_QKD_PREFETCH,
    PEER_REKEY,
    PEER_PPK,
)

TOP_GATEWAY: Final = Field("gateway", Section((GW_NAME, GW_IDENTITY, GW_LISTEN, GW_TUN)), "this gateway")
TOP_KME: Final = Field("kme", Section(_KME_FIELDS), "the local KME")
TOP_PEERS: Final = Field("peers", SectionList(_PEER_FIELDS), "peer gateways, one or more")
METRICS_LISTEN: Final = Field(
    "listen",
    SocketAddress(9108, remote=False),
    "address:port of the Prometheus exporter (no authentication: keep it on a management address)",
)
TOP_METRICS: Final = Field(
    "metrics", Section((METRICS_LISTEN,)), "Prometheus metrics over HTTP", Default.DERIVED, "off"
)
_TOP: Final = Section((TOP_GATEWAY, TOP_KME, TOP_PEERS, TOP_METRICS))


def describe_schema() -> list[FieldDoc]:
    """Return the documentation of every policy field, in file order, from the validator's tables.

    Returns:
        One :class:`FieldDoc` per key (sections included), paths like ``peers[].rekey.interval``,
        with type, unit, default (``required`` when the key must be given) and allowed range.
    """
    return field_docs(_TOP.fields)


schema = describe_schema
"""Alias of :func:`describe_schema`."""


# --- Loading -------------------------------------------------------------------------------


def load_policy(path: Path) -> GatewayPolicy:
    """Read, parse and validate the policy file at ``path`` (UTF-8 YAML, at most 1 MiB).

    Relative file names inside are resolved against ``path``'s directory; the files they
    name are not opened (``qgate check`` does that).

    Raises:
        PolicyError: the file cannot be read, is not UTF-8 or valid YAML, or breaks any
            rule; ``problems`` lists every problem found, each with line and dotted path.
    """
    try:
        with path.open("rb") as stream:
            data = stream.read(_POLICY_MAX_BYTES + 1)
    except OSError as exc:
        raise PolicyError(f"cannot read the policy file: {exc.strerror or exc}", file=path) from exc
    if len(data) > _POLICY_MAX_BYTES:
        raise PolicyError(f"the policy file is larger than {_POLICY_MAX_BYTES} bytes", file=path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise PolicyError(f"not UTF-8 text (byte offset {exc.start})", file=path, line=line) from exc
    return parse_policy(text, source=path)


def parse_policy(text: str, *, source: Path | None) -> GatewayPolicy:
    """Parse and validate policy YAML ``text``.

    Args:
        text: the YAML document.
        source: the file it came from: named in errors, stored in the result, and the
            base for relative file names; None leaves relative names as written.

    Returns:
        The validated policy; ``max_key_age`` defaults to 3 x ``interval`` when absent.

    Raises:
        PolicyError: YAML syntax error, empty file, non-mapping top level, or any rule
            broken; ``problems`` lists every problem found as ``(line, path, message)``.
    """
    root = _compose(text, source)
    ctx = Context(source.parent if source is not None else None)
    policy = _build_policy(root, ctx, source)
    if policy is None or ctx.problems:
        problems = sorted(ctx.problems or [(None, "", "invalid policy")], key=_line_key)
        line, path, message = problems[0]
        raise PolicyError(message, file=source, line=line, path=path, problems=problems)
    return policy


def _line_key(problem: tuple[int | None, str, str]) -> int:
    return problem[0] if problem[0] is not None else 1 << 30


_BARE_IPV6: Final = re.compile(r"\[[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*\]")
"""An unquoted ``[v6]`` in a line with a YAML syntax error: YAML read it as a list."""


def _line_text(text: str, line: int) -> str:
    """Return the 1-based ``line`` of ``text``, or "" past the end."""
    lines = text.splitlines()
    return lines[line - 1] if 0 < line <= len(lines) else ""


def _compose(text: str, source: Path | None) -> yaml.Node:
    """Return the YAML node tree of ``text`` (every node has a line), or raise PolicyError."""
    try:
        root = yaml.compose(text, Loader=PolicyYamlLoader)
    except AliasRefused as exc:
        raise PolicyError(NO_ALIASES, file=source, line=exc.line) from exc
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        what = " ".join(part for part in (exc.context, exc.problem) if part)
        if line is not None and _BARE_IPV6.search(_line_text(text, line)):
            what += ' (put IPv6 endpoints in quotes: "[2001:db8::1]:51820")'
        raise PolicyError(f"YAML syntax error: {what}", file=source, line=line) from exc
    except yaml.reader.ReaderError as exc:
        line = text[: int(exc.position)].count("\n") + 1
        message = f"YAML: character U+{int(exc.character):04X} is not allowed ({exc.reason})"
        raise PolicyError(message, file=source, line=line) from exc
    except yaml.YAMLError as exc:
        raise PolicyError(f"YAML error: {exc}", file=source) from exc
    except RecursionError as exc:
        raise PolicyError("YAML nesting is too deep", file=source) from exc
    if root is None:
        raise PolicyError("the policy file is empty: expected the keys gateway, kme and peers", file=source)
    return root


def _attempt(build: Callable[[Values, Context], T], values: Values | None, ctx: Context) -> T | None:
    """Run ``build`` when its section parsed; None when absent or incomplete (already reported)."""
    if values is None:
        return None
    try:
        return build(values, ctx)
    except Incomplete:
        return None


def _build_policy(root: yaml.Node, ctx: Context, source: Path | None) -> GatewayPolicy | None:
    """Check the whole tree and build the policy; None when anything is wrong."""
    top = _TOP.convert(root, "", ctx)
    if top is BAD:
        return None
    gateway, kme_values, peer_values = top.peek(TOP_GATEWAY), top.peek(TOP_KME), top.peek(TOP_PEERS)
    peers = [_attempt(_peer, values, ctx) for values in peer_values or ()]
    _check_peers(peer_values or (), gateway, kme_values, ctx)
    kme = _attempt(_kme, kme_values, ctx)
    if gateway is None or kme is None or peer_values is None or None in peers:
        return None
    try:
        host, port = gateway.value(GW_LISTEN)
        return GatewayPolicy(
            name=gateway.value(GW_NAME),
            identity=gateway.value(GW_IDENTITY),
            listen=Endpoint(str(host), port),
            tun=_tun(gateway.optional(GW_TUN)),
            kme=kme,
            peers=tuple(peer for peer in peers if peer is not None),
            source=source,
            metrics=_metrics(top.optional(TOP_METRICS)),
        )
    except Incomplete:
        return None


def _metrics(values: Values | None) -> Endpoint | None:
    if values is None:
        return None
    host, port = values.value(METRICS_LISTEN)
    return Endpoint(str(host), port)


def _tun(values: Values | None) -> TunPolicy:
    if values is None:
        return TunPolicy()
    return TunPolicy(
        name=values.value(TUN_NAME),
        address=values.value(TUN_ADDRESS),
        mtu=values.value(TUN_MTU),
        offload=values.value(TUN_OFFLOAD),
    )


def _kme(values: Values, ctx: Context) -> KmePolicy:
    version = values.value(KME_TLS_MIN_VERSION)
    if version == "1.3" and values.peek(KME_TLS_CIPHERS) is not None:
        message = 'has no effect with tls_min_version "1.3" (TLS 1.3 suites are OpenSSL defaults)'
        ctx.add(values.node_of(KME_TLS_CIPHERS), values.path_of(KME_TLS_CIPHERS), message)
    return KmePolicy(
        url=values.value(KME_URL),
        sae_id=values.value(KME_SAE_ID),
        ca=values.value(KME_CA),
        cert=values.value(KME_CERT),
        key=values.value(KME_KEY),
        timeout=values.value(KME_TIMEOUT),
        tls_min_version=version,
        tls_ciphers=values.value(KME_TLS_CIPHERS),
        server_name=values.value(KME_SERVER_NAME),
        server_cn=values.value(KME_SERVER_CN),
        server_sha256=values.value(KME_SERVER_SHA256),
        client_ca=values.value(KME_CLIENT_CA),
    )


def _peer(values: Values, ctx: Context) -> PeerPolicy:
    rekey_values = values.optional(PEER_REKEY)
    rekey = _rekey(rekey_values, ctx) if rekey_values is not None else RekeyPolicy()
    host, port = values.value(PEER_ENDPOINT)
    return PeerPolicy(
        name=values.value(PEER_NAME),
        public_key=values.value(PEER_PUBLIC_KEY),
        endpoint=Endpoint(str(host), port),
        sae_id=values.value(PEER_SAE_ID),
        qkd_role=values.value(PEER_QKD_ROLE),
        subnets=values.value(PEER_SUBNETS),
        kem=values.value(PEER_KEM),
        x25519=values.value(PEER_X25519),
        fail_mode=values.value(PEER_FAIL_MODE),
        qkd_key_bits=values.value(PEER_QKD_KEY_BITS),
        qkd_prefetch=values.value(PEER_QKD_PREFETCH),
        rekey=rekey,
        ppk=_ppk(values.optional(PEER_PPK)),
    )


def _ppk(values: Values | None) -> PpkPolicy | None:
    if values is None:
        return None
    return PpkPolicy(
        file=values.value(PPK_FILE), id=values.value(PPK_ID), mandatory=values.value(PPK_MANDATORY)
    )


def _rekey(values: Values, ctx: Context) -> RekeyPolicy:
    """Build the rekey timing: kem_interval >= interval, max_key_age > interval (default 3 x)."""
    interval = values.value(REKEY_INTERVAL)
    implicit = not values.has(REKEY_KEM_INTERVAL)
    kem_interval = RekeyPolicy.kem_interval if implicit else values.peek(REKEY_KEM_INTERVAL)
    if kem_interval is not None and kem_interval < interval:
        note = " (the default; set kem_interval)" if implicit else ""
        ctx.add(
            values.node_of(REKEY_KEM_INTERVAL),
            values.path_of(REKEY_KEM_INTERVAL),
            f"must be >= interval ({fmt_number(interval)} seconds), got {fmt_number(kem_interval)}{note}",
        )
    max_key_age = values.peek(REKEY_MAX_KEY_AGE)
    if max_key_age is not None and max_key_age <= interval:
        ctx.add(
            values.node_of(REKEY_MAX_KEY_AGE),
            values.path_of(REKEY_MAX_KEY_AGE),
            f"must be > interval ({fmt_number(interval)} seconds), got {fmt_number(max_key_age)}",
        )
    age = values.value(REKEY_MAX_KEY_AGE, derived=3 * interval)
    max_interval = values.peek(REKEY_MAX_INTERVAL)
    if max_interval is not None and not interval <= max_interval < age:
        ctx.add(
            values.node_of(REKEY_MAX_INTERVAL),
            values.path_of(REKEY_MAX_INTERVAL),
            f"must be >= interval ({fmt_number(interval)} seconds) and < max_key_age ({fmt_number(age)}"
            f" seconds), got {fmt_number(max_interval)}",
        )
    return RekeyPolicy(
        interval=interval,
        kem_interval=values.value(REKEY_KEM_INTERVAL),
        max_key_age=age,
        max_interval=values.value(REKEY_MAX_INTERVAL, derived=(interval + age) / 2),
    )


# --- Checks across peers --------------------------------------------------------------------


def _check_peers(peers: Sequence[Values], gateway: Values | None, kme: Values | None, ctx: Context) -> None:
    """Check what no single peer entry shows: duplicates, own SAE ID, overlaps, loops, families."""
    for key, what in ((PEER_NAME, "peer name"), (PEER_SAE_ID, "peer sae_id"), (PEER_ENDPOINT, "endpoint")):
        _check_unique(peers, key, what, ctx)
    own_sae_id = kme.peek(KME_SAE_ID) if kme is not None else None
    for peer in peers:
        if own_sae_id is not None and peer.peek(PEER_SAE_ID) == own_sae_id:
            message = f"must differ from this gateway's own kme.sae_id {own_sae_id!r}"
            ctx.add(peer.node_of(PEER_SAE_ID), peer.path_of(PEER_SAE_ID), message)
    subnets = _subnet_entries(peers)
    _check_overlaps(subnets, ctx)
    listen = gateway.peek(GW_LISTEN) if gateway is not None else None
    for peer in peers:
        endpoint = peer.peek(PEER_ENDPOINT)
        if endpoint is not None:
            _check_endpoint(peer, endpoint, listen, subnets, ctx)


def _check_unique(peers: Sequence[Values], field: Field[object], what: str, ctx: Context) -> None:
    first: dict[object, Values] = {}
    for peer in peers:
        value = peer.peek(field)
        if value is None:
            continue
        if value in first:
            other = first[value]
            where = f"{other.path_of(field)}, line {line_of(other.node_of(field))}"
            ctx.add(peer.node_of(field), peer.path_of(field), f"duplicate {what} (also at {where})")
        else:
            first[value] = peer


_SubnetEntry = tuple[IPNetwork, str, yaml.Node]
"""A peer subnet with its dotted path and node."""


def _subnet_entries(peers: Sequence[Values]) -> list[_SubnetEntry]:
    """Return every valid peer subnet with its path and node (invalid ones are reported already)."""
    entries: list[_SubnetEntry] = []
    for peer in peers:
        node = peer.node_of(PEER_SUBNETS)
        if not peer.has(PEER_SUBNETS) or not isinstance(node, yaml.SequenceNode):
            continue
        for index, item in enumerate(node.value):
            try:
                network = ipaddress.ip_network(str(item.value).strip(), strict=True)
            except (ValueError, TypeError):
                continue
            if item.tag == STR_TAG:
                entries.append((network, f"{peer.path_of(PEER_SUBNETS)}[{index}]", item))
    return entries


def _check_overlaps(entries: list[_SubnetEntry], ctx: Context) -> None:
    """Report each subnet overlapping another (CIDR blocks nest or are disjoint), O(n log n)."""
    ordered = sorted(entries, key=lambda e: (e[0].version, int(e[0].network_address), e[0].prefixlen))
    widest: _SubnetEntry | None = None
    for entry in ordered:
        network = entry[0]
        if (
            widest is not None
            and widest[0].version == network.version
            and int(network.network_address) <= int(widest[0].broadcast_address)
        ):
            first, second = sorted((widest, entry), key=lambda e: e[2].start_mark.index)
            message = f"{second[0]} overlaps {first[0]} at {first[1]} (line {line_of(first[2])})"
            ctx.add(second[2], second[1], message)
        else:
            widest = entry


def _check_endpoint(
    peer: Values,
    endpoint: tuple[IPAddress, int],
    listen: tuple[IPAddress, int] | None,
    subnets: list[_SubnetEntry],
    ctx: Context,
) -> None:
    """A peer endpoint must not be routed into the tunnel, nor be unreachable from ``listen``."""
    node, path = peer.node_of(PEER_ENDPOINT), peer.path_of(PEER_ENDPOINT)
    address = endpoint[0]
    for network, net_path, _ in subnets:
        if address in network:
            message = f"{address} lies in {net_path} {network}, which is routed into the tunnel (a loop)"
            ctx.add(node, path, message)
    if listen is None:
        return
    if listen == endpoint:
        ctx.add(node, path, "is this gateway's own gateway.listen address")
    elif address.version != listen[0].version and not (listen[0].version == 6 and listen[0].is_unspecified):
        message = f"an IPv{address.version} endpoint cannot be reached from gateway.listen {listen[0]}"
        ctx.add(node, path, message)
