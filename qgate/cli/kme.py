"""``qgate kme probe``: talk to the policy's KME once, like ``wg show`` for the KME side.

Read-only by default: Get status only; ``--consume-key`` adds one enc_keys per master peer.
Human text goes to stderr, its last line ``result: ...`` naming what happened; with ``--json`` the
last stdout line is one JSON object. Exit status: 0 everything worked; 1 a check found a problem (a
status value, an error answer of the KME for a peer, 503 "peer KME unreachable" too, a refused key
request); 2 the probe could not talk to the KME (policy or TLS files unusable, KME unreachable or
not answering in time, TLS failed).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Final

import click

from qgate.errors import KmsError, KmsTlsError, KmsUnavailableError, QgateError
from qgate.kms.client import Etsi014Client, MtlsHttps
from qgate.kms.etsi014 import Status
from qgate.kms.tls import CLIENT_CERT_REFUSED, Session, colon_hex, name_matches, stamp
from qgate.policy import GatewayPolicy, PeerPolicy, load_policy

OK: Final = 0
PROBLEM: Final = 1
UNREACHABLE: Final = 2
_TLS_DOWN: Final = (KmsTlsError, KmsUnavailableError)
_Json = dict[str, object]


class _Report:
    """The probe's findings: JSON fields, human lines, problems and the exit status."""

    def __init__(self, policy_file: Path) -> None:
        self.data: dict[str, object] = {"ok": False, "policy": str(policy_file)}
        self.lines: list[str] = []
        self.problems: list[str] = []
        self.unreachable = False
        self.stopped = ""  # why the probe could not go on (exit 2), for the result line

    def stop(self, summary: str, error: str) -> None:
        """Record that the probe cannot talk to the KME: the result line's ``summary``, JSON ``error``."""
        self.unreachable = True
        self.stopped = summary
        self.data["error"] = error

    def say(self, text: str) -> None:
        self.lines.append(text)

    def problem(self, text: str, indent: str = "  ") -> None:
        self.problems.append(text)
        self.say(f"{indent}problem: {text}")

    def exit_status(self) -> int:
        return UNREACHABLE if self.unreachable else PROBLEM if self.problems else OK

    def result(self) -> str:
        """Say in one line what happened (the ``result:`` line)."""
        if self.unreachable:
            return self.stopped
        if not self.problems:
            return "ok"
        if len(self.problems) == 1:
            return f"1 problem: {self.problems[0]}"
        return f"{len(self.problems)} problems; first: {self.problems[0]}"


@click.group("kme")
def kme() -> None:
    """This gateway's KME (ETSI GS QKD 014 over mutual TLS), seen as the gateway sees it."""


@kme.command("probe")
@click.argument("policy_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object as the last line on stdout.")
@click.option(
    "--consume-key",
    is_flag=True,
    help="As master SAE, also take one key per peer with enc_keys (the key is consumed). On a KME that"
    " replaces outstanding keys (each enc_keys voids the keys it handed out before) this costs the"
    " running gateway its prefetched keys and the key of a handshake in flight: stop the gateway first.",
)
@click.option("--no-keys", is_flag=True, hidden=True, help="No effect: read-only is the default now.")
@click.option(
    "--key-id", default=None, help="As slave, try dec_keys with a key_ID the master got (consumes it)."
)
@click.option("--peer", "peer_name", default=None, help="Probe only the peer with this name.")
def probe(
    policy_file: Path,
    as_json: bool,
    consume_key: bool,
    no_keys: bool,
    key_id: str | None,
    peer_name: str | None,
) -> None:
    """Talk to POLICY_FILE's KME once: TLS, its certificate, then per peer Get status.

    Read-only by default. For each peer: GET status (every field, and what it implies for this
    peer's settings). With --consume-key, as master SAE also one enc_keys of qkd_key_bits, showing
    key_ID and size, never key bytes; it consumes a key, and on a KME that replaces outstanding keys
    it costs the running gateway its prefetched keys. A slave cannot round-trip alone: dec_keys
    needs a key_ID the master got; give one with --key-id (it consumes that key).

    \b
    Exit status (the last line, "result: ...", says which and why):
      0  everything worked
      1  a check found a problem: a status value, an error answer of the KME
         for a peer (503 "peer KME unreachable" too), a refused key request
      2  the probe could not talk to the KME: the policy or its TLS files are
         unusable, the KME is unreachable or does not answer in time, or TLS
         failed (our certificate refused, the KME's not trusted, ...)
    Text goes to stderr; with --json the last stdout line is one JSON object.
    """
    if consume_key and no_keys:
        raise click.UsageError("--consume-key and --no-keys contradict each other")
    report = _Report(policy_file)
    try:
        policy = load_policy(policy_file)
        peers = _chosen_peers(policy, peer_name, key_id)
        kme_ = policy.kme
        client = Etsi014Client(
            kme_.url, ca=kme_.ca, cert=kme_.cert, key=kme_.key, timeout=kme_.timeout, tls=kme_
        )
    except QgateError as exc:
        report.stop(f"policy unusable: {exc}", str(exc))
        report.say(f"qgate: error: {exc}")
        _finish(report, as_json)
        return
    _probe(report, policy, client, peers, keys=consume_key, key_id=key_id)
    _finish(report, as_json)


def _chosen_peers(policy: GatewayPolicy, name: str | None, key_id: str | None) -> list[PeerPolicy]:
    peers = [p for p in policy.peers if name is None or p.name == name]
    if not peers:
        raise click.UsageError(f"no peer named {name!r} (peers: {', '.join(p.name for p in policy.peers)})")
    if key_id is not None and sum(p.qkd_role == "slave" for p in peers) != 1:
        raise click.UsageError("--key-id needs exactly one peer where this gateway is slave (use --peer)")
    return peers


def _probe(
    report: _Report,
    policy: GatewayPolicy,
    client: Etsi014Client,
    peers: list[PeerPolicy],
    *,
    keys: bool,
    key_id: str | None,
) -> None:
    kme_ = policy.kme
    report.data["kme"] = {"url": kme_.url, "sae_id": kme_.sae_id}
    report.say(f"kme {kme_.url} as SAE {kme_.sae_id}")
    if not _probe_tls(report, client.https):
        return
    results: list[dict[str, object]] = []
    report.data["peers"] = results
    for peer in peers:
        try:
            results.append(_probe_peer(report, client, peer, policy.kme.sae_id, keys=keys, key_id=key_id))
        except _TLS_DOWN as exc:
            _tls_down(report, client.https, exc, after_handshake=True)
            return


def _probe_tls(report: _Report, https: MtlsHttps) -> bool:
    """Make one handshake and describe it; False (and unreachable) when it failed."""
    offer = https.offer
    tls: dict[str, object] = {
        "offered": {"versions": list(offer.versions), "tls12_ciphers": list(offer.tls12)},
        "weak_ciphers_allowed": https.weak_ciphers_allowed,
    }
    report.data["tls"] = tls
    try:
        session = https.inspect()
    except _TLS_DOWN as exc:
        _tls_down(report, https, exc, after_handshake=False)
        return False
    tls.update(ok=True, version=session.version, cipher=session.cipher)
    tls["certificate"] = session.certificate.as_dict()
    report.say(f"  tls: {session.version} {session.cipher}")
    report.say(f"    offered: {offer.describe()}")
    if https.weak_ciphers_allowed:
        report.say(f"    note: kme.tls_ciphers allows weak TLS 1.2 suites: {', '.join(offer.weak[:6])}")
    _describe_certificate(report, https, session, tls)
    return True


def _describe_certificate(report: _Report, https: MtlsHttps, session: Session, tls: _Json) -> None:
    info, settings = session.certificate, https.settings
    report.say(f"  certificate: {info.subject}")
    report.say(f"    issuer: {info.issuer}")
    report.say(f"    names: {info.names_shown() or 'none (no subjectAltName)'}")
    report.say(f"    valid: {stamp(info.not_before)} to {stamp(info.not_after)}")
    report.say(f"    sha256: {colon_hex(info.sha256)}")
    matches = name_matches(info, https.expected_name)
    source = "kme.server_name" if settings.server_name else "the URL host"
    tls["name"] = {"expected": https.expected_name, "checked": not settings.pinned, "matches": matches}
    verdict = "verified" if matches else "does not match"
    checked = " (not checked: a pin replaces the name check)" if settings.pinned else ""
    report.say(f"    name {https.expected_name} ({source}): {verdict}{checked}")
    pins = []
    for pin, expected, seen in (
        ("server_cn", settings.server_cn, info.common_name),
        ("server_sha256", settings.server_sha256, info.sha256),
    ):
        if expected is not None:
            pins.append({"pin": pin, "expected": expected, "seen": seen, "ok": expected == seen})
            report.say(f"    pin {pin}: matches")
    tls["pins"] = pins  # a mismatch never gets here: inspect() raised KmsTlsError (pin_mismatch)


def _tls_down(report: _Report, https: MtlsHttps, exc: KmsError, *, after_handshake: bool) -> None:
    tls = report.data.setdefault("tls", {})
    assert isinstance(tls, dict)
    if isinstance(exc, KmsTlsError):
        cause = https.diagnose()
        kind, text = (cause.cause, cause.text) if cause is not None else (exc.cause, str(exc))
        tls.update(ok=False, error={"cause": kind, "message": text})
        when = "the KME refused our first request after the handshake" if after_handshake else "TLS failed"
        report.say(f"  tls: {when} ({kind}): {text}")
        refused = kind == CLIENT_CERT_REFUSED
        summary = "TLS failed: the KME refused our client certificate" if refused else f"TLS failed ({kind})"
        report.stop(f"{summary}: {text}", f"{https.base_url}: TLS failed ({kind}): {text}")  # no probe hint
    else:
        tls.update(ok=False, error={"cause": "unreachable", "message": str(exc)})
        report.say(f"  unreachable: {exc}")
        report.stop(f"KME unreachable: {exc}", str(exc))


def _probe_peer(
    report: _Report, client: Etsi014Client, peer: PeerPolicy, own_sae: str, *, keys: bool, key_id: str | None
) -> dict[str, object]:
    role = peer.qkd_role
    result: dict[str, object] = {"name": peer.name, "sae_id": peer.sae_id, "qkd_role": role}
    report.say(f"peer {peer.name} ({peer.sae_id}): this gateway is {role} SAE")
    try:
        status = client.status(peer.sae_id)
    except KmsTlsError:
        raise
    except KmsError as exc:
        if isinstance(exc, KmsUnavailableError) and exc.status is None:
            raise  # no answer at all: the KME is unreachable
        result["status_error"] = str(exc)
        report.problem(f"peer {peer.name}: Get status: {_answered(exc)}")
        return result
    result["status"] = dataclasses.asdict(status)
    _describe_status(report, status)
    problems, notes = status_findings(status, peer, own_sae)
    result["problems"], result["notes"] = problems, notes
    for note in notes:
        report.say(f"  note: {note}")
    for text in problems:
        report.problem(f"peer {peer.name}: {text}")
    if role == "master" and keys:
        result["enc_keys"] = _enc_keys(report, client, peer)
    elif role == "master":
        result["enc_keys"] = {"skipped": "read-only (no --consume-key)"}
        report.say("  enc_keys: not tried (read-only; --consume-key takes one key: see --help first)")
    elif key_id is not None:
        result["dec_keys"] = _dec_keys(report, client, peer, key_id)
    else:
        result["dec_keys"] = {"skipped": "a slave cannot round-trip alone"}
        report.say(
            "  dec_keys: not tried: as slave this gateway needs a key_ID the master got (its enc_keys);"
            " give one with --key-id"
        )
    return result


def _answered(exc: KmsError) -> str:
    """Say what the KME answered for a peer: ``the KME answered HTTP 503 for this peer: its message``."""
    if exc.status is None or exc.status == 200:
        return str(exc)
    said = exc.kme_message or str(exc).rpartition(f"HTTP {exc.status}: ")[2] or str(exc)
    return f"the KME answered HTTP {exc.status} for this peer: {said}"


def _describe_status(report: _Report, s: Status) -> None:
    route = f"{s.source_KME_ID} -> {s.target_KME_ID}, master {s.master_SAE_ID}, slave {s.slave_SAE_ID}"
    report.say(f"  status: {route}")
    report.say(
        f"    key_size {s.key_size} bits, stored_key_count {s.stored_key_count},"
        f" max_key_count {s.max_key_count}, max_key_per_request {s.max_key_per_request}"
    )
    extension = ", status_extension present" if s.status_extension else ""
    report.say(
        f"    min_key_size {s.min_key_size} bits, max_key_size {s.max_key_size} bits,"
        f" max_SAE_ID_count {s.max_SAE_ID_count}{extension}"
    )


def status_findings(status: Status, peer: PeerPolicy, own_sae: str) -> tuple[list[str], list[str]]:
    """Say what a Status (ETSI GS QKD 014 section 6.1) implies for ``peer``: (problems, notes).

    Problems make the probe exit 1: a master with no stored key, ``qkd_key_bits`` outside the
    KME's key sizes, a master_SAE_ID other than ours. Zero limits are notes: qgate reads them as
    "not stated".
    """
    problems, notes = [], []
    bits, master = peer.qkd_key_bits, peer.qkd_role == "master"
    if status.master_SAE_ID != own_sae:
        problems.append(f"the KME reports master_SAE_ID {status.master_SAE_ID!r}, not kme.sae_id {own_sae!r}")
    if status.stored_key_count == 0 and master:
        problems.append(
            "stored_key_count is 0: no key for this pair now; enc_keys fails until the link delivers"
        )
    elif status.stored_key_count == 0:
        notes.append("stored_key_count is 0: the KME holds no key for this pair now")
    low, high = status.min_key_size, status.max_key_size
    if (low and bits < low) or (high and bits > high):
        problems.append(
            f"qkd_key_bits {bits} is outside the KME's key sizes {low}-{high} bits: keys are refused"
        )
    for name in ("max_key_count", "max_key_per_request", "max_key_size", "min_key_size"):
        if getattr(status, name) == 0:
            notes.append(f"{name} is 0: read as not stated")
    prefetch = peer.qkd_prefetch if master else 0
    if 0 < status.max_key_per_request < prefetch:
        notes.append(
            f"max_key_per_request {status.max_key_per_request} is below qkd_prefetch {prefetch}:"
            " the stock fills over several requests"
        )
    if 0 < status.max_key_count < prefetch:
        notes.append(
            f"max_key_count {status.max_key_count} is below qkd_prefetch {prefetch}: the stock never fills"
        )
    if status.key_size != bits:
        notes.append(f"the KME's default key_size is {status.key_size} bits; qgate asks for {bits}")
    return problems, notes


def _enc_keys(report: _Report, client: Etsi014Client, peer: PeerPolicy) -> dict[str, object]:
    try:
        keys = client.enc_keys(peer.sae_id, 1, peer.qkd_key_bits)
    except KmsTlsError:
        raise
    except KmsError as exc:  # 503 and "not enough keys" too: the KME answered
        return _key_failed(report, peer, "enc_keys", exc)
    ids = [k.key_id for k in keys]
    report.say(
        f"  enc_keys: 1 key of {keys[0].size_bits} bits, key_ID {ids[0]} (consumed one key of the pair)"
    )
    return {"ok": True, "key_ids": ids, "size_bits": keys[0].size_bits, "consumed": len(keys)}


def _dec_keys(report: _Report, client: Etsi014Client, peer: PeerPolicy, key_id: str) -> dict[str, object]:
    try:
        keys = client.dec_keys(peer.sae_id, [key_id], size_bits=peer.qkd_key_bits)
    except KmsTlsError:
        raise
    except QgateError as exc:  # ConfigError for a malformed key_ID, any KmsError
        return _key_failed(report, peer, "dec_keys", exc)
    report.say(
        f"  dec_keys: key_ID {key_id}: {keys[0].size_bits} bits (taken from the KME: the master's gateway"
        " can no longer use it)"
    )
    return {"ok": True, "key_ids": [key_id], "size_bits": keys[0].size_bits, "consumed": 1}


def _key_failed(report: _Report, peer: PeerPolicy, what: str, exc: QgateError) -> dict[str, object]:
    report.problem(f"peer {peer.name}: {what} failed: {exc}")
    return {"ok": False, "error": str(exc)}


def _finish(report: _Report, as_json: bool) -> None:
    code = report.exit_status()
    report.say(f"result: {report.result()}")
    report.data.update(ok=code == OK, exit_status=code, problems=report.problems)
    click.echo("\n".join(report.lines), err=True)
    if as_json:
        sys.stdout.write(json.dumps(report.data, separators=(",", ":"), default=str) + "\n")
        sys.stdout.flush()
    sys.exit(code)
