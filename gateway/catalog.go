package gateway

import (
	"fmt"
	"net/netip"
	"sync"
)

// Endpoint is a ready backend of an exported service: the address the
// ingress dials, normally the pod's sidecar inbound port.
type Endpoint struct {
	Addr netip.AddrPort
	Name string // pod or endpoint name, for logs
}

// Catalog tells the ingress which services this cluster exports and their
// ready endpoints. Lookup must be cheap and must not call the API server:
// it runs on the path of every new stream. port is the Service port the
// caller named; endpoints carry the matching target port.
type Catalog interface {
	Lookup(namespace, name string, port int32) (eps []Endpoint, exported bool)
}

// StaticCatalog is a Catalog held in memory, for tests, benchmarks and the
// --catalog file of the binary. Safe for concurrent use.
type StaticCatalog struct {
	mu       sync.RWMutex
	services map[string][]Endpoint // key ns/name:port
}

var _ Catalog = (*StaticCatalog)(nil)

func catalogKey(ns, name string, port int32) string { return fmt.Sprintf("%s/%s:%d", ns, name, port) }

// Set exports ns/name:port with the given endpoints (an empty list means
// exported with no ready endpoint).
func (c *StaticCatalog) Set(ns, name string, port int32, eps ...Endpoint) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.services == nil {
		c.services = map[string][]Endpoint{}
	}
	c.services[catalogKey(ns, name, port)] = append([]Endpoint{}, eps...)
}

// Delete stops exporting ns/name:port.
func (c *StaticCatalog) Delete(ns, name string, port int32) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.services, catalogKey(ns, name, port))
}

// Lookup implements Catalog.
func (c *StaticCatalog) Lookup(ns, name string, port int32) ([]Endpoint, bool) {
	c.mu.RLock()
	defer c.mu.RUnlock()
	eps, ok := c.services[catalogKey(ns, name, port)]
	return eps, ok
}
