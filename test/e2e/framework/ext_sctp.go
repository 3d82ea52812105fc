package framework

// SCTP without a library: Go's net package has no SCTP, but one-to-one style
// SCTP sockets (SOCK_STREAM, IPPROTO_SCTP) behave like TCP sockets for
// bind/listen/accept/connect/read/write, which is all a reachability test
// needs.

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// SCTPSupported opens (and closes) an SCTP socket inside ns. It returns
// ErrNoSCTP, wrapped with the errno, when the kernel refuses the protocol.
func SCTPSupported(ns *NetNS) error {
	return ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_SCTP)
		if err != nil {
			return fmt.Errorf("%w: socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP): %v", ErrNoSCTP, err)
		}
		return unix.Close(fd)
	})
}

// SCTPServer answers every message on an SCTP association with its name.
type SCTPServer struct {
	fd   int
	wg   sync.WaitGroup
	once sync.Once
}

// ServeSCTP listens on port in the pod's namespace and answers with name.
func (p *Pod) ServeSCTP(port int, name string) (*SCTPServer, error) {
	var fd int
	err := p.NS.Do(func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_SCTP)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrNoSCTP, err)
		}
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: port}); err != nil {
			unix.Close(fd)
			return fmt.Errorf("sctp bind :%d: %w", port, err)
		}
		if err := unix.Listen(fd, 64); err != nil {
			unix.Close(fd)
			return fmt.Errorf("sctp listen :%d: %w", port, err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w", p.Name, err)
	}
	s := &SCTPServer{fd: fd}
	// Accept blocks in the kernel on a dedicated thread; Close shuts the
	// listener down, which wakes it with an error.
	s.wg.Go(func() {
		for {
			cfd, _, err := unix.Accept(fd)
			if err != nil {
				if errors.Is(err, unix.EINTR) {
					continue
				}
				return
			}
			s.wg.Go(func() {
				defer unix.Close(cfd)
				tv := unix.NsecToTimeval(int64(5 * time.Second))
				_ = unix.SetsockoptTimeval(cfd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
				buf := make([]byte, 512)
				for {
					n, err := unix.Read(cfd, buf)
					if err != nil || n == 0 {
						return
					}
					if _, err := unix.Write(cfd, []byte(name+"\n")); err != nil {
						return
					}
				}
			})
		}
	})
	return s, nil
}

// Close stops the server.
func (s *SCTPServer) Close() error {
	var err error
	s.once.Do(func() {
		_ = unix.Shutdown(s.fd, unix.SHUT_RDWR)
		err = unix.Close(s.fd)
		s.wg.Wait()
	})
	return err
}

// AskSCTP opens one SCTP association from ns to addr, sends a line and
// returns the answer. SO_SNDTIMEO bounds the connect, SO_RCVTIMEO the read.
func AskSCTP(ns *NetNS, addr netip.AddrPort, timeout time.Duration) (string, error) {
	var answer string
	err := ns.Do(func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM, unix.IPPROTO_SCTP)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrNoSCTP, err)
		}
		defer unix.Close(fd)
		tv := unix.NsecToTimeval(timeout.Nanoseconds())
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		if err := unix.Connect(fd, &unix.SockaddrInet4{Addr: addr.Addr().As4(), Port: int(addr.Port())}); err != nil {
			return fmt.Errorf("sctp connect %s: %w", addr, err)
		}
		if _, err := unix.Write(fd, []byte("hello\n")); err != nil {
			return fmt.Errorf("sctp write %s: %w", addr, err)
		}
		buf := make([]byte, 512)
		n, err := unix.Read(fd, buf)
		if err != nil {
			return fmt.Errorf("sctp read %s: %w", addr, err)
		}
		answer = strings.TrimSpace(string(buf[:n]))
		return nil
	})
	return answer, err
}
