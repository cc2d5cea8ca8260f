package federation

import (
	"context"
	"crypto/sha256"
	"fmt"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/fedmesh/fedmesh/federation/about"
)

// peer is one peer cluster: its current cache (possibly stale) and health.
type peer struct {
	name   string // configuration name: the Secret's or the static peer's
	hash   string // of the configuration, to skip no-op Secret updates
	cancel context.CancelFunc
	done   chan struct{}
	secret *corev1.Secret // for events; nil for static peers

	mu         sync.Mutex
	id         string // cluster ID, from the peer's ClusterProperty
	cache      *clusterCache
	reachable  bool
	failures   int
	staleSince time.Time
	lastSync   time.Time
	expired    bool
	lastErr    string
}

// peerView is a consistent snapshot of one connected peer.
type peerView struct {
	id         string
	cache      *clusterCache
	stale      bool
	staleSince time.Time
	expired    bool
}

// PeerStatus is what `fedctl status` shows per peer.
type PeerStatus struct {
	Name       string    `json:"name"`
	ClusterID  string    `json:"clusterID,omitempty"`
	Reachable  bool      `json:"reachable"`
	Stale      bool      `json:"stale"`
	StaleSince time.Time `json:"staleSince,omitzero"`
	Expired    bool      `json:"expired"`
	LastSync   time.Time `json:"lastSync,omitzero"`
	Error      string    `json:"error,omitempty"`
}

// Peers reports every configured peer's state.
func (c *Controller) Peers() []PeerStatus {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]PeerStatus, 0, len(c.peers))
	for _, name := range sortedKeys(c.peers) {
		p := c.peers[name]
		p.mu.Lock()
		out = append(out, PeerStatus{
			Name: name, ClusterID: p.id, Reachable: p.reachable, Stale: p.cache != nil && !p.reachable,
			StaleSince: p.staleSince, Expired: p.expired, LastSync: p.lastSync, Error: p.lastErr,
		})
		p.mu.Unlock()
	}
	return out
}

func (c *Controller) peerViews(now time.Time) []peerView {
	c.mu.RLock()
	defer c.mu.RUnlock()
	out := make([]peerView, 0, len(c.peers))
	for _, name := range sortedKeys(c.peers) {
		p := c.peers[name]
		p.mu.Lock()
		if p.cache != nil {
			out = append(out, peerView{
				id: p.id, cache: p.cache, stale: !p.reachable, staleSince: p.staleSince,
				expired: !p.reachable && c.opts.StaleBound >= 0 && now.Sub(p.staleSince) > c.opts.StaleBound,
			})
		}
		p.mu.Unlock()
	}
	return out
}

// startPeer (re)starts the watcher of one peer. A running peer of the same
// name is replaced.
func (c *Controller) startPeer(ctx context.Context, wg *sync.WaitGroup, name string, cfg *rest.Config, secret *corev1.Secret) {
	c.stopPeer(name)
	if ctx.Err() != nil {
		return
	}
	pctx, cancel := context.WithCancel(ctx)
	p := &peer{name: name, cancel: cancel, done: make(chan struct{}), secret: secret, hash: configHash(cfg)}
	c.mu.Lock()
	c.peers[name] = p
	c.mu.Unlock()
	c.metrics.peerUp.WithLabelValues(name).Set(0)
	c.metrics.peerStale.WithLabelValues(name).Set(0)
	wg.Go(func() {
		defer close(p.done)
		c.runPeer(pctx, p, cfg)
	})
}

// stopPeer stops a peer and withdraws what it exported.
func (c *Controller) stopPeer(name string) {
	c.mu.Lock()
	p := c.peers[name]
	delete(c.peers, name)
	c.mu.Unlock()
	if p == nil {
		return
	}
	p.cancel()
	<-p.done
	p.mu.Lock()
	cc := p.cache
	p.mu.Unlock()
	if cc != nil {
		cc.stop()
		c.enqueueCache(cc)
	}
	c.metrics.peerUp.DeleteLabelValues(name)
	c.metrics.peerStale.DeleteLabelValues(name)
	c.metrics.peerLastSync.DeleteLabelValues(name)
}

func (c *Controller) stopPeers() {
	c.mu.RLock()
	names := sortedKeys(c.peers)
	c.mu.RUnlock()
	for _, n := range names {
		c.stopPeer(n)
	}
}

func (c *Controller) runPeer(ctx context.Context, p *peer, cfg *rest.Config) {
	log := c.log.With("peer", p.name)
	kube, err := newKube(cfg)
	if err != nil {
		c.peerConfigError(p, "InvalidPeerConfig", fmt.Sprintf("peer %s: %v", p.name, err))
		return
	}
	t := time.NewTicker(c.opts.ProbeInterval)
	defer t.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, c.opts.ProbeTimeout)
		_, err := kube.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(pctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		c.observeProbe(ctx, log, p, cfg, err)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (c *Controller) observeProbe(ctx context.Context, log interface {
	Info(string, ...any)
	Warn(string, ...any)
}, p *peer, cfg *rest.Config, probeErr error) {
	now := time.Now()
	p.mu.Lock()
	if probeErr != nil {
		p.failures++
		if p.failures == 1 {
			p.staleSince = now
		}
		becameStale := p.reachable && p.failures >= c.opts.ProbeFailures
		neverConnected := p.cache == nil && p.failures == c.opts.ProbeFailures
		if becameStale {
			p.reachable = false
		}
		p.lastErr = probeErr.Error()
		cc := p.cache
		p.mu.Unlock()
		c.metrics.peerUp.WithLabelValues(p.name).Set(0)
		if becameStale {
			c.metrics.peerStale.WithLabelValues(p.name).Set(1)
			log.Warn("peer API server unreachable; keeping its last known state, marked stale",
				"err", probeErr, "staleBound", c.opts.StaleBound)
			c.enqueueCache(cc)
		}
		if neverConnected {
			c.peerEvent(p, corev1.EventTypeWarning, "PeerUnreachable", fmt.Sprintf("cannot reach peer %s: %v", p.name, probeErr))
			log.Warn("peer API server unreachable", "err", probeErr)
		}
		return
	}
	p.failures = 0
	p.lastSync = now
	needCache := p.cache == nil || !p.reachable
	p.mu.Unlock()
	c.metrics.peerLastSync.WithLabelValues(p.name).Set(float64(now.Unix()))
	if !needCache {
		return
	}
	// First contact, or recovery: build a fresh cache (a full relist), and
	// only then swap it in, so the stale state serves until the new one is
	// complete.
	id, err := c.peerClusterID(ctx, cfg, p.name)
	if err != nil {
		c.peerConfigError(p, "DuplicateClusterID", err.Error())
		return
	}
	cc, err := newClusterCache(cfg, false, c.opts.ResyncPeriod, c)
	if err != nil {
		c.peerConfigError(p, "InvalidPeerConfig", fmt.Sprintf("peer %s: %v", p.name, err))
		return
	}
	cc.start()
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	synced := cc.waitSynced(sctx)
	cancel()
	if !synced {
		cc.stop()
		if ctx.Err() == nil {
			log.Warn("peer cache did not sync within 30s; retrying")
		}
		return
	}
	p.mu.Lock()
	old, wasStale := p.cache, p.cache != nil
	p.cache, p.id, p.reachable, p.expired, p.staleSince, p.lastErr = cc, id, true, false, time.Time{}, ""
	p.mu.Unlock()
	c.metrics.peerUp.WithLabelValues(p.name).Set(1)
	c.metrics.peerStale.WithLabelValues(p.name).Set(0)
	if wasStale {
		old.stop()
		c.enqueueCache(old)
		log.Info("peer reachable again; resynced", "clusterID", id)
	} else {
		log.Info("peer connected", "clusterID", id)
	}
	c.enqueueCache(cc)
}

// peerClusterID reads the peer's ClusterProperty, falling back to its
// configured name, and refuses IDs that clash with this cluster or another peer.
func (c *Controller) peerClusterID(ctx context.Context, cfg *rest.Config, name string) (string, error) {
	id := name
	if dyn, err := dynamic.NewForConfig(cfg); err == nil {
		if v, err := about.Get(ctx, dyn, about.ClusterIDProperty); err == nil {
			id = v
		}
	}
	if id == c.clusterID {
		return "", fmt.Errorf("peer %s has cluster id %q, the same as this cluster", name, id)
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	for other, p := range c.peers {
		p.mu.Lock()
		clash := other != name && p.id == id
		p.mu.Unlock()
		if clash {
			return "", fmt.Errorf("peer %s has cluster id %q, already used by peer %s", name, id, other)
		}
	}
	return id, nil
}

func (c *Controller) peerConfigError(p *peer, reason, msg string) {
	p.mu.Lock()
	repeated := p.lastErr == msg
	p.lastErr = msg
	p.mu.Unlock()
	if repeated {
		return
	}
	c.metrics.peerConfigErrors.WithLabelValues(reason).Inc()
	c.log.Error("peer configuration unusable; other peers are unaffected", "peer", p.name, "reason", reason, "err", msg)
	c.peerEvent(p, corev1.EventTypeWarning, reason, msg)
}

func (c *Controller) peerEvent(p *peer, typ, reason, msg string) {
	if p.secret != nil && c.events != nil {
		c.events.Event(p.secret, typ, reason, msg)
	}
}

// expireStalePeers withdraws the state of peers stale for longer than the bound.
func (c *Controller) expireStalePeers(now time.Time) {
	if c.opts.StaleBound < 0 {
		return
	}
	c.mu.RLock()
	var expired []*clusterCache
	for _, p := range c.peers {
		p.mu.Lock()
		if p.cache != nil && !p.reachable && !p.expired && now.Sub(p.staleSince) > c.opts.StaleBound {
			p.expired = true
			expired = append(expired, p.cache)
			c.log.Warn("peer stale beyond the bound; withdrawing its endpoints", "peer", p.name, "staleSince", p.staleSince, "bound", c.opts.StaleBound)
		}
		p.mu.Unlock()
	}
	c.mu.RUnlock()
	for _, cc := range expired {
		c.enqueueCache(cc)
	}
}

// watchPeerSecrets follows labelled Secrets in the system namespace, each
// holding a peer's kubeconfig.
func (c *Controller) watchPeerSecrets(ctx context.Context, wg *sync.WaitGroup, kube kubernetes.Interface) error {
	f := informers.NewSharedInformerFactoryWithOptions(kube, c.opts.ResyncPeriod,
		informers.WithNamespace(c.opts.Namespace),
		informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = LabelPeerSecret + "=true" }))
	inf := f.Core().V1().Secrets().Informer()
	apply := func(o any) {
		s, ok := o.(*corev1.Secret)
		if !ok {
			return
		}
		name := s.Labels[LabelPeerCluster]
		if name == "" {
			name = s.Name
		}
		cfg, err := clientcmd.RESTConfigFromKubeConfig(s.Data["kubeconfig"])
		if cfg != nil {
			cfg.QPS, cfg.Burst = c.opts.Config.QPS, c.opts.Config.Burst
		}
		if err == nil && len(s.Data["kubeconfig"]) == 0 {
			err = fmt.Errorf("key %q is missing or empty", "kubeconfig")
		}
		if err != nil {
			p := &peer{name: name, secret: s}
			c.mu.RLock()
			if cur := c.peers[name]; cur != nil {
				p = cur
			}
			c.mu.RUnlock()
			c.peerConfigError(p, "InvalidPeerKubeconfig", fmt.Sprintf("secret %s/%s: kubeconfig for peer %s: %v", s.Namespace, s.Name, name, err))
			return
		}
		c.mu.RLock()
		cur := c.peers[name]
		c.mu.RUnlock()
		if cur != nil && cur.hash == configHash(cfg) {
			return
		}
		c.log.Info("peer configured from secret", "peer", name, "secret", s.Namespace+"/"+s.Name)
		c.startPeer(ctx, wg, name, cfg, s)
	}
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    apply,
		UpdateFunc: func(_, o any) { apply(o) },
		DeleteFunc: func(o any) {
			if d, ok := o.(cache.DeletedFinalStateUnknown); ok {
				o = d.Obj
			}
			if s, ok := o.(*corev1.Secret); ok {
				name := s.Labels[LabelPeerCluster]
				if name == "" {
					name = s.Name
				}
				// Here, not on a goroutine of its own: the informer's
				// handler is joined when lead stops the factory, so the
				// peer is withdrawn (and its metrics deleted) before Run
				// returns, and a later Add of the same name cannot be
				// overtaken by this stop.
				c.log.Info("peer secret deleted; withdrawing the peer", "peer", name)
				c.stopPeer(name)
			}
		},
	})
	if err != nil {
		return err
	}
	f.Start(ctx.Done())
	// Shutdown waits for the informer and its handlers (which start and
	// stop peers) to end.
	wg.Go(func() { <-ctx.Done(); f.Shutdown() })
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		return ctx.Err()
	}
	return nil
}

func configHash(cfg *rest.Config) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00%x\x00%x\x00%x\x00%s\x00%s", cfg.Host, cfg.BearerToken, cfg.CAData, cfg.CertData, cfg.KeyData, cfg.CAFile, strings.Join([]string{cfg.CertFile, cfg.KeyFile}, ","))
	return fmt.Sprintf("%x", h.Sum(nil))
}

// newKube builds a client for built-in types that speaks protobuf, which
// costs the API server far less CPU than JSON. (CRDs only speak JSON; their
// clients keep the default.)
func newKube(cfg *rest.Config) (kubernetes.Interface, error) {
	cfg = rest.CopyConfig(cfg)
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.AcceptContentTypes = "application/vnd.kubernetes.protobuf,application/json"
	k, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client for %s: %w", cfg.Host, err)
	}
	return k, nil
}
