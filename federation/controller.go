// Package federation is fedmesh's implementation of the Kubernetes
// Multi-Cluster Services API. One controller runs per cluster: it reads
// ServiceExports, Services and EndpointSlices in its own cluster and in every
// peer, and writes, in its own cluster only, the exports' conditions, one
// ServiceImport per exported name, a derived Service that gives the import
// its clusterset IP, and EndpointSlices mirrored from every exporting cluster.
//
// Every controller in the clusterset sees the same exports and applies the
// same rules (package merge), so they agree without talking to each other.
// A peer that stops answering is marked stale, not forgotten: its last known
// endpoints keep serving failover decisions for a bounded time.
package federation

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/client-go/tools/record"
	"k8s.io/client-go/util/workqueue"

	"github.com/fedmesh/fedmesh/federation/about"
	"github.com/fedmesh/fedmesh/federation/discovery"
)

// ManagedBy is the endpointslice.kubernetes.io/managed-by value of every
// EndpointSlice the controller writes.
const ManagedBy = "federation-controller.fedmesh.dev"

const (
	labelDerivedService = "multicluster.fedmesh.dev/derived-service"
	// LabelPeerSecret marks a Secret in the system namespace whose
	// "kubeconfig" key gives access to a peer cluster.
	LabelPeerSecret = "multicluster.fedmesh.dev/peer"
	// LabelPeerCluster optionally names the peer a Secret is for; the
	// Secret's name is used otherwise. The peer's own ClusterProperty wins
	// when it has one.
	LabelPeerCluster = "multicluster.fedmesh.dev/cluster"
	// LabelStale is set to "true" on mirrored EndpointSlices whose source
	// cluster is unreachable.
	LabelStale = "multicluster.fedmesh.dev/stale"
	// ConditionStale is the ServiceImport condition that says whether any
	// exporting cluster's state is being served from a stale cache.
	ConditionStale = "fedmesh.dev/Stale"
)

// Peer is a statically configured peer cluster (local mode).
type Peer struct {
	Name   string
	Config *rest.Config
}

// Options configure a Controller. Zero values mean the documented defaults.
type Options struct {
	Config    *rest.Config // the local cluster; required
	ClusterID string       // must agree with the ClusterProperty when both exist
	Peers     []Peer       // static peers, in addition to peer Secrets
	// Namespace holds peer Secrets and the leader lease. Default fedmesh-system.
	Namespace string
	// IgnorePeerSecrets turns off peer discovery through Secrets.
	IgnorePeerSecrets bool
	Workers           int           // concurrent reconciles; default 8
	ResyncPeriod      time.Duration // informer resync; default 10m
	// CRDPollInterval is how often a controller whose cluster serves
	// neither the Gateway API nor the fedmesh policy CRDs checks whether
	// they were installed since; default 10s.
	CRDPollInterval time.Duration
	ProbeInterval   time.Duration // peer API server probe period; default 1s
	ProbeTimeout    time.Duration // default 1s
	ProbeFailures   int           // consecutive failed probes before a peer is stale; default 2
	// StaleBound is how long an unreachable peer's last known state is kept.
	// Default 5m; negative keeps it forever.
	StaleBound time.Duration

	LeaderElection LeaderElection
	Logger         *slog.Logger
	Registry       prometheus.Registerer
}

// LeaderElection configures the lease that makes two replicas safe.
type LeaderElection struct {
	Disabled      bool
	Identity      string        // default hostname_pid
	LeaseName     string        // default fedmesh-federation-controller
	LeaseDuration time.Duration // default 15s
	RenewDeadline time.Duration // default 10s
	RetryPeriod   time.Duration // default 2s
}

func (o *Options) setDefaults() error {
	if o.Config == nil {
		return errors.New("federation: Options.Config is required")
	}
	if o.Namespace == "" {
		o.Namespace = "fedmesh-system"
	}
	if o.Workers <= 0 {
		o.Workers = 8
	}
	if o.CRDPollInterval == 0 {
		o.CRDPollInterval = 10 * time.Second
	}
	if o.ResyncPeriod == 0 {
		o.ResyncPeriod = 10 * time.Minute
	}
	if o.ProbeInterval <= 0 {
		o.ProbeInterval = time.Second
	}
	if o.ProbeTimeout <= 0 {
		o.ProbeTimeout = time.Second
	}
	if o.ProbeFailures <= 0 {
		o.ProbeFailures = 2
	}
	if o.StaleBound == 0 {
		o.StaleBound = 5 * time.Minute
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	le := &o.LeaderElection
	if le.Identity == "" {
		host, _ := os.Hostname()
		le.Identity = fmt.Sprintf("%s_%d", host, os.Getpid())
	}
	if le.LeaseName == "" {
		le.LeaseName = "fedmesh-federation-controller"
	}
	if le.LeaseDuration <= 0 {
		le.LeaseDuration = 15 * time.Second
	}
	if le.RenewDeadline <= 0 {
		le.RenewDeadline = 10 * time.Second
	}
	if le.RetryPeriod <= 0 {
		le.RetryPeriod = 2 * time.Second
	}
	if le.RenewDeadline >= le.LeaseDuration {
		return fmt.Errorf("federation: leader election renew deadline %s must be shorter than the lease duration %s", le.RenewDeadline, le.LeaseDuration)
	}
	for _, p := range o.Peers {
		if p.Name == "" || p.Config == nil {
			return fmt.Errorf("federation: static peer %q needs a name and a config", p.Name)
		}
	}
	return nil
}

// Controller is one cluster's federation controller.
type Controller struct {
	opts    Options
	log     *slog.Logger
	metrics *metrics
	queue   workqueue.TypedRateLimitingInterface[string]

	clusterID string
	local     *clusterCache
	events    record.EventRecorder

	mu    sync.RWMutex
	peers map[string]*peer // by configuration name (Secret or static name)

	conflicted *keyGauge // services whose exports conflict
	imported   *keyGauge // services imported into this cluster

	leading chan struct{} // closed once this replica leads and caches are synced
	disco   *discovery.Server
	traffic atomic.Pointer[traffic] // nil until started, and without the CRDs
	badRTT  atomic.Pointer[string]  // the last undecodable RTT annotation, logged once
	// lastStaleTick is the periodic goroutine's previous tick.
	lastStaleTick time.Time
}

// New validates the options and builds a controller; Run starts it.
func New(opts Options) (*Controller, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	c := &Controller{
		opts:    opts,
		log:     opts.Logger,
		peers:   map[string]*peer{},
		leading: make(chan struct{}),
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.DefaultTypedControllerRateLimiter[string](),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "federation"}),
	}
	c.metrics = newMetrics(opts.Registry, func() float64 { return float64(c.queue.Len()) })
	c.disco = discovery.NewServer(c, opts.Logger, opts.Registry)
	c.conflicted = newKeyGauge(c.metrics.conflicts)
	c.imported = newKeyGauge(c.metrics.imports)
	return c, nil
}

// ClusterID is the local cluster's ID, known once Run has started leading.
func (c *Controller) ClusterID() string { return c.clusterID }

// Leading is closed when this replica holds the lease and its caches synced.
func (c *Controller) Leading() <-chan struct{} { return c.leading }

// Run runs until ctx ends or, with leader election, leadership is lost; it
// returns an error in the latter case so that the process restarts cleanly.
func (c *Controller) Run(ctx context.Context) error {
	defer c.disco.Close() // after lead: nothing notifies it any more
	defer c.queue.ShutDown()
	if c.opts.LeaderElection.Disabled {
		return c.lead(ctx)
	}
	le := c.opts.LeaderElection
	kube, err := newKube(c.opts.Config)
	if err != nil {
		return err
	}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: c.opts.Namespace, Name: le.LeaseName},
		Client:     kube.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: le.Identity},
	}
	// The elector calls OnStartedLeading on a goroutine of its own, which
	// may not have begun when elector.Run returns: mu orders the two, so
	// either lead started and Run waits for done, or it never starts.
	var (
		mu      sync.Mutex
		started bool
		over    bool // elector.Run returned: too late to start leading
		leadErr error
		done    = make(chan struct{})
	)
	leCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	elector, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock:            lock,
		LeaseDuration:   le.LeaseDuration,
		RenewDeadline:   le.RenewDeadline,
		RetryPeriod:     le.RetryPeriod,
		ReleaseOnCancel: true,
		Name:            le.LeaseName,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(lctx context.Context) {
				mu.Lock()
				if over {
					mu.Unlock()
					return
				}
				started = true
				mu.Unlock()
				c.log.Info("acquired leader lease", "identity", le.Identity, "lease", c.opts.Namespace+"/"+le.LeaseName)
				c.metrics.leader.Set(1)
				defer close(done)
				leadErr = c.lead(lctx)
				cancel()
			},
			OnStoppedLeading: func() {
				c.metrics.leader.Set(0)
				c.log.Info("stopped leading", "identity", le.Identity)
			},
		},
	})
	if err != nil {
		return fmt.Errorf("leader election: %w", err)
	}
	elector.Run(leCtx)
	mu.Lock()
	over = true
	wasStarted := started
	mu.Unlock()
	if wasStarted {
		<-done
	}
	if ctx.Err() != nil {
		return nil
	}
	if leadErr != nil {
		return leadErr
	}
	return errors.New("lost leader lease")
}

// lead is the work of the leader: caches for every cluster, then workers.
func (c *Controller) lead(ctx context.Context) error {
	if err := c.resolveClusterID(ctx); err != nil {
		return err
	}
	c.log = c.log.With("cluster", c.clusterID)
	kube, err := newKube(c.opts.Config)
	if err != nil {
		return err
	}
	bc := record.NewBroadcaster(record.WithContext(ctx))
	bc.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: kube.CoreV1().Events("")})
	defer bc.Shutdown()
	c.events = bc.NewRecorder(scheme.Scheme, corev1.EventSource{Component: "fedmesh-federation-controller"})

	local, err := newClusterCache(c.opts.Config, true, c.opts.ResyncPeriod, c)
	if err != nil {
		return fmt.Errorf("local cluster cache: %w", err)
	}
	c.local = local // before the informers start: their handlers read it
	if err := c.feedDirectory(local); err != nil {
		return fmt.Errorf("local cluster cache: %w", err)
	}
	local.start()
	defer local.stop()
	if !local.waitSynced(ctx) {
		return ctx.Err()
	}

	var wg sync.WaitGroup
	defer wg.Wait()
	defer c.stopPeers()
	for _, p := range c.opts.Peers {
		c.startPeer(ctx, &wg, p.Name, p.Config, nil)
	}
	if !c.opts.IgnorePeerSecrets {
		if err := c.watchPeerSecrets(ctx, &wg, kube); err != nil {
			return err
		}
	}
	c.log.Info("federation controller leading", "peers", len(c.opts.Peers), "workers", c.opts.Workers)
	close(c.leading)
	// Traffic policy syncs its own informers; until it has, discovery sets
	// carry no policy, and sidecars keep the one they had.
	wg.Go(func() {
		if err := c.startTraffic(ctx, &wg); err != nil && ctx.Err() == nil {
			c.log.Error("traffic policy did not start; serving endpoints without policy", "err", err)
		}
	})

	// Level-triggered safety net: a slow periodic pass over everything, and
	// the expiry of stale peers, are driven from here.
	wg.Go(func() { c.periodic(ctx) })
	for range c.opts.Workers {
		wg.Go(func() {
			for c.processNext(ctx) {
			}
		})
	}
	<-ctx.Done()
	c.queue.ShutDown()
	return nil
}

func (c *Controller) resolveClusterID(ctx context.Context) error {
	dyn, err := dynamic.NewForConfig(c.opts.Config)
	if err != nil {
		return err
	}
	id, err := about.Get(ctx, dyn, about.ClusterIDProperty)
	switch {
	case err == nil && c.opts.ClusterID != "" && id != c.opts.ClusterID:
		return fmt.Errorf("cluster id %q given, but ClusterProperty %s says %q", c.opts.ClusterID, about.ClusterIDProperty, id)
	case err == nil:
		c.clusterID = id
	case c.opts.ClusterID != "":
		c.clusterID = c.opts.ClusterID
		if err := about.Set(ctx, dyn, about.ClusterIDProperty, id); err != nil {
			c.log.Warn("could not record the cluster id as a ClusterProperty", "err", err)
		}
	default:
		return fmt.Errorf("cluster id unknown: create ClusterProperty %s or pass a cluster id: %w", about.ClusterIDProperty, err)
	}
	return nil
}

func (c *Controller) processNext(ctx context.Context) bool {
	key, quit := c.queue.Get()
	if quit {
		return false
	}
	defer c.queue.Done(key)
	start := time.Now()
	err := c.reconcile(ctx, key)
	c.metrics.reconcileSeconds.Observe(time.Since(start).Seconds())
	if err == nil {
		c.metrics.reconciles.WithLabelValues("ok").Inc()
		c.queue.Forget(key)
		return true
	}
	c.metrics.reconciles.WithLabelValues("error").Inc()
	if ctx.Err() == nil {
		c.log.Warn("reconcile failed; will retry", "service", key, "err", err, "retries", c.queue.NumRequeues(key))
		c.queue.AddRateLimited(key)
	}
	return true
}

func (c *Controller) enqueue(ns, name string) {
	c.queue.Add(ns + "/" + name)
	if ns == c.opts.Namespace && name == GatewayService {
		c.disco.Notify(discovery.AllServices) // egress addresses are in every set
		return
	}
	c.disco.Notify(ns + "/" + name)
}

// enqueueNamespace requeues every exported or imported name in a namespace.
func (c *Controller) enqueueNamespace(ns string) {
	for _, cc := range c.caches() {
		exps, _ := cc.exports.ServiceExports(ns).List(labels.Everything())
		for _, e := range exps {
			c.enqueue(e.Namespace, e.Name)
		}
	}
	if c.local != nil {
		imps, _ := c.local.imports.ServiceImports(ns).List(labels.Everything())
		for _, i := range imps {
			c.enqueue(i.Namespace, i.Name)
		}
	}
}

// enqueueCache requeues every name a cluster exports, plus every local import.
func (c *Controller) enqueueCache(cc *clusterCache) {
	if cc != nil {
		exps, _ := cc.exports.List(labels.Everything())
		for _, e := range exps {
			c.enqueue(e.Namespace, e.Name)
		}
	}
	if c.local != nil {
		imps, _ := c.local.imports.List(labels.Everything())
		for _, i := range imps {
			c.enqueue(i.Namespace, i.Name)
		}
	}
}

// caches returns the local cache and every peer cache that has synced.
func (c *Controller) caches() []*clusterCache {
	var out []*clusterCache
	if c.local != nil {
		out = append(out, c.local)
	}
	for _, v := range c.peerViews(time.Now()) {
		out = append(out, v.cache)
	}
	return out
}

func (c *Controller) periodic(ctx context.Context) {
	t := time.NewTicker(c.opts.ProbeInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			c.expireStalePeers(now)
			c.notifyStaleAfter(now)
		}
	}
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}
