package framework

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"strings"
	"time"
)

// Counts is how many connections (or UDP flows) each endpoint answered.
type Counts struct {
	ByName   map[string]int
	Errors   int
	FirstErr error
}

// Total is the number of answered connections.
func (c Counts) Total() int {
	n := 0
	for _, v := range c.ByName {
		n += v
	}
	return n
}

// Names is the sorted set of endpoints that answered.
func (c Counts) Names() []string { return slices.Sorted(maps.Keys(c.ByName)) }

func (c Counts) String() string {
	var b strings.Builder
	for _, n := range c.Names() {
		fmt.Fprintf(&b, "%s=%d ", n, c.ByName[n])
	}
	fmt.Fprintf(&b, "errors=%d", c.Errors)
	if c.FirstErr != nil {
		fmt.Fprintf(&b, " (first: %v)", c.FirstErr)
	}
	return b.String()
}

func (c *Counts) add(name string, err error) {
	if c.ByName == nil {
		c.ByName = map[string]int{}
	}
	if err != nil {
		c.Errors++
		if c.FirstErr == nil {
			c.FirstErr = err
		}
		return
	}
	c.ByName[name]++
}

// askTCP opens one connection from ns, sends a line, and returns the name the
// server answered with.
func askTCP(ctx context.Context, ns *NetNS, addr string, timeout time.Duration) (string, error) {
	var name string
	err := ns.Do(func() error {
		var err error
		name, err = askTCPHere(ctx, addr, timeout)
		return err
	})
	return name, err
}

// askTCPHere must run on a thread inside the source namespace.
func askTCPHere(ctx context.Context, addr string, timeout time.Duration) (string, error) {
	d := net.Dialer{Timeout: timeout}
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return "", fmt.Errorf("dial tcp %s: %w", addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	return askOn(c)
}

func askOn(c net.Conn) (string, error) {
	if _, err := io.WriteString(c, "hello\n"); err != nil {
		return "", fmt.Errorf("write to %s: %w", c.RemoteAddr(), err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read from %s: %w", c.RemoteAddr(), err)
	}
	return strings.TrimSpace(line), nil
}

// askUDPHere sends one datagram from a fresh socket (a new conntrack flow)
// and waits for the answer; it retries the same flow a few times because a
// datagram may be lost while rules change.
func askUDPHere(addr string, timeout time.Duration, tries int) (string, error) {
	c, err := net.Dial("udp", addr)
	if err != nil {
		return "", fmt.Errorf("dial udp %s: %w", addr, err)
	}
	defer c.Close()
	buf := make([]byte, 512)
	var last error
	for i := 0; i < tries; i++ {
		if _, err := c.Write([]byte("hello\n")); err != nil {
			last = fmt.Errorf("udp write %s: %w", addr, err)
			continue
		}
		_ = c.SetReadDeadline(time.Now().Add(timeout))
		n, err := c.Read(buf)
		if err != nil {
			last = fmt.Errorf("udp read %s: %w", addr, err)
			continue
		}
		return strings.TrimSpace(string(buf[:n])), nil
	}
	return "", last
}

// TCPCounts opens n short TCP connections from the pod to addr (host:port),
// one after another, and counts which endpoint answered each.
func (p *Pod) TCPCounts(ctx context.Context, addr string, n int) (Counts, error) {
	return countFrom(ctx, p.NS, n, func() (string, error) { return askTCPHere(ctx, addr, 2*time.Second) })
}

// UDPCounts sends n UDP flows (each from a new source port) from the pod.
func (p *Pod) UDPCounts(ctx context.Context, addr string, n int) (Counts, error) {
	return countFrom(ctx, p.NS, n, func() (string, error) { return askUDPHere(addr, 700*time.Millisecond, 3) })
}

func countFrom(ctx context.Context, ns *NetNS, n int, ask func() (string, error)) (Counts, error) {
	var c Counts
	c.ByName = map[string]int{}
	// One namespace switch for the whole batch: sockets are created on this
	// locked thread, blocking waits park the goroutine without leaving it.
	err := ns.Do(func() error {
		for i := 0; i < n; i++ {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("after %d of %d: %w", i, n, err)
			}
			c.add(ask())
		}
		return nil
	})
	return c, err
}

// Conn is a long-lived TCP connection from a pod.
type Conn struct {
	c net.Conn
}

// DialTCP opens a connection from the pod that stays open until Close.
func (p *Pod) DialTCP(ctx context.Context, addr string) (*Conn, error) {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	c, err := p.NS.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("pod %s dial %s: %w", p.Name, addr, err)
	}
	return &Conn{c: c}, nil
}

// Ask sends one line on the open connection and returns the answering name.
func (c *Conn) Ask(timeout time.Duration) (string, error) {
	_ = c.c.SetDeadline(time.Now().Add(timeout))
	return askOn(c.c)
}

// Close closes the connection.
func (c *Conn) Close() error { return c.c.Close() }

// Answers reports whether a single TCP connection from the pod to addr gets
// an answer within timeout.
func (p *Pod) Answers(ctx context.Context, addr string, timeout time.Duration) bool {
	_, err := askTCP(ctx, p.NS, addr, timeout)
	return err == nil
}
