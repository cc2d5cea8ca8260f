package issuer

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"net/url"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// minted is one X.509-SVID, kept in both parsed and wire form so that
// pushing it to many streams costs no re-encoding.
type minted struct {
	svid     *x509svid.SVID
	certDER  []byte // leaf (the CA is a root, so the chain is the leaf alone)
	keyDER   []byte // PKCS#8
	renewAt  time.Time
	notAfter time.Time
}

// mintX509 issues an X.509-SVID per the SPIFFE X.509-SVID standard: exactly
// one URI SAN, not a CA, digitalSignature only, serverAuth and clientAuth.
// Its lifetime is ttl, clipped to the signing authority's expiry, and it is
// due for renewal at half its (unbackdated) lifetime.
func mintX509(a *authority, id spiffeid.ID, ttl time.Duration, now time.Time) (*minted, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("issue x509-svid %s: generate key: %w", id, err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("issue x509-svid %s: %w", id, err)
	}
	notAfter := now.Add(ttl)
	if notAfter.After(a.cert.NotAfter) {
		notAfter = a.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"fedmesh"}},
		URIs:                  []*url.URL{id.URL()},
		NotBefore:             now.Add(-backdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, key.Public(), a.key)
	if err != nil {
		return nil, fmt.Errorf("issue x509-svid %s: sign: %w", id, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("issue x509-svid %s: parse: %w", id, err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("issue x509-svid %s: marshal key: %w", id, err)
	}
	return &minted{
		svid:     &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key},
		certDER:  der,
		keyDER:   keyDER,
		renewAt:  now.Add(notAfter.Sub(now) / 2),
		notAfter: notAfter,
	}, nil
}

// mintJWT issues a JWT-SVID signed by the active authority's JWT key.
func mintJWT(a *authority, id spiffeid.ID, audience []string, ttl time.Duration, now time.Time) (string, error) {
	signer, err := jose.NewSigner(
		jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: a.jwtKey, KeyID: a.jwtKeyID}},
		(&jose.SignerOptions{}).WithType("JWT"),
	)
	if err != nil {
		return "", fmt.Errorf("issue jwt-svid %s: %w", id, err)
	}
	expiry := now.Add(ttl)
	if expiry.After(a.cert.NotAfter) {
		expiry = a.cert.NotAfter
	}
	token, err := jwt.Signed(signer).Claims(jwt.Claims{
		Subject:  id.String(),
		Audience: audience,
		IssuedAt: jwt.NewNumericDate(now),
		Expiry:   jwt.NewNumericDate(expiry),
	}).Serialize()
	if err != nil {
		return "", fmt.Errorf("issue jwt-svid %s: %w", id, err)
	}
	return token, nil
}
