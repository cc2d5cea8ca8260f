package issuer

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// errorRetry caps the wait before re-fetching a peer's bundle after a failed
// fetch, whatever the refresh hint says.
const errorRetry = 10 * time.Second

func checkHTTPSURL(s string) error {
	u, err := url.Parse(s)
	if err != nil {
		return fmt.Errorf("bundle endpoint url: %w", err)
	}
	if u.Scheme != "https" || u.Host == "" {
		return fmt.Errorf("bundle endpoint url %q: want an https://host:port URL", s)
	}
	return nil
}

// peerBundlePath is where the last bundle fetched from a peer is kept, so a
// restart resumes from it rather than from a possibly stale bootstrap file.
func (i *Issuer) peerBundlePath(td spiffeid.TrustDomain) string {
	return filepath.Join(i.cfg.DataDir, "federated", td.Name()+".json")
}

// loadPeerBundle returns the bundle that authenticates the first fetch from
// a peer: the newer (by sequence number) of the bootstrap file and the bundle
// kept from an earlier run. With neither there is no way to authenticate the
// peer, and the issuer refuses to start rather than trust on first use.
func (i *Issuer) loadPeerBundle(p Peer) (*spiffebundle.Bundle, error) {
	var boot, kept *spiffebundle.Bundle
	if p.BundleFile != "" {
		b, err := spiffebundle.Load(p.TrustDomain, p.BundleFile)
		if err != nil {
			return nil, fmt.Errorf("load bootstrap bundle of %s from %s: %w", p.TrustDomain, p.BundleFile, err)
		}
		boot = b
	}
	switch b, err := spiffebundle.Load(p.TrustDomain, i.peerBundlePath(p.TrustDomain)); {
	case err == nil:
		kept = b
	case !errors.Is(err, os.ErrNotExist):
		i.log.Warn("ignoring unreadable kept bundle", "trust_domain", p.TrustDomain.Name(), "error", err)
	}
	b := boot
	if kept != nil && (boot == nil || seq(kept) >= seq(boot)) {
		b = kept
	}
	if b == nil {
		return nil, fmt.Errorf("federated peer %s: no bootstrap bundle file and none kept in %s; get the peer's bundle out of band (its data dir's %s, or `spire-server bundle show -format spiffe`)",
			p.TrustDomain, i.cfg.DataDir, bundleFile)
	}
	if len(b.X509Authorities()) == 0 {
		return nil, fmt.Errorf("federated peer %s: bundle has no X.509 authorities", p.TrustDomain)
	}
	return b, nil
}

func seq(b *spiffebundle.Bundle) uint64 {
	n, _ := b.SequenceNumber()
	return n
}

// startBundleEndpoint serves the trust domain's bundle over HTTPS, presenting
// the issuer's own SVID (https_spiffe profile).
func (i *Issuer) startBundleEndpoint() error {
	ln := i.cfg.BundleEndpointListener
	if ln == nil {
		if i.cfg.BundleEndpointAddr == "" {
			return nil
		}
		var err error
		if ln, err = net.Listen("tcp", i.cfg.BundleEndpointAddr); err != nil {
			return fmt.Errorf("listen for bundle endpoint on %s: %w", i.cfg.BundleEndpointAddr, err)
		}
	}
	// Issue the endpoint's SVID up front so the first handshake cannot fail.
	if _, err := i.svidFor(i.endpoint); err != nil {
		ln.Close()
		return fmt.Errorf("issue bundle endpoint svid: %w", err)
	}
	handler, err := federation.NewHandler(i.cfg.TrustDomain, bundleSource{i})
	if err != nil {
		ln.Close()
		return fmt.Errorf("bundle endpoint handler: %w", err)
	}
	i.httpLn = ln
	i.http = &http.Server{
		Handler:           handler,
		TLSConfig:         tlsconfig.TLSServerConfig(endpointSVID{i}),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          slog.NewLogLogger(i.log.Handler(), slog.LevelWarn),
	}
	// Peers fetch every few minutes: keeping connections open buys nothing,
	// so serve HTTP/1.1 only and close each connection after its response.
	i.http.Protocols = new(http.Protocols)
	i.http.Protocols.SetHTTP1(true)
	i.http.SetKeepAlivesEnabled(false)
	i.wg.Add(1)
	go func() {
		defer i.wg.Done()
		if err := i.http.ServeTLS(ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			i.log.Error("bundle endpoint stopped", "error", err)
		}
	}()
	return nil
}

// bundleSource serves the trust domain's own current bundle.
type bundleSource struct{ i *Issuer }

func (s bundleSource) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	if td != s.i.cfg.TrustDomain {
		return nil, fmt.Errorf("no bundle for trust domain %s", td)
	}
	return s.i.Bundle(), nil
}

// endpointSVID is the bundle endpoint's current SVID, renewed like any other.
type endpointSVID struct{ i *Issuer }

func (s endpointSVID) GetX509SVID() (*x509svid.SVID, error) {
	m, err := s.i.svidFor(s.i.endpoint)
	if err != nil {
		return nil, err
	}
	return m.svid, nil
}

// peerBundles authenticates a peer's bundle endpoint with the bundle we
// currently hold for that peer, so each authenticated fetch can carry the
// peer across its next CA rotation.
type peerBundles struct{ i *Issuer }

func (s peerBundles) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b, err := s.get(td)
	if err != nil {
		return nil, err
	}
	return b.X509Bundle(), nil
}

func (s peerBundles) get(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	s.i.mu.Lock()
	defer s.i.mu.Unlock()
	b := s.i.peers[td]
	if b == nil {
		return nil, fmt.Errorf("no bundle held for trust domain %s", td)
	}
	return b, nil
}

// watchPeer keeps one peer's bundle fresh until ctx ends.
func (i *Issuer) watchPeer(ctx context.Context, p Peer) {
	w := &peerWatcher{i: i, peer: p}
	err := federation.WatchBundle(ctx, p.TrustDomain, p.BundleEndpointURL, w,
		federation.WithSPIFFEAuth(peerBundles{i}, p.EndpointID))
	if err != nil && ctx.Err() == nil {
		i.log.Error("federated bundle watch ended", "trust_domain", p.TrustDomain.Name(), "error", err)
	}
}

// peerWatcher is go-spiffe's federation.BundleWatcher for one peer. Its
// methods are called from the single watch goroutine, in order.
type peerWatcher struct {
	i      *Issuer
	peer   Peer
	result string // outcome of the fetch just made: updated, error or ""
}

var _ federation.BundleWatcher = (*peerWatcher)(nil)

// NextRefresh honours the peer's refresh hint, bounded below so a peer
// cannot make us spin and capped after errors so we recover quickly.
func (w *peerWatcher) NextRefresh(hint time.Duration) time.Duration {
	result := w.result
	if result == "" {
		result = "unchanged"
	}
	w.i.metrics.peerFetches.WithLabelValues(w.peer.TrustDomain.Name(), result).Inc()
	d := hint
	if d == 0 {
		// Nothing fetched yet (or no hint in it): use the hint of the
		// bundle we hold, i.e. the bootstrap one.
		if b, err := (peerBundles{w.i}).get(w.peer.TrustDomain); err == nil {
			d, _ = b.RefreshHint()
		}
	}
	if d == 0 {
		d = DefaultRefreshHint
	}
	if w.result == "error" && d > errorRetry {
		d = errorRetry
	}
	w.result = ""
	w.i.log.Debug("next refresh", "hint", hint, "d", d)
	return max(d, w.i.cfg.minRefresh)
}

func (w *peerWatcher) OnUpdate(b *spiffebundle.Bundle) {
	if len(b.X509Authorities()) == 0 {
		w.result = "error"
		w.i.log.Warn("rejected federated bundle without X.509 authorities", "trust_domain", w.peer.TrustDomain.Name())
		return
	}
	w.result = "updated"
	// Keep it on disk first: once it is served, a restart must resume
	// from it, not from an older one.
	if err := w.keep(b); err != nil {
		w.i.log.Warn("could not keep federated bundle on disk", "trust_domain", w.peer.TrustDomain.Name(), "error", err)
	}
	w.i.mu.Lock()
	w.i.peers[w.peer.TrustDomain] = b
	for s := range w.i.allSubs {
		s.wake()
	}
	w.i.mu.Unlock()
	w.i.log.Info("federated bundle updated", "trust_domain", w.peer.TrustDomain.Name(),
		"sequence", seq(b), "x509_authorities", len(b.X509Authorities()))
}

func (w *peerWatcher) keep(b *spiffebundle.Bundle) error {
	data, err := b.Marshal()
	if err != nil {
		return fmt.Errorf("marshal bundle: %w", err)
	}
	path := w.i.peerBundlePath(w.peer.TrustDomain)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("create %s: %w", filepath.Dir(path), err)
	}
	return writeFileAtomic(path, data, 0o644)
}

func (w *peerWatcher) OnError(err error) {
	w.result = "error"
	w.i.log.Warn("fetch federated bundle failed", "trust_domain", w.peer.TrustDomain.Name(),
		"url", w.peer.BundleEndpointURL, "error", err)
}
