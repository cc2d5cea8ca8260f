#!/usr/bin/env bash
# Installs etcd from Debian's etcd-server package. The package's service is not
# started: fedmesh runs its own etcd per local federation.
set -euo pipefail
if command -v etcd >/dev/null 2>&1; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "etcd not found and apt-get is unavailable: install etcd 3.4+ and put it on PATH" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
echo ">> installing etcd from Debian's etcd-server package"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
# Debian enables a system service; fedmesh never uses it.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
fi
etcd --version | head -1
