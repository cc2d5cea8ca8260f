package fedctl

import (
	"fmt"
	"sort"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/fedmesh/fedmesh/localfed"
)

// member is one cluster fedctl talks to.
type member struct {
	context string
	config  *rest.Config
	local   *localfed.Cluster // set for a local federation
}

// members resolves the clusters to talk to: the local federation's by
// default, or the contexts of --kubeconfig.
func (g *globals) members() ([]member, *localfed.State, error) {
	var st *localfed.State
	path := g.kubeconfig
	if path == "" {
		var err error
		if st, err = localfed.ReadState(g.dir); err != nil {
			return nil, nil, fmt.Errorf("%w; or point at another federation with --kubeconfig", err)
		}
		path = st.Kubeconfig
	}
	raw, err := clientcmd.LoadFromFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("load kubeconfig %s: %w", path, err)
	}
	ctxs := g.contexts
	if len(ctxs) == 0 {
		for name := range raw.Contexts {
			ctxs = append(ctxs, name)
		}
		sort.Strings(ctxs)
	}
	var out []member
	for _, c := range ctxs {
		if _, ok := raw.Contexts[c]; !ok {
			return nil, nil, usagef("context %q is not in %s", c, path)
		}
		cfg, err := clientcmd.NewNonInteractiveClientConfig(*raw, c, &clientcmd.ConfigOverrides{}, nil).ClientConfig()
		if err != nil {
			return nil, nil, fmt.Errorf("context %s: %w", c, err)
		}
		m := member{context: c, config: cfg}
		if st != nil {
			for i := range st.Clusters {
				if st.Clusters[i].Context == c {
					m.local = &st.Clusters[i]
				}
			}
		}
		out = append(out, m)
	}
	if len(out) == 0 {
		return nil, nil, fmt.Errorf("no contexts in %s", path)
	}
	return out, st, nil
}

// one resolves exactly one cluster for commands that write to one.
func (g *globals) one() (member, error) {
	if len(g.contexts) > 1 {
		return member{}, usagef("this command writes to one cluster: give one --context, not %d", len(g.contexts))
	}
	ms, _, err := g.members()
	if err != nil {
		return member{}, err
	}
	if len(g.contexts) == 0 && len(ms) > 1 {
		names := make([]string, len(ms))
		for i, m := range ms {
			names[i] = m.context
		}
		return member{}, usagef("say which cluster with --context (one of %v)", names)
	}
	return ms[0], nil
}
