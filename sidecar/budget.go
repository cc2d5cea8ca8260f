package sidecar

import (
	"sync"
	"time"

	"github.com/fedmesh/fedmesh/sidecar/balancer"
)

// RetryBudget bounds retries to a share of requests plus a small steady
// allowance, so that a total outage cannot turn into a retry storm. Zero
// fields mean the defaults: 20% of requests plus 10 per second, over a
// sliding 10 s window.
type RetryBudget struct {
	Ratio        float64
	MinPerSecond float64
	Window       time.Duration
}

func (b *RetryBudget) setDefaults() {
	if b.Ratio <= 0 {
		b.Ratio = 0.2
	}
	if b.MinPerSecond < 0 {
		b.MinPerSecond = 0
	} else if b.MinPerSecond == 0 {
		b.MinPerSecond = 10
	}
	if b.Window <= 0 {
		b.Window = 10 * time.Second
	}
}

const budgetBuckets = 10

// budget is RetryBudget's state: requests and retries per bucket of a
// sliding window.
type budget struct {
	cfg  RetryBudget
	slot time.Duration

	mu      sync.Mutex
	epoch   [budgetBuckets]int64 // bucket index (time/slot) each entry counts
	reqs    [budgetBuckets]float64
	retries [budgetBuckets]float64
}

func newBudget(cfg RetryBudget) *budget {
	cfg.setDefaults()
	return &budget{cfg: cfg, slot: cfg.Window / budgetBuckets}
}

func (b *budget) bucket(now time.Time) int {
	e := now.UnixNano() / int64(b.slot)
	i := int(e % budgetBuckets)
	if b.epoch[i] != e {
		b.epoch[i], b.reqs[i], b.retries[i] = e, 0, 0
	}
	return i
}

func (b *budget) sums(now time.Time) (reqs, retries float64) {
	e := now.UnixNano() / int64(b.slot)
	for i := range budgetBuckets {
		if e-b.epoch[i] < budgetBuckets {
			reqs += b.reqs[i]
			retries += b.retries[i]
		}
	}
	return reqs, retries
}

// request counts one request.
func (b *budget) request(now time.Time) {
	b.mu.Lock()
	b.reqs[b.bucket(now)]++
	b.mu.Unlock()
}

// allowRetry takes one retry from the budget if there is one.
func (b *budget) allowRetry(now time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	i := b.bucket(now)
	reqs, retries := b.sums(now)
	if retries+1 > b.cfg.Ratio*reqs+b.cfg.MinPerSecond*b.cfg.Window.Seconds() {
		return false
	}
	b.retries[i]++
	return true
}

// attempts hands out the targets of one request or connection: a first
// pick, then retries, each to a target not yet tried (which moves to the
// next priority when the current one is exhausted), each taking a token of
// the retry budget and waiting the route's backoff. It lives on the
// caller's stack; the caller keeps the targets tried (stored in the
// struct, they would move to the heap).
type attempts struct {
	u         *upstream
	picker    *balancer.Picker
	max       int
	deadline  time.Time // zero: none
	backoff   time.Duration
	n         int
	firstPrio int
}

// next returns the next target not in tried, or nil when attempts, the
// deadline, the untried targets or the retry budget ran out.
func (a *attempts) next(tried []*balancer.Target) *balancer.Target {
	if a.n >= a.max {
		return nil
	}
	now := time.Now()
	if a.n > 0 && !a.deadline.IsZero() && now.After(a.deadline) {
		return nil
	}
	t := a.picker.Pick(now, tried)
	if t == nil {
		return nil
	}
	if a.n > 0 {
		if !a.u.budget.allowRetry(now) {
			a.u.s.m.budgetExhausted.WithLabelValues(a.u.name).Inc()
			return nil
		}
		a.u.s.m.retries.WithLabelValues(a.u.name).Inc()
		if a.backoff > 0 {
			d := a.backoff
			if !a.deadline.IsZero() {
				d = min(d, time.Until(a.deadline))
			}
			time.Sleep(d)
		}
	} else {
		a.firstPrio = t.Priority
	}
	a.n++
	return t
}

// failedOver reports whether t ranks below the first target tried: the
// request moved to a worse priority (a failover).
func (a *attempts) failedOver(t *balancer.Target) bool { return a.n > 1 && t.Priority > a.firstPrio }
