// Package discoveryv1 is the generated Go code of the discovery API
// (discovery.proto): the contract between the federation controller and the
// sidecars. Regenerate with `make generate`; never edit the .pb.go files.
package discoveryv1
