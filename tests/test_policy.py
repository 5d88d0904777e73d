"""Policy loading: the lab policies load, and every kind of mistake names file, line and path."""

from __future__ import annotations

import ipaddress
import time
import tracemalloc
from pathlib import Path

import pytest

from qgate.errors import PolicyError
from qgate.policy import (
    Endpoint,
    GatewayPolicy,
    RekeyPolicy,
    TunPolicy,
    load_policy,
    parse_policy,
)

REPO = Path(__file__).resolve().parent.parent
POLICIES = REPO / "policies"
SOURCE = Path("/etc/qgate/site-a.yaml")

# Line numbers matter: the error table below refers to them.
BASE = """\
gateway:
  name: site-a
  identity: keys/site-a.key
  listen: 10.99.0.1:51820
  tun: {name: qgtun0, mtu: 1420}
kme:
  url: https://127.0.0.1:8443
  sae_id: SAE_A
  ca: pki/ca.pem
  cert: pki/SAE_A.pem
  key: pki/SAE_A.key
  timeout: 5
peers:
  - name: site-b
    public_key: keys/site-b.pub
    endpoint: 10.99.0.2:51820
    sae_id: SAE_B
    qkd_role: master
    subnets: [10.2.0.0/24]
    kem: ml-kem-768
    x25519: true
    fail_mode: qkd_and_pqc
    qkd_key_bits: 256
    rekey: {interval: 1.0, kem_interval: 4.0, max_key_age: 3.0}
"""

SECOND_PEER = """\
  - name: site-c
    public_key: keys/site-c.pub
    endpoint: 10.99.0.3:51820
    sae_id: SAE_C
    qkd_role: slave
    subnets: [10.3.0.0/24]
"""
"""A valid second peer, starting on line 25 when appended to BASE."""


def edit(old: str, new: str, text: str = BASE) -> str:
    """Replace the single occurrence of ``old`` in ``text``."""
    assert text.count(old) == 1, old
    return text.replace(old, new)


def problems_of(text: str, source: Path | None = SOURCE) -> list[tuple[int | None, str, str]]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source=source)
    return info.value.problems


def assert_problem(text: str, line: int | None, path: str, fragment: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source=SOURCE)
    err = info.value
    hits = [p for p in err.problems if p[0] == line and p[1] == path and fragment in p[2]]
    assert hits, f"no ({line}, {path!r}, ~{fragment!r}) in {err.problems}"
    where = f"{SOURCE}:{line}" if line is not None else str(SOURCE)
    assert f"{where}: {path + ': ' if path else ''}{hits[0][2]}" in str(err).splitlines()
    assert err.file == str(SOURCE)
    return err


# --- the two lab policies --------------------------------------------------------------------


def test_site_a_policy_loads_with_lab_values() -> None:
    policy = load_policy(POLICIES / "site-a.yaml")
    assert policy.name == "site-a"
    assert policy.source == POLICIES / "site-a.yaml"
    assert policy.identity == POLICIES / "keys/site-a.key"
    assert policy.listen == Endpoint("10.99.0.1", 51820)
    assert policy.tun == TunPolicy(name="qgtun0", address=None, mtu=1420)
    assert policy.kme.url == "https://127.0.0.1:8443"
    assert policy.kme.sae_id == "SAE_A"
    assert (policy.kme.ca, policy.kme.cert, policy.kme.key) == (
        POLICIES / "pki/ca.pem",
        POLICIES / "pki/SAE_A.pem",
        POLICIES / "pki/SAE_A.key",
    )
    (peer,) = policy.peers
    assert (peer.name, peer.sae_id, peer.qkd_role) == ("site-b", "SAE_B", "master")
    assert peer.endpoint == Endpoint("10.99.0.2", 51820)
    assert peer.public_key == POLICIES / "keys/site-b.pub"
    assert peer.subnets == (ipaddress.ip_network("10.2.0.0/24"),)
    assert (peer.kem, peer.x25519, peer.fail_mode, peer.qkd_key_bits) == (
        "ml-kem-768",
        True,
        "qkd_and_pqc",
        256,
    )
    assert peer.rekey == RekeyPolicy(interval=1.0, kem_interval=4.0, max_key_age=3.0, max_interval=2.0)


def test_site_b_policy_is_the_mirror_of_site_a() -> None:
    a = load_policy(POLICIES / "site-a.yaml")
    b = load_policy(POLICIES / "site-b.yaml")
    (a_peer,), (b_peer,) = a.peers, b.peers
    assert b.kme.sae_id == "SAE_B" and b_peer.qkd_role == "slave"
    assert b.listen == Endpoint("10.99.0.2", 51820)
    assert b_peer.subnets == (ipaddress.ip_network("10.1.0.0/24"),)
    assert (a_peer.endpoint, b_peer.endpoint) == (b.listen, a.listen)
    assert (a_peer.sae_id, b_peer.sae_id) == (b.kme.sae_id, a.kme.sae_id)
    assert (a_peer.name, b_peer.name) == (b.name, a.name)
    assert b.identity.name == "site-b.key" and b_peer.public_key.name == "site-a.pub"
    assert b.kme.cert.name == "SAE_B.pem" and b.kme.key.name == "SAE_B.key"
    assert (b.tun, b.kme.url, b_peer.rekey) == (a.tun, a.kme.url, a_peer.rekey)


def test_lab_policies_need_no_file_to_exist(tmp_path: Path) -> None:
    copy = tmp_path / "site-a.yaml"
    copy.write_text((POLICIES / "site-a.yaml").read_text())
    policy = load_policy(copy)
    assert policy.identity == tmp_path / "keys/site-a.key"
    assert not policy.identity.exists()


# --- values, defaults, paths -----------------------------------------------------------------


def test_parse_policy_returns_frozen_gateway_policy() -> None:
    policy = parse_policy(BASE, source=SOURCE)
    assert isinstance(policy, GatewayPolicy)
    with pytest.raises(AttributeError):
        policy.name = "x"  # type: ignore[misc]


def test_relative_paths_resolve_against_the_policy_directory() -> None:
    policy = parse_policy(edit("ca: pki/ca.pem", "ca: /srv/pki/ca.pem"), source=SOURCE)
    assert policy.identity == Path("/etc/qgate/keys/site-a.key")
    assert policy.kme.ca == Path("/srv/pki/ca.pem")
    assert policy.peers[0].public_key == Path("/etc/qgate/keys/site-b.pub")


def test_relative_paths_stay_as_written_without_a_source() -> None:
    policy = parse_policy(BASE, source=None)
    assert policy.identity == Path("keys/site-a.key")
    assert policy.source is None


def test_max_key_age_defaults_to_three_intervals() -> None:
    policy = parse_policy(edit(", max_key_age: 3.0}", "}"), source=SOURCE)
    assert policy.peers[0].rekey == RekeyPolicy(
        interval=1.0, kem_interval=4.0, max_key_age=3.0, max_interval=2.0
    )
    policy = parse_policy(
        edit("{interval: 1.0, kem_interval: 4.0, max_key_age: 3.0}", "{interval: 7}"), source=None
    )
    assert policy.peers[0].rekey == RekeyPolicy(
        interval=7.0, kem_interval=120.0, max_key_age=21.0, max_interval=14.0
    )


def test_optional_sections_and_keys_take_the_documented_defaults() -> None:
    text = BASE
    for line in ("  tun: {name: qgtun0, mtu: 1420}\n", "  timeout: 5\n", "    kem: ml-kem-768\n"):
        text = edit(line, "", text)
    for line in ("    x25519: true\n", "    fail_mode: qkd_and_pqc\n", "    qkd_key_bits: 256\n"):
        text = edit(line, "", text)
    text = edit("    rekey: {interval: 1.0, kem_interval: 4.0, max_key_age: 3.0}\n", "", text)
    policy = parse_policy(text, source=None)
    assert policy.tun == TunPolicy()
    assert policy.kme.timeout == 5.0
    peer = policy.peers[0]
    assert (peer.kem, peer.x25519, peer.fail_mode, peer.qkd_key_bits) == (
        "ml-kem-768",
        True,
        "qkd_and_pqc",
        256,
    )
    assert peer.rekey == RekeyPolicy() == RekeyPolicy(10.0, 120.0, 30.0, 20.0)


def test_ipv6_endpoints_in_brackets_and_tun_address_are_accepted() -> None:
    text = edit("listen: 10.99.0.1:51820", 'listen: "[2001:db8::1]:51820"')
    text = edit("endpoint: 10.99.0.2:51820", "endpoint: '[2001:DB8::2]:4500'", text)
    text = edit("mtu: 1420}", "mtu: 1420, address: 10.255.0.1/30}", text)
    text = edit("url: https://127.0.0.1:8443", "url: https://[::1]:8443/", text)
    policy = parse_policy(text, source=None)
    assert policy.listen == Endpoint("2001:db8::1", 51820)
    assert str(policy.listen) == "[2001:db8::1]:51820"
    assert policy.peers[0].endpoint == Endpoint("2001:db8::2", 4500)
    assert policy.tun.address == ipaddress.ip_interface("10.255.0.1/30")
    assert policy.kme.url == "https://[::1]:8443"


def test_port_defaults_to_51820_and_kme_url_may_be_a_host_name() -> None:
    text = edit("listen: 10.99.0.1:51820", "listen: 0.0.0.0")
    text = edit("url: https://127.0.0.1:8443", "url: https://kme-a.example:8443", text)
    policy = parse_policy(text, source=None)
    assert policy.listen == Endpoint("0.0.0.0", 51820)
    assert policy.kme.url == "https://kme-a.example:8443"


def test_two_peers_with_distinct_subnets_load() -> None:
    policy = parse_policy(BASE + SECOND_PEER, source=None)
    assert [p.name for p in policy.peers] == ["site-b", "site-c"]


# --- one mistake each: file, line, dotted path, and a message that explains ---------------------

ERROR_CASES = [
    # id, old, new, line, path, fragment of the message
    (
        "duplicate-key",
        "  sae_id: SAE_A",
        "  sae_id: SAE_A\n  sae_id: SAE_X",
        9,
        "kme.sae_id",
        "duplicate key",
    ),
    ("unknown-key", "  timeout: 5", "  timeout: 5\n  timout: 6", 13, "kme.timout", "did you mean 'timeout'"),
    ("unknown-top-key", "kme:", "version: 2\nkme:", 6, "version", "unknown key 'version'"),
    ("merge-key", "  timeout: 5", "  timeout: 5\n  <<: {x: 1}", 13, "kme", "merge keys"),
    ("non-string-key", "  timeout: 5", "  timeout: 5\n  7: x", 13, "kme", "keys must be strings"),
    ("missing-key", "  key: pki/SAE_A.key\n", "", 7, "kme.key", "missing required key 'key'"),
    ("missing-section", "kme:", "kme_:", 6, "kme_", "unknown key"),
    ("string-got-list", "name: site-a", "name: [a]", 2, "gateway.name", "expected a string, got a list"),
    ("string-got-int", "sae_id: SAE_B", "sae_id: 17", 17, "peers[0].sae_id", "put it in quotes"),
    ("number-got-string", "timeout: 5", "timeout: fast", 12, "kme.timeout", "expected a number"),
    ("number-got-bool", "timeout: 5", "timeout: true", 12, "kme.timeout", "got a boolean"),
    ("bool-got-int", "x25519: true", "x25519: 1", 21, "peers[0].x25519", "expected true or false"),
    ("section-got-string", "  tun: {name: qgtun0, mtu: 1420}", "  tun: qgtun0", 5, "gateway.tun", "mapping"),
    (
        "peers-not-list",
        "peers:\n  - name: site-b",
        "peers: 3\nx:\n  - name: site-b",
        13,
        "peers",
        "got an integer",
    ),
    ("timeout-range", "timeout: 5", "timeout: 61", 12, "kme.timeout", "must be 0.1-60 seconds, got 61"),
    ("timeout-nan", "timeout: 5", "timeout: .nan", 12, "kme.timeout", "0.1-60 seconds"),
    ("mtu-range", "mtu: 1420", "mtu: 9001", 5, "gateway.tun.mtu", "must be 576-9000 bytes, got 9001"),
    ("mtu-float", "mtu: 1420", "mtu: 1420.5", 5, "gateway.tun.mtu", "expected an integer"),
    ("interval-low", "interval: 1.0", "interval: 0.05", 24, "peers[0].rekey.interval", "0.1-86400 seconds"),
    (
        "interval-high",
        "interval: 1.0,",
        "interval: 86401,",
        24,
        "peers[0].rekey.interval",
        "0.1-86400 seconds",
    ),
    ("bits-step", "qkd_key_bits: 256", "qkd_key_bits: 100", 23, "peers[0].qkd_key_bits", "multiple of 8"),
    ("bits-range", "qkd_key_bits: 256", "qkd_key_bits: 4104", 23, "peers[0].qkd_key_bits", "64-4096 bits"),
    ("bits-small", "qkd_key_bits: 256", "qkd_key_bits: 56", 23, "peers[0].qkd_key_bits", "64-4096 bits"),
    ("bad-ip", "10.99.0.1:51820", "10.99.0.256:51820", 4, "gateway.listen", "not a literal IP address"),
    (
        "host-name",
        "10.99.0.2:51820",
        "gw-b.example:51820",
        16,
        "peers[0].endpoint",
        "not a literal IP address",
    ),
    ("bad-port", "10.99.0.2:51820", "10.99.0.2:70000", 16, "peers[0].endpoint", "port must be 1-65535"),
    ("port-zero", "10.99.0.1:51820", "10.99.0.1:0", 4, "gateway.listen", "port must be 1-65535"),
    ("ipv6-no-brackets", "10.99.0.2:51820", "'2001:db8::2:5182'", 16, "peers[0].endpoint", "in brackets"),
    ("unspecified-peer", "10.99.0.2:51820", "0.0.0.0:51820", 16, "peers[0].endpoint", "unspecified"),
    ("multicast", "10.99.0.1:51820", "224.0.0.1:51820", 4, "gateway.listen", "multicast"),
    ("bare-ipv6", "10.99.0.1:51820", "[2001:db8::1]:51820", 4, "", "put IPv6 endpoints in quotes"),
    ("own-endpoint", "10.99.0.2:51820", "10.99.0.1:51820", 16, "peers[0].endpoint", "own gateway.listen"),
    ("family", "10.99.0.2:51820", "'[2001:db8::2]:51820'", 16, "peers[0].endpoint", "cannot be reached"),
    (
        "endpoint-in-subnet",
        "[10.2.0.0/24]",
        "[10.99.0.0/16]",
        16,
        "peers[0].endpoint",
        "routed into the tunnel",
    ),
    ("url-http", "https://127.0.0.1:8443", "http://127.0.0.1:8443", 7, "kme.url", "must start with https://"),
    ("url-query", "https://127.0.0.1:8443", "https://127.0.0.1:8443/?a=1", 7, "kme.url", "query"),
    ("url-user", "https://127.0.0.1:8443", "https://u:p@127.0.0.1:8443", 7, "kme.url", "user name"),
    ("url-port", "https://127.0.0.1:8443", "https://127.0.0.1:99999", 7, "kme.url", "not a valid URL"),
    (
        "url-api",
        "https://127.0.0.1:8443",
        "https://127.0.0.1:8443/api/v1/keys",
        7,
        "kme.url",
        "base URL only",
    ),
    ("url-host", "https://127.0.0.1:8443", "https://bad_host!:8443", 7, "kme.url", "host"),
    ("sae-slash", "sae_id: SAE_B", "sae_id: SAE/B", 17, "peers[0].sae_id", "printable ASCII"),
    ("sae-empty", "sae_id: SAE_A", "sae_id: ''", 8, "kme.sae_id", "printable ASCII"),
    ("sae-non-ascii", "sae_id: SAE_A", "sae_id: SAÉ", 8, "kme.sae_id", "printable ASCII"),
    ("sae-own", "sae_id: SAE_B", "sae_id: SAE_A", 17, "peers[0].sae_id", "kme.sae_id 'SAE_A'"),
    ("tun-long", "name: qgtun0", "name: qgtun01234567890", 5, "gateway.tun.name", "1-15 characters"),
    ("tun-chars", "name: qgtun0", "name: 'qg tun'", 5, "gateway.tun.name", "1-15 characters"),
    ("tun-dot", "name: qgtun0", "name: '..'", 5, "gateway.tun.name", "not . or .."),
    ("tun-address", "mtu: 1420}", "mtu: 1420, address: 10.255.0.1}", 5, "gateway.tun.address", "/prefix"),
    ("peer-name", "name: site-b", "name: site b", 14, "peers[0].name", "1-32 characters"),
    (
        "kem-interval",
        "kem_interval: 4.0",
        "kem_interval: 0.5",
        24,
        "peers[0].rekey.kem_interval",
        ">= interval",
    ),
    (
        "kem-default",
        "{interval: 1.0, kem_interval: 4.0,",
        "{interval: 200,",
        24,
        "peers[0].rekey.kem_interval",
        "set",
    ),
    ("key-age-equal", "max_key_age: 3.0", "max_key_age: 1.0", 24, "peers[0].rekey.max_key_age", "> interval"),
    ("qkd-role", "qkd_role: master", "qkd_role: boss", 18, "peers[0].qkd_role", "one of: master, slave"),
    ("kem", "kem: ml-kem-768", "kem: ml-kem-512", 20, "peers[0].kem", "ml-kem-768, ml-kem-1024"),
    (
        "fail-open",
        "fail_mode: qkd_and_pqc",
        "fail_mode: classical_only",
        22,
        "peers[0].fail_mode",
        "one of: qkd_and_pqc, pqc_only_if_qkd_down",
    ),
    ("host-bits", "[10.2.0.0/24]", "[10.2.0.1/24]", 19, "peers[0].subnets[0]", "host bits set"),
    ("no-subnets", "[10.2.0.0/24]", "[]", 19, "peers[0].subnets", "an empty list"),
    ("subnet-overlap", "[10.2.0.0/24]", "[10.2.0.0/16, 10.2.3.0/24]", 19, "peers[0].subnets[1]", "overlaps"),
    (
        "identity-empty",
        "identity: keys/site-a.key",
        "identity: ''",
        3,
        "gateway.identity",
        "non-empty file path",
    ),
    ("path-control", "ca: pki/ca.pem", 'ca: "pki/\\x01"', 9, "kme.ca", "control characters"),
    ("null-value", "cert: pki/SAE_A.pem", "cert:", 10, "kme.cert", "empty value"),
    ("tag", "cert: pki/SAE_A.pem", "cert: !!binary aGk=", 10, "kme.cert", "tagged"),
]


@pytest.mark.parametrize(
    ("old", "new", "line", "path", "fragment"), [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES]
)
def test_each_kind_of_mistake_names_file_line_and_path(
    old: str, new: str, line: int, path: str, fragment: str
) -> None:
    assert_problem(edit(old, new), line, path, fragment)


def test_duplicate_peer_names_are_refused() -> None:
    text = BASE + edit("name: site-c", "name: site-b", SECOND_PEER)
    assert_problem(text, 25, "peers[1].name", "duplicate peer name (also at peers[0].name, line 14)")


def test_duplicate_peer_sae_ids_and_endpoints_are_refused() -> None:
    text = BASE + edit("SAE_C", "SAE_B", edit("10.99.0.3:", "10.99.0.2:", SECOND_PEER))
    assert_problem(text, 28, "peers[1].sae_id", "duplicate peer sae_id")
    assert_problem(text, 27, "peers[1].endpoint", "duplicate endpoint")


def test_overlapping_subnets_of_two_peers_are_refused() -> None:
    text = BASE + edit("[10.3.0.0/24]", "[10.3.0.0/24, 10.2.0.128/25]", SECOND_PEER)
    err = assert_problem(
        text, 30, "peers[1].subnets[1]", "10.2.0.128/25 overlaps 10.2.0.0/24 at peers[0].subnets[0]"
    )
    assert len(err.problems) == 1


def test_subnets_of_different_families_never_overlap() -> None:
    text = BASE + edit("[10.3.0.0/24]", "['::/0']", SECOND_PEER)
    assert parse_policy(text, source=None).peers[1].subnets == (ipaddress.ip_network("::/0"),)


# --- whole-file problems ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("", None, "empty"),
        ("# only a comment\n", None, "empty"),
        ("- gateway\n", 1, "expected a mapping with keys gateway, kme, peers, metrics; got a list"),
        ("just text\n", 1, "got a string"),
        ("---\n", 2, "got an empty value"),
        ("gateway:\n  name: [a\nkme: 1\n", 3, "YAML syntax error"),
        ("a: 1\n---\nb: 2\n", 2, "YAML syntax error"),
        ("a: 1\nb: \x00\n", 2, "character U+0000"),
        ("a: &x 1\nb: *y\n", 1, "YAML anchors and aliases are not allowed in a policy"),
        ("a: 1\nb: *y\n", 2, "YAML anchors and aliases are not allowed in a policy"),
    ],
)
def test_unusable_files_raise_policy_error_with_line(text: str, line: int | None, fragment: str) -> None:
    (problem,) = problems_of(text)
    assert problem[0] == line and fragment in problem[2]


def billion_laughs(levels: int = 9) -> str:
    """The classic alias bomb: 9 levels of 9 aliases each, 9**9 (387 million) strings once expanded."""
    lines = ['lol0: &lol0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"lol{level}: &lol{level} [" + ", ".join([f"*lol{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused_at_the_first_anchor_fast_and_small(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(billion_laughs())
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(PolicyError) as info:
            load_policy(path)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value) == f"{path}:1: YAML anchors and aliases are not allowed in a policy"
    assert elapsed < 0.5 and peak < 2_000_000, (elapsed, peak)


def test_qgate_check_refuses_billion_laughs_fast(tmp_path: Path) -> None:
    from qgate.checks import check_policy_file, field_lines

    path = tmp_path / "bomb.yaml"
    path.write_text(BASE + billion_laughs())
    started = time.perf_counter()
    with pytest.raises(PolicyError, match="anchors and aliases are not allowed"):
        check_policy_file(path)
    assert field_lines(path.read_text()) == {}  # the line map refuses aliases too, it does not walk them
    assert time.perf_counter() - started < 1.0


def test_anchor_and_alias_in_an_otherwise_valid_policy_are_refused_at_the_anchor() -> None:
    text = edit("    rekey: {interval", "    rekey: &timing {interval") + edit(
        "qkd_role: slave", "qkd_role: slave\n    rekey: *timing", SECOND_PEER
    )
    (problem,) = problems_of(text)
    assert problem == (24, "", "YAML anchors and aliases are not allowed in a policy")


def test_anchors_on_keys_and_documents_are_refused_and_plain_ampersands_are_text() -> None:
    assert problems_of("&k gateway: 1\n")[0][:1] == (1,)
    assert problems_of("--- &doc\ngateway: 1\n")[0][0] == 1
    assert "anchors" in problems_of("a:\n  - 1\n  - &x 2\n")[0][2]
    text = edit("name: site-a", "name: 'a&b*c'")
    assert all("anchors" not in message for _, _, message in problems_of(text))


def test_top_level_sections_missing_are_each_reported() -> None:
    problems = problems_of("gateway:\n  name: x\n")
    paths = {p[1] for p in problems}
    assert {"kme", "peers", "gateway.identity", "gateway.listen"} <= paths


def test_deep_nesting_raises_policy_error() -> None:
    problems = problems_of("a: " + "[" * 20000 + "]" * 20000 + "\n")
    assert "too deep" in problems[0][2] or "YAML" in problems[0][2]


def test_several_errors_are_reported_at_once_sorted_by_line() -> None:
    text = edit("mtu: 1420", "mtu: 1")
    text = edit("timeout: 5", "timeout: 0", text)
    text = edit("sae_id: SAE_B", "sae_id: SAE_A", text)
    text = edit("qkd_key_bits: 256", "qkd_key_bits: 257", text)
    text = edit("max_key_age: 3.0", "max_key_age: 0.5", text)
    text = edit("  cert: pki/SAE_A.pem", "  cert: pki/SAE_A.pem\n  cert: again", text)
    with pytest.raises(PolicyError) as info:
        parse_policy(text, source=SOURCE)
    err = info.value
    got = [(line, path) for line, path, _ in err.problems]
    assert got == [
        (5, "gateway.tun.mtu"),
        (11, "kme.cert"),
        (13, "kme.timeout"),
        (18, "peers[0].sae_id"),
        (24, "peers[0].qkd_key_bits"),
        (25, "peers[0].rekey.max_key_age"),
    ]
    assert len(str(err).splitlines()) == 6
    assert all(row.startswith(f"{SOURCE}:") for row in str(err).splitlines())
    assert (err.line, err.path) == (5, "gateway.tun.mtu")


def test_without_a_source_errors_name_the_policy_placeholder() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(edit("mtu: 1420", "mtu: 1"), source=None)
    assert str(info.value).startswith("<policy>:5: gateway.tun.mtu: must be 576-9000 bytes")


# --- load_policy: reading the file ------------------------------------------------------------


def test_load_policy_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(edit("mtu: 1420", "mtu: 1"))
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.file == str(path)
    assert str(info.value).startswith(f"{path}:5: gateway.tun.mtu:")


def test_load_policy_missing_file_or_directory_is_a_policy_error(tmp_path: Path) -> None:
    for path in (tmp_path / "absent.yaml", tmp_path):
        with pytest.raises(PolicyError) as info:
            load_policy(path)
        assert info.value.file == str(path)
        assert "cannot read" in str(info.value)


def test_load_policy_refuses_non_utf8_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"gateway:\n  name: caf\xe9\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert info.value.line == 2 and "UTF-8" in str(info.value)


def test_load_policy_refuses_huge_files(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_bytes(b"#" * (2 << 20))
    with pytest.raises(PolicyError, match="larger than"):
        load_policy(path)


def test_load_policy_accepts_a_utf8_bom(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_policy(path).name == "site-a"


@pytest.mark.parametrize("name", ["ministry", "substation", "site-a", "site-b"])
def test_every_example_policy_loads(name: str) -> None:
    policy = load_policy(Path(__file__).resolve().parent.parent / "policies" / f"{name}.yaml")
    assert policy.peers


def test_ministry_fails_closed_with_ml_kem_1024_and_substation_may_degrade_with_ml_kem_768() -> None:
    root = Path(__file__).resolve().parent.parent / "policies"
    ministry = load_policy(root / "ministry.yaml").peers[0]
    substation = load_policy(root / "substation.yaml").peers[0]
    assert (ministry.kem, ministry.fail_mode) == ("ml-kem-1024", "qkd_and_pqc")
    assert (substation.kem, substation.fail_mode) == ("ml-kem-768", "pqc_only_if_qkd_down")
