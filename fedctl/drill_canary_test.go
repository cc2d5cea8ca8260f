package fedctl

import (
	"math"
	"testing"
	"time"
)

func TestCanaryFollow(t *testing.T) {
	shift := time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)
	var samples []sample
	// 1 s before the shift all local; after it, 100 more local requests
	// (the route takes 100 ms to arrive), then every other one canary.
	for i := range 1000 {
		start := shift.Add(time.Duration(i-300) * time.Millisecond)
		by := "east"
		if i >= 400 && i%2 == 0 {
			by = "west"
		}
		samples = append(samples, sample{start: start, end: start.Add(time.Millisecond), ok: true, servedBy: by})
	}
	first, follow, after := canaryFollow(samples, "west", shift, 50, 5, 200)
	if first != 101*time.Millisecond {
		t.Errorf("first canary answer %v after the shift, want 101ms", first)
	}
	// The 50-request window reaches 45% after 23 canary answers among the
	// last 50: at request 400+45 = 445.
	if follow < 140*time.Millisecond || follow > 150*time.Millisecond {
		t.Errorf("followed after %v, want about 145ms", follow)
	}
	if math.Abs(after-50) > 0.5 {
		t.Errorf("share after = %.1f, want 50", after)
	}

	// Nothing ever moves: never follows.
	for i := range samples {
		samples[i].servedBy = "east"
	}
	first, follow, after = canaryFollow(samples, "west", shift, 50, 5, 200)
	if first >= 0 || follow >= 0 || !math.IsNaN(after) {
		t.Errorf("no canary traffic: first=%v follow=%v after=%v, want -1, -1, NaN", first, follow, after)
	}
}
