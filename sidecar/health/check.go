package health

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"sync"
	"time"
)

// Probe is one active check of one endpoint; nil means healthy.
type Probe func(ctx context.Context) error

// Target is an endpoint under active checking.
type Target struct {
	Outlier *Outlier
	Probe   Probe
}

// CheckConfig tunes active checks. Zero fields mean the defaults.
type CheckConfig struct {
	Interval time.Duration // between rounds (1s)
	Jitter   float64       // each wait is Interval*(1±Jitter) (0.1)
	Timeout  time.Duration // per probe (500ms)
	// Unhealthy consecutive failed probes eject an endpoint (2). One
	// successful probe returns an ejected endpoint at once, which is what
	// makes failback fast.
	Unhealthy int
}

func (c *CheckConfig) setDefaults() {
	if c.Interval <= 0 {
		c.Interval = time.Second
	}
	if c.Jitter <= 0 || c.Jitter >= 1 {
		c.Jitter = 0.1
	}
	if c.Timeout <= 0 {
		c.Timeout = 500 * time.Millisecond
	}
	if c.Unhealthy <= 0 {
		c.Unhealthy = 2
	}
}

// RunChecks probes every target that targets returns (asked again each
// round, so membership may change) until ctx ends. Rounds start on a
// jittered ticker so that many sidecars do not probe in step.
func RunChecks(ctx context.Context, cfg CheckConfig, targets func() []Target) {
	cfg.setDefaults()
	fails := map[*Outlier]int{}
	var mu sync.Mutex
	for {
		wait := time.Duration(float64(cfg.Interval) * (1 + cfg.Jitter*(2*rand.Float64()-1)))
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		ts := targets()
		var wg sync.WaitGroup
		seen := make(map[*Outlier]bool, len(ts))
		for _, tg := range ts {
			seen[tg.Outlier] = true
			wg.Go(func() {
				pctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
				err := tg.Probe(pctx)
				cancel()
				if ctx.Err() != nil {
					return
				}
				mu.Lock()
				defer mu.Unlock()
				if err == nil {
					fails[tg.Outlier] = 0
					tg.Outlier.Return()
					return
				}
				fails[tg.Outlier]++
				if fails[tg.Outlier] >= cfg.Unhealthy {
					tg.Outlier.Eject()
				}
			})
		}
		wg.Wait()
		for o := range fails {
			if !seen[o] {
				delete(fails, o)
			}
		}
	}
}

// TCPProbe succeeds when a TCP connection to addr is accepted.
func TCPProbe(addr string) Probe {
	return func(ctx context.Context) error {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err != nil {
			return fmt.Errorf("tcp check %s: %w", addr, err)
		}
		return c.Close()
	}
}

// HTTPProbe sends "GET path" on a connection from dial (which may be an
// mTLS connection to a sidecar) and succeeds on a status below 500.
func HTTPProbe(dial func(ctx context.Context) (net.Conn, error), host, path string) Probe {
	return func(ctx context.Context) error {
		c, err := dial(ctx)
		if err != nil {
			return fmt.Errorf("http check %s%s: %w", host, path, err)
		}
		defer c.Close()
		if dl, ok := ctx.Deadline(); ok {
			_ = c.SetDeadline(dl)
		}
		if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\nUser-Agent: fedmesh-sidecar-check\r\n\r\n", path, host); err != nil {
			return fmt.Errorf("http check %s%s: %w", host, path, err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return fmt.Errorf("http check %s%s: %w", host, path, err)
		}
		resp.Body.Close()
		if resp.StatusCode >= 500 {
			return errors.New("http check " + host + path + ": " + resp.Status)
		}
		return nil
	}
}
