// Command fedctl runs, inspects and drills fedmesh federations.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/fedmesh/fedmesh/fedctl"
)

func main() {
	err := fedctl.NewCommand(os.Stdout, os.Stderr).ExecuteContext(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, "fedctl:", err)
	}
	os.Exit(fedctl.ExitCode(err))
}
