package localfed

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/fedmesh/fedmesh/controlplane"
)

// EchoReplicas is how many echo "pods" (app + sidecar) each cluster runs.
const EchoReplicas = 2

// Workload ports. Every pod has its own address in its cluster's pod
// network, so the ports repeat like in a real cluster.
const (
	appPort      = 8080
	inboundPort  = 15006
	adminPort    = 15000
	outboundPort = 8080
)

// podHosts are the host numbers of the sample pods in a cluster's /24:
// echo pods from 10, the client at 100.
func podHosts() []int {
	hosts := []int{100}
	for r := range EchoReplicas {
		hosts = append(hosts, 10+r)
	}
	return hosts
}

// pod is one sample workload instance: its app and its sidecar.
type pod struct {
	name    string
	addr    string
	app     *controlplane.Process
	sidecar *controlplane.Process
	running bool
}

// workloads owns the sample pods of one cluster.
type workloads struct {
	mu     sync.Mutex
	m      *member
	index  int
	echo   []*pod
	client *pod
	bins   map[string]string
	disco  string
	egress string
	feds   []string
}

func (w *workloads) sidecarArgs(p *pod, identity string) []string {
	a := []string{
		"--cluster", w.m.state.Name, "--trust-domain", w.m.state.TrustDomain,
		"--workload-api", "unix://" + filepath.Join(w.m.dir, identity+".sock"),
		"--federated", strings.Join(w.feds, ","),
		"--discovery", w.disco, "--gateway-egress", w.egress,
		"--admin", net.JoinHostPort(p.addr, strconv.Itoa(adminPort)),
	}
	if identity == "echo" {
		// The echo pods serve demo/echo: its authorization and rate limit
		// policies apply at their inbound, per HTTP request.
		a = append(a, "--inbound", net.JoinHostPort(p.addr, strconv.Itoa(inboundPort)),
			"--app", net.JoinHostPort(p.addr, strconv.Itoa(appPort)),
			"--service", "demo/echo", "--service-port", strconv.Itoa(appPort), "--inbound-protocol", "http")
	} else {
		a = append(a, "--upstream", fmt.Sprintf("demo/echo:%d=%s,http", appPort, net.JoinHostPort(p.addr, strconv.Itoa(outboundPort))))
	}
	return a
}

// inPod runs a program inside the cluster's network namespace.
func (w *workloads) inPod(logPath, bin string, args ...string) (*controlplane.Process, error) {
	return controlplane.StartProcess("ip", logPath, append([]string{"netns", "exec", w.m.net.name, bin}, args...)...)
}

func (w *workloads) start(p *pod, identity string) error {
	logf := func(what string) string { return filepath.Join(w.m.dir, p.name+"-"+what+".log") }
	if identity == "echo" {
		app, err := w.inPod(logf("app"), w.bins["fedmesh-echo"],
			"--listen", net.JoinHostPort(p.addr, strconv.Itoa(appPort)), "--cluster", w.m.state.Name, "--pod", p.name)
		if err != nil {
			return fmt.Errorf("start %s app: %w", p.name, err)
		}
		p.app = app
	}
	sc, err := w.inPod(logf("sidecar"), w.bins["fedmesh-sidecar"], w.sidecarArgs(p, identity)...)
	if err != nil {
		return fmt.Errorf("start %s sidecar: %w", p.name, err)
	}
	p.sidecar = sc
	p.running = true
	return nil
}

func (w *workloads) stop(p *pod, kill bool) {
	for _, proc := range []*controlplane.Process{p.sidecar, p.app} {
		if proc == nil {
			continue
		}
		if kill {
			proc.Kill()
		} else {
			proc.Stop()
		}
	}
	p.running = false
}

func (w *workloads) stopAll() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, p := range append(w.echo, w.client) {
		if p != nil {
			w.stop(p, false)
		}
	}
}

// publish writes demo/echo's EndpointSlice as the cluster's endpoint
// controller would: every echo pod's sidecar inbound, ready while it runs.
func (w *workloads) publish(ctx context.Context) error {
	kube, err := kubernetes.NewForConfig(w.m.cp.Config)
	if err != nil {
		return err
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{Name: "echo-local", Namespace: "demo", Labels: map[string]string{
			discoveryv1.LabelServiceName: "echo", discoveryv1.LabelManagedBy: "localfed.fedmesh.dev"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: new("http"), Port: new(int32(inboundPort)), Protocol: new(corev1.ProtocolTCP)}},
	}
	for _, p := range w.echo {
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses:  []string{p.addr},
			Hostname:   new(p.name),
			Conditions: discoveryv1.EndpointConditions{Ready: new(p.running), Serving: new(p.running), Terminating: new(false)},
		})
	}
	api := kube.DiscoveryV1().EndpointSlices("demo")
	cur, err := api.Get(ctx, slice.Name, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		_, err = api.Create(ctx, slice, metav1.CreateOptions{})
	case err == nil:
		slice.ResourceVersion = cur.ResourceVersion
		_, err = api.Update(ctx, slice, metav1.UpdateOptions{})
	}
	if err != nil {
		return fmt.Errorf("cluster %s: publish demo/echo endpoints: %w", w.m.state.Name, err)
	}
	return nil
}

// setEcho kills (as a crash would) or restarts every echo pod of the
// cluster, then updates the EndpointSlice like the endpoint controller.
func (w *workloads) setEcho(ctx context.Context, up bool) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, p := range w.echo {
		switch {
		case up && !p.running:
			if err := w.start(p, "echo"); err != nil {
				return err
			}
		case !up && p.running:
			w.stop(p, true)
		}
	}
	return w.publish(ctx)
}

func startWorkloads(ctx context.Context, ms []*member, bins map[string]string) ([]*workloads, error) {
	var all []*workloads
	for i, m := range ms {
		w := &workloads{m: m, index: i, bins: bins, disco: m.discovery}
		if len(m.state.Gateways) > 0 {
			w.egress = m.state.Gateways[0].Egress
		}
		for _, o := range ms {
			if o != m {
				w.feds = append(w.feds, o.state.TrustDomain)
			}
		}
		for r := range EchoReplicas {
			p := &pod{name: fmt.Sprintf("echo-%d", r), addr: m.net.podAddr(10 + r)}
			if err := w.start(p, "echo"); err != nil {
				return all, err
			}
			w.echo = append(w.echo, p)
		}
		w.client = &pod{name: "client", addr: m.net.podAddr(100)}
		if err := w.start(w.client, "client"); err != nil {
			return all, err
		}
		all = append(all, w)
		m.state.Workloads = append(m.state.Workloads,
			Workload{Name: "demo/client -> demo/echo", Outbound: "http://" + net.JoinHostPort(w.client.addr, strconv.Itoa(outboundPort)),
				Admin: "http://" + net.JoinHostPort(w.client.addr, strconv.Itoa(adminPort))})
		for _, p := range w.echo {
			m.state.Workloads = append(m.state.Workloads, Workload{Name: "demo/" + p.name, Inbound: net.JoinHostPort(p.addr, strconv.Itoa(inboundPort)),
				Admin: "http://" + net.JoinHostPort(p.addr, strconv.Itoa(adminPort))})
		}
		if err := w.publish(ctx); err != nil {
			return all, err
		}
	}
	return all, nil
}
