// Command coredns is CoreDNS built from its Go module at a pinned version with
// only the plugins a local Kubernetes node needs (the cluster DNS of package
// kubenode): the upstream build links every cloud provider's SDK, which a
// node that may reach nothing outside 198.18.0.0/15 never uses and which
// doubles the cold build.
package main

import (
	"slices"

	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/hosts"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/metrics"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
	_ "github.com/coredns/coredns/plugin/rewrite"
	_ "github.com/coredns/coredns/plugin/template"
	_ "github.com/coredns/coredns/plugin/whoami"
)

// plugins are the directives linked above. Their order is CoreDNS's own
// (dnsserver.Directives), which decides the order a query passes them in.
var plugins = []string{
	"cache", "errors", "forward", "health", "hosts", "kubernetes", "loadbalance",
	"log", "loop", "prometheus", "ready", "reload", "rewrite", "template", "whoami",
}

func main() {
	dnsserver.Directives = slices.DeleteFunc(slices.Clone(dnsserver.Directives), func(d string) bool {
		return !slices.Contains(plugins, d)
	})
	coremain.Run()
}
