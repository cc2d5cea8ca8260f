package issuer

import "github.com/prometheus/client_golang/prometheus"

// metrics are the issuer's Prometheus series, registered on the registry the
// caller passes in (none when it passes nil).
type metrics struct {
	x509Issued   prometheus.Counter
	jwtIssued    prometheus.Counter
	issueSeconds prometheus.Histogram
	updatesSent  prometheus.Counter
	requests     *prometheus.CounterVec
	connections  prometheus.Counter
	streams      prometheus.Gauge
	caSteps      *prometheus.CounterVec
	peerFetches  *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		x509Issued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fedmesh_issuer_x509_svids_issued_total",
			Help: "X.509-SVIDs signed, first issues and renewals.",
		}),
		jwtIssued: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fedmesh_issuer_jwt_svids_issued_total",
			Help: "JWT-SVIDs signed.",
		}),
		issueSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "fedmesh_issuer_x509_svid_issue_duration_seconds",
			Help:    "Time to generate a key and sign one X.509-SVID.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 14),
		}),
		updatesSent: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fedmesh_issuer_workload_api_messages_sent_total",
			Help: "Messages sent on Workload API streams (each carries the complete current set).",
		}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_issuer_workload_api_requests_total",
			Help: "Workload API calls by method and gRPC status code.",
		}, []string{"method", "code"}),
		connections: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fedmesh_issuer_workload_api_connections_total",
			Help: "Connections accepted and attested on Workload API sockets.",
		}),
		streams: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "fedmesh_issuer_workload_api_streams",
			Help: "Workload API streams currently open.",
		}),
		caSteps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_issuer_ca_rotation_steps_total",
			Help: "CA rotation steps taken: prepare, activate, prune.",
		}, []string{"step"}),
		peerFetches: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_issuer_federated_bundle_fetches_total",
			Help: "Fetches of federated trust domains' bundles by result (updated, unchanged, error).",
		}, []string{"trust_domain", "result"}),
	}
	if reg == nil {
		return m, nil
	}
	for _, c := range []prometheus.Collector{m.x509Issued, m.jwtIssued, m.issueSeconds, m.updatesSent, m.requests, m.connections, m.streams, m.caSteps, m.peerFetches} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
