package fedctl_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/yaml"

	"github.com/fedmesh/fedmesh/fedctl"
	"github.com/fedmesh/fedmesh/localfed"
)

var (
	httpRoutes = schema.GroupVersionResource{Group: "gateway.networking.k8s.io", Version: "v1", Resource: "httproutes"}
	authzPols  = schema.GroupVersionResource{Group: "policy.fedmesh.dev", Version: "v1alpha1", Resource: "authorizationpolicies"}
	rateLimits = schema.GroupVersionResource{Group: "policy.fedmesh.dev", Version: "v1alpha1", Resource: "ratelimitpolicies"}
)

// policyWorld is the east cluster of a running local federation, seen by a
// user: its API server (YAML in, status out) and its client sidecar.
type policyWorld struct {
	t      *testing.T
	dyn    dynamic.Interface
	client string // east's client sidecar outbound URL
	admin  string // and its admin URL
}

// echoLoads is the traffic share per priority that east's client sidecar
// gives its own upstream demo/echo:8080, and the raw /state it read it
// from (for failure messages).
func (w *policyWorld) echoLoads() ([]float64, string) {
	resp, err := http.Get(w.admin + "/state")
	if err != nil {
		return nil, err.Error()
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	var doc struct {
		Upstreams []struct {
			Upstream string    `json:"upstream"`
			Loads    []float64 `json:"loads"`
		} `json:"upstreams"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		return nil, fmt.Sprintf("%v: %s", err, raw)
	}
	for _, u := range doc.Upstreams {
		if u.Upstream == "demo/echo:8080" {
			return u.Loads, string(raw)
		}
	}
	return nil, string(raw)
}

// waitEchoHome waits up to 15 s until east's client sidecar sends all of
// demo/echo's traffic to east's own pods. The drills before this test kill
// and restart those pods; while any is not yet available again, the
// client's overprovisioning rightly sends a share of it to other clusters,
// which would be counted against the route's split.
func (w *policyWorld) waitEchoHome() {
	w.t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		loads, raw := w.echoLoads()
		if len(loads) > 0 && loads[0] == 1 {
			return
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("east's client sidecar does not send all of demo/echo's traffic home after 15 s (loads per priority %v); its /state:\n%s", loads, raw)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (w *policyWorld) apply(gvr schema.GroupVersionResource, doc string) {
	w.t.Helper()
	var o unstructured.Unstructured
	if err := yaml.Unmarshal([]byte(doc), &o.Object); err != nil {
		w.t.Fatalf("test YAML: %v", err)
	}
	api := w.dyn.Resource(gvr).Namespace(o.GetNamespace())
	// The controller writes the object's status meanwhile, so an update
	// may meet a newer resourceVersion: read again and retry, as kubectl
	// apply does.
	err := retry.RetryOnConflict(retry.DefaultRetry, func() error {
		cur, err := api.Get(context.Background(), o.GetName(), metav1.GetOptions{})
		if err == nil {
			o.SetResourceVersion(cur.GetResourceVersion())
			_, err = api.Update(context.Background(), &o, metav1.UpdateOptions{})
		} else {
			_, err = api.Create(context.Background(), &o, metav1.CreateOptions{})
		}
		return err
	})
	if err != nil {
		w.t.Fatalf("apply %s %s: %v", gvr.Resource, o.GetName(), err)
	}
}

// waitImportReady waits up to 30 s for ServiceImport demo/name to be
// Ready in the world's cluster.
func (w *policyWorld) waitImportReady(name string) {
	w.t.Helper()
	gvr := schema.GroupVersionResource{Group: "multicluster.x-k8s.io", Version: "v1beta1", Resource: "serviceimports"}
	deadline := time.Now().Add(30 * time.Second)
	for {
		o, err := w.dyn.Resource(gvr).Namespace("demo").Get(context.Background(), name, metav1.GetOptions{})
		if err == nil {
			conds, _, _ := unstructured.NestedSlice(o.Object, "status", "conditions")
			for _, c := range conds {
				if cm, _ := c.(map[string]any); cm["type"] == "Ready" && cm["status"] == "True" {
					return
				}
			}
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("ServiceImport demo/%s not Ready after 30s (last error %v)", name, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (w *policyWorld) remove(gvr schema.GroupVersionResource, name string) {
	_ = w.dyn.Resource(gvr).Namespace("demo").Delete(context.Background(), name, metav1.DeleteOptions{})
}

// routeVerdict waits until fedmesh's controller has judged the route's
// current generation and returns "Type=Status Reason" of each condition.
func (w *policyWorld) routeVerdict(name string) map[string]string {
	w.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		o, err := w.dyn.Resource(httpRoutes).Namespace("demo").Get(context.Background(), name, metav1.GetOptions{})
		if err != nil {
			w.t.Fatal(err)
		}
		out := map[string]string{}
		parents, _, _ := unstructured.NestedSlice(o.Object, "status", "parents")
		for _, p := range parents {
			pm := p.(map[string]any)
			if pm["controllerName"] != fedctl.MeshControllerName {
				continue
			}
			conds, _, _ := unstructured.NestedSlice(pm, "conditions")
			for _, c := range conds {
				cm := c.(map[string]any)
				if g, _, _ := unstructured.NestedInt64(cm, "observedGeneration"); g == o.GetGeneration() {
					out[cm["type"].(string)] = fmt.Sprintf("%s %s", cm["status"], cm["reason"])
				}
			}
		}
		if out["Accepted"] != "" && out["ResolvedRefs"] != "" {
			return out
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("route %s: no verdict from %s for generation %d after 10s: %v", name, fedctl.MeshControllerName, o.GetGeneration(), parents)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// answer is one request through the client sidecar.
type answer struct {
	code       int
	cluster    string
	pod        string
	retryAfter string
}

// send makes n GETs of path (with headers) through east's client sidecar,
// `conc` at a time, optionally paced to rate per second, and returns them.
func (w *policyWorld) send(n, conc, rate int, path string, hdr map[string]string) []answer {
	w.t.Helper()
	client := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{MaxIdleConnsPerHost: conc}}
	defer client.CloseIdleConnections()
	out := make([]answer, n)
	var wg sync.WaitGroup
	next := make(chan int)
	for range conc {
		wg.Go(func() {
			for i := range next {
				req, _ := http.NewRequest(http.MethodGet, strings.TrimSuffix(w.client, "/drill")+path, nil)
				for k, v := range hdr {
					req.Header.Set(k, v)
				}
				resp, err := client.Do(req)
				if err != nil {
					out[i] = answer{code: -1}
					continue
				}
				var a struct {
					Cluster string `json:"cluster"`
					Pod     string `json:"pod"`
				}
				body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
				resp.Body.Close()
				_ = json.Unmarshal(body, &a)
				out[i] = answer{code: resp.StatusCode, cluster: a.Cluster, pod: a.Pod, retryAfter: resp.Header.Get("Retry-After")}
			}
		})
	}
	start := time.Now()
	for i := range n {
		if rate > 0 {
			time.Sleep(time.Until(start.Add(time.Duration(i) * time.Second / time.Duration(rate))))
		}
		next <- i
	}
	close(next)
	wg.Wait()
	return out
}

// until sends small batches until ok holds for one, or fails after 10 s.
func (w *policyWorld) until(what, path string, hdr map[string]string, ok func([]answer) bool) {
	w.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		as := w.send(20, 4, 0, path, hdr)
		if ok(as) {
			return
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("%s: not after 10s; last answers %v", what, as)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func count(as []answer, f func(answer) bool) int {
	n := 0
	for _, a := range as {
		if f(a) {
			n++
		}
	}
	return n
}

func all(f func(answer) bool) func([]answer) bool {
	return func(as []answer) bool { return count(as, f) == len(as) }
}

func from(cluster string) func(answer) bool {
	return func(a answer) bool { return a.code == 200 && a.cluster == cluster }
}

// checkTrafficPolicy is issue 8's end-to-end proof on the local federation:
// routes, authorization and rate limits written as YAML to east's API server
// and observed through east's client sidecar. north serves the canary.
func checkTrafficPolicy(t *testing.T, state *localfed.State, run func(args ...string) (string, int)) {
	raw, err := clientcmd.LoadFromFile(state.Kubeconfig)
	if err != nil {
		t.Fatal(err)
	}
	cfg := func(cluster string) *rest.Config {
		c, err := clientcmd.NewNonInteractiveClientConfig(*raw, localfed.ContextName(cluster), &clientcmd.ConfigOverrides{}, nil).ClientConfig()
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	dyn, err := dynamic.NewForConfig(cfg("east"))
	if err != nil {
		t.Fatal(err)
	}
	w := &policyWorld{t: t, dyn: dyn}
	for _, c := range state.Clusters {
		if c.Name == "east" {
			w.client, w.admin = c.Workloads[0].Outbound, c.Workloads[0].Admin
		}
	}
	cleanup, err := fedctl.ExportCanary(context.Background(), cfg("north"))
	defer cleanup()
	if err != nil {
		t.Fatal(err)
	}
	// The route below names east's ServiceImport of echo-canary: wait for
	// the import (a route checked before it exists is rightly refused with
	// BackendNotFound, which is tested further down).
	w.waitImportReady("echo-canary")
	defer w.remove(httpRoutes, "split")
	defer w.remove(httpRoutes, "match")
	defer w.remove(httpRoutes, "broken")

	// 1. A weighted split between the local Service and a ServiceImport
	// served only by north lands within ±3 points over 2,000 requests.
	w.apply(httpRoutes, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 8080}]
  rules:
  - backendRefs:
    - {name: echo, port: 8080, weight: 70}
    - {group: multicluster.x-k8s.io, kind: ServiceImport, name: echo-canary, port: 8080, weight: 30}
`)
	if v := w.routeVerdict("split"); v["Accepted"] != "True Accepted" || v["ResolvedRefs"] != "True ResolvedRefs" {
		t.Fatalf("valid split route: %v", v)
	}
	w.until("north answers a share of demo/echo", "/", nil, func(as []answer) bool { return count(as, from("north")) > 0 })
	w.waitEchoHome()
	as := w.send(2000, 16, 0, "/", nil)
	north, east := count(as, from("north")), count(as, from("east"))
	share := 100 * float64(north) / 2000
	t.Logf("split 70/30: east %d, north %d of 2000 (north %.1f%%)", east, north, share)
	if north+east != 2000 || math.Abs(share-30) > 3 {
		loads, raw := w.echoLoads()
		t.Errorf("split 70/30 over 2000 requests: east %d, north %d, other %d; north share %.1f%%, want 30 ± 3; demo/echo's loads per priority now %v; east's client /state:\n%s", east, north, 2000-north-east, share, loads, raw)
	}

	// 2. Matches route as written: a header match beats the catch-all
	// split, a longer path prefix beats both.
	w.apply(httpRoutes, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: match, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 8080}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo-canary, port: 8080}]
  - matches: [{path: {type: PathPrefix, value: /stable}}]
    backendRefs: [{name: echo, port: 8080}]
`)
	if v := w.routeVerdict("match"); v["Accepted"] != "True Accepted" {
		t.Fatalf("valid match route: %v", v)
	}
	canary := map[string]string{"x-canary": "yes"}
	w.until("x-canary: yes goes to north", "/", canary, all(from("north")))
	if as := w.send(100, 4, 0, "/", canary); count(as, from("north")) != 100 {
		t.Errorf("x-canary: yes: %d of 100 from north", count(as, from("north")))
	}
	if as := w.send(100, 4, 0, "/stable/x", canary); count(as, from("east")) != 100 {
		t.Errorf("/stable/x (with x-canary): %d of 100 from east", count(as, from("east")))
	}
	if as := w.send(100, 4, 0, "/stablex", canary); count(as, from("north")) != 100 {
		t.Errorf("/stablex is not under prefix /stable: %d of 100 from north", count(as, from("north")))
	}

	// 3. Bad input gets a status and changes nothing that flows: an unknown
	// backend, and a valid route edited to all-zero weights.
	w.apply(httpRoutes, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /stable}}]
    backendRefs: [{name: nope, port: 8080}]
`)
	if v := w.routeVerdict("broken"); v["ResolvedRefs"] != "False BackendNotFound" {
		t.Errorf("route to a missing Service: %v, want ResolvedRefs False BackendNotFound", v)
	}
	w.apply(httpRoutes, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: match, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 8080}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo-canary, port: 8080, weight: 0}]
  - matches: [{path: {type: PathPrefix, value: /stable}}]
    backendRefs: [{name: echo, port: 8080, weight: 0}]
`)
	if v := w.routeVerdict("match"); v["Accepted"] != "False UnsupportedValue" {
		t.Errorf("all weights 0: %v, want Accepted False UnsupportedValue", v)
	}
	// Barrier: a valid route applied after the bad edit, served by north.
	// Once east's client sidecar routes /barrier to north, it runs on a
	// snapshot the controller built after it judged the bad edit; a data
	// plane that took the all-zero weights would show them from then on.
	w.apply(httpRoutes, `
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: barrier, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /barrier}}]
    backendRefs: [{group: multicluster.x-k8s.io, kind: ServiceImport, name: echo-canary, port: 8080}]
`)
	if v := w.routeVerdict("barrier"); v["Accepted"] != "True Accepted" {
		t.Fatalf("barrier route: %v", v)
	}
	w.until("the barrier route (applied after the bad edit) is in force in east's client", "/barrier", nil, all(from("north")))
	if as := w.send(100, 4, 0, "/", canary); count(as, from("north")) != 100 {
		t.Errorf("after the bad edit, x-canary: yes: %d of 100 from north (the last good route must stay)", count(as, from("north")))
	}
	if as := w.send(100, 4, 0, "/stable/y", nil); count(as, from("east")) != 100 {
		t.Errorf("after the broken route, /stable/y: %d of 100 from east", count(as, from("east")))
	}
	// fedctl status shows, per service, what is in force and what not.
	out, code := run("status", "-o", "json")
	var st fedctl.Status
	if err := json.Unmarshal([]byte(out), &st); code != 0 || err != nil {
		t.Fatalf("status: exit %d, %v\n%s", code, err, out)
	}
	verdicts := map[string]string{}
	for _, p := range st.Policies {
		if p.Cluster == "east" && p.Kind == "HTTPRoute" {
			verdicts[p.Name] = fmt.Sprintf("%v %s", p.Accepted, p.Reason)
		}
	}
	if verdicts["split"] != "true " || !strings.HasPrefix(verdicts["broken"], "false ResolvedRefs=False BackendNotFound") ||
		!strings.HasPrefix(verdicts["match"], "false Accepted=False UnsupportedValue") {
		t.Errorf("fedctl status routes in east: %v", verdicts)
	}
	if table, _ := run("status"); !strings.Contains(table, "HTTPRoute demo/broken") {
		t.Errorf("fedctl status table does not list the broken route:\n%s", table)
	}
	w.remove(httpRoutes, "split")
	w.remove(httpRoutes, "match")
	w.remove(httpRoutes, "broken")
	w.remove(httpRoutes, "barrier")
	w.until("routes removed: everything local again", "/", canary, all(from("east")))

	// 4. Authorization by SPIFFE ID at east's echo sidecars: only north's
	// workloads admitted, so east's client gets 403; then east's trust
	// domain admitted, and it passes.
	defer w.remove(authzPols, "echo-callers")
	w.apply(authzPols, `
apiVersion: policy.fedmesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-callers, namespace: demo}
spec:
  targetRef: {group: "", kind: Service, name: echo}
  rules:
  - from: {trustDomains: [north.fedmesh.test]}
`)
	w.until("east's client refused with 403", "/", nil, all(func(a answer) bool { return a.code == http.StatusForbidden }))
	w.apply(authzPols, `
apiVersion: policy.fedmesh.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-callers, namespace: demo}
spec:
  targetRef: {group: "", kind: Service, name: echo}
  rules:
  - from: {ids: [spiffe://east.fedmesh.test/ns/demo/sa/client]}
    methods: [GET]
`)
	w.until("east's client admitted", "/", nil, all(from("east")))
	w.remove(authzPols, "echo-callers")

	// 5. A rate limit holds within 5% of its rate. The limit is per
	// sidecar: 40/s with burst 10 on each of east's two echo pods, loaded
	// at 200/s for 3 s. The client's balancer need not split evenly (a pod
	// that answers 429 answers fast), so each pod must admit at most its
	// limit, and the busiest, which is saturated, must admit its rate
	// within 5%.
	defer w.remove(rateLimits, "echo-rl")
	w.apply(rateLimits, `
apiVersion: policy.fedmesh.dev/v1alpha1
kind: RateLimitPolicy
metadata: {name: echo-rl, namespace: demo}
spec:
  targetRef: {group: "", kind: Service, name: echo}
  requestsPerSecond: 40
  burst: 10
`)
	w.until("rate limit in force", "/", nil, func(as []answer) bool {
		return count(as, func(a answer) bool { return a.code == http.StatusTooManyRequests }) > 0
	})
	time.Sleep(time.Second) // buckets refill to their burst
	start := time.Now()
	as = w.send(600, 32, 200, "/", nil)
	elapsed := time.Since(start).Seconds()
	admitted := count(as, from("east"))
	limited := count(as, func(a answer) bool { return a.code == http.StatusTooManyRequests })
	if limited+admitted != len(as) {
		t.Errorf("rate limited load: %d admitted, %d limited, %d other of %d", admitted, limited, len(as)-admitted-limited, len(as))
	}
	if n := count(as, func(a answer) bool { return a.code == http.StatusTooManyRequests && a.retryAfter == "" }); n > 0 {
		t.Errorf("%d answers 429 without Retry-After", n)
	}
	perPod := map[string]int{}
	for _, a := range as {
		if a.code == 200 {
			perPod[a.pod]++
		}
	}
	busiest := 0
	for pod, n := range perPod {
		rate := (float64(n) - 10) / elapsed
		t.Logf("rate limit 40/s, burst 10: pod %s admitted %d in %.2fs: %.1f/s beyond the burst", pod, n, elapsed, rate)
		if rate > 40*1.05 {
			t.Errorf("pod %s admitted %.1f/s beyond its burst, limit 40/s + 5%%", pod, rate)
		}
		busiest = max(busiest, n)
	}
	if rate := (float64(busiest) - 10) / elapsed; limited == 0 || math.Abs(rate-40)/40 > 0.05 {
		t.Errorf("the busiest pod admitted %.1f/s beyond its burst (%d limited in all), want 40 ± 5%%", rate, limited)
	}
}
