// Command coredns is CoreDNS v1.15.0 with only the plugins the lab uses:
// errors, log, cache and kubernetes. Upstream's main package imports every
// plugin through core/plugin; this one imports the four explicitly and sets
// the directive order itself (the order in which plugins see a query).
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
)

// directives keeps upstream's relative order of these plugins (errors and log
// first so they wrap everything, cache before the data source).
var directives = []string{"errors", "log", "cache", "kubernetes"}

func main() {
	dnsserver.Directives = directives
	coremain.Run()
}
