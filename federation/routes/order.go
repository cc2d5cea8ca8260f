package routes

import (
	"time"

	"github.com/fedmesh/fedmesh/policy"
)

// orderKey sorts rule×match items in Gateway API precedence order: an
// exact path, then the longest prefix (regular expressions after every
// prefix), then a method, then the most header matches, then the most
// query parameter matches; then the oldest route, then kind, name, and
// the position of the rule and the match within the route.
type orderKey struct {
	match   policy.Match
	created time.Time
	kind    string
	name    string
	rule    int
	match2  int
}

func pathRank(p *policy.PathMatch) (rank, length int) {
	if p == nil {
		return 1, 1 // no path match is PathPrefix /
	}
	switch p.Type {
	case policy.PathExact:
		return 3, len(p.Value)
	case policy.PathPrefix:
		return 2, len(p.Value)
	}
	return 0, len(p.Value)
}

func (a orderKey) less(b orderKey) bool {
	ar, al := pathRank(a.match.Path)
	br, bl := pathRank(b.match.Path)
	if ar != br {
		return ar > br
	}
	if al != bl {
		return al > bl
	}
	if am, bm := a.match.Method != "", b.match.Method != ""; am != bm {
		return am
	}
	if len(a.match.Headers) != len(b.match.Headers) {
		return len(a.match.Headers) > len(b.match.Headers)
	}
	if len(a.match.Query) != len(b.match.Query) {
		return len(a.match.Query) > len(b.match.Query)
	}
	if !a.created.Equal(b.created) {
		return a.created.Before(b.created)
	}
	if a.name != b.name {
		return a.name < b.name
	}
	if a.kind != b.kind {
		return a.kind < b.kind
	}
	if a.rule != b.rule {
		return a.rule < b.rule
	}
	return a.match2 < b.match2
}
