package sidecar

import (
	"fmt"

	// imetrics: the name metrics is the struct below.
	imetrics "github.com/fedmesh/fedmesh/internal/metrics"
)

// metrics are the sidecar's metric families, registered on
// Config.Registry.
type metrics struct {
	requests        *imetrics.CounterVec
	latency         *imetrics.HistogramVec
	retries         *imetrics.CounterVec
	budgetExhausted *imetrics.CounterVec
	failovers       *imetrics.CounterVec
	ejections       *imetrics.CounterVec
	overflows       *imetrics.CounterVec
	tunnelRefusals  *imetrics.CounterVec
	inbound         *imetrics.CounterVec
	routes          *imetrics.CounterVec
	authz           *imetrics.CounterVec
	rateLimited     *imetrics.CounterVec
}

func newMetrics(reg *imetrics.Registry) (*metrics, error) {
	r := registrar{reg: reg}
	m := &metrics{
		requests: r.counter("fedmesh_sidecar_requests_total",
			"Outbound HTTP requests and TCP connections by upstream, destination cluster and result.",
			"upstream", "cluster", "result"),
		latency: r.histogram("fedmesh_sidecar_request_duration_seconds",
			"Outbound HTTP request latency, retries included, until the response was forwarded.",
			[]float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10},
			"upstream"),
		retries: r.counter("fedmesh_sidecar_retries_total",
			"Attempts after the first, by upstream.",
			"upstream"),
		budgetExhausted: r.counter("fedmesh_sidecar_retry_budget_exhausted_total",
			"Retries not made because the retry budget was spent.",
			"upstream"),
		failovers: r.counter("fedmesh_sidecar_failovers_total",
			"Requests answered from a worse priority than their first attempt, by answering cluster.",
			"upstream", "cluster"),
		ejections: r.counter("fedmesh_sidecar_ejections_total",
			"Endpoint ejections by upstream, cluster and reason.",
			"upstream", "cluster", "reason"),
		overflows: r.counter("fedmesh_sidecar_circuit_breaker_trips_total",
			"Requests and TCP connections refused by an upstream's circuit breakers, by limit: requests (outstanding), connections (TCP over max connections), pending (too many waiting for a connection, or none came free in time).",
			"upstream", "limit"),
		tunnelRefusals: r.counter("fedmesh_sidecar_tunnel_refusals_total",
			"Gateway refusals of tunnel streams by target cluster and code.",
			"cluster", "code"),
		inbound: r.counter("fedmesh_sidecar_inbound_connections_total",
			"Inbound connections by result (accepted, refused, handshake_failed, app_unreachable).",
			"result"),
		routes: r.counter("fedmesh_sidecar_route_requests_total",
			"Outbound requests (HTTP) and connections (TCP) served by a route rule, by upstream, route and chosen backend.",
			"upstream", "route", "backend"),
		authz: r.counter("fedmesh_sidecar_authz_decisions_total",
			"Inbound authorization decisions under an AuthorizationPolicy (per connection, or per request for HTTP rules with methods or paths), by service, decision and policy.",
			"service", "decision", "policy"),
		rateLimited: r.counter("fedmesh_sidecar_ratelimited_total",
			"Inbound requests (HTTP) and connections (TCP) refused by a rate limit, by service and policy.",
			"service", "policy"),
	}
	if r.err != nil {
		return nil, fmt.Errorf("register sidecar metrics: %w", r.err)
	}
	return m, nil
}

// registrar registers metric families and keeps the first error, so that
// newMetrics reads as the list of families.
type registrar struct {
	reg *imetrics.Registry
	err error
}

func (r *registrar) counter(name, help string, labels ...string) *imetrics.CounterVec {
	c, err := r.reg.NewCounterVec(name, help, labels...)
	if r.err == nil {
		r.err = err
	}
	return c
}

func (r *registrar) histogram(name, help string, buckets []float64, labels ...string) *imetrics.HistogramVec {
	h, err := r.reg.NewHistogramVec(name, help, buckets, labels...)
	if r.err == nil {
		r.err = err
	}
	return h
}
