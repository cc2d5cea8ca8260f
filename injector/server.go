package injector

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// Recorder emits a Kubernetes Event; the command passes one backed by the
// API, tests may pass nil.
type Recorder interface {
	// Eventf records an event about the namespace a pod is created in (the
	// pod has no UID yet during admission).
	Eventf(namespace, eventType, reason, format string, args ...any)
}

// Options configures a Handler.
type Options struct {
	Config   Config
	Logger   *slog.Logger          // default discards
	Registry prometheus.Registerer // default: metrics are not registered
	Recorder Recorder              // default: no events
}

// Handler serves AdmissionReview requests on /mutate.
type Handler struct {
	cfg     Config
	log     *slog.Logger
	rec     Recorder
	reviews *prometheus.CounterVec
	latency prometheus.Histogram
}

// maxBody bounds an AdmissionReview; the API server's own limit on objects is 3 MiB.
const maxBody = 4 << 20

// New returns a Handler.
func New(o Options) (*Handler, error) {
	if err := o.Config.Validate(); err != nil {
		return nil, err
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	h := &Handler{
		cfg: o.Config,
		log: o.Logger,
		rec: o.Recorder,
		reviews: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_injector_reviews_total",
			Help: "Admission reviews answered, by result (injected, opted_out, already_injected, failed_open, denied, bad_request).",
		}, []string{"result"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "fedmesh_injector_review_duration_seconds",
			Help:    "Time to answer one admission review.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 4, 8),
		}),
	}
	if o.Registry != nil {
		for _, c := range []prometheus.Collector{h.reviews, h.latency} {
			if err := o.Registry.Register(c); err != nil {
				return nil, fmt.Errorf("register injector metrics: %w", err)
			}
		}
	}
	return h, nil
}

// ServeHTTP answers one AdmissionReview.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	defer func() { h.latency.Observe(time.Since(start).Seconds()) }()
	if r.Method != http.MethodPost {
		h.reviews.WithLabelValues("bad_request").Inc()
		http.Error(w, "want POST", http.StatusMethodNotAllowed)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil || len(body) > maxBody {
		h.reviews.WithLabelValues("bad_request").Inc()
		http.Error(w, "read admission review: body unreadable or too large", http.StatusBadRequest)
		return
	}
	var review admissionv1.AdmissionReview
	if err := json.Unmarshal(body, &review); err != nil || review.Request == nil {
		h.reviews.WithLabelValues("bad_request").Inc()
		http.Error(w, "decode admission review: no request", http.StatusBadRequest)
		return
	}
	resp, result := h.review(review.Request)
	h.reviews.WithLabelValues(result).Inc()
	resp.UID = review.Request.UID
	out := admissionv1.AdmissionReview{TypeMeta: review.TypeMeta, Response: resp}
	if out.APIVersion == "" {
		out.APIVersion, out.Kind = "admission.k8s.io/v1", "AdmissionReview"
	}
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(out); err != nil {
		h.log.Warn("write admission response", "err", err)
	}
}

// review decides one request and returns the response and its metric label.
func (h *Handler) review(req *admissionv1.AdmissionRequest) (*admissionv1.AdmissionResponse, string) {
	allow := &admissionv1.AdmissionResponse{Allowed: true}
	if req.Kind.Kind != "Pod" || req.Operation != admissionv1.Create {
		return allow, "bad_request"
	}
	var pod corev1.Pod
	if err := json.Unmarshal(req.Object.Raw, &pod); err != nil {
		return h.failure(req, fmt.Errorf("decode pod: %w", err))
	}
	ok, why := decide(&pod)
	if !ok {
		return allow, string(why)
	}
	patch, err := h.cfg.Patch(&pod)
	if err != nil {
		return h.failure(req, err)
	}
	pt := admissionv1.PatchTypeJSONPatch
	allow.Patch, allow.PatchType = patch, &pt
	h.log.Debug("injected sidecar", "namespace", req.Namespace, "pod", podName(req, &pod))
	return allow, string(Injected)
}

// failure applies the failure policy to a pod that cannot be injected.
func (h *Handler) failure(req *admissionv1.AdmissionRequest, err error) (*admissionv1.AdmissionResponse, string) {
	name := req.Name
	if name == "" {
		name = "(generated name)"
	}
	dry := req.DryRun != nil && *req.DryRun
	if h.cfg.FailurePolicy == Fail {
		msg := fmt.Sprintf("fedmesh sidecar injection failed for pod %s/%s and the injector fails closed: %v; fix the pod or opt out with %s: \"false\"", req.Namespace, name, err, LabelInject)
		h.log.Warn("denied pod", "namespace", req.Namespace, "pod", name, "err", err)
		if h.rec != nil && !dry {
			h.rec.Eventf(req.Namespace, corev1.EventTypeWarning, "InjectionDenied", "%s", msg)
		}
		return &admissionv1.AdmissionResponse{Allowed: false, Result: &metav1.Status{
			Status: metav1.StatusFailure, Code: http.StatusForbidden, Reason: metav1.StatusReasonForbidden, Message: msg,
		}}, "denied"
	}
	msg := fmt.Sprintf("fedmesh sidecar NOT injected into pod %s/%s (the injector fails open): %v; the pod runs outside the mesh", req.Namespace, name, err)
	h.log.Warn("admitted pod without sidecar", "namespace", req.Namespace, "pod", name, "err", err)
	if h.rec != nil && !dry {
		h.rec.Eventf(req.Namespace, corev1.EventTypeWarning, "InjectionSkipped", "%s", msg)
	}
	return &admissionv1.AdmissionResponse{Allowed: true, Warnings: []string{msg}}, "failed_open"
}

func podName(req *admissionv1.AdmissionRequest, pod *corev1.Pod) string {
	if req.Name != "" {
		return req.Name
	}
	return pod.GenerateName + "*"
}

// Serve serves /mutate and /healthz over TLS on ln until ctx ends, taking
// its serving certificate from certs on every handshake.
func (h *Handler) Serve(ctx context.Context, ln net.Listener, certs *CertReloader) error {
	mux := http.NewServeMux()
	mux.Handle("/mutate", h)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { fmt.Fprintln(w, "ok") })
	srv := &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       10 * time.Second,
		WriteTimeout:      10 * time.Second,
		TLSConfig:         certs.TLSConfig(),
		ErrorLog:          slog.NewLogLogger(h.log.Handler(), slog.LevelDebug),
	}
	ctx, stop := context.WithCancel(ctx)
	defer stop()
	done := make(chan struct{})
	go func() {
		defer close(done)
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	err := srv.ServeTLS(ln, "", "")
	stop()
	<-done
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("serve injector: %w", err)
}
