"""Key hygiene: old epoch keys are dropped, secret holders never print key bytes, logs never carry secrets.

The in-memory tests drive two engines with an explicit clock (``test_protocol_peers.Pair``),
which, like any adapter, calls ``handle_timer`` only when ``next_timer`` says it is due. The lab
test runs real KMEs and gateways at DEBUG level in network namespaces and then searches every log
and stats file for every secret of the run, in hex, base64 and Python bytes notation.
"""

from __future__ import annotations

import ast
import base64
import binascii
import gc
import os
import re
import sys
import time
import types
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mldsa
from test_protocol_peers import Pair

from qgate import lab_net as net
from qgate import lab_setup as setup
from qgate.constants import EPOCH_GRACE
from qgate.crypto.aead import RecordKey
from qgate.crypto.identity import IdentityKey
from qgate.crypto.kem import get_kem
from qgate.crypto.secret import Secret
from qgate.crypto.x25519 import X25519KeyPair
from qgate.kms.etsi014 import QkdKey
from qgate.kms.sim_store import LinkKeys
from qgate.lab import Lab, listens, read_stats
from qgate.lab_procs import wait_until
from qgate.protocol import keyschedule as ks
from qgate.protocol.core import Pending
from qgate.protocol.epoch import PREVIOUS_MAX, Epoch, EpochSet
from qgate.protocol.peer import Peer

WINDOW = 16
"""Bytes: any run of this many secret bytes found in a text counts as a leak."""

# ----- the leak scanner ---------------------------------------------------------------------------

_HEX_RUN = re.compile(rb"[0-9a-fA-F]{%d,}" % (2 * WINDOW))
_B64_RUN = re.compile(rb"[A-Za-z0-9+/]{%d,}" % (4 * WINDOW // 3 + 2))
_B64URL_RUN = re.compile(rb"[A-Za-z0-9_-]{%d,}" % (4 * WINDOW // 3 + 2))
_BYTES_LITERAL = re.compile(rb"""b'(?:[^'\\\n]|\\.)*'|b"(?:[^"\\\n]|\\.)*\"""")


def _decodings(data: bytes) -> Iterable[bytes]:
    """``data`` itself plus every hex, base64 (standard and URL-safe) and ``b'...'`` run in it, decoded.

    Each run is decoded at every alignment (2 for hex, 4 for base64), so a secret inside a longer
    encoded blob is found wherever the blob starts. Base64 runs are also tried with line breaks
    (real or JSON-escaped) removed, as in PEM bodies.
    """
    yield data
    for run in _HEX_RUN.findall(data):
        for start in (0, 1):
            end = start + (len(run) - start) // 2 * 2
            yield binascii.unhexlify(run[start:end])
    joined = data.replace(b"\\n", b"").replace(b"\r", b"").replace(b"\n", b"")
    for text in (data, joined):
        for pattern, altchars in ((_B64_RUN, None), (_B64URL_RUN, b"-_")):
            for run in pattern.findall(text):
                for start in range(4):
                    end = start + (len(run) - start) // 4 * 4
                    yield base64.b64decode(run[start:end], altchars=altchars)
    for literal in _BYTES_LITERAL.findall(data):
        try:
            value = ast.literal_eval(literal.decode("latin-1"))
        except (ValueError, SyntaxError):
            continue
        if isinstance(value, bytes):
            yield value


def secret_windows(secrets: Mapping[str, bytes], public: Iterable[bytes] = ()) -> dict[bytes, str]:
    """Every WINDOW-byte run of every secret (the whole secret if shorter), mapped to the secret's name.

    Runs that also occur in ``public`` material (certificates, public keys: DER structure and public
    values shared with a private key's encoding) are left out: they are not secret.
    """
    public_runs = {blob[i : i + WINDOW] for blob in public for i in range(len(blob) - WINDOW + 1)}
    windows: dict[bytes, str] = {}
    for name, value in secrets.items():
        size = min(WINDOW, len(value))
        for i in range(len(value) - size + 1):
            run = value[i : i + size]
            if run not in public_runs:
                windows[run] = name
    return windows


def find_leaks(data: bytes, windows: Mapping[bytes, str]) -> set[str]:
    """Names of the secrets with a window present in ``data``, raw or in any encoding of ``_decodings``."""
    found: set[str] = set()
    sizes = {len(w) for w in windows}
    for blob in _decodings(data):
        for size in sizes:
            for i in range(len(blob) - size + 1):
                name = windows.get(blob[i : i + size])
                if name is not None:
                    found.add(name)
    return found


SAMPLE = bytes(range(7, 7 + 48))


@pytest.mark.parametrize(
    "encode",
    [
        lambda s: s.hex(),
        lambda s: s.hex().upper(),
        lambda s: "key=" + s[5:21].hex() + " more",
        lambda s: base64.b64encode(s).decode(),
        lambda s: "x" + base64.b64encode(b"\x00" + s).decode() + " trailing",
        lambda s: base64.b64encode(b"\x00\x01" + s).decode(),
        lambda s: base64.urlsafe_b64encode(b"\xff" + s).decode(),
        lambda s: "\n".join(re.findall(".{1,10}", base64.b64encode(s).decode())),
        lambda s: repr(s[3:30]),
        lambda s: str({"key": s}),
    ],
    ids=["hex", "HEX", "hex-window", "b64", "b64-off1", "b64-off2", "b64url", "pem-lines", "repr", "dict"],
)
def test_leak_scanner_finds_a_secret_window_in_every_encoding(encode: Callable[[bytes], str]) -> None:
    windows = secret_windows({"sample": SAMPLE})
    text = f"2024-01-01 INFO something {encode(SAMPLE)} end\n"
    assert find_leaks(text.encode(), windows) == {"sample"}
    assert find_leaks(b"nothing secret here " + bytes(range(100, 160)).hex().encode(), windows) == set()


# ----- old epochs are dropped ---------------------------------------------------------------------


def _reachable(root: object, target: object) -> bool:
    """Whether ``target`` can be reached from ``root`` through object references (modules, classes,
    functions and plain values are not followed)."""
    skip = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, str, bytes, int, float)
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if obj is target:
            return True
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        stack.extend(gc.get_referents(obj))
    return False


def _held(peer: Peer, epoch: Epoch) -> bool:
    epochs = peer.epochs
    return epoch in epochs.by_index.values() or epoch in epochs.previous or _reachable(peer, epoch)


def test_datagram_sealed_under_an_old_epoch_no_longer_opens_after_its_grace_period() -> None:
    pair = Pair(interval=3.0, kem_interval=100.0, max_key_age=300.0)
    pair.run(0.2)
    old_m, old_s = pair.master.epochs.current, pair.slave.epochs.current
    assert old_m is not None and old_s is not None
    to_slave = [pair.master.seal(b"old-%d" % i, pair.now) for i in range(2)]
    to_master = [pair.slave.seal(b"old-%d" % i, pair.now) for i in range(2)]
    pair.run(3.0)  # one ratchet step: the old epoch is "previous" on both sides
    assert pair.master.stats.rekeys_qkd == pair.slave.stats.rekeys_qkd == 1
    assert old_m in pair.master.epochs.previous and old_s in pair.slave.epochs.previous
    assert to_slave[0] and to_master[0] and to_slave[1] and to_master[1]
    assert pair.slave.open(to_slave[0], pair.now) == b"old-0"  # within the grace: reordered packets open
    assert pair.master.open(to_master[0], pair.now) == b"old-0"

    pair.run(EPOCH_GRACE + 0.1)  # no rekey falls due meanwhile (interval 3 s)
    assert pair.master.stats.rekeys_qkd == 1
    for peer, old, datagram in ((pair.slave, old_s, to_slave[1]), (pair.master, old_m, to_master[1])):
        assert not _held(peer, old), f"{peer.config.role} still holds the expired epoch"
        unknown = peer.epochs.stats.drops_unknown_index
        assert peer.open(datagram, pair.now) is None
        assert peer.epochs.stats.drops_unknown_index == unknown + 1


def test_datagram_sealed_under_an_epoch_trimmed_within_its_grace_no_longer_opens() -> None:
    pair = Pair(interval=0.1, kem_interval=100.0, max_key_age=300.0)
    pair.run(0.05)
    old_m, old_s = pair.master.epochs.current, pair.slave.epochs.current
    assert old_m is not None and old_s is not None
    to_slave = pair.master.seal(b"old", pair.now)
    to_master = pair.slave.seal(b"old", pair.now)
    assert to_slave is not None and to_master is not None
    replaced_at = None
    while pair.master.stats.rekeys_qkd < PREVIOUS_MAX + 1:
        pair.run(0.05)
        pair.send_both_ways(b"tick")  # the slave switches at once
        if replaced_at is None and pair.master.epochs.current is not old_m:
            replaced_at = pair.now
    assert replaced_at is not None and pair.now - replaced_at < EPOCH_GRACE  # trimmed, not expired
    for peer, old, datagram in ((pair.slave, old_s, to_slave), (pair.master, old_m, to_master)):
        assert len(peer.epochs.previous) <= PREVIOUS_MAX
        assert not _held(peer, old), f"{peer.config.role} still holds the trimmed epoch"
        assert peer.open(datagram, pair.now) is None


# ----- nothing prints key bytes -------------------------------------------------------------------


def _epoch_keys() -> tuple[ks.EpochKeys, list[bytes]]:
    ck, qkd = os.urandom(48), os.urandom(32)
    keys = ks.ratchet_keys(Secret(ck), Secret(qkd), epoch=7, request_hash=bytes(48))
    parts = [keys.k_m2s, keys.k_s2m, keys.chaining_key, keys.kc_master, keys.kc_slave]
    return keys, [ck, qkd, *(p.reveal() for p in parts)]


def _secret_holders() -> Iterable[tuple[str, object, list[bytes]]]:
    raw = os.urandom(32)
    yield "Secret", Secret(raw), [raw]
    yield "RecordKey", RecordKey(Secret(raw)), [raw]
    keys, secrets = _epoch_keys()
    yield "EpochKeys", keys, secrets
    send, recv, ck = os.urandom(32), os.urandom(32), os.urandom(48)
    epoch = Epoch(number=3, my_index=5, peer_index=6, send_key=Secret(send), recv_key=Secret(recv),
                  chaining_key=Secret(ck), created_at=0.0, kind="ratchet", key_ids=("id",))  # fmt: skip
    epoch.confirm_key = Secret(raw)
    yield "Epoch", epoch, [send, recv, ck, raw]
    epochs = EpochSet(max_key_age=3.0)
    epochs.install_current(epoch, 0.0)
    yield "EpochSet", epochs, [send, recv, ck, raw]
    identity = IdentityKey.generate("ml-dsa-65")
    private = serialization.load_pem_private_key(identity.to_pem(), password=None)
    assert isinstance(private, mldsa.MLDSA65PrivateKey)
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    yield "IdentityKey", identity, [private.private_bytes_raw(), der[-32:]]
    x_raw = os.urandom(32)
    yield "X25519KeyPair", X25519KeyPair.from_private_bytes(x_raw), [x_raw]
    yield "QkdKey", QkdKey("5f0c6d2e-0000-4000-8000-000000000001", Secret(raw)), [raw]
    seed = os.urandom(64)
    dk = get_kem("ml-kem-768").from_seed(seed)
    yield "KemDecapsulationKey", dk, [seed]
    pending = Pending("rk", 1, 0.0, qkd_key=Secret(raw), keys=keys, dk=dk,
                       x25519=X25519KeyPair.from_private_bytes(x_raw), base=epoch)  # fmt: skip
    yield "pending exchange", pending, [raw, seed, x_raw, send, recv, ck, *secrets]


@pytest.mark.parametrize(("name", "holder", "secrets"), list(_secret_holders()), ids=lambda v: str(v)[:20])
def test_secret_holding_objects_print_no_key_bytes(name: str, holder: object, secrets: list[bytes]) -> None:
    windows = secret_windows({f"{name}[{i}]": s for i, s in enumerate(secrets)})
    texts = [repr(holder), str(holder), f"{holder!r}", f"{holder} {holder!r}", repr([holder])]
    for text in texts:
        assert find_leaks(text.encode(), windows) == set(), f"{name} shows key bytes: {text[:200]}"


# ----- nothing secret in the lab's logs and stats ---------------------------------------------------

_UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
KME_RATE = 100_000
"""Bits/s: the lab KMEs' rate (``lab_setup.kms_sim_argv`` default), which ties key indexes to the clock."""
KME_KEY_SIZE = 256
KME_MAX_KEYS = 1000


def _delivered_qkd_keys(run_dir: Path, key_ids: set[str], since: float, until: float) -> dict[str, bytes]:
    """Recover the key bytes of ``key_ids`` the way the KME simulator derives them from the link secret.

    A key's index in its direction's stream follows the wall clock (``OutgoingPool``), so the
    indexes released between ``since`` and ``until`` (Unix seconds), plus a full store, are searched.
    """
    link = LinkKeys(Secret((run_dir / "pki" / "link.secret").read_bytes()))
    first = int((since - 1) * KME_RATE / KME_KEY_SIZE) - KME_MAX_KEYS
    last = int((until + 1) * KME_RATE / KME_KEY_SIZE)
    keys: dict[str, bytes] = {}
    for direction in ("KME_A>KME_B", "KME_B>KME_A"):
        for index in range(first, last + 1):
            key_id = link.key_id(direction, index)
            if key_id in key_ids:
                keys[f"qkd {key_id}"] = link.key(direction, index, KME_KEY_SIZE).reveal()
    return keys


def _private_key_material(run_dir: Path) -> tuple[dict[str, bytes], list[bytes]]:
    """Every private key file of the run (raw and PKCS#8 DER), and the DER of every public file."""
    secrets = {"link.secret": (run_dir / "pki" / "link.secret").read_bytes()}
    for path in sorted(run_dir.rglob("*.key")):
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        secrets[f"{path.name} (DER)"] = der
        if isinstance(key, ec.EllipticCurvePrivateKey):
            secrets[f"{path.name} (scalar)"] = key.private_numbers().private_value.to_bytes(32, "big")
        elif isinstance(key, mldsa.MLDSA65PrivateKey | mldsa.MLDSA87PrivateKey):
            secrets[f"{path.name} (seed)"] = key.private_bytes_raw()
    public = [
        base64.b64decode(b"".join(block.split()))
        for path in list(run_dir.rglob("*.pem")) + list(run_dir.rglob("*.pub"))
        for block in re.findall(rb"-----BEGIN [A-Z ]+-----(.*?)-----END", path.read_bytes(), re.S)
    ]
    return secrets, public


def _start_debug_kmes(lab: Lab) -> None:
    for site, role in (("a", "ga"), ("b", "gb")):
        argv = [*setup.kms_sim_argv(sys.executable, lab.run_dir, site, rate=KME_RATE), "--log-level", "debug"]
        lab.start(f"kme-{site}", role, argv)
    wait_until(
        "both KMEs to listen",
        lambda: all(listens(lab.topo.ns(role), setup.KME_PORT) for role in ("ga", "gb")),
        timeout=15,
    )


@pytest.mark.netns
@pytest.mark.slow
def test_no_secret_appears_in_any_gateway_or_kme_log_or_stats_file_at_debug_level() -> None:
    since = time.time()
    with Lab() as lab:
        setup.make_pki_and_identities(lab.run_dir)
        setup.write_policies(lab.run_dir)  # the lab policies: QKD ratchet every 1 s, ML-KEM every 4 s
        _start_debug_kmes(lab)
        gateways = [
            lab.start(f"gateway-{site}", role,
                      [*setup.gateway_argv(sys.executable, lab.run_dir, site), "--log-level", "debug"])
            for site, role in (("b", "gb"), ("a", "ga"))
        ]  # fmt: skip
        lab.wait_path(gateways)
        ping = lab.run("ha", ["ping", "-c", "30", "-i", "0.2", "-W", "1", net.HOST_B], timeout=30)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        for child in reversed(lab.kids.items):
            assert lab.kids.stop(child) == 0, child.tail()
        until = time.time()

        stats = read_stats(lab.run_dir / "stats-a.json")
        rekeys_qkd, rekeys_kem, handshakes = (
            stats.get(k) for k in ("rekeys_qkd", "rekeys_kem", "handshakes")
        )
        assert isinstance(rekeys_qkd, int) and isinstance(rekeys_kem, int) and isinstance(handshakes, int)
        assert rekeys_qkd >= 3 and rekeys_kem >= 1, stats
        files = sorted((lab.run_dir / "logs").glob("*.log")) + sorted(lab.run_dir.glob("stats-*.json"))
        contents = {path.name: path.read_bytes() for path in files}
        expected = {
            "kme-a.log",
            "kme-b.log",
            "gateway-a.log",
            "gateway-b.log",
            "stats-a.json",
            "stats-b.json",
        }
        assert expected <= set(contents)
        assert b"DEBUG" in contents["gateway-a.log"] and b"DEBUG" in contents["kme-a.log"]

        enc_lines = [line for line in contents["kme-a.log"].splitlines() if b"enc_keys" in line]
        delivered = {m.decode() for line in enc_lines for m in _UUID.findall(line)}
        mentioned = {m.decode() for blob in contents.values() for m in _UUID.findall(blob)}
        assert len(delivered) >= rekeys_qkd + handshakes
        qkd = _delivered_qkd_keys(lab.run_dir, mentioned, since, until)
        assert {f"qkd {k}" for k in delivered} <= set(qkd), "could not recover every delivered QKD key"
        private, public = _private_key_material(lab.run_dir)
        assert len(private) == 1 + 2 * 7  # link secret; CA, 2 KMEs, 2 SAEs, 2 identities: DER + raw each
        windows = secret_windows({**qkd, **private}, public)
        leaks = {name: find_leaks(blob, windows) for name, blob in contents.items()}
        assert all(not found for found in leaks.values()), leaks
