package sidecar

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	requests        *prometheus.CounterVec
	latency         *prometheus.HistogramVec
	retries         *prometheus.CounterVec
	budgetExhausted *prometheus.CounterVec
	failovers       *prometheus.CounterVec
	ejections       *prometheus.CounterVec
	overflows       *prometheus.CounterVec
	tunnelRefusals  *prometheus.CounterVec
	inbound         *prometheus.CounterVec
	routes          *prometheus.CounterVec
	authz           *prometheus.CounterVec
	rateLimited     *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_sidecar_requests_total",
			Help: "Outbound HTTP requests and TCP connections by upstream, destination cluster and result.",
		}, []string{"upstream", "cluster", "result"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "fedmesh_sidecar_request_duration_seconds",
			Help:    "Outbound HTTP request latency, retries included, until the response was forwarded.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
		}, []string{"upstream"}),
		retries: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_sidecar_retries_total",
			Help: "Attempts after the first, by upstream.",
		}, []string{"upstream"}),
		budgetExhausted: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_sidecar_retry_budget_exhausted_total",
			Help: "Retries not made because the retry budget was spent.",
		}, []string{"upstream"}),
		failovers: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_sidecar_failovers_total",
			Help: "Requests answered from a worse priority than their first attempt, by answering cluster.",
		}, []string{"upstream", "cluster"}),
		ejections: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_sidecar_ejections_total",
			Help: "Endpoint ejections by upstream, cluster and reason.",
		}, []string{"upstream", "cluster", "reason"}),
		overflows: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_sidecar_circuit_breaker_trips_total",
			Help: "Requests and TCP connections refused by an upstream's circuit breakers, by limit: requests (outstanding), connections (TCP over max connections), pending (too many waiting for a connection, or none came free in time).",
		}, []string{"upstream", "limit"}),
		tunnelRefusals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_sidecar_tunnel_refusals_total",
			Help: "Gateway refusals of tunnel streams by target cluster and code.",
		}, []string{"cluster", "code"}),
		inbound: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_sidecar_inbound_connections_total",
			Help: "Inbound connections by result (accepted, refused, handshake_failed, app_unreachable).",
		}, []string{"result"}),
		routes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_sidecar_route_requests_total",
			Help: "Outbound requests (HTTP) and connections (TCP) served by a route rule, by upstream, route and chosen backend.",
		}, []string{"upstream", "route", "backend"}),
		authz: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_sidecar_authz_decisions_total",
			Help: "Inbound authorization decisions under an AuthorizationPolicy (per connection, or per request for HTTP rules with methods or paths), by service, decision and policy.",
		}, []string{"service", "decision", "policy"}),
		rateLimited: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_sidecar_ratelimited_total",
			Help: "Inbound requests (HTTP) and connections (TCP) refused by a rate limit, by service and policy.",
		}, []string{"service", "policy"}),
	}
	for _, c := range []prometheus.Collector{m.requests, m.latency, m.retries, m.budgetExhausted, m.failovers, m.ejections, m.overflows, m.tunnelRefusals, m.inbound, m.routes, m.authz, m.rateLimited} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("register sidecar metrics: %w", err)
		}
	}
	return m, nil
}
