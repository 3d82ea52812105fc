// Package netnsrun runs a function with the calling goroutine's OS thread
// inside another network namespace. Sockets (and netlink sockets) created by
// the function stay in that namespace after the thread switches back, which
// is how the IPVS backend programs a node namespace and how tests dial "from
// a pod" without forking a process.
package netnsrun

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// Path runs fn inside the namespace bind-mounted or linked at path (e.g.
// /run/netns/NAME or /proc/PID/ns/net).
func Path(path string, fn func() error) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", path, err)
	}
	defer f.Close()
	if err := FD(int(f.Fd()), fn); err != nil {
		return fmt.Errorf("in netns %s: %w", path, err)
	}
	return nil
}

// FD runs fn inside the namespace referred to by the open descriptor fd, on a
// fresh goroutine locked to its thread. If the thread cannot switch back, it
// stays locked, and the runtime discards it when the goroutine ends, so no
// other goroutine ever runs in the wrong namespace.
func FD(fd int, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("open current netns: %w", err)
			return
		}
		defer orig.Close()
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns: %w", err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("switching back: %w (thread discarded)", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}
