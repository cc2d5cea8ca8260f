#!/usr/bin/env bash
# Bootstraps federation between the kind clusters' SPIRE servers: copies each
# server's current trust bundle into every peer once, out of band, so that
# the first https_spiffe fetch of a peer's bundle endpoint is authenticated.
# After that the servers keep each other's bundles fresh on their own (and
# across CA rotations) through the bundle endpoints. Nothing is trusted on
# first use. Run it once after `kubectl apply -k spire-config/<cluster>` on
# every cluster, and again only if a server lost its keys.
set -euo pipefail

clusters=("${@:-east west north}")
read -r -a clusters <<<"${clusters[*]}"

server() { # cluster, spire-server args...
  local c=$1
  shift
  kubectl --context "kind-$c" -n spire exec -i spire-server-0 -c spire-server -- /opt/spire/bin/spire-server "$@"
}

declare -A bundle
for c in "${clusters[@]}"; do
  bundle[$c]=$(server "$c" bundle show -format spiffe)
done
for c in "${clusters[@]}"; do
  for p in "${clusters[@]}"; do
    [[ $p == "$c" ]] && continue
    echo ">> $c trusts $p.fedmesh.test's current bundle"
    printf '%s\n' "${bundle[$p]}" | server "$c" bundle set -format spiffe -id "spiffe://$p.fedmesh.test"
  done
done
