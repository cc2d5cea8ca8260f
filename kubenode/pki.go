package kubenode

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/fedmesh/fedmesh/controlplane"
)

// pki is one node's certificate authority (controlplane.CA) and the
// directory its files go to: it signs the API server's and the kubelet's
// serving certificates and every component's client certificate (the
// identity the API server authorizes: system:node:<name> for the kubelet,
// system:kube-scheduler, ...).
type pki struct {
	dir    string
	ca     *controlplane.CA
	caPath string
}

func newPKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	ca, err := controlplane.NewCA("fedmesh local node CA")
	if err != nil {
		return nil, err
	}
	keyPEM, err := ca.KeyPEM()
	if err != nil {
		return nil, err
	}
	p := &pki{dir: dir, ca: ca, caPath: filepath.Join(dir, "ca.crt")}
	if err := os.WriteFile(p.caPath, ca.PEM, 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "ca.key"), keyPEM, 0o600); err != nil {
		return nil, err
	}
	return p, nil
}

// pair is a certificate and its key, in memory and on disk.
type pair struct {
	cert, key         []byte
	certPath, keyPath string
}

// issue signs a leaf certificate (controlplane.CA.Issue) and writes it as
// name.crt/name.key in the pki directory.
func (p *pki) issue(name, cn string, groups []string, ips []net.IP, dns []string, server bool) (*pair, error) {
	cert, key, err := p.ca.Issue(cn, groups, ips, dns, server)
	if err != nil {
		return nil, err
	}
	pr := &pair{cert: cert, key: key, certPath: filepath.Join(p.dir, name+".crt"), keyPath: filepath.Join(p.dir, name+".key")}
	if err := os.WriteFile(pr.certPath, pr.cert, 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(pr.keyPath, pr.key, 0o600); err != nil {
		return nil, err
	}
	return pr, nil
}

// kubeconfig issues a client certificate and writes a kubeconfig for it.
func (p *pki) kubeconfig(name, server, cn string, groups []string) (path string, cfg *rest.Config, err error) {
	pr, err := p.issue(name, cn, groups, nil, nil, false)
	if err != nil {
		return "", nil, err
	}
	cfg = &rest.Config{
		Host:            server,
		TLSClientConfig: rest.TLSClientConfig{CAData: p.ca.PEM, CertData: pr.cert, KeyData: pr.key},
		QPS:             -1,
		Timeout:         30 * time.Second,
	}
	path = filepath.Join(p.dir, name+".kubeconfig")
	if err := clientcmd.WriteToFile(*controlplane.KubeconfigFor(map[string]*rest.Config{name: cfg}, name), path); err != nil {
		return "", nil, fmt.Errorf("write kubeconfig %s: %w", path, err)
	}
	return path, cfg, nil
}

// serviceAccountKey writes the key pair kube-apiserver signs and verifies
// service account tokens with (kube-controller-manager signs with it too).
func (p *pki) serviceAccountKey() (pub, priv string, err error) {
	return controlplane.WriteServiceAccountKey(p.dir)
}
