"""Policy reload: rekey timing, fail mode and prefetch apply live; everything else is refused and reported."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from qgate.policy import RekeyPolicy, load_policy
from qgate.reload import plan_reload

SITE_A = Path(__file__).resolve().parent.parent / "policies" / "site-a.yaml"


def test_rekey_timing_fail_mode_and_prefetch_apply_live() -> None:
    old = load_policy(SITE_A)
    peer = replace(
        old.peers[0], rekey=RekeyPolicy(0.5, 2.0, 1.5, 1.0), fail_mode="pqc_only_if_qkd_down", qkd_prefetch=4
    )
    plan = plan_reload(old, replace(old, peers=(peer,)))
    assert plan.refused == []
    assert plan.peers["site-b"] == peer
    assert plan.applied == ["peer site-b: fail_mode, qkd_prefetch, rekey applied"]


def test_changes_that_need_a_restart_are_refused_and_named() -> None:
    old = load_policy(SITE_A)
    peer = replace(old.peers[0], kem="ml-kem-1024")
    new = replace(old, peers=(peer,), tun=replace(old.tun, mtu=1300))
    plan = plan_reload(old, new)
    assert "gateway.tun changed (restart to apply)" in plan.refused
    assert "peers[site-b].kem changed (restart to apply)" in plan.refused
    assert plan.peers["site-b"].kem == "ml-kem-768"  # the running value stays
