package federation_test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	mcsv1beta1 "sigs.k8s.io/mcs-api/pkg/apis/v1beta1"
	mcsclient "sigs.k8s.io/mcs-api/pkg/client/clientset/versioned"
	mcsinformers "sigs.k8s.io/mcs-api/pkg/client/informers/externalversions"

	"github.com/fedmesh/fedmesh/controlplane"
)

// benchEnv runs the real fedmesh-controller binary, one process per cluster,
// against its own three control planes, so that RSS is the controller's alone.
type benchEnv struct {
	cp      *controlplane.Federation
	startup time.Duration
	kube    map[string]kubernetes.Interface
	mcs     map[string]mcsclient.Interface
	procs   map[string]*exec.Cmd
	// discovery is each controller's discovery API address (loopback).
	discovery map[string]string
}

var (
	bench     *benchEnv
	benchOnce sync.Once
	benchErr  error
)

func needBench(b *testing.B) *benchEnv {
	b.Helper()
	benchOnce.Do(func() { bench, benchErr = startBench() })
	if benchErr != nil {
		b.Fatal(benchErr)
	}
	return bench
}

func startBench() (*benchEnv, error) {
	dir, err := os.MkdirTemp("", "fedmesh-bench-")
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(dir, "fedmesh-controller")
	build := exec.Command("go", "build", "-tags=grpcnotrace", "-o", bin, "github.com/fedmesh/fedmesh/cmd/fedmesh-controller")
	build.Env = append(os.Environ(), "CGO_ENABLED=0") // as `make build` builds it
	if out, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("build controller: %v\n%s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	cp, err := controlplane.Start(ctx, controlplane.Options{})
	if err != nil {
		return nil, err
	}
	e := &benchEnv{cp: cp, startup: time.Since(start), kube: map[string]kubernetes.Interface{}, mcs: map[string]mcsclient.Interface{},
		procs: map[string]*exec.Cmd{}, discovery: map[string]string{}}
	for _, c := range cp.Clusters {
		e.kube[c.Name] = kubernetes.NewForConfigOrDie(c.Config)
		e.mcs[c.Name] = mcsclient.NewForConfigOrDie(c.Config)
		addr, err := freeLoopbackAddr()
		if err != nil {
			return nil, err
		}
		e.discovery[c.Name] = addr
		args := []string{"--kubeconfig", c.Kubeconfig, "--metrics-addr", "", "--log-level", "warn", "--discovery-addr", addr}
		for _, p := range cp.Clusters {
			if p.Name != c.Name {
				args = append(args, "--peer-kubeconfig", p.Name+"="+p.Kubeconfig)
			}
		}
		cmd := exec.Command(bin, args...)
		logf, err := os.Create(filepath.Join(dir, c.Name+".log"))
		if err != nil {
			return nil, err
		}
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			return nil, err
		}
		e.procs[c.Name] = cmd
	}
	// Each controller leads once its lease names a holder.
	for name, k := range e.kube {
		deadline := time.Now().Add(30 * time.Second)
		for {
			l, err := k.CoordinationV1().Leases(controlplane.SystemNamespace).Get(ctx, "fedmesh-federation-controller", metav1.GetOptions{})
			if err == nil && l.Spec.HolderIdentity != nil && *l.Spec.HolderIdentity != "" {
				break
			}
			if time.Now().After(deadline) {
				e.stop()
				return nil, fmt.Errorf("controller of %s did not lead within 30s (log in %s)", name, dir)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return e, nil
}

func (e *benchEnv) stop() {
	for _, p := range e.procs {
		p.Process.Signal(syscall.SIGTERM)
		p.Wait()
	}
	e.cp.Stop()
}

func (e *benchEnv) namespace(b *testing.B, name string) {
	for _, k := range e.kube {
		if _, err := k.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
}

// arrivals records when each ServiceImport first appears in each cluster.
type arrivals struct {
	mu   sync.Mutex
	seen map[string]map[string]time.Time // name -> cluster -> time
	cond *sync.Cond
	stop context.CancelFunc
}

func (e *benchEnv) watchImports(ns string) *arrivals {
	a := &arrivals{seen: map[string]map[string]time.Time{}}
	a.cond = sync.NewCond(&a.mu)
	ctx, cancel := context.WithCancel(context.Background())
	a.stop = cancel
	for cl, m := range e.mcs {
		f := mcsinformers.NewSharedInformerFactoryWithOptions(m, 0, mcsinformers.WithNamespace(ns))
		inf := f.Multicluster().V1beta1().ServiceImports().Informer()
		inf.AddEventHandler(cache.ResourceEventHandlerFuncs{AddFunc: func(o any) {
			now := time.Now()
			si := o.(*mcsv1beta1.ServiceImport)
			a.mu.Lock()
			if a.seen[si.Name] == nil {
				a.seen[si.Name] = map[string]time.Time{}
			}
			if _, ok := a.seen[si.Name][cl]; !ok {
				a.seen[si.Name][cl] = now
			}
			a.cond.Broadcast()
			a.mu.Unlock()
		}})
		f.Start(ctx.Done())
		f.WaitForCacheSync(ctx.Done())
	}
	return a
}

// waitAll blocks until the names are present in n clusters; it returns the
// latest arrival time of each name.
func (a *arrivals) waitAll(names []string, n int, timeout time.Duration) (map[string]time.Time, error) {
	deadline := time.Now().Add(timeout)
	timer := time.AfterFunc(timeout, func() { a.mu.Lock(); a.cond.Broadcast(); a.mu.Unlock() })
	defer timer.Stop()
	a.mu.Lock()
	defer a.mu.Unlock()
	for {
		out := map[string]time.Time{}
		for _, nm := range names {
			if len(a.seen[nm]) < n {
				break
			}
			var last time.Time
			for _, t := range a.seen[nm] {
				if t.After(last) {
					last = t
				}
			}
			out[nm] = last
		}
		if len(out) == len(names) {
			return out, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%d of %d imports present in all %d clusters after %s", len(out), len(names), n, timeout)
		}
		a.cond.Wait()
	}
}

func percentile(d []time.Duration, p float64) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(p*float64(len(s))+0.5) - 1
	return s[max(0, min(i, len(s)-1))]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// BenchmarkControlPlaneStart reports how long three real control planes took
// to become ready (binaries cached).
func BenchmarkControlPlaneStart(b *testing.B) {
	e := needBench(b)
	for b.Loop() {
	}
	b.ReportMetric(e.startup.Seconds(), "s")
}

// BenchmarkExportToImport: ServiceExport created in east until the
// ServiceImport exists in all three clusters, over 100 exports.
func BenchmarkExportToImport(b *testing.B) {
	e := needBench(b)
	ns := "bench-export"
	e.namespace(b, ns)
	a := e.watchImports(ns)
	defer a.stop()
	const n = 100
	var lat []time.Duration
	for b.Loop() {
		lat = lat[:0]
		for i := range n {
			name := fmt.Sprintf("svc-%d-%d", b.N, i)
			if _, err := e.kube["east"].CoreV1().Services(ns).Create(context.Background(), &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: name},
				Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
			}, metav1.CreateOptions{}); err != nil {
				b.Fatal(err)
			}
			start := time.Now()
			if _, err := e.mcs["east"].MulticlusterV1beta1().ServiceExports(ns).Create(context.Background(),
				&mcsv1beta1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
				b.Fatal(err)
			}
			got, err := a.waitAll([]string{name}, 3, 10*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			lat = append(lat, got[name].Sub(start))
		}
	}
	b.ReportMetric(ms(percentile(lat, 0.5)), "p50-ms")
	b.ReportMetric(ms(percentile(lat, 0.99)), "p99-ms")
}

// BenchmarkEndpointFlip: one endpoint's readiness flipped in east until both
// peers' mirrored EndpointSlices show it, over 100 flips.
func BenchmarkEndpointFlip(b *testing.B) {
	e := needBench(b)
	ctx := context.Background()
	ns := "bench-flip"
	e.namespace(b, ns)
	if _, err := e.kube["east"].CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "flip"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
	}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	slice := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "flip-1", Labels: map[string]string{discoveryv1.LabelServiceName: "flip"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: new("http"), Port: new(int32(8080))}},
	}
	for i := range 10 {
		slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
			Addresses: []string{fmt.Sprintf("10.1.0.%d", i+1)}, Conditions: discoveryv1.EndpointConditions{Ready: new(true)}})
	}
	slice, err := e.kube["east"].DiscoveryV1().EndpointSlices(ns).Create(ctx, slice, metav1.CreateOptions{})
	if err != nil {
		b.Fatal(err)
	}
	if _, err := e.mcs["east"].MulticlusterV1beta1().ServiceExports(ns).Create(ctx,
		&mcsv1beta1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: "flip"}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}

	// Watch the mirrored slices in the peers; signal each observed state.
	type obs struct {
		cluster string
		ready   bool
		at      time.Time
	}
	seen := make(chan obs, 1024)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, cl := range []string{"west", "north"} {
		f := informers.NewSharedInformerFactoryWithOptions(e.kube[cl], 0, informers.WithNamespace(ns),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) { o.LabelSelector = mcsv1beta1.LabelServiceName + "=flip" }))
		report := func(o any) {
			s := o.(*discoveryv1.EndpointSlice)
			if len(s.Endpoints) > 0 && s.Endpoints[0].Conditions.Ready != nil {
				seen <- obs{cl, *s.Endpoints[0].Conditions.Ready, time.Now()}
			}
		}
		f.Discovery().V1().EndpointSlices().Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: report, UpdateFunc: func(_, o any) { report(o) }})
		f.Start(wctx.Done())
	}
	waitState := func(ready bool, timeout time.Duration) (time.Time, error) {
		got := map[string]time.Time{}
		deadline := time.After(timeout)
		for len(got) < 2 {
			select {
			case o := <-seen:
				if o.ready == ready {
					got[o.cluster] = o.at
				} else {
					delete(got, o.cluster)
				}
			case <-deadline:
				return time.Time{}, fmt.Errorf("peers did not show ready=%v within %s (%d of 2)", ready, timeout, len(got))
			}
		}
		if got["west"].After(got["north"]) {
			return got["west"], nil
		}
		return got["north"], nil
	}
	if _, err := waitState(true, 15*time.Second); err != nil {
		b.Fatal(err)
	}

	const n = 100
	var lat []time.Duration
	for b.Loop() {
		lat = lat[:0]
		ready := true
		for range n {
			ready = !ready
			slice.Endpoints[0].Conditions.Ready = new(ready)
			start := time.Now()
			if slice, err = e.kube["east"].DiscoveryV1().EndpointSlices(ns).Update(ctx, slice, metav1.UpdateOptions{}); err != nil {
				b.Fatal(err)
			}
			at, err := waitState(ready, 10*time.Second)
			if err != nil {
				b.Fatal(err)
			}
			lat = append(lat, at.Sub(start))
		}
	}
	b.ReportMetric(ms(percentile(lat, 0.5)), "p50-ms")
	b.ReportMetric(ms(percentile(lat, 0.99)), "p99-ms")
}

// BenchmarkConverge1000 exports 1,000 existing Services, spread over the
// three clusters, and reports the time from the first ServiceExport create
// until every ServiceImport exists in every cluster and every export is
// Ready; then the controllers' peak RSS.
func BenchmarkConverge1000(b *testing.B) {
	e := needBench(b)
	ctx := context.Background()
	const n = 1000
	var took time.Duration
	for b.Loop() {
		ns := fmt.Sprintf("bench-1000-%d", b.N)
		e.namespace(b, ns)
		a := e.watchImports(ns)
		names := make([]string, n)
		for i := range names {
			names[i] = fmt.Sprintf("s%04d", i)
		}
		clusters := []string{"east", "west", "north"}
		// The Services exist before the export (not timed), as when a team
		// exports services it already runs.
		createAll := func(mk func(cl, name string) error) error {
			var wg sync.WaitGroup
			errs := make(chan error, 8)
			for w := range 8 {
				wg.Go(func() {
					for i := w; i < n; i += 8 {
						if err := mk(clusters[i%3], names[i]); err != nil {
							errs <- err
							return
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			return <-errs
		}
		if err := createAll(func(cl, name string) error {
			_, err := e.kube[cl].CoreV1().Services(ns).Create(ctx, &corev1.Service{
				ObjectMeta: metav1.ObjectMeta{Name: name},
				Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{{Name: "http", Port: 80}}},
			}, metav1.CreateOptions{})
			return err
		}); err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		if err := createAll(func(cl, name string) error {
			_, err := e.mcs[cl].MulticlusterV1beta1().ServiceExports(ns).Create(ctx,
				&mcsv1beta1.ServiceExport{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
			return err
		}); err != nil {
			b.Fatal(err)
		}
		created := time.Since(start)
		if _, err := a.waitAll(names, 3, 3*time.Minute); err != nil {
			b.Fatal(err)
		}
		b.Logf("exports created in %s, imports everywhere after %s", created.Round(time.Millisecond), time.Since(start).Round(time.Millisecond))
		// Every export carries Ready=True.
		deadline := time.Now().Add(3 * time.Minute)
		for {
			ready := 0
			for _, cl := range clusters {
				l, err := e.mcs[cl].MulticlusterV1beta1().ServiceExports(ns).List(ctx, metav1.ListOptions{})
				if err != nil {
					b.Fatal(err)
				}
				for _, se := range l.Items {
					if meta.IsStatusConditionTrue(se.Status.Conditions, "Ready") {
						ready++
					}
				}
			}
			if ready == n {
				break
			}
			if time.Now().After(deadline) {
				b.Fatalf("%d of %d exports Ready", ready, n)
			}
			time.Sleep(20 * time.Millisecond)
		}
		took = time.Since(start)
		a.stop()
	}
	b.ReportMetric(took.Seconds(), "s")
	var peak float64
	for _, p := range e.procs {
		if kb, err := vmHWM(p.Process.Pid); err == nil {
			peak = max(peak, float64(kb)/1024)
		} else {
			b.Fatal(err)
		}
	}
	b.ReportMetric(peak, "peak-RSS-MB")
}

// vmHWM is a process's peak resident set size in KiB.
func vmHWM(pid int) (int, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			return strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")))
		}
	}
	return 0, fmt.Errorf("no VmHWM in /proc/%d/status", pid)
}
