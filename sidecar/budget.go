package sidecar

import (
	"sync"
	"time"
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
