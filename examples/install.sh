#!/usr/bin/env bash
# Install qgate and what its lab, tests and benchmarks use, on Debian 12 (run as root, from the repo).
# System tools come from apt; qgate and its Python dependencies go into ./.venv (PEP 668: Debian's
# system Python refuses plain pip installs).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive
need_apt=0
for tool in ip ping tcpdump iperf3 nft faketime; do command -v "$tool" >/dev/null 2>&1 || need_apt=1; done
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt=1
if [ "$need_apt" = 1 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends \
    iproute2 iputils-ping tcpdump iperf3 nftables faketime python3 python3-venv python3-pip ca-certificates >&2
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >&2
.venv/bin/python -m pip install -q -e '.[test]' >&2
# The unprivileged system user `qgate up --user qgate` drops to after setting up the TUN and routes.
if ! id qgate >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin qgate 2>/dev/null || true
fi
echo "qgate installed in $(pwd)/.venv: run it as .venv/bin/qgate" >&2
