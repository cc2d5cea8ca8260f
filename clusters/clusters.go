// Package clusters is how fedmesh gets onto real Kubernetes clusters: the
// kind cluster configurations, the image's Dockerfile, and the kustomize
// bases and per-cluster overlays that `kubectl apply -k` installs. The Go
// code here only names the clusters; the tests render every kustomization
// with kustomize's Go API and have a real kube-apiserver accept every object
// (server-side dry-run), so a manifest cannot rot unnoticed.
package clusters

import _ "embed"

// Names are the clusters that have a kind configuration (kind/<name>.yaml)
// and an overlay (overlays/<name>).
var Names = []string{"east", "west", "north"}

// PeerReader is the ServiceAccount, ClusterRole and binding a peer's
// controller uses in this cluster (namespace fedmesh-system). `fedctl link`
// installs it when it is missing.
//
//go:embed base/controller/peer-reader.yaml
var PeerReader []byte
