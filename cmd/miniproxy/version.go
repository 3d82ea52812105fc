package main

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// version is stamped at link time (-ldflags "-X main.version=..."), as `make
// image` does; a plain `go build` leaves it empty and the VCS revision Go
// records in the binary stands in.
var version string

// versionString is what --version prints: "miniproxy <version> (<go version>)".
func versionString() string {
	v := version
	if v == "" {
		v = "dev"
		if bi, ok := debug.ReadBuildInfo(); ok {
			var rev, dirty string
			for _, s := range bi.Settings {
				switch s.Key {
				case "vcs.revision":
					rev = s.Value
				case "vcs.modified":
					if s.Value == "true" {
						dirty = "-dirty"
					}
				}
			}
			if len(rev) > 12 {
				rev = rev[:12]
			}
			if rev != "" {
				v = "dev-" + rev + dirty
			}
		}
	}
	return fmt.Sprintf("miniproxy %s (%s)", v, runtime.Version())
}
