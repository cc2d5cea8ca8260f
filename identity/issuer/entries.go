package issuer

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"sigs.k8s.io/yaml"
)

// Entry is one registration entry: which callers get which SPIFFE ID.
//
// A caller on the main socket gets an entry when every one of the entry's
// selectors holds for it (the SPIRE rule: the entry's selectors are a subset
// of the caller's). An entry with a Socket is served on its own unix socket
// instead, and every caller on that socket gets it (after its selectors, if
// any, also hold); the socket's file permissions are then the access control.
type Entry struct {
	// SPIFFEID is spiffe://<trust domain>/ns/<namespace>/sa/<service account>.
	SPIFFEID string `json:"spiffeID"`
	// Selectors are unix:uid:<n>, unix:gid:<n>, unix:pid:<n> or
	// unix:path:<absolute executable path>.
	Selectors []string `json:"selectors,omitempty"`
	// Socket, if set, is a per-workload Workload API socket for this entry.
	Socket string `json:"socket,omitempty"`
	// TTL overrides the issuer's X.509-SVID lifetime ("10m"; at least 1m).
	TTL string `json:"ttl,omitempty"`
	// FederatesWith lists the trust domains whose bundles this workload
	// receives. Empty means every trust domain the issuer federates with.
	FederatesWith []string `json:"federatesWith,omitempty"`
}

// entriesFile is the registration entries file: YAML or JSON.
type entriesFile struct {
	Entries []Entry `json:"entries"`
}

// LoadEntries reads a registration entries file (YAML or JSON):
//
//	entries:
//	- spiffeID: spiffe://east.fedmesh.test/ns/shop/sa/checkout
//	  selectors: ["unix:uid:1000", "unix:path:/usr/local/bin/checkout"]
//	- spiffeID: spiffe://east.fedmesh.test/ns/fedmesh-system/sa/gateway
//	  socket: /run/fedmesh/east/gateway.sock
//
// Entries are checked when the issuer is created, against its trust domain.
func LoadEntries(path string) ([]Entry, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read entries file: %w", err)
	}
	var f entriesFile
	if err := yaml.UnmarshalStrict(data, &f); err != nil {
		return nil, fmt.Errorf("parse entries file %s: %w", path, err)
	}
	return f.Entries, nil
}

// selector is one attested property of a caller, e.g. unix:uid:1000.
type selector struct{ kind, value string }

func (s selector) String() string { return "unix:" + s.kind + ":" + s.value }

func parseSelector(s string) (selector, error) {
	typ, rest, ok := strings.Cut(s, ":")
	if !ok || typ != "unix" {
		return selector{}, fmt.Errorf("selector %q: want unix:<uid|gid|pid|path>:<value>", s)
	}
	kind, value, ok := strings.Cut(rest, ":")
	if !ok || value == "" {
		return selector{}, fmt.Errorf("selector %q: want unix:<uid|gid|pid|path>:<value>", s)
	}
	switch kind {
	case "uid", "gid", "pid":
		if _, err := strconv.ParseUint(value, 10, 32); err != nil {
			return selector{}, fmt.Errorf("selector %q: %s must be a non-negative integer", s, kind)
		}
	case "path":
		if !filepath.IsAbs(value) {
			return selector{}, fmt.Errorf("selector %q: path must be absolute", s)
		}
	default:
		return selector{}, fmt.Errorf("selector %q: unknown unix selector %q (want uid, gid, pid or path)", s, kind)
	}
	return selector{kind: kind, value: value}, nil
}

// entry is a validated Entry.
type entry struct {
	index         int
	id            spiffeid.ID
	selectors     []selector
	socket        string
	ttl           time.Duration // 0: issuer default
	federatesWith []spiffeid.TrustDomain
	allPeers      bool
}

// validateEntries checks entries against the issuer's configuration.
func validateEntries(td spiffeid.TrustDomain, mainSocket string, minTTL time.Duration, peers []Peer, in []Entry) ([]*entry, error) {
	known := map[spiffeid.TrustDomain]bool{}
	for _, p := range peers {
		known[p.TrustDomain] = true
	}
	sockets := map[string]int{}
	out := make([]*entry, 0, len(in))
	for i, e := range in {
		where := fmt.Sprintf("entry %d (%s)", i, e.SPIFFEID)
		id, err := spiffeid.FromString(e.SPIFFEID)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		if id.TrustDomain() != td {
			return nil, fmt.Errorf("%s: trust domain %s is not the issuer's %s", where, id.TrustDomain(), td)
		}
		if err := checkWorkloadPath(id.Path()); err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		ent := &entry{index: i, id: id, socket: e.Socket, allPeers: len(e.FederatesWith) == 0}
		for _, s := range e.Selectors {
			sel, err := parseSelector(s)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", where, err)
			}
			ent.selectors = append(ent.selectors, sel)
		}
		if len(ent.selectors) == 0 && ent.socket == "" {
			return nil, fmt.Errorf("%s: needs selectors or a socket, or every caller would get it", where)
		}
		if ent.socket != "" {
			if !filepath.IsAbs(ent.socket) {
				return nil, fmt.Errorf("%s: socket %q must be an absolute path", where, ent.socket)
			}
			if filepath.Clean(ent.socket) == filepath.Clean(mainSocket) {
				return nil, fmt.Errorf("%s: socket %q is the main socket", where, ent.socket)
			}
			if j, dup := sockets[ent.socket]; dup {
				return nil, fmt.Errorf("%s: socket %q is already used by entry %d", where, ent.socket, j)
			}
			sockets[ent.socket] = i
		}
		if e.TTL != "" {
			ttl, err := time.ParseDuration(e.TTL)
			if err != nil {
				return nil, fmt.Errorf("%s: ttl: %w", where, err)
			}
			if ttl < minTTL {
				return nil, fmt.Errorf("%s: ttl %s is under the minimum %s", where, ttl, minTTL)
			}
			ent.ttl = ttl
		}
		for _, f := range e.FederatesWith {
			ftd, err := spiffeid.TrustDomainFromString(f)
			if err != nil {
				return nil, fmt.Errorf("%s: federatesWith: %w", where, err)
			}
			if !known[ftd] {
				return nil, fmt.Errorf("%s: federatesWith %s, which is not a configured federated trust domain", where, ftd)
			}
			ent.federatesWith = append(ent.federatesWith, ftd)
		}
		out = append(out, ent)
	}
	return out, nil
}

// checkWorkloadPath enforces the fedmesh naming: /ns/<namespace>/sa/<sa>.
func checkWorkloadPath(p string) error {
	parts := strings.Split(strings.TrimPrefix(p, "/"), "/")
	if len(parts) != 4 || parts[0] != "ns" || parts[2] != "sa" || parts[1] == "" || parts[3] == "" {
		return fmt.Errorf("path %q: want /ns/<namespace>/sa/<serviceaccount>", p)
	}
	return nil
}

// caller is what attestation learned about the process on the other end of
// a Workload API connection.
type caller struct {
	uid, gid uint32
	pid      int32
	path     string // executable, from /proc/<pid>/exe; empty if unreadable
	socket   string // the socket the caller connected to
}

func (c caller) has(s selector) bool {
	switch s.kind {
	case "uid":
		return s.value == strconv.FormatUint(uint64(c.uid), 10)
	case "gid":
		return s.value == strconv.FormatUint(uint64(c.gid), 10)
	case "pid":
		return s.value == strconv.FormatInt(int64(c.pid), 10)
	case "path":
		return c.path != "" && s.value == c.path
	}
	return false
}

// match returns the entries the caller is entitled to, in file order.
func match(entries []*entry, c caller, mainSocket string) []*entry {
	var out []*entry
	for _, e := range entries {
		if e.socket != "" {
			if e.socket != c.socket {
				continue
			}
		} else if c.socket != mainSocket {
			continue
		}
		if !slices.ContainsFunc(e.selectors, func(s selector) bool { return !c.has(s) }) {
			out = append(out, e)
		}
	}
	return out
}

var errNoIdentity = errors.New("no registration entry matches the caller")
