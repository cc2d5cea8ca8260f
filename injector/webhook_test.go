package injector

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	admregv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"

	"github.com/fedmesh/fedmesh/controlplane"
	"github.com/fedmesh/fedmesh/sidecar/appprobe"
)

// testCA issues serving certificates for 127.0.0.1.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "fedmesh-injector test ca"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue returns PEM cert and key for 127.0.0.1 with the given serial.
func (ca *testCA) issue(t *testing.T, serial int64) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "fedmesh-injector"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
}

// servedSerial dials addr with a fresh TLS handshake and returns the serial
// number of the leaf certificate it serves.
func servedSerial(addr string, roots *x509.CertPool) (int64, error) {
	d := &net.Dialer{Timeout: 2 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", addr, &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"})
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	return conn.ConnectionState().PeerCertificates[0].SerialNumber.Int64(), nil
}

// warnings collects API warnings sent to a client.
type warnings struct {
	mu   sync.Mutex
	msgs []string
}

func (w *warnings) HandleWarningHeader(_ int, _ string, text string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.msgs = append(w.msgs, text)
}

func (w *warnings) take() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	m := w.msgs
	w.msgs = nil
	return m
}

// TestWebhook registers the shipped MutatingWebhookConfiguration
// (clusters/base/injector/webhook.yaml), pointed at an injector on
// 127.0.0.1, with a real kube-apiserver and creates pods through the API.
func TestWebhook(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cp, err := controlplane.Start(ctx, controlplane.Options{Clusters: []string{"east"}})
	if err != nil {
		t.Fatalf("start control plane: %v", err)
	}
	defer cp.Stop()
	cfg := rest.CopyConfig(cp.Cluster("east").Config)
	warn := &warnings{}
	cfg.WarningHandler = warn
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}

	// Serving certificate on disk, injector on a loopback port.
	ca := newTestCA(t)
	roots := x509.NewCertPool()
	roots.AddCert(ca.cert)
	dir := t.TempDir()
	certFile, keyFile := filepath.Join(dir, "tls.crt"), filepath.Join(dir, "tls.key")
	c, k := ca.issue(t, 100)
	if err := os.WriteFile(certFile, c, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, k, 0o600); err != nil {
		t.Fatal(err)
	}
	reg := prometheus.NewRegistry()
	certs, err := NewCertReloader(certFile, keyFile, nil, reg)
	if err != nil {
		t.Fatal(err)
	}
	h, err := New(Options{Config: Config{FailurePolicy: Ignore}, Registry: reg, Recorder: NewEventRecorder(kube, slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	sctx, stop := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- h.Serve(sctx, ln, certs) }()
	defer func() {
		stop()
		if err := <-served; err != nil {
			t.Errorf("serve: %v", err)
		}
	}()

	// The shipped webhook configuration, with the URL and CA of this test.
	raw, err := os.ReadFile("../clusters/base/injector/webhook.yaml")
	if err != nil {
		t.Fatal(err)
	}
	whc := &admregv1.MutatingWebhookConfiguration{}
	if err := yaml.UnmarshalStrict(raw, whc); err != nil {
		t.Fatalf("parse webhook.yaml: %v", err)
	}
	if len(whc.Webhooks) != 2 {
		t.Fatalf("webhook.yaml has %d webhooks, want 2", len(whc.Webhooks))
	}
	url := "https://" + addr + "/mutate"
	fail := admregv1.Fail // an unreachable injector must fail the test, not be ignored
	for i := range whc.Webhooks {
		whc.Webhooks[i].ClientConfig = admregv1.WebhookClientConfig{URL: &url, CABundle: ca.pem}
		whc.Webhooks[i].FailurePolicy = &fail
	}
	if _, err := kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx, whc, metav1.CreateOptions{}); err != nil {
		t.Fatalf("register webhook: %v", err)
	}

	for _, ns := range []*corev1.Namespace{
		{ObjectMeta: metav1.ObjectMeta{Name: "mesh", Labels: map[string]string{LabelInject: "enabled"}}},
		{ObjectMeta: metav1.ObjectMeta{Name: "plain"}},
	} {
		if _, err := kube.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	newPod := func(ns, name string, mod func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "registry.k8s.io/pause:3.10"}}},
		}
		if mod != nil {
			mod(p)
		}
		return p
	}

	// The API server picks the configuration up asynchronously: wait until a
	// dry-run pod comes back injected.
	err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 20*time.Second, true, func(ctx context.Context) (bool, error) {
		got, err := kube.CoreV1().Pods("mesh").Create(ctx, newPod("mesh", "probe", nil), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		return err == nil && got.Annotations[AnnotationInjected] == "true", nil
	})
	if err != nil {
		t.Fatalf("webhook never became active: %v", err)
	}
	injCfg := h.cfg

	withProbes := func(p *corev1.Pod) {
		svc := "echo"
		p.Spec.Containers[0].Ports = []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "grpc", ContainerPort: 9090}}
		p.Spec.Containers[0].ReadinessProbe = &corev1.Probe{
			ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intstr.FromString("http")}},
			PeriodSeconds: 3, FailureThreshold: 5, TimeoutSeconds: 2,
		}
		p.Spec.Containers[0].LivenessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}}}
		p.Spec.Containers[0].StartupProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{GRPC: &corev1.GRPCAction{Port: 9090, Service: &svc}}, FailureThreshold: 30}
		p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "tool", Image: "registry.k8s.io/pause:3.10",
			LivenessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"true"}}}}})
	}
	// checkProbes: the API server stored the rewritten probes (with the
	// timing the pod asked for and its defaults) and the sidecar got the
	// originals.
	checkProbes := func(t *testing.T, got *corev1.Pod) {
		app, tool := got.Spec.Containers[0], got.Spec.Containers[1]
		for _, c := range []struct {
			probe            *corev1.Probe
			path             string
			period, failures int32
		}{
			{app.ReadinessProbe, "/app-health/app/readyz", 3, 5},
			{app.LivenessProbe, "/app-health/app/livez", 10, 3},
			{app.StartupProbe, "/app-health/app/startupz", 10, 30},
		} {
			g := c.probe.HTTPGet
			if g == nil || g.Path != c.path || g.Port.IntValue() != int(injCfg.ProbePort) || g.Scheme != corev1.URISchemeHTTP ||
				c.probe.TCPSocket != nil || c.probe.GRPC != nil || c.probe.PeriodSeconds != c.period || c.probe.FailureThreshold != c.failures {
				t.Errorf("probe %s stored as %+v (%+v)", c.path, c.probe, g)
			}
		}
		if tool.LivenessProbe == nil || tool.LivenessProbe.Exec == nil {
			t.Errorf("exec probe changed: %+v", tool.LivenessProbe)
		}
		want := map[string]appprobe.Probe{
			"/app-health/app/readyz":   {Type: appprobe.HTTP, Port: 8080, Path: "/healthz", Scheme: "HTTP", TimeoutSeconds: 2},
			"/app-health/app/livez":    {Type: appprobe.TCP, Port: 8080, TimeoutSeconds: 1},
			"/app-health/app/startupz": {Type: appprobe.GRPC, Port: 9090, Service: "echo", TimeoutSeconds: 1},
		}
		if d := cmp.Diff(want, sidecarProbes(t, got)); d != "" {
			t.Errorf("the sidecar's probes (-want +got):\n%s", d)
		}
	}

	for _, tc := range []struct {
		name       string
		pod        *corev1.Pod
		wantInject bool
		wantWarn   string
		check      func(*testing.T, *corev1.Pod)
	}{
		{name: "labelled namespace", pod: newPod("mesh", "app", nil), wantInject: true},
		{name: "opted out by label", pod: newPod("mesh", "out-label", func(p *corev1.Pod) { p.Labels = map[string]string{LabelInject: "false"} })},
		{name: "opted out by annotation", pod: newPod("mesh", "out-annotation", func(p *corev1.Pod) { p.Annotations = map[string]string{LabelInject: "false"} })},
		{name: "unlabelled namespace", pod: newPod("plain", "app", nil)},
		{name: "pod opts in", pod: newPod("plain", "in", func(p *corev1.Pod) { p.Labels = map[string]string{LabelInject: "true"} }), wantInject: true},
		{name: "port conflict fails open with a warning", pod: newPod("mesh", "conflict", func(p *corev1.Pod) {
			p.Spec.Containers[0].Ports = []corev1.ContainerPort{{ContainerPort: 15001}}
		}), wantWarn: "NOT injected"},
		{name: "probes rewritten", pod: newPod("mesh", "probes", withProbes), wantInject: true, check: checkProbes},
		{name: "unresolved named probe port fails open with a warning", pod: newPod("mesh", "badprobe", func(p *corev1.Pod) {
			p.Spec.Containers[0].ReadinessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromString("http")}}}
		}), wantWarn: `port "http" is not the name of a port of container app`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			warn.take()
			got, err := kube.CoreV1().Pods(tc.pod.Namespace).Create(ctx, tc.pod, metav1.CreateOptions{})
			if err != nil {
				t.Fatalf("create pod: %v", err)
			}
			if err := checkInjected(got, tc.pod, injCfg); (err == nil) != tc.wantInject {
				t.Fatalf("injected = %v, want %v (%v): %+v", err == nil, tc.wantInject, err, got.Spec)
			}
			if !tc.wantInject && (len(got.Spec.Containers) != 1 || len(got.Spec.InitContainers) != 0 || len(got.Spec.Volumes) != 0) {
				t.Fatalf("pod changed although not injected: %+v", got.Spec)
			}
			if tc.check != nil {
				tc.check(t, got)
			}
			ws := strings.Join(warn.take(), "\n")
			if (tc.wantWarn == "") != (ws == "") || !strings.Contains(ws, tc.wantWarn) {
				t.Fatalf("warnings %q, want %q", ws, tc.wantWarn)
			}
			if tc.wantWarn == "" {
				return
			}
			err = wait.PollUntilContextTimeout(ctx, 100*time.Millisecond, 10*time.Second, true, func(ctx context.Context) (bool, error) {
				evs, err := kube.CoreV1().Events(tc.pod.Namespace).List(ctx, metav1.ListOptions{})
				if err != nil {
					return false, nil
				}
				for _, e := range evs.Items {
					if e.Reason == "InjectionSkipped" && strings.Contains(e.Message, tc.pod.Name) && e.Type == corev1.EventTypeWarning {
						return true, nil
					}
				}
				return false, nil
			})
			if err != nil {
				t.Fatalf("no InjectionSkipped event: %v", err)
			}
		})
	}
	if n := counterValue(t, h.reviews.WithLabelValues("failed_open")); n != 2 {
		t.Errorf("fedmesh_injector_reviews_total{result=failed_open} = %v, want 2", n)
	}

	t.Run("cert rotation drops no request", func(t *testing.T) {
		if s, err := servedSerial(addr, roots); err != nil || s != 100 {
			t.Fatalf("served serial %d, %v; want 100", s, err)
		}
		newCert, newKey := ca.issue(t, 200)
		const creations, handshakes = 30, 30
		var failures []string
		var mu sync.Mutex
		failed := func(f string, a ...any) {
			mu.Lock()
			defer mu.Unlock()
			failures = append(failures, fmt.Sprintf(f, a...))
		}
		var wg sync.WaitGroup
		wg.Go(func() { // pod creations through the API server
			for i := range creations {
				p := newPod("mesh", fmt.Sprintf("rot-%d", i), nil)
				got, err := kube.CoreV1().Pods("mesh").Create(ctx, p, metav1.CreateOptions{})
				if err != nil {
					failed("create %s: %v", p.Name, err)
				} else if err := checkInjected(got, p, injCfg); err != nil {
					failed("pod %s not injected: %v", p.Name, err)
				}
			}
		})
		wg.Go(func() { // fresh handshakes, since the API server reuses its connections
			for i := range handshakes {
				if _, err := servedSerial(addr, roots); err != nil {
					failed("handshake %d: %v", i, err)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
		wg.Go(func() {
			// Rotate mid-way, cert before key, with a gap: for a moment the
			// files do not match and the old pair must keep being served.
			time.Sleep(100 * time.Millisecond)
			if err := os.WriteFile(certFile, newCert, 0o600); err != nil {
				failed("write cert: %v", err)
			}
			time.Sleep(50 * time.Millisecond)
			if err := os.WriteFile(keyFile, newKey, 0o600); err != nil {
				failed("write key: %v", err)
			}
		})
		wg.Wait()
		if len(failures) > 0 {
			t.Fatalf("%d failures during rotation:\n%s", len(failures), strings.Join(failures, "\n"))
		}
		if s, err := servedSerial(addr, roots); err != nil || s != 200 {
			t.Fatalf("after rotation served serial %d, %v; want 200", s, err)
		}
		if n := counterValue(t, certs.reloads.WithLabelValues("ok")); n < 1 {
			t.Errorf("fedmesh_injector_cert_reloads_total{result=ok} = %v, want >= 1", n)
		}
		p := newPod("mesh", "after-rotation", nil)
		got, err := kube.CoreV1().Pods("mesh").Create(ctx, p, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if err := checkInjected(got, p, injCfg); err != nil {
			t.Fatal(err)
		}
	})
}

func counterValue(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	m := &dto.Metric{}
	if err := c.Write(m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
