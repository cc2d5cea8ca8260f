package injector

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// EventRecorder writes core/v1 Events about the namespace a pod is admitted
// to, so that `kubectl get events -n NS` says why a pod has no sidecar.
type EventRecorder struct {
	kube kubernetes.Interface
	log  *slog.Logger
	// Source names the reporting component.
	Source string
}

var _ Recorder = (*EventRecorder)(nil)

// NewEventRecorder returns a recorder that writes through kube.
func NewEventRecorder(kube kubernetes.Interface, log *slog.Logger) *EventRecorder {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &EventRecorder{kube: kube, log: log, Source: "fedmesh-injector"}
}

// Eventf writes the event in the background, so that the admission answer
// never waits on it; a failure is logged.
func (r *EventRecorder) Eventf(namespace, eventType, reason, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	now := metav1.Now()
	ev := &corev1.Event{
		ObjectMeta: metav1.ObjectMeta{GenerateName: "fedmesh-injector.", Namespace: namespace},
		InvolvedObject: corev1.ObjectReference{
			APIVersion: "v1", Kind: "Namespace", Name: namespace, Namespace: namespace,
		},
		Reason: reason, Message: msg, Type: eventType,
		Source:         corev1.EventSource{Component: r.Source},
		FirstTimestamp: now, LastTimestamp: now, Count: 1,
		ReportingController: "fedmesh.dev/" + r.Source,
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if _, err := r.kube.CoreV1().Events(namespace).Create(ctx, ev, metav1.CreateOptions{}); err != nil {
			r.log.Warn("write event", "namespace", namespace, "reason", reason, "err", err)
		}
	}()
}
