// Package issuer is fedmesh's own small SPIFFE issuer, so that a laptop, a
// test or the local federation gets real, short-lived, rotating SPIFFE
// identities without deploying SPIRE.
//
// It speaks only standard protocols, which is the whole point: workloads talk
// to it through the SPIFFE Workload API (go-spiffe's generated gRPC service,
// over a unix socket, caller identified by its socket peer credentials), and
// other trust domains talk to it through a SPIFFE bundle endpoint
// (https_spiffe profile). Anything that works against this issuer therefore
// works unchanged against a SPIRE agent and server; see docs/identity.md and
// spire-config/ for that path.
//
// One Issuer serves one trust domain. It keeps its CA on disk (restarts keep
// trust), rotates the CA with an overlap window in which the bundle carries
// old and new roots, renews every served X.509-SVID at half its lifetime and
// pushes it down the open stream, and keeps the bundles of the trust domains
// it federates with fresh by watching their bundle endpoints.
package issuer
