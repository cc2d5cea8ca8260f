package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestExitsOnMissedOrAbsentGoal: make bench gates on this command, so a
// missed goal and a goal whose benchmark never ran are errors, and a figure
// without a goal is not.
func TestExitsOnMissedOrAbsentGoal(t *testing.T) {
	goals := filepath.Join(t.TempDir(), "goals.tsv")
	if err := os.WriteFile(goals, []byte("BenchmarkA\tms\t<10\tlatency\nBenchmarkA\tMB\t-\trss\nBenchmarkB\tms\t-\tinfo only\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, out, wantErr string
	}{
		{"met", "BenchmarkA-2 1 5 ms 3 MB\n", ""},
		{"missed", "BenchmarkA-2 1 50 ms 3 MB\n", "1 figures missed their goal"},
		{"not run", "PASS\n", "1 with a goal were not run"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stdin := filepath.Join(t.TempDir(), "in")
			if err := os.WriteFile(stdin, []byte(tc.out), 0o644); err != nil {
				t.Fatal(err)
			}
			f, err := os.Open(stdin)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			old := os.Stdin
			os.Stdin = f
			defer func() { os.Stdin = old }()
			err = run(goals)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("run: %v, want no error", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("run: %v, want an error with %q", err, tc.wantErr)
			}
		})
	}
}
