// Package workload is fedmesh's client of the SPIFFE Workload API: an
// X509Source that streams the workload's X.509-SVID and trust bundles
// (FetchX509SVID) and keeps them current as they rotate.
//
// It exists instead of go-spiffe's workloadapi because that package brings
// grpc-go and the protobuf runtime, about 4 MB of code, into every sidecar's
// resident set, while this needs one server-streaming call: it speaks the
// Workload API's gRPC wire protocol with net/http's HTTP/2 (internal/grpclite)
// and decodes the two messages by hand (internal/pbwire). What it returns is
// go-spiffe's own types (x509svid.SVID, x509bundle.Bundle), checked by
// go-spiffe's parsers, so go-spiffe's tlsconfig verifies peers as before.
// It follows go-spiffe's semantics: the first SVID of a response is the
// workload's; each SVID's bundle is its trust domain's and the federated
// bundles are added; a response that does not parse keeps the last good one.
// The tests check it against fedmesh's issuer and go-spiffe's own client.
package workload

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/fedmesh/fedmesh/internal/grpclite"
	"github.com/fedmesh/fedmesh/internal/pbwire"
)

const (
	fetchX509SVID = "/SpiffeWorkloadAPI/FetchX509SVID"
	// maxResponse bounds one X509SVIDResponse (grpc-go's default is 4 MiB;
	// many federated bundles may need more).
	maxResponse = 16 << 20
	minBackoff  = 100 * time.Millisecond
	maxBackoff  = 5 * time.Second
)

// securityHeader is the metadata every Workload API call must carry.
var securityHeader = map[string]string{"workload.spiffe.io": "true"}

// X509Source is the workload's current X.509-SVID and bundles. It
// implements go-spiffe's x509svid.Source and x509bundle.Source.
type X509Source struct {
	client *grpclite.Client
	cancel context.CancelFunc
	done   chan struct{}

	mu      sync.RWMutex
	svid    *x509svid.SVID
	bundles *x509bundle.Set
	lastErr error // the last watch or parse error, for NewX509Source's message
	closed  bool
	first   chan struct{} // closed at the first good response
	fatal   chan error    // the watch gave up (InvalidArgument) before that
}

var (
	_ x509svid.Source   = (*X509Source)(nil)
	_ x509bundle.Source = (*X509Source)(nil)
)

// NewX509Source connects to the Workload API at addr (unix:///path,
// unix:path or tcp://host:port) and waits, until ctx ends, for the first
// SVID. It then keeps watching, reconnecting with jittered backoff, until
// Close.
func NewX509Source(ctx context.Context, addr string) (*X509Source, error) {
	target, err := parseAddr(addr)
	if err != nil {
		return nil, err
	}
	client, err := grpclite.New(target, nil)
	if err != nil {
		return nil, err
	}
	wctx, cancel := context.WithCancel(context.Background())
	s := &X509Source{client: client, cancel: cancel, done: make(chan struct{}), first: make(chan struct{}), fatal: make(chan error, 1)}
	go s.watch(wctx)
	select {
	case <-s.first:
		return s, nil
	case err := <-s.fatal:
		s.Close()
		return nil, err
	case <-ctx.Done():
		s.mu.RLock()
		last := s.lastErr
		s.mu.RUnlock()
		s.Close()
		if last != nil {
			return nil, fmt.Errorf("no X.509-SVID from the workload api at %s (%w); last error: %w", addr, ctx.Err(), last)
		}
		return nil, fmt.Errorf("no X.509-SVID from the workload api at %s (%w)", addr, ctx.Err())
	}
}

// parseAddr checks a Workload API address as the SPIFFE spec writes it.
func parseAddr(addr string) (string, error) {
	switch {
	case strings.HasPrefix(addr, "unix:"):
		return addr, nil
	case strings.HasPrefix(addr, "tcp://"):
		return strings.TrimPrefix(addr, "tcp://"), nil
	}
	return "", fmt.Errorf("workload api address %q: want unix:///path/to.sock or tcp://host:port", addr)
}

// GetX509SVID is the workload's current SVID.
func (s *X509Source) GetX509SVID() (*x509svid.SVID, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return nil, errors.New("workload api source is closed")
	}
	return s.svid, nil
}

// GetX509BundleForTrustDomain is the current bundle of td: the own trust
// domain's or a federated one's.
func (s *X509Source) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.closed {
		return nil, errors.New("workload api source is closed")
	}
	return s.bundles.GetX509BundleForTrustDomain(td)
}

// Close stops watching. The source answers errors afterwards.
func (s *X509Source) Close() error {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
	s.cancel()
	<-s.done
	s.client.Close()
	return nil
}

func (s *X509Source) watch(ctx context.Context) {
	defer close(s.done)
	backoff := minBackoff
	for {
		got, err := s.stream(ctx)
		if ctx.Err() != nil {
			return
		}
		if grpclite.CodeOf(err) == grpclite.InvalidArgument {
			// The server says the call itself is wrong: retrying cannot help
			// (go-spiffe gives up on it too).
			s.fail(err)
			return
		}
		s.setErr(err)
		if got {
			backoff = minBackoff
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff/2 + rand.N(backoff/2+1)):
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

// stream runs one FetchX509SVID call; it reports whether a good response
// arrived.
func (s *X509Source) stream(ctx context.Context) (bool, error) {
	st, err := s.client.ServerStream(ctx, fetchX509SVID, securityHeader, nil) // X509SVIDRequest{} is empty
	if err != nil {
		return false, err
	}
	defer st.Close()
	got := false
	for {
		msg, err := st.Recv(maxResponse)
		if err == io.EOF {
			return got, errors.New("workload api ended the stream")
		}
		if err != nil {
			return got, err
		}
		svid, bundles, err := parseResponse(msg)
		if err != nil {
			s.setErr(err) // keep the last good identity
			continue
		}
		got = true
		s.mu.Lock()
		s.svid, s.bundles, s.lastErr = svid, bundles, nil
		s.mu.Unlock()
		select {
		case <-s.first:
		default:
			close(s.first)
		}
	}
}

func (s *X509Source) setErr(err error) {
	s.mu.Lock()
	s.lastErr = err
	s.mu.Unlock()
}

func (s *X509Source) fail(err error) {
	select {
	case <-s.first: // already serving: keep the identity it has
		s.setErr(err)
	default:
		s.fatal <- err
	}
}

// rawSVID is one X509SVID message.
type rawSVID struct {
	id, hint   string
	certs, key []byte
	bundle     []byte
}

// parseResponse decodes an X509SVIDResponse (spiffe/workload.proto):
//
//	repeated X509SVID svids = 1;            // spiffe_id=1 x509_svid=2 x509_svid_key=3 bundle=4 hint=5
//	repeated bytes crl = 2;                 // ignored, as go-spiffe does
//	map<string, bytes> federated_bundles = 3;
func parseResponse(b []byte) (*x509svid.SVID, *x509bundle.Set, error) {
	var svids []rawSVID
	federated := map[string][]byte{}
	err := pbwire.Walk(b, func(f *pbwire.Field) error {
		switch f.Num {
		case 1:
			return pbwire.AppendMessage(f, "svids", &svids, parseSVID)
		case 3:
			v, err := f.Value("federated_bundles")
			if err != nil {
				return err
			}
			var key string
			var val []byte
			if err := pbwire.Walk(v, func(e *pbwire.Field) error {
				switch e.Num {
				case 1:
					return e.Str("key", &key)
				case 2:
					return e.Bytes("value", &val)
				}
				return nil
			}); err != nil {
				return fmt.Errorf("federated_bundles: %w", err)
			}
			federated[key] = val
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("decode X509SVIDResponse: %w", err)
	}
	if len(svids) == 0 {
		return nil, nil, errors.New("workload api response has no SVID")
	}
	first := svids[0]
	svid, err := x509svid.ParseRaw(first.certs, first.key)
	if err != nil {
		return nil, nil, fmt.Errorf("workload api SVID %q: %w", first.id, err)
	}
	svid.Hint = first.hint
	var all []*x509bundle.Bundle
	for _, r := range svids {
		bd, err := parseBundle(r.id, r.bundle)
		if err != nil {
			return nil, nil, err
		}
		all = append(all, bd)
	}
	for id, der := range federated {
		bd, err := parseBundle(id, der)
		if err != nil {
			return nil, nil, err
		}
		all = append(all, bd)
	}
	return svid, x509bundle.NewSet(all...), nil
}

func parseSVID(b []byte) (rawSVID, error) {
	var r rawSVID
	err := pbwire.Walk(b, func(f *pbwire.Field) error {
		switch f.Num {
		case 1:
			return f.Str("spiffe_id", &r.id)
		case 2:
			return f.Bytes("x509_svid", &r.certs)
		case 3:
			return f.Bytes("x509_svid_key", &r.key)
		case 4:
			return f.Bytes("bundle", &r.bundle)
		case 5:
			return f.Str("hint", &r.hint)
		}
		return nil
	})
	return r, err
}

// parseBundle is one trust domain's bundle: id is a trust domain name or
// any SPIFFE ID in it, der its certificates.
func parseBundle(id string, der []byte) (*x509bundle.Bundle, error) {
	td, err := spiffeid.TrustDomainFromString(id)
	if err != nil {
		return nil, fmt.Errorf("workload api bundle for %q: %w", id, err)
	}
	certs, err := x509.ParseCertificates(der)
	if err != nil {
		return nil, fmt.Errorf("workload api bundle for %s: %w", td, err)
	}
	return x509bundle.FromX509Authorities(td, certs), nil
}
