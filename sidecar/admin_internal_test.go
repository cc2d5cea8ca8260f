package sidecar

import (
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	imetrics "github.com/fedmesh/fedmesh/internal/metrics"
	"github.com/fedmesh/fedmesh/internal/testutil"
)

// TestAdminMetrics: /metrics on the admin handler serves the sidecar's
// families and the runtime series as text Prometheus parses, with the
// names, types and labels dashboards and docs use.
func TestAdminMetrics(t *testing.T) {
	testutil.CheckGoroutines(t)
	reg := imetrics.NewRegistry()
	if err := reg.RegisterRuntime(); err != nil {
		t.Fatal(err)
	}
	m, err := newMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newMetrics(reg); err == nil || !strings.Contains(err.Error(), "already registered") {
		t.Errorf("second registration: %v, want already registered", err)
	}
	m.requests.WithLabelValues("shop/checkout:8080", "east", "ok").Inc()
	m.latency.WithLabelValues("shop/checkout:8080").Observe(.003)
	m.retries.WithLabelValues("shop/checkout:8080").Inc()
	m.budgetExhausted.WithLabelValues("shop/checkout:8080").Inc()
	m.failovers.WithLabelValues("shop/checkout:8080", "east").Inc()
	m.ejections.WithLabelValues("shop/checkout:8080", "east", "5xx").Inc()
	m.overflows.WithLabelValues("shop/checkout:8080", "requests").Inc()
	m.tunnelRefusals.WithLabelValues("east", "not_exported").Inc()
	m.inbound.WithLabelValues("accepted").Inc()
	m.routes.WithLabelValues("shop/checkout:8080", "shop/canary", "Service shop/checkout-v2:8080").Inc()
	m.authz.WithLabelValues("shop/web", "allow", "shop/allow-web").Inc()
	m.rateLimited.WithLabelValues("shop/web", "shop/rl").Inc()

	s := &Sidecar{cfg: Config{Registry: reg}, own: newOwner()}
	srv := httptest.NewServer(s.AdminHandler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", resp.StatusCode, err)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/plain; version=0.0.4; charset=utf-8" {
		t.Errorf("Content-Type %q", ct)
	}
	p := expfmt.NewTextParser(model.LegacyValidation)
	mfs, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	for name, want := range map[string]struct {
		typ    dto.MetricType
		labels []string
	}{
		"fedmesh_sidecar_requests_total":               {dto.MetricType_COUNTER, []string{"cluster", "result", "upstream"}},
		"fedmesh_sidecar_request_duration_seconds":     {dto.MetricType_HISTOGRAM, []string{"upstream"}},
		"fedmesh_sidecar_retries_total":                {dto.MetricType_COUNTER, []string{"upstream"}},
		"fedmesh_sidecar_retry_budget_exhausted_total": {dto.MetricType_COUNTER, []string{"upstream"}},
		"fedmesh_sidecar_failovers_total":              {dto.MetricType_COUNTER, []string{"cluster", "upstream"}},
		"fedmesh_sidecar_ejections_total":              {dto.MetricType_COUNTER, []string{"cluster", "reason", "upstream"}},
		"fedmesh_sidecar_circuit_breaker_trips_total":  {dto.MetricType_COUNTER, []string{"limit", "upstream"}},
		"fedmesh_sidecar_tunnel_refusals_total":        {dto.MetricType_COUNTER, []string{"cluster", "code"}},
		"fedmesh_sidecar_inbound_connections_total":    {dto.MetricType_COUNTER, []string{"result"}},
		"fedmesh_sidecar_route_requests_total":         {dto.MetricType_COUNTER, []string{"backend", "route", "upstream"}},
		"fedmesh_sidecar_authz_decisions_total":        {dto.MetricType_COUNTER, []string{"decision", "policy", "service"}},
		"fedmesh_sidecar_ratelimited_total":            {dto.MetricType_COUNTER, []string{"policy", "service"}},
		"go_goroutines":                                {dto.MetricType_GAUGE, nil},
		"go_memstats_heap_alloc_bytes":                 {dto.MetricType_GAUGE, nil},
	} {
		mf := mfs[name]
		if mf == nil {
			t.Errorf("no %s in /metrics", name)
			continue
		}
		if mf.GetType() != want.typ || mf.GetHelp() == "" || len(mf.GetMetric()) != 1 {
			t.Errorf("%s: type %v, help %q, %d series", name, mf.GetType(), mf.GetHelp(), len(mf.GetMetric()))
			continue
		}
		var labels []string
		for _, l := range mf.GetMetric()[0].GetLabel() {
			labels = append(labels, l.GetName())
		}
		slices.Sort(labels)
		if !slices.Equal(labels, want.labels) {
			t.Errorf("%s: labels %v, want %v", name, labels, want.labels)
		}
		if c := mf.GetMetric()[0].GetCounter(); c != nil && c.GetValue() != 1 {
			t.Errorf("%s: %v, want 1", name, c.GetValue())
		}
	}
	h := mfs["fedmesh_sidecar_request_duration_seconds"].GetMetric()[0].GetHistogram()
	if h.GetSampleCount() != 1 || h.GetSampleSum() != .003 || len(h.GetBucket()) != 15 {
		t.Errorf("latency histogram: count %d, sum %v, %d buckets; want 1, 0.003, 14 + +Inf", h.GetSampleCount(), h.GetSampleSum(), len(h.GetBucket()))
	}
}
