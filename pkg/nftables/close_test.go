package nftables

import (
	"context"
	"errors"
	"testing"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/proxy"
)

// TestClosedBackendRefuses: once Close released the namespace file, netlink
// would reach the caller's namespace, so Sync and Cleanup must fail before
// touching any kernel. Runs without root: nothing is sent.
func TestClosedBackendRefuses(t *testing.T) {
	b, err := New(proxy.Config{})
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := b.Sync(context.Background(), &model.Snapshot{}, true); !errors.Is(err, errClosed) {
		t.Errorf("Sync after Close: %v, want %v", err, errClosed)
	}
	if err := b.Cleanup(context.Background()); !errors.Is(err, errClosed) {
		t.Errorf("Cleanup after Close: %v, want %v", err, errClosed)
	}
}
