"""Policy reload (SIGHUP): what a new policy may change in a running gateway, and what needs a restart.

Pure comparison of two policies; the gateway applies the ``applicable`` part without dropping the
tunnel (rekey timing, fail mode, QKD prefetch) and reports the rest.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from qgate.policy import GatewayPolicy, PeerPolicy

LIVE_PEER_FIELDS = frozenset({"rekey", "fail_mode", "qkd_prefetch"})
"""Peer fields a reload applies to the running engine (the tunnel keeps its keys)."""


@dataclass
class ReloadPlan:
    """The outcome of comparing the running policy with a new one.

    Attributes:
        peers: for each peer that stays, its new policy (only live fields differ from the running one).
        applied: human lines of what changes now.
        refused: human lines of what changed but needs a restart (left as it was).
    """

    peers: dict[str, PeerPolicy] = field(default_factory=dict)
    applied: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def plan_reload(old: GatewayPolicy, new: GatewayPolicy) -> ReloadPlan:
    """Return which differences between ``old`` and ``new`` apply live and which are refused."""
    plan = ReloadPlan()
    for name in ("name", "identity", "listen", "tun"):
        if getattr(old, name) != getattr(new, name):
            plan.refused.append(f"gateway.{name} changed (restart to apply)")
    if (old.kme.url, old.kme.sae_id, old.kme.ca, old.kme.cert, old.kme.key) != (
        new.kme.url, new.kme.sae_id, new.kme.ca, new.kme.cert, new.kme.key
    ):  # fmt: skip
        plan.refused.append("kme connection settings changed (restart to apply)")
    if old.kme.timeout != new.kme.timeout:
        plan.refused.append("kme.timeout changed (restart to apply)")
    new_peers = {p.name: p for p in new.peers}
    for peer in old.peers:
        fresh = new_peers.pop(peer.name, None)
        if fresh is None:
            plan.refused.append(f"peer {peer.name} removed (restart to apply)")
            continue
        changed = []
        for f in fields(PeerPolicy):
            if getattr(peer, f.name) == getattr(fresh, f.name):
                continue
            if f.name in LIVE_PEER_FIELDS:
                changed.append(f.name)
            else:
                plan.refused.append(f"peers[{peer.name}].{f.name} changed (restart to apply)")
        plan.peers[peer.name] = replace(
            peer, rekey=fresh.rekey, fail_mode=fresh.fail_mode, qkd_prefetch=fresh.qkd_prefetch
        )
        if changed:
            plan.applied.append(f"peer {peer.name}: {', '.join(changed)} applied")
    for name in new_peers:
        plan.refused.append(f"peer {name} added (restart to apply)")
    return plan
