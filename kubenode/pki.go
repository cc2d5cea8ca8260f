package kubenode

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/fedmesh/fedmesh/controlplane"
)

// pki is one node's certificate authority: it signs the API server's and the
// kubelet's serving certificates and every component's client certificate
// (the identity the API server authorizes: system:node:<name> for the
// kubelet, system:kube-scheduler, ...).
type pki struct {
	dir    string
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	caPEM  []byte
	caPath string
}

func newPKI(dir string) (*pki, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate ca key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: "fedmesh local node CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("sign ca: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	p := &pki{dir: dir, cert: cert, key: key, caPEM: pemBlock("CERTIFICATE", der), caPath: filepath.Join(dir, "ca.crt")}
	if err := os.WriteFile(p.caPath, p.caPEM, 0o644); err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "ca.key"), pemBlock("EC PRIVATE KEY", keyDER), 0o600); err != nil {
		return nil, err
	}
	return p, nil
}

// pair is a certificate and its key, in memory and on disk.
type pair struct {
	cert, key         []byte
	certPath, keyPath string
}

// issue signs a leaf certificate named name.crt/name.key in the pki
// directory. Client certificates carry the groups as organizations, which is
// how kube-apiserver reads them.
func (p *pki) issue(name, cn string, groups []string, ips []net.IP, dns []string, server bool) (*pair, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key for %s: %w", cn, err)
	}
	usage := []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	if server {
		usage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: cn, Organization: groups},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(5 * 365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  usage,
		IPAddresses:  ips,
		DNSNames:     dns,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.cert, &key.PublicKey, p.key)
	if err != nil {
		return nil, fmt.Errorf("sign certificate for %s: %w", cn, err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, err
	}
	pr := &pair{
		cert: pemBlock("CERTIFICATE", der), key: pemBlock("EC PRIVATE KEY", keyDER),
		certPath: filepath.Join(p.dir, name+".crt"), keyPath: filepath.Join(p.dir, name+".key"),
	}
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
		TLSClientConfig: rest.TLSClientConfig{CAData: p.caPEM, CertData: pr.cert, KeyData: pr.key},
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
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return "", "", err
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return "", "", err
	}
	pubDER, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return "", "", err
	}
	priv, pub = filepath.Join(p.dir, "sa.key"), filepath.Join(p.dir, "sa.pub")
	if err := os.WriteFile(priv, pemBlock("EC PRIVATE KEY", keyDER), 0o600); err != nil {
		return "", "", err
	}
	if err := os.WriteFile(pub, pemBlock("PUBLIC KEY", pubDER), 0o644); err != nil {
		return "", "", err
	}
	return pub, priv, nil
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		panic(err) // crypto/rand never fails on Linux
	}
	return n
}
