package localfed

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/federation"
	"github.com/fedmesh/fedmesh/gateway"
	"github.com/fedmesh/fedmesh/gateway/faultnet"
)

// GatewayReplicas is how many gateway replicas each local cluster runs.
const GatewayReplicas = 2

// Gateway is one gateway replica's addresses.
type Gateway struct {
	Tunnel string `json:"tunnel"` // UDP, QUIC from peer gateways (reached through the WAN relays)
	Egress string `json:"egress"` // TCP+mTLS (default) and QUIC from local sidecars, same port number
	Admin  string `json:"admin"`  // HTTP: /state, /metrics, /healthz
}

// wan is the userspace WAN between clusters: one faultnet relay per
// (source cluster, destination gateway replica), so faults can be set per
// direction and pair of clusters.
type wan struct {
	mu     sync.Mutex
	relays map[[2]string][]*faultnet.Relay // {from, to} -> relays to each replica of to
}

func (w *wan) close() {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, rs := range w.relays {
		for _, r := range rs {
			r.Close()
		}
	}
}

// setFaults applies faults to both directions between two clusters.
func (w *wan) setFaults(a, b string, f faultnet.Faults) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	pairs := [][2]string{{a, b}, {b, a}}
	for _, p := range pairs {
		if _, ok := w.relays[p]; !ok {
			return fmt.Errorf("no WAN link between %s and %s", a, b)
		}
	}
	for _, p := range pairs {
		for _, r := range w.relays[p] {
			if err := r.SetFaults(f); err != nil {
				return err
			}
		}
	}
	return nil
}

// startGateways starts GatewayReplicas gateways per cluster, with every peer
// reached through the WAN relays, and publishes each cluster's egress
// addresses on its fedmesh-gateway Service for the discovery API.
func startGateways(ctx context.Context, bin string, ms []*member) (*wan, error) {
	type ports struct{ tunnel, egress, admin int }
	alloc := map[string][]ports{}
	for _, m := range ms {
		for range GatewayReplicas {
			var p ports
			var err error
			if p.tunnel, err = freeUDPPort("127.0.0.1"); err != nil {
				return nil, err
			}
			if p.egress, err = freeUDPTCPPort(m.listenAddr()); err != nil {
				return nil, err
			}
			if p.admin, err = controlplane.FreePort("127.0.0.1"); err != nil {
				return nil, err
			}
			alloc[m.state.Name] = append(alloc[m.state.Name], p)
		}
	}
	w := &wan{relays: map[[2]string][]*faultnet.Relay{}}
	for _, from := range ms {
		for _, to := range ms {
			if from == to {
				continue
			}
			for _, p := range alloc[to.state.Name] {
				r, err := faultnet.New("127.0.0.1:0", "127.0.0.1:"+strconv.Itoa(p.tunnel))
				if err != nil {
					w.close()
					return nil, fmt.Errorf("wan relay %s->%s: %w", from.state.Name, to.state.Name, err)
				}
				key := [2]string{from.state.Name, to.state.Name}
				w.relays[key] = append(w.relays[key], r)
			}
		}
	}
	for _, m := range ms {
		var peers []string
		for _, to := range ms {
			if to == m {
				continue
			}
			var addrs []string
			for _, r := range w.relays[[2]string{m.state.Name, to.state.Name}] {
				addrs = append(addrs, r.Addr().String())
			}
			peers = append(peers, "--peer", to.state.Name+"@"+to.state.TrustDomain+"="+strings.Join(addrs, ","))
		}
		var egress []string
		for i, p := range alloc[m.state.Name] {
			g := Gateway{Tunnel: "127.0.0.1:" + strconv.Itoa(p.tunnel), Egress: net.JoinHostPort(m.listenAddr(), strconv.Itoa(p.egress)), Admin: "http://127.0.0.1:" + strconv.Itoa(p.admin)}
			args := append([]string{
				"--cluster", m.state.Name, "--trust-domain", m.state.TrustDomain,
				"--kubeconfig", m.cp.Kubeconfig,
				"--spiffe-socket", "unix://" + filepath.Join(m.dir, "gateway.sock"),
				"--tunnel-addr", g.Tunnel, "--egress-addr", g.Egress, "--admin-addr", strings.TrimPrefix(g.Admin, "http://"),
				"--stateless-reset-key-file", filepath.Join(m.dir, fmt.Sprintf("gateway-%d.resetkey", i)),
			}, peers...)
			proc, err := controlplane.StartProcess(bin, filepath.Join(m.dir, fmt.Sprintf("gateway-%d.log", i)), args...)
			if err != nil {
				w.close()
				return nil, fmt.Errorf("start gateway %d of %s: %w", i, m.state.Name, err)
			}
			m.gateways = append(m.gateways, proc)
			m.gatewayCmds = append(m.gatewayCmds, append([]string{bin}, args...))
			m.state.Gateways = append(m.state.Gateways, g)
			egress = append(egress, g.Egress)
		}
		if err := publishEgress(ctx, m, egress); err != nil {
			w.close()
			return nil, err
		}
	}
	return w, nil
}

// publishEgress writes the fedmesh-gateway Service whose annotation tells
// the discovery API where local sidecars reach their gateway.
func publishEgress(ctx context.Context, m *member, egress []string) error {
	kube, err := kubernetes.NewForConfig(m.cp.Config)
	if err != nil {
		return err
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: federation.GatewayService, Namespace: controlplane.SystemNamespace,
			Annotations: map[string]string{federation.AnnotationEgress: strings.Join(egress, ",")}},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "tunnel", Protocol: corev1.ProtocolUDP, Port: 15443},
			{Name: "egress", Protocol: corev1.ProtocolUDP, Port: 15444},
			{Name: "egress-tcp", Protocol: corev1.ProtocolTCP, Port: 15444},
		}},
	}
	_, err = kube.CoreV1().Services(controlplane.SystemNamespace).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("cluster %s: publish gateway service: %w", m.state.Name, err)
	}
	return nil
}

// GatewayState reads a gateway replica's admin /state.
func GatewayState(ctx context.Context, admin string) (*gateway.State, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, admin+"/state", nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("gateway admin %s: %w", admin, err)
	}
	defer resp.Body.Close()
	var st gateway.State
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		return nil, fmt.Errorf("gateway admin %s: %w", admin, err)
	}
	return &st, nil
}

// waitGateways waits until every replica has a live link to every peer cluster.
func waitGateways(ctx context.Context, ms []*member, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for _, m := range ms {
		for i, g := range m.state.Gateways {
			for {
				st, err := GatewayState(ctx, g.Admin)
				up := 0
				if err == nil {
					for _, c := range st.Clusters {
						if c.Up {
							up++
						}
					}
				}
				if up == len(ms)-1 {
					break
				}
				if m.gateways[i].Exited() {
					return fmt.Errorf("gateway %d of %s exited: %s", i, m.state.Name, m.gateways[i].Tail())
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("gateway %d of %s: %d of %d peer clusters up after %s (%v): %s", i, m.state.Name, up, len(ms)-1, timeout, err, m.gateways[i].Tail())
				}
				select {
				case <-ctx.Done():
					return ctx.Err()
				case <-time.After(50 * time.Millisecond):
				}
			}
		}
	}
	return nil
}
