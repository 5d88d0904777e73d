#!/usr/bin/env bash
# One-shot set-up of the two-site container lab (installed as /usr/local/bin/qgate-lab-init; the
# `lab-init` service of compose.yaml runs it on the shared volume). THROW-AWAY keys: lab only.
#
# Writes into $QGATE_LAB_DIR (default /etc/qgate):
#   pki/      lab CA, KME_A/KME_B server and SAE_A/SAE_B client certificates, link.secret (qgate pki)
#   keys/     site-a.{key,pub}, site-b.{key,pub}: ML-DSA-65 gateway identities (qgate keygen)
#   site-a.yaml, site-b.yaml   gateway policies (paths relative to this directory)
# then validates both policies with `qgate check --no-connect` (files only: no KME runs yet). Does nothing when the directory is already set
# up (marker file .lab-ready), so restarting the lab keeps its keys; `docker compose down -v` resets.
#
# Addresses: the same as `qgate lab run` (see examples/README.md), plus the two KMEs, which are
# separate services here: KME_A at 10.1.0.10 (site A LAN) and 10.99.0.11 (WAN, KME-to-KME link),
# KME_B at 10.2.0.10 and 10.99.0.12.
set -euo pipefail
umask 077

DIR=${QGATE_LAB_DIR:-/etc/qgate}
MARKER=$DIR/.lab-ready

if [[ -e $MARKER ]]; then
	echo "qgate-lab-init: $DIR is already set up (delete the volume to start again)" >&2
	exit 0
fi
mkdir -p "$DIR"

qgate pki --out "$DIR/pki" --force \
	--kme KME_A=10.1.0.10,10.99.0.11 --kme KME_B=10.2.0.10,10.99.0.12 \
	--sae SAE_A --sae SAE_B
qgate keygen --alg ml-dsa-65 --force --out "$DIR/keys/site-a.key"
qgate keygen --alg ml-dsa-65 --force --out "$DIR/keys/site-b.key"

# policy SITE PEER LISTEN PEER_ENDPOINT KME_URL SAE PEER_SAE ROLE PEER_SUBNET
policy() {
	cat <<EOF
# qgate container lab: $1 (written by qgate-lab-init; see policies/$1.yaml for every field)
gateway:
  name: $1
  identity: keys/$1.key
  listen: $3
  tun: {name: qgtun0, mtu: 1420}
kme:
  url: $5
  sae_id: $6
  ca: pki/ca.pem
  cert: pki/$6.pem
  key: pki/$6.key
  timeout: 5
peers:
  - name: $2
    public_key: keys/$2.pub
    endpoint: $4
    sae_id: $7
    qkd_role: $8
    subnets: [$9]
    kem: ml-kem-768
    x25519: true
    fail_mode: qkd_and_pqc
    qkd_key_bits: 256
    qkd_prefetch: 16
    rekey: {interval: 1.0, kem_interval: 4.0, max_key_age: 3.0}
EOF
}

policy site-a site-b 10.99.0.1:51820 10.99.0.2:51820 https://10.1.0.10:8443 SAE_A SAE_B master 10.2.0.0/24 \
	>"$DIR/site-a.yaml"
policy site-b site-a 10.99.0.2:51820 10.99.0.1:51820 https://10.2.0.10:8443 SAE_B SAE_A slave 10.1.0.0/24 \
	>"$DIR/site-b.yaml"

qgate check --no-connect "$DIR/site-a.yaml" >&2
qgate check --no-connect "$DIR/site-b.yaml" >&2
touch "$MARKER"
echo "qgate-lab-init: lab PKI, identities and policies written to $DIR" >&2
