#!/usr/bin/env bash
# Installs what fedmesh needs from Debian's packages: etcd (etcd-server; its
# system service is not used), iproute2 (network namespaces of the local
# federation's pod networks) and iptables (the sidecar's transparent-mode
# test installs the injector's redirect rules in a network namespace).
# Nothing is downloaded from anywhere else.
set -euo pipefail
need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing ${need[*]} and apt-get is unavailable: install etcd 3.4+, iproute2 and iptables and put them on PATH" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
echo ">> installing ${need[*]} from Debian's packages"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian enables etcd's system service; fedmesh never uses it.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
fi
etcd --version | head -1
