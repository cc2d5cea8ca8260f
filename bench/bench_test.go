package bench

import (
	"bytes"
	"strings"
	"testing"
)

func TestTable(t *testing.T) {
	goals, err := ParseGoals(strings.NewReader("# c\nBenchmarkA\tp99-ms\t<1000\texport to import p99\nBenchmarkA\tMB\t-\tpeak RSS\nBenchmarkB\tGbit/s\t>1.5\tthroughput\nBenchmarkC\tx\t<1\tnever run\nBenchmarkD\tx\t-\tinfo never run\n"))
	if err != nil {
		t.Fatal(err)
	}
	res, err := ParseResults(strings.NewReader("goos: linux\nBenchmarkA-2   \t       1\t  5000 ns/op\t  412.5 p99-ms\t 88 MB\nBenchmarkB \t 3\t 1.2 Gbit/s\nPASS\n"))
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	missed, absent := WriteTable(&buf, goals, res)
	if missed != 1 || absent != 1 {
		t.Fatalf("missed=%d absent=%d, want 1 and 1\n%s", missed, absent, buf.String())
	}
	for _, want := range []string{"412.5", "info", "MISSED", "NOT RUN", "not run"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, buf.String())
		}
	}
}

func TestParseGoalsErrors(t *testing.T) {
	for name, in := range map[string]string{
		"fields": "BenchmarkA\tms\t<1\n",
		"op":     "BenchmarkA\tms\t=1\tx\n",
		"number": "BenchmarkA\tms\t<abc\tx\n",
	} {
		t.Run(name, func(t *testing.T) {
			if _, err := ParseGoals(strings.NewReader(in)); err == nil {
				t.Fatal("want error")
			}
		})
	}
}
