package gateway

import "github.com/prometheus/client_golang/prometheus"

type metrics struct {
	streamsOpen   *prometheus.GaugeVec   // direction
	streamsTotal  *prometheus.CounterVec // direction, result
	bytes         *prometheus.CounterVec // direction, flow
	handshakeFail *prometheus.CounterVec // listener, reason
	drops         *prometheus.CounterVec // reason
	dialFailures  prometheus.Counter
	peerUp        *prometheus.GaugeVec // cluster, addr
	peerRTT       *prometheus.GaugeVec // cluster, addr
	peerConnects  *prometheus.CounterVec
	udpBuffer     *prometheus.GaugeVec // socket, dir
	// rttPublications counts writes of AnnotationPeerRTT, by result.
	rttPublications *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		streamsOpen: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fedmesh_gateway_streams_open", Help: "Proxied streams open now, by direction (ingress from peers, egress from sidecars).",
		}, []string{"direction"}),
		streamsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_gateway_streams_total", Help: "Streams handled, by direction and result (tunnel response code, or reset/error after ok).",
		}, []string{"direction", "result"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_gateway_bytes_total", Help: "Application bytes spliced, by direction and flow (to_target, to_caller).",
		}, []string{"direction", "flow"}),
		handshakeFail: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_gateway_handshake_failures_total", Help: "mTLS handshakes refused, by listener (tunnel, egress, dial) and reason (untrusted, unauthorized, error).",
		}, []string{"listener", "reason"}),
		drops: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_gateway_drops_total", Help: "Streams dropped before a response, by reason.",
		}, []string{"reason"}),
		dialFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "fedmesh_gateway_endpoint_dial_failures_total", Help: "Failed dials to local endpoints (each is retried on another endpoint).",
		}),
		peerUp: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fedmesh_gateway_peer_up", Help: "1 when the QUIC connection to a peer gateway is live.",
		}, []string{"cluster", "addr"}),
		peerRTT: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fedmesh_gateway_peer_rtt_seconds", Help: "RTT to a peer gateway, p50 of recent samples.",
		}, []string{"cluster", "addr"}),
		peerConnects: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_gateway_peer_connects_total", Help: "QUIC connections established to a peer gateway.",
		}, []string{"cluster", "addr"}),
		udpBuffer: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "fedmesh_gateway_udp_buffer_bytes", Help: "UDP socket buffer sizes the OS granted, by socket and dir (rcv, snd).",
		}, []string{"socket", "dir"}),
		rttPublications: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_gateway_rtt_publications_total", Help: "Writes of this replica's per-cluster RTT to the gateway Service's annotation, by result (ok, error).",
		}, []string{"result"}),
	}
	if reg != nil {
		reg.MustRegister(m.streamsOpen, m.streamsTotal, m.bytes, m.handshakeFail, m.drops, m.dialFailures,
			m.peerUp, m.peerRTT, m.peerConnects, m.udpBuffer, m.rttPublications)
	}
	return m
}
