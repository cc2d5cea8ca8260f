// Package bench turns `go test -bench` output into the table that `make bench`
// prints: every figure an issue names, beside its goal, so a reader sees at a
// glance which objectives hold on this machine today.
//
// Benchmarks publish figures with testing.B.ReportMetric; bench/goals.tsv says
// which (benchmark, unit) pairs are figures and what their goals are.
package bench

import (
	"bufio"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"
)

// Goal is one row of goals.tsv.
type Goal struct {
	Benchmark string // name without the -GOMAXPROCS suffix, e.g. BenchmarkExportToImport
	Unit      string // the unit given to ReportMetric, e.g. p99-ms
	Op        string // "<", ">" or "" (informational)
	Limit     float64
	What      string // the figure in words
}

// Met reports whether v meets the goal; informational rows always do.
func (g Goal) Met(v float64) bool {
	switch g.Op {
	case "<":
		return v < g.Limit
	case ">":
		return v > g.Limit
	}
	return true
}

// GoalText is the goal as printed in the table.
func (g Goal) GoalText() string {
	if g.Op == "" {
		return "-"
	}
	return g.Op + " " + strconv.FormatFloat(g.Limit, 'g', -1, 64)
}

// ParseGoals reads goals.tsv: benchmark, unit, goal ("<N", ">N" or "-"), what.
// Blank lines and lines starting with # are skipped.
func ParseGoals(r io.Reader) ([]Goal, error) {
	var goals []Goal
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Split(line, "\t")
		if len(f) != 4 {
			return nil, fmt.Errorf("goals line %d: want 4 tab-separated fields, got %d", n, len(f))
		}
		g := Goal{Benchmark: f[0], Unit: f[1], What: f[3]}
		if spec := strings.TrimSpace(f[2]); spec != "-" {
			if len(spec) < 2 || (spec[0] != '<' && spec[0] != '>') {
				return nil, fmt.Errorf("goals line %d: goal %q must be <N, >N or -", n, spec)
			}
			v, err := strconv.ParseFloat(strings.TrimSpace(spec[1:]), 64)
			if err != nil {
				return nil, fmt.Errorf("goals line %d: goal %q: %w", n, spec, err)
			}
			g.Op, g.Limit = spec[:1], v
		}
		goals = append(goals, g)
	}
	return goals, sc.Err()
}

var benchLine = regexp.MustCompile(`^(Benchmark\S+?)(-\d+)?\s+\d+\s+(.*)$`)

// ParseResults reads `go test -bench` output and returns, per benchmark name
// (without the -GOMAXPROCS suffix), its metrics by unit. A benchmark that ran
// more than once keeps the last figures.
func ParseResults(r io.Reader) (map[string]map[string]float64, error) {
	out := map[string]map[string]float64{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	for sc.Scan() {
		m := benchLine.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		fields := strings.Fields(m[3])
		metrics := map[string]float64{}
		for i := 0; i+1 < len(fields); i += 2 {
			v, err := strconv.ParseFloat(fields[i], 64)
			if err != nil {
				break
			}
			metrics[fields[i+1]] = v
		}
		out[m[1]] = metrics
	}
	return out, sc.Err()
}

// WriteTable prints one row per goal. It returns how many goals were missed
// and how many goals (figures with a goal, not "-") had no figure at all.
func WriteTable(w io.Writer, goals []Goal, results map[string]map[string]float64) (missed, absent int) {
	fmt.Fprintf(w, "%-44s %-14s %12s %10s  %s\n", "figure", "unit", "measured", "goal", "status")
	fmt.Fprintf(w, "%s\n", strings.Repeat("-", 96))
	for _, g := range goals {
		v, ok := results[g.Benchmark][g.Unit]
		status, val := "ok", "-"
		switch {
		case !ok && g.Op == "":
			status = "not run" // a figure without a goal: reported, not gated
		case !ok:
			status = "NOT RUN"
			absent++
		case !g.Met(v):
			status = "MISSED"
			missed++
			val = strconv.FormatFloat(v, 'f', -1, 64)
		default:
			val = strconv.FormatFloat(v, 'f', -1, 64)
		}
		if g.Op == "" && ok {
			status = "info"
		}
		fmt.Fprintf(w, "%-44s %-14s %12s %10s  %s\n", trim(g.What, 44), g.Unit, trimNum(val), g.GoalText(), status)
	}
	return missed, absent
}

func trim(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n-1] + "…"
}

func trimNum(s string) string {
	if v, err := strconv.ParseFloat(s, 64); err == nil {
		return strconv.FormatFloat(v, 'g', 5, 64)
	}
	return s
}
