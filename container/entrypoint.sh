#!/usr/bin/env bash
# qgate container entrypoint (installed as /usr/local/bin/qgate-entrypoint).
#
#   qgate-entrypoint [--audit-log FILE ...]  check $QGATE_POLICY, then exec `qgate up $QGATE_POLICY ...`
#   qgate-entrypoint up POLICY [...]         exec `qgate up POLICY ...` (no separate check)
#   qgate-entrypoint healthcheck             exit 0 when `qgate status --json` answers and no peer is down
#   qgate-entrypoint SUBCOMMAND [...]        exec `qgate SUBCOMMAND ...` (check, status, kms-sim, pki, ...)
#   qgate-entrypoint PROGRAM [...]           exec PROGRAM (e.g. bash, qgate-lab-init)
#
# Before `qgate up` it checks what the container must be given: the policy file, the TUN clone
# device (--device /dev/net/tun) and CAP_NET_ADMIN in the bounding set (--cap-add NET_ADMIN), and
# says which option is missing. The gateway is started with `exec`, so it becomes the container's
# main process and receives SIGTERM from `docker stop` directly (it removes its TUN and routes).
#
# Environment:
#   QGATE_POLICY           policy file for the default command (default /etc/qgate/policy.yaml)
#   QGATE_NETADMIN_PYTHON  interpreter holding the file capability cap_net_admin+ep, used for
#                          `qgate up` when this process is not privileged itself
#                          (default /opt/qgate/venv/bin/python-netadmin, made by the Containerfile)
#   QGATE_DRY_RUN=1        do every check, print the command that would be exec'd, exit 0
set -euo pipefail

readonly CAP_NET_ADMIN=12 # linux/capability.h
readonly TUN_DEVICE=/dev/net/tun
POLICY=${QGATE_POLICY:-/etc/qgate/policy.yaml}
NETADMIN_PYTHON=${QGATE_NETADMIN_PYTHON:-/opt/qgate/venv/bin/python-netadmin}

die() {
	echo "qgate-entrypoint: error: $*" >&2
	exit 2
}

# has_cap SET BIT: whether capability BIT is in SET (CapEff, CapBnd, ...) of this shell.
has_cap() {
	local hex
	hex=$(awk -v key="$1:" '$1 == key { print $2 }' "/proc/$$/status")
	[[ -n $hex ]] || return 1
	(((16#$hex >> $2) & 1))
}

run() {
	if [[ ${QGATE_DRY_RUN:-0} == 1 ]]; then
		printf '%q ' "$@" | sed 's/ $//'
		echo
		exit 0
	fi
	exec "$@"
}

preflight_up() {
	[[ -c $TUN_DEVICE ]] || die "$TUN_DEVICE is missing: run the container with --device /dev/net/tun"
	has_cap CapBnd "$CAP_NET_ADMIN" ||
		die "CAP_NET_ADMIN is not available: run the container with --cap-add NET_ADMIN"
}

# The command that runs `qgate up` with CAP_NET_ADMIN effective: plain `qgate` when this process
# already has it (root with --cap-add NET_ADMIN), else the file-capability interpreter in isolated
# mode (-I: no PYTHON* variables, no user site, no script directory on sys.path).
up_command() {
	if has_cap CapEff "$CAP_NET_ADMIN"; then
		UP=(qgate up)
	elif [[ -x $NETADMIN_PYTHON ]]; then
		UP=("$NETADMIN_PYTHON" -I -m qgate up)
	else
		echo "qgate-entrypoint: warning: no CAP_NET_ADMIN and no $NETADMIN_PYTHON: qgate up will fail" >&2
		UP=(qgate up)
	fi
}

healthcheck() {
	local answer
	answer=$(qgate status --json) || exit 1
	python3 - "$answer" <<'EOF'
import json, sys

status = json.loads(sys.argv[1])
peers = status.get("peers") or []
bad = [f"{p.get('name')}: {p.get('state')} ({p.get('why')})" for p in peers
       if p.get("state") not in ("up", "rekeying", "degraded")]
if not status.get("ok", True) or not peers or bad:
    print("unhealthy:", "; ".join(bad) or status.get("error") or "no peers")
    sys.exit(1)
print("healthy:", ", ".join(f"{p.get('name')} {p.get('state')}" for p in peers))
EOF
}

main() {
	case ${1:-} in
	-h | --help | --version) run qgate "$@" ;;
	"" | -*)
		[[ -r $POLICY ]] ||
			die "no readable policy at $POLICY: mount the site's directory on /etc/qgate or set QGATE_POLICY"
		preflight_up
		# Files only: `qgate up` reports the KME's TLS by cause, `qgate kme probe` checks it on demand.
		qgate check --no-connect "$POLICY" >&2 || exit $?
		up_command
		run "${UP[@]}" "$POLICY" "$@"
		;;
	up)
		shift
		preflight_up
		up_command
		run "${UP[@]}" "$@"
		;;
	healthcheck) healthcheck ;;
	audit | check | down | keygen | kms-sim | lab | pki | status) run qgate "$@" ;;
	*) run "$@" ;;
	esac
}

main "$@"
