// Command benchtable reads `go test -bench` output on stdin and prints the
// figures named in a goals file beside their goals.
package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/fedmesh/fedmesh/bench"
)

func main() {
	goalsPath := flag.String("goals", "bench/goals.tsv", "tab-separated goals: benchmark, unit, goal (<N, >N or -), what")
	flag.Parse()
	if err := run(*goalsPath); err != nil {
		fmt.Fprintln(os.Stderr, "benchtable:", err)
		os.Exit(1)
	}
}

func run(goalsPath string) error {
	f, err := os.Open(goalsPath)
	if err != nil {
		return err
	}
	defer f.Close()
	goals, err := bench.ParseGoals(f)
	if err != nil {
		return err
	}
	results, err := bench.ParseResults(os.Stdin)
	if err != nil {
		return fmt.Errorf("read benchmark output: %w", err)
	}
	fmt.Println()
	missed, absent := bench.WriteTable(os.Stdout, goals, results)
	fmt.Printf("\n%d figures, %d missed their goal, %d with a goal not run\n", len(goals), missed, absent)
	if missed+absent > 0 {
		return fmt.Errorf("%d figures missed their goal and %d with a goal were not run", missed, absent)
	}
	return nil
}
