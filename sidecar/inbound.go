package sidecar

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"sync"
	"time"
)

// appDialTimeout bounds the dial to the app on localhost.
const appDialTimeout = time.Second

func (s *Sidecar) serveInbound(ctx context.Context) {
	var wg sync.WaitGroup
	defer wg.Wait()
	for {
		c, err := s.inbound.Accept()
		if err != nil {
			if ctx.Err() == nil && !errors.Is(err, net.ErrClosed) {
				s.log.Error("accept inbound", "err", err)
			}
			return
		}
		wg.Go(func() {
			untrack := s.track(c)
			defer untrack()
			if err := s.handleInbound(c); err != nil {
				s.log.Debug("inbound connection", "remote", c.RemoteAddr().String(), "err", err)
			}
		})
	}
}

// handleInbound owns c. The app is dialed before the handshake: when the
// app is gone, the caller's handshake fails, which its sidecar counts as a
// connect failure and retries elsewhere, before any request byte is sent.
// Bytes reach the app only after the caller was authorized.
func (s *Sidecar) handleInbound(c net.Conn) error {
	app, err := net.DialTimeout("tcp", s.cfg.AppAddr, appDialTimeout)
	if err != nil {
		s.m.inbound.WithLabelValues("app_unreachable").Inc()
		_ = c.Close()
		return err
	}
	if tc, ok := app.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	tc := tls.Server(c, s.serverTLS)
	_ = c.SetDeadline(time.Now().Add(s.cfg.HandshakeTimeout))
	if err := tc.Handshake(); err != nil {
		s.m.inbound.WithLabelValues("handshake_failed").Inc()
		_ = c.Close()
		_ = app.Close()
		return err
	}
	_ = c.SetDeadline(time.Time{})
	s.m.inbound.WithLabelValues("accepted").Inc()
	untrack := s.track(app)
	defer untrack()
	splice(tc, app)
	return nil
}
