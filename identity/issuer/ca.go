package issuer

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// backdate is subtracted from every NotBefore so that peers whose clocks lag
// slightly still accept a certificate the moment it is issued.
const backdate = 10 * time.Second

// caFile is the name of the CA state file inside the data directory.
const caFile = "ca.json"

// authority is one generation of the trust domain's signing keys: an X.509
// root that signs X.509-SVIDs and a key that signs JWT-SVIDs. Both are
// published in the bundle while the authority is prepared, active or retired.
type authority struct {
	cert     *x509.Certificate
	key      *ecdsa.PrivateKey
	jwtKey   *ecdsa.PrivateKey
	jwtKeyID string
}

// lifetime is the authority's full validity period.
func (a *authority) lifetime() time.Duration { return a.cert.NotAfter.Sub(a.cert.NotBefore) }

// ca holds the authorities of one trust domain and persists them.
//
// Rotation has three steps so that peers always learn a root before they
// meet a certificate signed by it:
//
//   - prepare, at half the active authority's lifetime: a new authority is
//     created and published in the bundle, but does not sign yet;
//   - activate, at three quarters: the prepared authority starts signing and
//     the old one is retired;
//   - prune: a retired authority stays in the bundle until it expires, so
//     SVIDs it signed (clipped to its expiry) stay valid to the end.
type ca struct {
	td  spiffeid.TrustDomain
	dir string
	ttl time.Duration // lifetime of newly created authorities

	mu      sync.Mutex
	active  *authority
	next    *authority   // prepared, published, not signing
	retired []*authority // published until they expire
	seq     uint64       // bundle sequence number, bumped on every change
}

// loadCA reads the CA state from dir, or creates a first authority when there
// is none. An active authority that expired while the issuer was down is
// replaced (a trust break the caller should log, reported by renewed=true).
func loadCA(td spiffeid.TrustDomain, dir string, ttl time.Duration, now time.Time) (c *ca, renewed bool, err error) {
	c = &ca{td: td, dir: dir, ttl: ttl}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, false, fmt.Errorf("create data dir %s: %w", dir, err)
	}
	data, err := os.ReadFile(filepath.Join(dir, caFile))
	switch {
	case errors.Is(err, os.ErrNotExist):
		a, err := newAuthority(td, ttl, now)
		if err != nil {
			return nil, false, err
		}
		c.active, c.seq = a, 1
		return c, false, c.saveLocked()
	case err != nil:
		return nil, false, fmt.Errorf("read ca state: %w", err)
	}
	if err := c.unmarshal(data); err != nil {
		return nil, false, fmt.Errorf("load ca state %s: %w", filepath.Join(dir, caFile), err)
	}
	if !c.active.cert.NotAfter.After(now) {
		a, err := newAuthority(td, ttl, now)
		if err != nil {
			return nil, false, err
		}
		c.active, c.next, renewed = a, nil, true
	}
	c.pruneLocked(now)
	if renewed {
		c.seq++
		if err := c.saveLocked(); err != nil {
			return nil, false, err
		}
	}
	return c, renewed, nil
}

func newAuthority(td spiffeid.TrustDomain, ttl time.Duration, now time.Time) (*authority, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate ca key: %w", err)
	}
	jwtKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate jwt key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	ski, err := subjectKeyID(key.Public())
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"fedmesh"}, CommonName: td.Name() + " root " + serial.Text(16)[:8]},
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		SubjectKeyId:          ski,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create ca certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse ca certificate: %w", err)
	}
	kid := make([]byte, 16)
	if _, err := rand.Read(kid); err != nil {
		return nil, fmt.Errorf("generate jwt key id: %w", err)
	}
	return &authority{cert: cert, key: key, jwtKey: jwtKey, jwtKeyID: hex.EncodeToString(kid)}, nil
}

func randomSerial() (*big.Int, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, fmt.Errorf("generate serial number: %w", err)
	}
	return serial, nil
}

func subjectKeyID(pub crypto.PublicKey) ([]byte, error) {
	der, err := x509.MarshalPKIXPublicKey(pub)
	if err != nil {
		return nil, fmt.Errorf("marshal public key: %w", err)
	}
	sum := sha256.Sum256(der)
	return sum[:20], nil
}

// signer returns the authority that signs right now.
func (c *ca) signer() *authority {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.active
}

// step is what the rotation schedule asks for at a given time.
type step int

const (
	stepNone step = iota
	stepPrepare
	stepActivate
	stepPrune
)

// due says which rotation step is due at now and when the next one is.
func (c *ca) due(now time.Time) (step, time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, r := range c.retired {
		if !r.cert.NotAfter.After(now) {
			return stepPrune, now
		}
	}
	a := c.active
	prepareAt := a.cert.NotBefore.Add(a.lifetime() / 2)
	activateAt := a.cert.NotBefore.Add(a.lifetime() * 3 / 4)
	var next time.Time
	switch {
	case c.next == nil && !now.Before(prepareAt):
		return stepPrepare, now
	case c.next != nil && !now.Before(activateAt):
		return stepActivate, now
	case c.next == nil:
		next = prepareAt
	default:
		next = activateAt
	}
	for _, r := range c.retired {
		if r.cert.NotAfter.Before(next) {
			next = r.cert.NotAfter
		}
	}
	return stepNone, next
}

// prepare creates and publishes the next authority. It is a no-op when one
// is already prepared.
func (c *ca) prepare(now time.Time) (bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.next != nil {
		return false, nil
	}
	a, err := newAuthority(c.td, c.ttl, now)
	if err != nil {
		return false, err
	}
	c.next = a
	c.seq++
	return true, c.saveLocked()
}

// activate makes the prepared authority the signing one and retires the old
// one. It is a no-op when nothing is prepared.
func (c *ca) activate(now time.Time) (bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.next == nil {
		return false, nil
	}
	c.retired = append(c.retired, c.active)
	c.active, c.next = c.next, nil
	c.pruneLocked(now)
	c.seq++
	return true, c.saveLocked()
}

// prune drops retired authorities that have expired.
func (c *ca) prune(now time.Time) (bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.pruneLocked(now) {
		return false, nil
	}
	c.seq++
	return true, c.saveLocked()
}

func (c *ca) pruneLocked(now time.Time) bool {
	kept := c.retired[:0]
	for _, r := range c.retired {
		if r.cert.NotAfter.After(now) {
			kept = append(kept, r)
		}
	}
	changed := len(kept) != len(c.retired)
	c.retired = kept
	return changed
}

// published lists every authority that belongs in the bundle, signing one
// first.
func (c *ca) publishedLocked() []*authority {
	out := []*authority{c.active}
	if c.next != nil {
		out = append(out, c.next)
	}
	return append(out, c.retired...)
}

// bundle is the trust domain's own SPIFFE bundle: every published X.509 root
// and JWT key, the sequence number and the refresh hint peers should honour.
func (c *ca) bundle(refreshHint time.Duration) *spiffebundle.Bundle {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := spiffebundle.New(c.td)
	for _, a := range c.publishedLocked() {
		b.AddX509Authority(a.cert)
		// Key IDs are random and unique, so this cannot fail.
		_ = b.AddJWTAuthority(a.jwtKeyID, a.jwtKey.Public())
	}
	b.SetSequenceNumber(c.seq)
	b.SetRefreshHint(refreshHint)
	return b
}

// stored is the on-disk form of the CA state.
type stored struct {
	Sequence    uint64            `json:"sequence"`
	Authorities []storedAuthority `json:"authorities"`
}

type storedAuthority struct {
	State    string `json:"state"` // active, prepared or retired
	Cert     string `json:"cert"`  // PEM
	Key      string `json:"key"`   // PKCS#8 PEM
	JWTKey   string `json:"jwtKey"`
	JWTKeyID string `json:"jwtKeyID"`
}

func (c *ca) saveLocked() error {
	s := stored{Sequence: c.seq}
	add := func(state string, a *authority) error {
		key, err := x509.MarshalPKCS8PrivateKey(a.key)
		if err != nil {
			return fmt.Errorf("marshal ca key: %w", err)
		}
		jwtKey, err := x509.MarshalPKCS8PrivateKey(a.jwtKey)
		if err != nil {
			return fmt.Errorf("marshal jwt key: %w", err)
		}
		s.Authorities = append(s.Authorities, storedAuthority{
			State:    state,
			Cert:     string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.cert.Raw})),
			Key:      string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: key})),
			JWTKey:   string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: jwtKey})),
			JWTKeyID: a.jwtKeyID,
		})
		return nil
	}
	if err := add("active", c.active); err != nil {
		return err
	}
	if c.next != nil {
		if err := add("prepared", c.next); err != nil {
			return err
		}
	}
	for _, r := range c.retired {
		if err := add("retired", r); err != nil {
			return err
		}
	}
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("marshal ca state: %w", err)
	}
	return writeFileAtomic(filepath.Join(c.dir, caFile), data, 0o600)
}

func (c *ca) unmarshal(data []byte) error {
	var s stored
	if err := json.Unmarshal(data, &s); err != nil {
		return err
	}
	c.seq = s.Sequence
	for i, sa := range s.Authorities {
		a, err := sa.parse()
		if err != nil {
			return fmt.Errorf("authority %d: %w", i, err)
		}
		if id, err := spiffeid.FromURI(firstURI(a.cert)); err != nil || id != c.td.ID() {
			return fmt.Errorf("authority %d: certificate is not a root of trust domain %s", i, c.td)
		}
		switch sa.State {
		case "active":
			if c.active != nil {
				return errors.New("more than one active authority")
			}
			c.active = a
		case "prepared":
			if c.next != nil {
				return errors.New("more than one prepared authority")
			}
			c.next = a
		case "retired":
			c.retired = append(c.retired, a)
		default:
			return fmt.Errorf("authority %d: unknown state %q", i, sa.State)
		}
	}
	if c.active == nil {
		return errors.New("no active authority")
	}
	return nil
}

func (sa storedAuthority) parse() (*authority, error) {
	cert, err := parsePEMCert(sa.Cert)
	if err != nil {
		return nil, err
	}
	key, err := parsePEMKey(sa.Key)
	if err != nil {
		return nil, fmt.Errorf("ca key: %w", err)
	}
	jwtKey, err := parsePEMKey(sa.JWTKey)
	if err != nil {
		return nil, fmt.Errorf("jwt key: %w", err)
	}
	if !key.PublicKey.Equal(cert.PublicKey) {
		return nil, errors.New("ca key does not match certificate")
	}
	if sa.JWTKeyID == "" {
		return nil, errors.New("empty jwt key id")
	}
	return &authority{cert: cert, key: key, jwtKey: jwtKey, jwtKeyID: sa.JWTKeyID}, nil
}

func parsePEMCert(s string) (*x509.Certificate, error) {
	block, _ := pem.Decode([]byte(s))
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("no PEM certificate")
	}
	return x509.ParseCertificate(block.Bytes)
}

func parsePEMKey(s string) (*ecdsa.PrivateKey, error) {
	block, _ := pem.Decode([]byte(s))
	if block == nil || block.Type != "PRIVATE KEY" {
		return nil, errors.New("no PEM private key")
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, err
	}
	ek, ok := k.(*ecdsa.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("key is %T, want ECDSA", k)
	}
	return ek, nil
}

func firstURI(cert *x509.Certificate) *url.URL {
	if len(cert.URIs) == 0 {
		return &url.URL{}
	}
	return cert.URIs[0]
}

// writeFileAtomic writes data to a temporary file in the same directory and
// renames it over path, so a crash never leaves a half-written file.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer os.Remove(tmp.Name()) // no-op after a successful rename
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}
