#!/usr/bin/env bash
# Installs what fedmesh needs from Debian's packages: etcd (etcd-server; its
# system service is not used), iproute2 (network namespaces of the local
# federation's pod networks and of the local Kubernetes nodes), iptables (the
# sidecar's transparent-mode test installs the injector's redirect rules in a
# network namespace; kube-proxy programs a node's services with it),
# containerd and runc (built with seccomp: the kubelet applies RuntimeDefault)
# and containernetworking-plugins (the bridge CNI of a node's pods).
# Nothing is downloaded from anywhere else.
set -euo pipefail
need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || need+=(iptables)
command -v containerd >/dev/null 2>&1 || need+=(containerd)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || need+=(runc)
[ -x /usr/lib/cni/bridge ] || [ -x /opt/cni/bin/bridge ] || need+=(containernetworking-plugins)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null 2>&1; then
  echo "missing ${need[*]} and apt-get is unavailable: install etcd 3.4+, iproute2, iptables, containerd 1.6+, runc (with seccomp) and the CNI plugins and put them on PATH" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
echo ">> installing ${need[*]} from Debian's packages"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian enables etcd's and containerd's system services; fedmesh never uses
# them (each local node runs its own, with its own directories and socket).
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  for unit in etcd containerd; do
    $SUDO systemctl disable --now "$unit" >/dev/null 2>&1 || true
  done
fi
etcd --version | head -1
