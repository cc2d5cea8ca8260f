package fedctl

import (
	"encoding/json"
	"io"
	"log/slog"
	"os"
	"time"

	"golang.org/x/term"
	"sigs.k8s.io/yaml"
)

// printObject writes v as yaml or json.
func printObject(w io.Writer, v any, format string) error {
	switch format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	case "yaml":
		b, err := yaml.Marshal(v)
		if err != nil {
			return err
		}
		_, err = w.Write(b)
		return err
	}
	return usagef("output format %q: want yaml or json", format)
}

// colors paints problems red and good news green on a terminal only.
type colors struct{ on bool }

func colorsFor(w io.Writer) colors {
	f, ok := w.(*os.File)
	return colors{on: ok && term.IsTerminal(int(f.Fd())) && os.Getenv("NO_COLOR") == ""}
}

func (c colors) bad(s string) string {
	if !c.on {
		return s
	}
	return "\x1b[31m" + s + "\x1b[0m"
}

func (c colors) good(s string) string {
	if !c.on {
		return s
	}
	return "\x1b[32m" + s + "\x1b[0m"
}

func newLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo}))
}

func sleep100ms() <-chan time.Time { return time.After(100 * time.Millisecond) }
