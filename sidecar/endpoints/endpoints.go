// Package endpoints is the sidecar's only view of where a service runs. The
// proxy never asks the control plane anything on the request path: it
// subscribes once per upstream through a Source and keeps serving from the
// last Set it received, so a controller outage changes nothing until the
// controller comes back with news.
//
// Static and File are the Sources used by the local federation, tests and
// benchmarks; the federation controller's discovery API plugs in as another
// Source.
package endpoints

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"

	"github.com/fedmesh/fedmesh/policy"
)

// Endpoint is one backend of a service, normally a pod's sidecar inbound
// port.
type Endpoint struct {
	Name string `json:"name"`
	// Addr is the host:port the sidecar dials with mTLS. It is empty for
	// endpoints of a cluster reached through the gateway, where the remote
	// gateway picks the pod.
	Addr  string `json:"addr,omitempty"`
	Ready bool   `json:"ready"`
}

// Cluster is the part of a service that runs in one cluster.
type Cluster struct {
	Name string `json:"name"`
	// RTT is the local gateway's round-trip time to this cluster's gateway;
	// remote clusters are tried in increasing RTT. Zero for the own cluster.
	RTT Duration `json:"rtt,omitempty"`
	// Gateway means: reach this cluster through the local gateway's egress
	// with a tunnel header, not by dialing endpoint addresses. Endpoints
	// then only summarise health (how many of them are ready).
	Gateway   bool       `json:"gateway,omitempty"`
	Endpoints []Endpoint `json:"endpoints"`
}

// Set is everything the sidecar knows about one service port at one time.
type Set struct {
	Namespace string    `json:"namespace"`
	Service   string    `json:"service"`
	Port      uint16    `json:"port"`
	Clusters  []Cluster `json:"clusters"`
	// Policy is the traffic policy in force for the service (routes,
	// authorization, rate limits, failover); nil means defaults.
	Policy *policy.Service `json:"policy,omitempty"`
}

// Source delivers endpoint sets. Watch returns a channel that receives the
// current Set as soon as it is known and a new one at each change, newest
// wins (a slow reader skips intermediate Sets, never the last one). Readers
// stop when ctx ends; the channel need not be closed. A Source keeps delivering across its own
// reconnections: a gap in updates means "nothing new", never "no endpoints".
type Source interface {
	Watch(ctx context.Context, namespace, service string) (<-chan Set, error)
}

// Duration is a time.Duration that reads and writes as "250ms" in JSON
// (the same type as the policy contract's).
type Duration = policy.Duration

// Static is a Source held in memory. Update replaces a service's Set and
// notifies its watchers. Safe for concurrent use.
type Static struct {
	mu       sync.Mutex
	sets     map[string]Set
	watchers map[string][]chan Set
}

var _ Source = (*Static)(nil)

func key(ns, name string) string { return ns + "/" + name }

// Update publishes s to the watchers of its namespace/service.
func (st *Static) Update(s Set) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.sets == nil {
		st.sets = map[string]Set{}
	}
	k := key(s.Namespace, s.Service)
	st.sets[k] = s
	for _, ch := range st.watchers[k] {
		select { // keep only the newest pending Set
		case <-ch:
		default:
		}
		ch <- s
	}
}

// Watch implements Source.
func (st *Static) Watch(ctx context.Context, ns, name string) (<-chan Set, error) {
	ch := make(chan Set, 1)
	st.mu.Lock()
	if st.watchers == nil {
		st.watchers = map[string][]chan Set{}
	}
	k := key(ns, name)
	st.watchers[k] = append(st.watchers[k], ch)
	if s, ok := st.sets[k]; ok {
		ch <- s
	}
	st.mu.Unlock()
	go func() {
		<-ctx.Done()
		st.mu.Lock()
		defer st.mu.Unlock()
		ws := st.watchers[k]
		for i, w := range ws {
			if w == ch {
				st.watchers[k] = append(ws[:i:i], ws[i+1:]...)
				break
			}
		}
		// Not closed: Update may hold a reference until it sees the removal,
		// and receivers stop on ctx.
	}()
	return ch, nil
}

// ReadFile reads a JSON array of Sets.
func ReadFile(path string) ([]Set, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read endpoints file: %w", err)
	}
	var sets []Set
	if err := json.Unmarshal(b, &sets); err != nil {
		return nil, fmt.Errorf("parse endpoints file %s: %w", path, err)
	}
	for i, s := range sets {
		if s.Namespace == "" || s.Service == "" {
			return nil, fmt.Errorf("endpoints file %s: set %d has no namespace or service", path, i)
		}
	}
	return sets, nil
}

// FromFile returns a Static loaded from a JSON file (see ReadFile).
func FromFile(path string) (*Static, error) {
	sets, err := ReadFile(path)
	if err != nil {
		return nil, err
	}
	st := &Static{}
	for _, s := range sets {
		st.Update(s)
	}
	if len(sets) == 0 {
		return nil, errors.New("endpoints file " + path + " has no sets")
	}
	return st, nil
}
