package gateway

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

const (
	// ServiceName is the gateway's Service in its namespace (fedmesh-system):
	// the federation controller reads the egress addresses
	// (multicluster.fedmesh.dev/egress-addresses) and AnnotationPeerRTT from
	// it.
	ServiceName = "fedmesh-gateway"
	// AnnotationPeerRTT on the gateway Service is the gateway's round-trip
	// time to each peer cluster: a JSON object of cluster name to
	// microseconds (integers), e.g. {"north":35012,"west":1234}, holding the
	// clusters with a live link that has at least one RTT sample. Gateway
	// replicas write it (RTTPublication); the federation controller reads
	// the same key (federation.AnnotationPeerRTT) and passes the values to
	// sidecars, which try remote clusters nearest first.
	AnnotationPeerRTT = "multicluster.fedmesh.dev/peer-rtt"
	// DefaultRTTPublishInterval is the shortest time between two writes of
	// AnnotationPeerRTT by one replica.
	DefaultRTTPublishInterval = 5 * time.Second
)

// A published RTT is rewritten only when it moved by more than both of
// these (or a cluster appeared or disappeared): jitter does not turn into
// API writes and watch events for every controller.
const (
	rttMoveRatio     = 0.2
	rttMoveMicros    = 200
	rttWriteTimeout  = 10 * time.Second
	rttFailureLogGap = time.Minute
)

// RTTPublication makes a gateway replica write its RTT to each peer cluster
// as AnnotationPeerRTT on the Service ServiceName in Namespace.
type RTTPublication struct {
	Client    kubernetes.Interface // the gateway's own cluster (required)
	Namespace string               // the gateway Service's namespace (required)
	// Interval is the shortest time between two writes, and how often the
	// RTTs are compared with the last written ones. Default
	// DefaultRTTPublishInterval.
	Interval time.Duration
}

func (p *RTTPublication) validate() error {
	switch {
	case p.Client == nil:
		return errors.New("rtt publication: no Kubernetes client")
	case p.Namespace == "":
		return errors.New("rtt publication: no namespace")
	case p.Interval < 0:
		return fmt.Errorf("rtt publication: interval %s is negative", p.Interval)
	}
	return nil
}

// PeerRTTs is this replica's round-trip time to each peer cluster that has
// at least one live link with an RTT sample: the mean of those links'
// recent RTTs (peer.Status.RTTRecent, the median of the last 32 samples, so
// a slower path shows within seconds; streams spread over a peer's
// replicas, so the mean is what a stream meets). Clusters without such a
// link are absent.
func (g *Gateway) PeerRTTs() map[string]time.Duration {
	out := map[string]time.Duration{}
	for cluster, ls := range g.links {
		var sum time.Duration
		n := 0
		for _, l := range ls {
			if st := l.Status(); st.Up && st.RTTSamples > 0 {
				sum += st.RTTRecent
				n++
			}
		}
		if n > 0 {
			out[cluster] = sum / time.Duration(n)
		}
	}
	return out
}

// PublishPeerRTT writes rtts (cluster name to microseconds) as
// AnnotationPeerRTT on the Service namespace/ServiceName, with a JSON merge
// patch of that one annotation: the only write a gateway makes to the API
// server (its RBAC allows patching that Service and nothing else).
func PublishPeerRTT(ctx context.Context, kube kubernetes.Interface, namespace string, rtts map[string]int64) error {
	if rtts == nil {
		rtts = map[string]int64{}
	}
	value, err := json.Marshal(rtts) // keys sorted: equal maps give equal values
	if err != nil {
		return fmt.Errorf("encode peer rtts: %w", err)
	}
	patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": map[string]string{AnnotationPeerRTT: string(value)}}})
	if err != nil {
		return fmt.Errorf("encode peer rtt patch: %w", err)
	}
	_, err = kube.CoreV1().Services(namespace).Patch(ctx, ServiceName, types.MergePatchType, patch, metav1.PatchOptions{FieldManager: "fedmesh-gateway"})
	if err != nil {
		return fmt.Errorf("patch annotation %s of service %s/%s: %w", AnnotationPeerRTT, namespace, ServiceName, err)
	}
	return nil
}

// rttPublisher writes a replica's per-cluster RTTs when they moved, at most
// once per interval, off the data path: it only reads the links' samples.
type rttPublisher struct {
	interval time.Duration
	measure  func() map[string]time.Duration
	write    func(ctx context.Context, rtts map[string]int64) error
	log      *slog.Logger
	count    func(result string)

	// last is what this replica wrote last (not what the annotation holds:
	// replicas that measure a little differently must not take turns
	// rewriting it). Empty at first, so a replica with nothing measured
	// yet does not erase the values another replica wrote.
	last     map[string]int64
	failing  bool
	failures int       // since the last logged failure
	loggedAt time.Time // of the last logged failure
}

func newRTTPublisher(p *RTTPublication, measure func() map[string]time.Duration, log *slog.Logger, count func(string)) *rttPublisher {
	interval := p.Interval
	if interval == 0 {
		interval = DefaultRTTPublishInterval
	}
	client, ns := p.Client, p.Namespace
	return &rttPublisher{
		interval: interval, measure: measure, log: log, count: count, last: map[string]int64{},
		write: func(ctx context.Context, rtts map[string]int64) error { return PublishPeerRTT(ctx, client, ns, rtts) },
	}
}

// run compares every interval until ctx ends.
func (p *rttPublisher) run(ctx context.Context) {
	every(ctx, p.interval, func() { p.tick(ctx) })
}

// tick writes the current RTTs if they moved since the last write. A
// failed write is retried at the next tick and logged at most once a
// minute.
func (p *rttPublisher) tick(ctx context.Context) {
	cur := map[string]int64{}
	for c, d := range p.measure() {
		cur[c] = int64(d.Round(time.Microsecond) / time.Microsecond)
	}
	if !rttMoved(p.last, cur) {
		return
	}
	wctx, cancel := context.WithTimeout(ctx, rttWriteTimeout)
	err := p.write(wctx, cur)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return // shutting down
		}
		p.count("error")
		p.failing = true
		p.failures++
		if p.loggedAt.IsZero() || time.Since(p.loggedAt) >= rttFailureLogGap {
			p.log.Warn("cannot publish peer RTTs on the gateway Service; retrying every interval, logging once a minute",
				"annotation", AnnotationPeerRTT, "failures", p.failures, "interval", p.interval, "err", err)
			p.loggedAt = time.Now()
			p.failures = 0
		}
		return
	}
	p.count("ok")
	if p.failing {
		p.log.Info("publishing peer RTTs works again", "annotation", AnnotationPeerRTT)
		p.failing, p.failures = false, 0
	}
	p.log.Debug("published peer RTTs", "annotation", AnnotationPeerRTT, "rtt_us", cur)
	p.last = cur
}

// rttMoved reports whether cur should replace last: a cluster appeared or
// disappeared, or one's RTT moved by more than 20% and more than 200 µs.
func rttMoved(last, cur map[string]int64) bool {
	if len(last) != len(cur) {
		return true
	}
	for c, v := range cur {
		old, ok := last[c]
		if !ok {
			return true
		}
		d := v - old
		if d < 0 {
			d = -d
		}
		if d > rttMoveMicros && float64(d) > rttMoveRatio*float64(old) {
			return true
		}
	}
	return false
}
