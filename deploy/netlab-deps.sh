#!/usr/bin/env bash
# Install what the NAT lab (deploy/netlab, tests/netlab) needs, when running as root and missing:
# iproute2 (ip netns), iptables (the routers' NAT), miniupnpd + nftables (the UPnP IGD / NAT-PMP
# gateway on one router, deploy/netlab-igd; Debian builds miniupnpd with its nftables backend).
# Not root, or no apt-get: print why and leave it; the lab tests then skip with that reason.
set -uo pipefail
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v iptables >/dev/null || missing+=(iptables)
command -v miniupnpd >/dev/null || missing+=(miniupnpd)
command -v nft >/dev/null || missing+=(nftables)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "netlab-deps: missing ${missing[*]} (need root and apt-get to install); NAT lab tests will skip" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } ||
    echo "netlab-deps: could not install ${missing[*]}; NAT lab tests will skip" >&2
exit 0
