package issuer

import (
	"context"
	"path"
	"slices"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

// headerKey/headerValue is the metadata every Workload API request must
// carry (SPIFFE Workload API spec, "Transport"): it proves the request was
// made on purpose by a Workload API client, not forged by e.g. a browser.
const (
	headerKey   = "workload.spiffe.io"
	headerValue = "true"
)

func checkHeader(ctx context.Context) error {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok || len(md.Get(headerKey)) != 1 || md.Get(headerKey)[0] != headerValue {
		return status.Error(codes.InvalidArgument, "security header missing from request")
	}
	return nil
}

func (i *Issuer) unaryInterceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	resp, err := func() (any, error) {
		if err := checkHeader(ctx); err != nil {
			return nil, err
		}
		return handler(ctx, req)
	}()
	i.metrics.requests.WithLabelValues(path.Base(info.FullMethod), status.Code(err).String()).Inc()
	return resp, err
}

func (i *Issuer) streamInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	err := checkHeader(ss.Context())
	if err == nil {
		i.metrics.streams.Inc()
		err = handler(srv, ss)
		i.metrics.streams.Dec()
	}
	i.metrics.requests.WithLabelValues(path.Base(info.FullMethod), status.Code(err).String()).Inc()
	return err
}

// workloadAPI implements the SPIFFE Workload API on top of an Issuer.
type workloadAPI struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	i *Issuer
}

// attest returns the caller's entries or the gRPC error to answer with.
func (w *workloadAPI) attest(ctx context.Context) ([]*entry, error) {
	c, err := callerFromContext(ctx)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "attest caller: %v", err)
	}
	entries := match(w.i.entries, c, w.i.cfg.SocketPath)
	if len(entries) == 0 {
		w.i.log.Debug("workload api caller has no identity", "uid", c.uid, "gid", c.gid, "pid", c.pid, "path", c.path, "socket", c.socket)
		return nil, status.Error(codes.PermissionDenied, errNoIdentity.Error())
	}
	return entries, nil
}

// stream sends build()'s message now and again after every change that
// concerns the caller, until the client or the issuer goes away.
func stream[T any](w *workloadAPI, ctx context.Context, entries []*entry, build func() (T, error), send func(T) error) error {
	sub := w.i.subscribe(entries)
	defer w.i.unsubscribe(sub, entries)
	for {
		msg, err := build()
		if err != nil {
			return status.Errorf(codes.Unavailable, "%v", err)
		}
		if err := send(msg); err != nil {
			return err
		}
		w.i.metrics.updatesSent.Inc()
		select {
		case <-sub.c:
		case <-ctx.Done():
			return nil
		}
	}
}

func (w *workloadAPI) FetchX509SVID(_ *workload.X509SVIDRequest, ss grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	entries, err := w.attest(ss.Context())
	if err != nil {
		return err
	}
	return stream(w, ss.Context(), entries, func() (*workload.X509SVIDResponse, error) {
		return w.i.x509Response(entries)
	}, ss.Send)
}

func (w *workloadAPI) FetchX509Bundles(_ *workload.X509BundlesRequest, ss grpc.ServerStreamingServer[workload.X509BundlesResponse]) error {
	entries, err := w.attest(ss.Context())
	if err != nil {
		return err
	}
	return stream(w, ss.Context(), nil, func() (*workload.X509BundlesResponse, error) {
		bundles := map[string][]byte{}
		for _, b := range w.i.bundlesFor(entries) {
			bundles[b.TrustDomain().IDString()] = x509DER(b)
		}
		return &workload.X509BundlesResponse{Bundles: bundles}, nil
	}, ss.Send)
}

func (w *workloadAPI) FetchJWTBundles(_ *workload.JWTBundlesRequest, ss grpc.ServerStreamingServer[workload.JWTBundlesResponse]) error {
	entries, err := w.attest(ss.Context())
	if err != nil {
		return err
	}
	return stream(w, ss.Context(), nil, func() (*workload.JWTBundlesResponse, error) {
		bundles := map[string][]byte{}
		for _, b := range w.i.bundlesFor(entries) {
			jwks, err := b.JWTBundle().Marshal()
			if err != nil {
				return nil, err
			}
			bundles[b.TrustDomain().IDString()] = jwks
		}
		return &workload.JWTBundlesResponse{Bundles: bundles}, nil
	}, ss.Send)
}

func (w *workloadAPI) FetchJWTSVID(ctx context.Context, req *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	if len(req.Audience) == 0 {
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	}
	entries, err := w.attest(ctx)
	if err != nil {
		return nil, err
	}
	if req.SpiffeId != "" {
		want, err := spiffeid.FromString(req.SpiffeId)
		if err != nil {
			return nil, status.Errorf(codes.InvalidArgument, "spiffe_id: %v", err)
		}
		entries = slices.DeleteFunc(slices.Clone(entries), func(e *entry) bool { return e.id != want })
		if len(entries) == 0 {
			return nil, status.Errorf(codes.PermissionDenied, "caller is not entitled to %s", want)
		}
	}
	resp := &workload.JWTSVIDResponse{}
	for _, e := range entries {
		token, err := mintJWT(w.i.ca.signer(), e.id, req.Audience, w.i.cfg.JWTSVIDTTL, w.i.clock.Now())
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "%v", err)
		}
		w.i.metrics.jwtIssued.Inc()
		resp.Svids = append(resp.Svids, &workload.JWTSVID{SpiffeId: e.id.String(), Svid: token})
	}
	return resp, nil
}

func (w *workloadAPI) ValidateJWTSVID(ctx context.Context, req *workload.ValidateJWTSVIDRequest) (*workload.ValidateJWTSVIDResponse, error) {
	switch {
	case req.Audience == "":
		return nil, status.Error(codes.InvalidArgument, "audience must be specified")
	case req.Svid == "":
		return nil, status.Error(codes.InvalidArgument, "svid must be specified")
	}
	entries, err := w.attest(ctx)
	if err != nil {
		return nil, err
	}
	set := jwtbundle.NewSet()
	for _, b := range w.i.bundlesFor(entries) {
		set.Add(b.JWTBundle())
	}
	svid, err := jwtsvid.ParseAndValidate(req.Svid, set, []string{req.Audience})
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "validate jwt-svid: %v", err)
	}
	claims, err := structpb.NewStruct(svid.Claims)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "encode claims: %v", err)
	}
	return &workload.ValidateJWTSVIDResponse{SpiffeId: svid.ID.String(), Claims: claims}, nil
}

// x509Response is the complete current X.509 picture for a caller: one SVID
// per entry (the first is the default) and every bundle it federates with.
func (i *Issuer) x509Response(entries []*entry) (*workload.X509SVIDResponse, error) {
	resp := &workload.X509SVIDResponse{FederatedBundles: map[string][]byte{}}
	bundles := i.bundlesFor(entries)
	own := x509DER(bundles[0])
	for _, e := range entries {
		m, err := i.svidFor(e)
		if err != nil {
			return nil, err
		}
		resp.Svids = append(resp.Svids, &workload.X509SVID{
			SpiffeId:    e.id.String(),
			X509Svid:    m.certDER,
			X509SvidKey: m.keyDER,
			Bundle:      own,
		})
	}
	for _, b := range bundles[1:] {
		resp.FederatedBundles[b.TrustDomain().IDString()] = x509DER(b)
	}
	return resp, nil
}

// bundlesFor returns the trust domain's own bundle first, then the bundle of
// every federated trust domain any of the entries federates with.
func (i *Issuer) bundlesFor(entries []*entry) []*spiffebundle.Bundle {
	i.mu.Lock()
	defer i.mu.Unlock()
	out := []*spiffebundle.Bundle{i.own}
	for _, p := range i.cfg.Peers {
		b := i.peers[p.TrustDomain]
		if b == nil {
			continue
		}
		if slices.ContainsFunc(entries, func(e *entry) bool {
			return e.allPeers || slices.Contains(e.federatesWith, p.TrustDomain)
		}) {
			out = append(out, b)
		}
	}
	return out
}

// x509DER is the Workload API's wire form of a bundle's X.509 roots: their
// DER encodings, concatenated.
func x509DER(b *spiffebundle.Bundle) []byte {
	var out []byte
	for _, c := range b.X509Authorities() {
		out = append(out, c.Raw...)
	}
	return out
}
