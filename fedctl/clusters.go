package fedctl

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/fedmesh/fedmesh/localfed"
)

// member is one cluster fedctl talks to.
type member struct {
	context string
	config  *rest.Config
	local   *localfed.Cluster // set for a local federation
}

// kubeconfig is where the member clusters were found.
type kubeconfig struct {
	raw    *clientcmdapi.Config
	source string          // for messages: "--kubeconfig FILE", "$KUBECONFIG (a:b)", "the local federation in DIR"
	local  *localfed.State // set when the source is a local federation
	rules  *clientcmd.ClientConfigLoadingRules
}

// loadKubeconfig finds the member clusters, first match wins: --kubeconfig;
// an explicit --dir (the local federation there); $KUBECONFIG with kubectl's
// merging of several files; the local federation in $FEDMESH_DIR or
// ~/.fedmesh/local. Drills (localOnly) skip $KUBECONFIG.
func (g *globals) loadKubeconfig() (*kubeconfig, error) {
	env := ""
	if g.getenv != nil {
		env = g.getenv(clientcmd.RecommendedConfigPathEnvVar)
	}
	dirSet := g.flags != nil && g.flags.Changed("dir")
	var kc kubeconfig
	switch {
	case g.kubeconfig != "":
		kc.rules = &clientcmd.ClientConfigLoadingRules{ExplicitPath: g.kubeconfig}
		kc.source = "--kubeconfig " + g.kubeconfig
	case dirSet || g.localOnly || env == "":
		st, err := localfed.ReadState(g.dir)
		if err != nil {
			if dirSet || g.localOnly {
				return nil, err
			}
			return nil, fmt.Errorf("%w; or point at another federation with --kubeconfig or $KUBECONFIG", err)
		}
		kc.local = st
		kc.rules = &clientcmd.ClientConfigLoadingRules{ExplicitPath: st.Kubeconfig}
		kc.source = "the local federation's kubeconfig " + st.Kubeconfig
	default:
		paths := filepath.SplitList(env)
		kc.rules = &clientcmd.ClientConfigLoadingRules{Precedence: paths}
		kc.source = "$KUBECONFIG (" + env + ")"
		found := false
		for _, p := range paths {
			if _, err := os.Stat(p); err == nil {
				found = true
			}
		}
		if !found {
			return nil, fmt.Errorf("none of the files in $KUBECONFIG exists: %s", env)
		}
	}
	raw, err := kc.rules.Load()
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig from %s: %w", kc.source, err)
	}
	kc.raw = raw
	return &kc, nil
}

func (kc *kubeconfig) contextNames() []string {
	names := make([]string, 0, len(kc.raw.Contexts))
	for name := range kc.raw.Contexts {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// members resolves the clusters to talk to: every context of the kubeconfig
// (see loadKubeconfig), or those --context names.
func (g *globals) members() ([]member, *localfed.State, error) {
	kc, err := g.loadKubeconfig()
	if err != nil {
		return nil, nil, err
	}
	all := kc.contextNames()
	if len(all) == 0 {
		return nil, nil, fmt.Errorf("no contexts in %s", kc.source)
	}
	ctxs := g.contexts
	if len(ctxs) == 0 {
		ctxs = all
	}
	var out []member
	for _, c := range ctxs {
		if _, ok := kc.raw.Contexts[c]; !ok {
			return nil, nil, usagef("context %q is not in %s; valid: %s", c, kc.source, strings.Join(all, ", "))
		}
		cfg, err := clientcmd.NewNonInteractiveClientConfig(*kc.raw, c, &clientcmd.ConfigOverrides{}, kc.rules).ClientConfig()
		if err != nil {
			return nil, nil, fmt.Errorf("context %s: %w", c, err)
		}
		m := member{context: c, config: cfg}
		if kc.local != nil {
			for i := range kc.local.Clusters {
				if kc.local.Clusters[i].Context == c {
					m.local = &kc.local.Clusters[i]
				}
			}
		}
		out = append(out, m)
	}
	return out, kc.local, nil
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
