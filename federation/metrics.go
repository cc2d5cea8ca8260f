package federation

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the controller's Prometheus series. Labels stay low-cardinality:
// peer names and fixed reasons, never a service name.
type metrics struct {
	reconciles       *prometheus.CounterVec
	reconcileSeconds prometheus.Histogram
	peerUp           *prometheus.GaugeVec
	peerStale        *prometheus.GaugeVec
	peerLastSync     *prometheus.GaugeVec
	peerConfigErrors *prometheus.CounterVec
	leader           prometheus.Gauge
	imports          prometheus.Gauge
	conflicts        prometheus.Gauge
	queueDepth       prometheus.GaugeFunc
	trafficObjects   *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer, depth func() float64) *metrics {
	m := &metrics{
		reconciles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_federation_reconciles_total",
			Help: "Reconciles of one multi-cluster service, by result (ok, error).",
		}, []string{"result"}),
		reconcileSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "fedmesh_federation_reconcile_duration_seconds",
			Help:    "Time to reconcile one multi-cluster service.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		peerUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fedmesh_federation_peer_up",
			Help: "1 when the peer cluster's API server answered the last probe.",
		}, []string{"peer"}),
		peerStale: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fedmesh_federation_peer_stale",
			Help: "1 while the peer is unreachable and its last known state is being served.",
		}, []string{"peer"}),
		peerLastSync: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fedmesh_federation_peer_last_sync_timestamp_seconds",
			Help: "Unix time of the last successful probe of the peer.",
		}, []string{"peer"}),
		peerConfigErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_federation_peer_config_errors_total",
			Help: "Peer configurations (Secrets, kubeconfigs) that could not be used, by reason.",
		}, []string{"reason"}),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fedmesh_federation_leader",
			Help: "1 while this replica holds the leader lease.",
		}),
		imports: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fedmesh_federation_service_imports",
			Help: "ServiceImports this controller maintains in its cluster.",
		}),
		conflicts: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fedmesh_federation_services_in_conflict",
			Help: "Multi-cluster services whose exports conflict.",
		}),
		trafficObjects: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fedmesh_federation_traffic_objects",
			Help: "Routes attached to Services and fedmesh policies in this cluster, by kind and verdict (accepted, rejected).",
		}, []string{"kind", "verdict"}),
		queueDepth: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "fedmesh_federation_queue_depth",
			Help: "Services waiting to be reconciled.",
		}, depth),
	}
	if reg != nil {
		reg.MustRegister(m.reconciles, m.reconcileSeconds, m.peerUp, m.peerStale, m.peerLastSync,
			m.peerConfigErrors, m.leader, m.imports, m.conflicts, m.queueDepth, m.trafficObjects)
	}
	return m
}

// keyGauge is a set of keys whose size a gauge mirrors.
type keyGauge struct {
	mu    sync.Mutex
	keys  map[string]bool
	gauge prometheus.Gauge
}

func newKeyGauge(g prometheus.Gauge) *keyGauge { return &keyGauge{keys: map[string]bool{}, gauge: g} }

func (k *keyGauge) set(key string, on bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if on {
		k.keys[key] = true
	} else {
		delete(k.keys, key)
	}
	k.gauge.Set(float64(len(k.keys)))
}
