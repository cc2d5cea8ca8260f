package injector

import (
	"crypto/tls"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// CertReloader serves the key pair in two files and picks up a new pair as
// soon as the files change, so rotating the serving certificate (a Secret
// volume update, cert-manager) needs no restart and drops no handshake. A
// half-written pair (new cert, old key) fails to load and the previous pair
// keeps being served until the files agree again.
type CertReloader struct {
	certFile, keyFile string
	log               *slog.Logger
	reloads           *prometheus.CounterVec

	mu    sync.Mutex
	stamp [2]fileStamp
	cert  *tls.Certificate
}

type fileStamp struct {
	mod  time.Time
	size int64
}

// NewCertReloader loads the pair once; it fails if the first load does.
// reg may be nil.
func NewCertReloader(certFile, keyFile string, log *slog.Logger, reg prometheus.Registerer) (*CertReloader, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &CertReloader{certFile: certFile, keyFile: keyFile, log: log,
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "fedmesh_injector_cert_reloads_total",
			Help: "Serving certificate reloads after the files changed, by result (ok, error).",
		}, []string{"result"}),
	}
	if reg != nil {
		if err := reg.Register(r.reloads); err != nil {
			return nil, fmt.Errorf("register cert reload metric: %w", err)
		}
	}
	if _, err := r.current(); err != nil {
		return nil, err
	}
	return r, nil
}

// GetCertificate is for tls.Config.GetCertificate.
func (r *CertReloader) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	return r.current()
}

// TLSConfig returns a server config that serves the current pair.
func (r *CertReloader) TLSConfig() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: r.GetCertificate}
}

// current returns the pair, reloading it first if either file changed.
// Checking on each handshake costs two stat calls and needs no watcher
// goroutine; the API server reuses connections, so handshakes are rare.
func (r *CertReloader) current() (*tls.Certificate, error) {
	var now [2]fileStamp
	for i, f := range []string{r.certFile, r.keyFile} {
		fi, err := os.Stat(f)
		if err != nil {
			return r.keep(fmt.Errorf("stat %s: %w", f, err))
		}
		now[i] = fileStamp{fi.ModTime(), fi.Size()}
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cert != nil && now == r.stamp {
		return r.cert, nil
	}
	cert, err := tls.LoadX509KeyPair(r.certFile, r.keyFile)
	if err != nil {
		r.reloads.WithLabelValues("error").Inc()
		if r.cert == nil {
			return nil, fmt.Errorf("load serving certificate: %w", err)
		}
		// Keep serving the old pair; the stamp is not updated, so the next
		// handshake tries again.
		r.log.Warn("serving certificate changed but does not load; keeping the previous one", "err", err)
		return r.cert, nil
	}
	if r.cert != nil {
		r.reloads.WithLabelValues("ok").Inc()
		r.log.Info("reloaded serving certificate", "cert", r.certFile)
	}
	r.cert, r.stamp = &cert, now
	return r.cert, nil
}

func (r *CertReloader) keep(err error) (*tls.Certificate, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.cert == nil {
		return nil, fmt.Errorf("load serving certificate: %w", err)
	}
	r.log.Warn("serving certificate unreadable; keeping the previous one", "err", err)
	return r.cert, nil
}
