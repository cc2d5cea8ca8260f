#!/usr/bin/env bash
# kind end-to-end runner: creates the kind clusters east, west and north,
# builds and loads the fedmesh images, installs SPIRE (spire-config/) and
# fedmesh (clusters/overlays/<cluster>), links the controllers with peer
# kubeconfigs and the gateways with their peers' node addresses, deploys the
# sample app, exports it, waits until every cluster imports it and every
# gateway reaches every peer, and sends a request from east across the
# gateways once east's own echo pods are gone.
#
#   clusters/kind-e2e.sh [--no-tear-down] [--keep-clusters-on-failure]
#
# Needs docker, kind, kubectl and openssl. It stops at once, before touching
# anything, when one of them is missing. CI has no Docker engine, so this
# script is NOT run by CI (see docs/kubernetes.md).
set -euo pipefail

cd "$(dirname "$0")/.."
CLUSTERS=(east west north)
IMAGE=ghcr.io/fedmesh/fedmesh:dev
# Service fedmesh-gateway-tunnel (clusters/base/gateway/service.yaml).
TUNNEL_NODE_PORT=31443
TEAR_DOWN=1

for arg in "$@"; do
	case "$arg" in
	--no-tear-down) TEAR_DOWN=0 ;;
	-h | --help)
		sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "kind-e2e: unknown argument $arg (try --help)" >&2
		exit 2
		;;
	esac
done

missing=()
for tool in docker kind kubectl openssl; do
	command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if ((${#missing[@]})); then
	echo "kind-e2e: missing: ${missing[*]}. Install them (docker: https://docs.docker.com/engine/install/, kind: https://kind.sigs.k8s.io/docs/user/quick-start/#installation) and run again; nothing was created." >&2
	exit 2
fi
if ! docker info >/dev/null 2>&1; then
	echo "kind-e2e: docker is installed but its engine is not reachable (docker info failed); start Docker and run again; nothing was created." >&2
	exit 2
fi

WORK=$(mktemp -d)
cleanup() {
	status=$?
	if ((TEAR_DOWN)); then
		for c in "${CLUSTERS[@]}"; do kind delete cluster --name "$c" >/dev/null 2>&1 || true; done
	else
		echo "kind-e2e: --no-tear-down: clusters ${CLUSTERS[*]} left running (kind delete cluster --name <c>)"
	fi
	rm -rf "$WORK"
	exit $status
}
trap cleanup EXIT

step() { echo ">> $*"; }

step "building images"
docker build -f clusters/Dockerfile -t "$IMAGE" .

for c in "${CLUSTERS[@]}"; do
	step "cluster $c"
	kind get clusters 2>/dev/null | grep -qx "$c" || kind create cluster --config "clusters/kind/$c.yaml" --wait 120s
	kind load docker-image "$IMAGE" --name "$c" # the init container runs fedmesh-init from it too
	ctx="kind-$c"

	step "SPIRE in $c (spire-config/$c)"
	kubectl --context "$ctx" apply -k "spire-config/$c"

	step "fedmesh in $c (clusters/overlays/$c)"
	# The webhook's serving pair: a CA per cluster, a cert for the Service name.
	d="$WORK/$c"
	mkdir -p "$d"
	openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=fedmesh-injector-ca-$c" \
		-keyout "$d/ca.key" -out "$d/ca.crt" 2>/dev/null
	openssl req -newkey rsa:2048 -nodes -subj "/CN=fedmesh-injector.fedmesh-system.svc" \
		-keyout "$d/tls.key" -out "$d/tls.csr" 2>/dev/null
	printf 'subjectAltName=DNS:fedmesh-injector.fedmesh-system.svc,DNS:fedmesh-injector.fedmesh-system.svc.cluster.local\nextendedKeyUsage=serverAuth\n' >"$d/ext"
	openssl x509 -req -in "$d/tls.csr" -CA "$d/ca.crt" -CAkey "$d/ca.key" -CAcreateserial -days 30 \
		-extfile "$d/ext" -out "$d/tls.crt" 2>/dev/null
	kubectl --context "$ctx" apply -k "clusters/overlays/$c"
	kubectl --context "$ctx" -n fedmesh-system create secret tls fedmesh-injector-tls \
		--cert "$d/tls.crt" --key "$d/tls.key" --dry-run=client -o yaml | kubectl --context "$ctx" apply -f -
	ca=$(base64 <"$d/ca.crt" | tr -d '\n')
	kubectl --context "$ctx" patch mutatingwebhookconfiguration fedmesh-injector --type json -p \
		"[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$ca\"},{\"op\":\"add\",\"path\":\"/webhooks/1/clientConfig/caBundle\",\"value\":\"$ca\"}]"
	kubectl --context "$ctx" -n fedmesh-system rollout status deploy/fedmesh-federation-controller --timeout 180s
	kubectl --context "$ctx" -n fedmesh-system rollout status deploy/fedmesh-injector --timeout 180s
	kubectl --context "$ctx" -n fedmesh-system rollout status deploy/fedmesh-gateway --timeout 180s
done

step "federating SPIRE trust domains"
spire-config/bootstrap-federation.sh

step "linking clusters (peer kubeconfigs with fedmesh-peer-reader tokens)"
for c in "${CLUSTERS[@]}"; do
	kind get kubeconfig --internal --name "$c" >"$WORK/$c.internal"
	server=$(kubectl --kubeconfig "$WORK/$c.internal" config view --raw -o jsonpath='{.clusters[0].cluster.server}')
	kubectl --kubeconfig "$WORK/$c.internal" config view --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d >"$WORK/$c.ca"
	token=$(kubectl --context "kind-$c" -n fedmesh-system create token fedmesh-peer-reader --duration 24h)
	kc="$WORK/$c.peer.kubeconfig"
	kubectl --kubeconfig "$kc" config set-cluster "$c" --server "$server" --certificate-authority "$WORK/$c.ca" --embed-certs >/dev/null
	kubectl --kubeconfig "$kc" config set-credentials fedmesh-peer-reader --token "$token" >/dev/null
	kubectl --kubeconfig "$kc" config set-context "$c" --cluster "$c" --user fedmesh-peer-reader >/dev/null
	kubectl --kubeconfig "$kc" config use-context "$c" >/dev/null
done
for c in "${CLUSTERS[@]}"; do
	for p in "${CLUSTERS[@]}"; do
		[[ "$p" == "$c" ]] && continue
		kubectl --context "kind-$c" -n fedmesh-system create secret generic "peer-$p" \
			--from-file kubeconfig="$WORK/$p.peer.kubeconfig" --dry-run=client -o yaml |
			kubectl --context "kind-$c" label --local -f - multicluster.fedmesh.dev/peer=true multicluster.fedmesh.dev/cluster="$p" -o yaml |
			kubectl --context "kind-$c" apply -f -
	done
done

step "gateway peers: every peer's tunnel (NodePort $TUNNEL_NODE_PORT/udp on each of its nodes)"
# Node addresses exist only now; the gateways read them from the ConfigMap
# fedmesh-gateway-peers at start (--peers-file), hence the restart.
declare -A TUNNEL_ADDRS
for c in "${CLUSTERS[@]}"; do
	addrs=()
	for ip in $(kubectl --context "kind-$c" get nodes -o jsonpath='{range .items[*]}{.status.addresses[?(@.type=="InternalIP")].address}{"\n"}{end}'); do
		[[ $ip == *:* ]] && ip="[$ip]"
		addrs+=("$ip:$TUNNEL_NODE_PORT")
	done
	((${#addrs[@]})) || { echo "kind-e2e: no node addresses in $c" >&2; exit 1; }
	TUNNEL_ADDRS[$c]=$(IFS=,; echo "${addrs[*]}")
done
for c in "${CLUSTERS[@]}"; do
	{
		echo "# written by clusters/kind-e2e.sh: each peer's kind nodes, Service fedmesh-gateway-tunnel"
		for p in "${CLUSTERS[@]}"; do
			[[ "$p" == "$c" ]] || echo "$p=${TUNNEL_ADDRS[$p]}"
		done
	} >"$WORK/$c.peers"
	kubectl --context "kind-$c" -n fedmesh-system create configmap fedmesh-gateway-peers \
		--from-file peers="$WORK/$c.peers" --dry-run=client -o yaml | kubectl --context "kind-$c" apply -f -
	kubectl --context "kind-$c" -n fedmesh-system rollout restart deploy/fedmesh-gateway
done
for c in "${CLUSTERS[@]}"; do
	kubectl --context "kind-$c" -n fedmesh-system rollout status deploy/fedmesh-gateway --timeout 180s
done

step "scenario: every gateway replica has a live link to every peer cluster, and publishes its RTTs"
# The admin endpoint (:15000) through the API server's pod proxy: the image
# has no shell. A replica still terminating after the restart may be listed
# for a while; it must go, or come up too.
want=$((${#CLUSTERS[@]} - 1))
for c in "${CLUSTERS[@]}"; do
	for i in $(seq 1 45); do
		ok=1
		report=""
		for pod in $(kubectl --context "kind-$c" -n fedmesh-system get pods -l app.kubernetes.io/name=fedmesh-gateway -o jsonpath='{.items[*].metadata.name}'); do
			up=$(kubectl --context "kind-$c" get --raw "/api/v1/namespaces/fedmesh-system/pods/$pod:15000/proxy/metrics" 2>/dev/null |
				grep '^fedmesh_gateway_peer_up{' | grep ' 1$' | grep -o 'cluster="[^"]*"' | sort -u | wc -l) || up=0
			report+=" $pod:$up/$want"
			((up == want)) || ok=0
		done
		((ok)) && break
		((i == 45)) && { echo "kind-e2e: gateways in $c with live peer clusters:$report after 90s" >&2; exit 1; }
		sleep 2
	done
	for i in $(seq 1 30); do
		rtt=$(kubectl --context "kind-$c" -n fedmesh-system get service fedmesh-gateway \
			-o jsonpath='{.metadata.annotations.multicluster\.fedmesh\.dev/peer-rtt}')
		n=0
		for p in "${CLUSTERS[@]}"; do
			[[ "$p" != "$c" && $rtt == *"\"$p\":"* ]] && n=$((n + 1))
		done
		((n == want)) && break
		((i == 30)) && { echo "kind-e2e: Service fedmesh-gateway in $c: peer-rtt annotation '$rtt' after 60s, want all $want peers" >&2; exit 1; }
		sleep 2
	done
	echo "   $c's gateways reach every peer; RTTs (us): $rtt"
done

step "scenario: export demo/echo from every cluster, import it everywhere"
for c in "${CLUSTERS[@]}"; do
	kubectl --context "kind-$c" apply -k clusters/samples
done
for c in "${CLUSTERS[@]}"; do
	kubectl --context "kind-$c" -n demo rollout status deploy/echo --timeout 180s
	kubectl --context "kind-$c" -n demo get pod -l app=echo -o jsonpath='{.items[0].spec.containers[*].name}' | grep -qw fedmesh-sidecar ||
		{ echo "kind-e2e: echo in $c has no fedmesh-sidecar: the injector did not run" >&2; exit 1; }
	for i in $(seq 1 60); do
		kubectl --context "kind-$c" -n demo get serviceimport echo >/dev/null 2>&1 && break
		((i == 60)) && { echo "kind-e2e: no ServiceImport demo/echo in $c after 120s" >&2; exit 1; }
		sleep 2
	done
	echo "   $c imports demo/echo"
done

step "scenario: the sample traffic policy is accepted by every cluster's controller"
mesh='fedmesh.dev/mesh-controller'
for c in "${CLUSTERS[@]}"; do
	for i in $(seq 1 30); do
		accepted=$(kubectl --context "kind-$c" -n demo get httproute echo-canary \
			-o jsonpath="{.status.parents[?(@.controllerName=='$mesh')].conditions[?(@.type=='Accepted')].status}" 2>/dev/null)
		resolved=$(kubectl --context "kind-$c" -n demo get httproute echo-canary \
			-o jsonpath="{.status.parents[?(@.controllerName=='$mesh')].conditions[?(@.type=='ResolvedRefs')].status}" 2>/dev/null)
		[[ $accepted == True && $resolved == True ]] && break
		((i == 30)) && { echo "kind-e2e: HTTPRoute demo/echo-canary in $c: Accepted=$accepted ResolvedRefs=$resolved after 60s" >&2; exit 1; }
		sleep 2
	done
	for kind in authorizationpolicies ratelimitpolicies; do
		st=$(kubectl --context "kind-$c" -n demo get "$kind" -o jsonpath="{.items[*].status.conditions[?(@.type=='Accepted')].status}")
		[[ -n $st && $st != *False* ]] || { echo "kind-e2e: $kind in $c not accepted: '$st'" >&2; exit 1; }
	done
	echo "   $c accepted the canary route and the policies"
done

step "scenario: east's echo pods gone, east's client is answered by west or north through the gateways"
# The sample AuthorizationPolicy admits the ServiceAccount demo/client; the
# canary route's Service backend (east's own pods) then has no target, so
# every request goes to the ServiceImport: the other clusters, through
# east's egress and the peers' tunnels.
kubectl --context kind-east -n demo create serviceaccount client --dry-run=client -o yaml | kubectl --context kind-east apply -f -
kubectl --context kind-east -n demo apply -f - <<'EOF'
apiVersion: v1
kind: Pod
metadata:
  name: e2e-client
  labels:
    app: e2e-client
spec:
  serviceAccountName: client
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
  containers:
    - name: client
      image: registry.k8s.io/e2e-test-images/agnhost:2.53
      args: ["pause"]
      securityContext:
        allowPrivilegeEscalation: false
        capabilities:
          drop: ["ALL"]
EOF
kubectl --context kind-east -n demo wait --for=condition=Ready pod/e2e-client --timeout 180s
kubectl --context kind-east -n demo get pod e2e-client -o jsonpath='{.spec.containers[*].name}' | grep -qw fedmesh-sidecar ||
	{ echo "kind-e2e: e2e-client in east has no fedmesh-sidecar" >&2; exit 1; }
kubectl --context kind-east -n demo scale deploy/echo --replicas 0
for i in $(seq 1 60); do
	[[ -z $(kubectl --context kind-east -n demo get pods -l app=echo -o name) ]] && break
	((i == 60)) && { echo "kind-e2e: east's echo pods still there 120s after scaling to 0" >&2; exit 1; }
	sleep 2
done
remote=$(for p in west north; do
	kubectl --context "kind-$p" -n demo get pods -l app=echo -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}'
done)
for i in $(seq 1 30); do
	who=$(kubectl --context kind-east -n demo exec e2e-client -c client -- \
		curl -sS --max-time 5 http://echo.demo.svc.cluster.local/hostname 2>/dev/null) || who=""
	[[ -n $who ]] && grep -qxF "$who" <<<"$remote" && break
	((i == 30)) && { echo "kind-e2e: with no echo pod in east, echo answered '$who' after 60s; want one of west's or north's: $(echo $remote)" >&2; exit 1; }
	sleep 2
done
echo "   east's client was answered by $who"
kubectl --context kind-east -n demo scale deploy/echo --replicas 2
kubectl --context kind-east -n demo rollout status deploy/echo --timeout 180s
kubectl --context kind-east -n demo delete pod e2e-client --wait=false
echo "kind-e2e: PASS"
