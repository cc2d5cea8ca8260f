// Package appprobe is the sidecar's probe server. In an injected pod every
// inbound TCP connection is redirected to the sidecar's mTLS inbound, so
// the kubelet's plaintext httpGet, tcpSocket and grpc probes of the app
// would land there and fail. The injector rewrites those probes to plain
// HTTP GETs of this server on a port the redirect leaves alone, and hands
// the original probes to the sidecar; this server performs them against the
// app on 127.0.0.1 and answers with their verdict, as Istio's pilot-agent
// does. It also answers the sidecar's own readiness.
//
// The injector and the sidecar agree on Probe, its JSON and the paths
// below; the package links nothing beyond the standard library, protowire
// and internal/grpclite, because it runs in every sidecar.
package appprobe

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/url"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"
)

const (
	// EnvAddr is the environment default of the sidecar's --probe-addr:
	// where this server listens (":15021" when injected).
	EnvAddr = "FEDMESH_PROBE_ADDR"
	// EnvProbes is the environment default of the sidecar's --app-probes:
	// the JSON object of the app's original probes by path (Parse).
	EnvProbes = "FEDMESH_APP_PROBES"
	// ReadyPath answers the sidecar's own readiness.
	ReadyPath = "/ready"
	// PathPrefix starts the path of every app probe:
	// /app-health/<container>/<livez|readyz|startupz> (Path).
	PathPrefix = "/app-health/"
)

// Kinds of probes, the last element of their path, by the Container field
// they come from.
const (
	Liveness  = "livez"
	Readiness = "readyz"
	Startup   = "startupz"
)

// Path is where the probe server answers the probe of the given kind
// (Liveness, Readiness, Startup) of a container.
func Path(container, kind string) string { return PathPrefix + container + "/" + kind }

// Type is how a probe checks the app.
type Type string

// Probe types, as the kubelet has them.
const (
	HTTP Type = "http" // GET, healthy on a 2xx or 3xx status
	TCP  Type = "tcp"  // a TCP connection is accepted
	GRPC Type = "grpc" // grpc.health.v1.Health/Check answers SERVING
)

// Probe is one original probe of an app container, performed against
// 127.0.0.1:Port.
type Probe struct {
	Type Type  `json:"type"`
	Port int32 `json:"port"` // named ports are resolved by the injector
	// Path (with an optional query) and Scheme (HTTP or HTTPS, default
	// HTTP; HTTPS does not verify the certificate, as the kubelet) and
	// the request headers, for HTTP only.
	Path        string   `json:"path,omitempty"`
	Scheme      string   `json:"scheme,omitempty"`
	HTTPHeaders []Header `json:"httpHeaders,omitempty"`
	// Service is the service name of a gRPC health check ("" is the
	// server as a whole).
	Service string `json:"service,omitempty"`
	// TimeoutSeconds bounds the probe; 0 means 1, the kubelet's default.
	TimeoutSeconds int32 `json:"timeoutSeconds,omitempty"`
}

// Header is one HTTP request header of a probe.
type Header struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Timeout is the probe's timeout.
func (p Probe) Timeout() time.Duration {
	if p.TimeoutSeconds <= 0 {
		return time.Second
	}
	return time.Duration(p.TimeoutSeconds) * time.Second
}

// Parse decodes and checks the JSON object of probes by path (EnvProbes).
// An empty string means none. Unknown fields are errors: the injector and
// the sidecar ship in one image, and a misspelt hand-written field should
// not silently change a probe.
func Parse(s string) (map[string]Probe, error) {
	if strings.TrimSpace(s) == "" {
		return map[string]Probe{}, nil
	}
	dec := json.NewDecoder(strings.NewReader(s))
	dec.DisallowUnknownFields()
	var probes map[string]Probe
	if err := dec.Decode(&probes); err != nil {
		return nil, fmt.Errorf("decode app probes: %w", err)
	}
	if dec.More() {
		return nil, errors.New("decode app probes: data after the JSON object")
	}
	if probes == nil {
		probes = map[string]Probe{}
	}
	var errs []error
	for _, k := range slices.Sorted(maps.Keys(probes)) {
		p := probes[k]
		if err := p.check(k); err != nil {
			errs = append(errs, fmt.Errorf("app probe %s: %w", k, err))
			continue
		}
		probes[k] = p
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return probes, nil
}

// check validates p, served at key, and normalizes its scheme.
func (p *Probe) check(key string) error {
	if rest, ok := strings.CutPrefix(key, PathPrefix); !ok || rest == "" || path.Clean(key) != key || strings.ContainsAny(key, "?# \t\r\n") {
		return fmt.Errorf("path must be a clean path under %s", PathPrefix)
	}
	if p.Port < 1 || p.Port > 65535 {
		return fmt.Errorf("port %d out of range", p.Port)
	}
	if p.TimeoutSeconds < 0 {
		return fmt.Errorf("timeoutSeconds %d is negative", p.TimeoutSeconds)
	}
	switch p.Type {
	case HTTP:
		switch strings.ToUpper(p.Scheme) {
		case "", "HTTP":
			p.Scheme = "HTTP"
		case "HTTPS":
			p.Scheme = "HTTPS"
		default:
			return fmt.Errorf("scheme %q: want HTTP or HTTPS", p.Scheme)
		}
		if _, err := p.requestURI(); err != nil {
			return err
		}
		for _, h := range p.HTTPHeaders {
			if !validHeaderName(h.Name) {
				return fmt.Errorf("header name %q is not a token", h.Name)
			}
			if strings.ContainsAny(h.Value, "\r\n\x00") {
				return fmt.Errorf("header %s: value holds a control character", h.Name)
			}
		}
		if p.Service != "" {
			return errors.New("service is for grpc probes")
		}
	case TCP, GRPC:
		if p.Path != "" || p.Scheme != "" || len(p.HTTPHeaders) > 0 {
			return fmt.Errorf("path, scheme and httpHeaders are for http probes, not %s", p.Type)
		}
		if p.Type == TCP && p.Service != "" {
			return errors.New("service is for grpc probes")
		}
	default:
		return fmt.Errorf("type %q: want http, tcp or grpc", p.Type)
	}
	return nil
}

// requestURI is the path and query of an HTTP probe, as the kubelet makes
// them from its path ("" and "healthz" mean "/" and "/healthz").
func (p *Probe) requestURI() (string, error) {
	u, err := url.Parse(p.Path)
	if err != nil {
		return "", fmt.Errorf("path %q: %w", p.Path, err)
	}
	if u.Scheme != "" || u.Opaque != "" || u.Host != "" || u.User != nil {
		return "", fmt.Errorf("path %q: want a path with an optional query, not a URL", p.Path)
	}
	u.Fragment, u.RawFragment = "", ""
	if !strings.HasPrefix(u.Path, "/") {
		u.Path = "/" + u.Path
		u.RawPath = ""
	}
	return u.RequestURI(), nil
}

// url is the probe's target on 127.0.0.1.
func (p *Probe) url() string {
	uri, _ := p.requestURI() // checked by Parse
	return strings.ToLower(p.Scheme) + "://" + p.addr() + uri
}

func (p *Probe) addr() string { return "127.0.0.1:" + strconv.Itoa(int(p.Port)) }

// validHeaderName reports whether s is an HTTP token (RFC 9110 5.1).
func validHeaderName(s string) bool {
	if s == "" {
		return false
	}
	for i := range len(s) {
		c := s[i]
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0 {
			continue
		}
		return false
	}
	return true
}
