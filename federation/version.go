package federation

import (
	"runtime/debug"
	"strings"
)

// BuildVersion is what the controller's admin /version serves and `fedctl
// status` shows: the module version and the VCS revision it was built from.
type BuildVersion struct {
	Version  string `json:"version"`            // module version, "(devel)" for a checkout build
	Revision string `json:"revision,omitempty"` // VCS commit, shortened
	Modified bool   `json:"modified,omitempty"` // built from a tree with uncommitted changes
	Go       string `json:"go"`
}

// String is "version revision[+dirty]".
func (v BuildVersion) String() string {
	s := v.Version
	if v.Revision != "" {
		s += " " + v.Revision
		if v.Modified {
			s += "+dirty"
		}
	}
	return strings.TrimSpace(s)
}

// buildRevision is set by `make build` (-ldflags -X) to `git describe
// --always --dirty`, for builds without VCS stamping (GOFLAGS=-buildvcs=false).
var buildRevision string

// Version reads the running binary's build information.
func Version() BuildVersion {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return BuildVersion{Version: "unknown"}
	}
	v := BuildVersion{Version: bi.Main.Version, Go: bi.GoVersion}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Revision = s.Value[:min(12, len(s.Value))]
		case "vcs.modified":
			v.Modified = s.Value == "true"
		}
	}
	if v.Revision == "" && buildRevision != "" {
		v.Revision, v.Modified = strings.TrimSuffix(buildRevision, "-dirty"), strings.HasSuffix(buildRevision, "-dirty")
	}
	return v
}
