package sidecar

import (
	"context"
	"sync"
)

// owner is what a Sidecar started that serves no listener, and what it made
// that holds connections of its own: goroutines started off the request path
// (a pool's prewarm dial), every backend pool and every upstream, including
// the ones made on first use (transparent mode, route backends) and the ones
// retired since. Run ends the goroutines, waits for them, then closes every
// pool's connections and every upstream's HTTP/2 server, and only then the
// gateway client they used: nothing the sidecar started outlives Run.
type owner struct {
	ctx    context.Context // ends when Run shuts down
	cancel context.CancelFunc

	mu      sync.Mutex
	stopped bool
	wg      sync.WaitGroup
	pools   map[*backendPool]struct{}
	ups     map[*upstream]struct{}
}

func newOwner() *owner {
	o := &owner{pools: map[*backendPool]struct{}{}, ups: map[*upstream]struct{}{}}
	o.ctx, o.cancel = context.WithCancel(context.Background())
	return o
}

// spawn runs f in a goroutine that stop waits for; false (and f not run)
// once stop has begun.
func (o *owner) spawn(f func(ctx context.Context)) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.stopped {
		return false
	}
	o.wg.Go(func() { f(o.ctx) })
	return true
}

func (o *owner) addPool(p *backendPool) {
	o.mu.Lock()
	o.pools[p] = struct{}{}
	o.mu.Unlock()
}

// forgetPool drops a retired pool that holds no connection any more.
func (o *owner) forgetPool(p *backendPool) {
	o.mu.Lock()
	delete(o.pools, p)
	o.mu.Unlock()
}

func (o *owner) addUpstream(u *upstream) {
	o.mu.Lock()
	o.ups[u] = struct{}{}
	o.mu.Unlock()
}

// stop cancels the spawned goroutines, waits for them, then closes every
// upstream's HTTP/2 server and every pool's connections. Run calls it after
// its own goroutines (accept loops, watches) have ended, so no request is
// in flight and nothing spawns or registers any more.
func (o *owner) stop() {
	o.mu.Lock()
	o.stopped = true
	o.mu.Unlock()
	o.cancel()
	o.wg.Wait()
	o.mu.Lock()
	ups, pools := o.ups, o.pools
	o.ups, o.pools = map[*upstream]struct{}{}, map[*backendPool]struct{}{}
	o.mu.Unlock()
	for u := range ups {
		u.closeH2Server()
	}
	for p := range pools {
		p.retire(true)
	}
}
