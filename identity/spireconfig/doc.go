// Package spireconfig exists to keep spire-config/ honest: the SPIRE server
// and agent configuration, spire-controller-manager resources and
// Kubernetes manifests for the east, west and north kind clusters must
// agree with each other (trust domains, bundle endpoint URLs and SPIFFE IDs,
// symmetric federation), or federation fails at runtime in ways that are
// slow to diagnose. Its test parses every file there and checks that.
//
// It lives here rather than in spire-config/ because a Go package's
// directory is named after the package, and "spire-config" is not a valid
// package name; spire-config/ stays pure deployment configuration.
package spireconfig
