// Package e2e runs miniproxy against a real kube-apiserver and real kernel
// dataplanes in network namespaces (see test/e2e/framework). Each feature runs
// once per proxy mode; the suite writes e2e-results/e2e-matrix.md.
//
// Needs root; without it every test skips and says why. Needs the binaries
// from hack/provision.sh and `make build` (`make e2e` does both).
package e2e

import (
	"fmt"
	"os"
	"testing"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// suite is the one piece of package state: TestMain owns the shared cluster
// so that it is torn down exactly once, after every test, and on signals.
var suite *framework.Suite

func TestMain(m *testing.M) {
	suite = framework.NewSuite()
	code := m.Run()
	if err := suite.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "e2e teardown:", err)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}
