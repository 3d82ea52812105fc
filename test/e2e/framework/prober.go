package framework

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// Prober measures what clients see while the node's proxy changes: a new TCP
// connection every Interval, and a few long-lived connections that each ask
// every 100 ms. Every attempt is recorded with its time, so a test can count
// the failures after a given moment (say, the new proxy's first sync).
type Prober struct {
	Addr     string
	Interval time.Duration

	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu    sync.Mutex
	new   []ProbeAttempt
	long  []ProbeAttempt
	first []string // the endpoint each long-lived connection reached first
}

// ProbeAttempt is one new connection, or one question on a long-lived one.
type ProbeAttempt struct {
	At     time.Time
	Conn   int // long-lived connection index; -1 for new connections
	Answer string
	Err    error
}

// StartProber opens long connections from the pod to addr (failing if one
// cannot be opened) and starts probing. Stop ends it.
func (p *Pod) StartProber(ctx context.Context, addr string, interval time.Duration, long int) (*Prober, error) {
	pr := &Prober{Addr: addr, Interval: interval}
	var conns []*Conn
	for i := 0; i < long; i++ {
		c, err := p.DialTCP(ctx, addr)
		if err != nil {
			for _, c := range conns {
				c.Close()
			}
			return nil, err
		}
		name, err := c.Ask(2 * time.Second)
		if err != nil {
			c.Close()
			for _, c := range conns {
				c.Close()
			}
			return nil, fmt.Errorf("long-lived connection %d to %s: %w", i, addr, err)
		}
		conns = append(conns, c)
		pr.first = append(pr.first, name)
	}
	ctx, pr.cancel = context.WithCancel(ctx)
	pr.wg.Add(2)
	go func() {
		defer pr.wg.Done()
		// One locked thread in the pod's namespace for the whole run.
		_ = p.NS.Do(func() error {
			t := time.NewTicker(interval)
			defer t.Stop()
			for {
				select {
				case <-ctx.Done():
					return nil
				case <-t.C:
				}
				at := time.Now()
				name, err := askTCPHere(ctx, addr, time.Second)
				if ctx.Err() != nil {
					return nil
				}
				pr.mu.Lock()
				pr.new = append(pr.new, ProbeAttempt{At: at, Conn: -1, Answer: name, Err: err})
				pr.mu.Unlock()
			}
		})
	}()
	go func() {
		defer pr.wg.Done()
		defer func() {
			for _, c := range conns {
				c.Close()
			}
		}()
		t := time.NewTicker(100 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
			for i, c := range conns {
				at := time.Now()
				name, err := c.Ask(time.Second)
				if err == nil && name != pr.first[i] {
					err = fmt.Errorf("long-lived connection %d answered by %s, opened to %s", i, name, pr.first[i])
				}
				pr.mu.Lock()
				pr.long = append(pr.long, ProbeAttempt{At: at, Conn: i, Answer: name, Err: err})
				pr.mu.Unlock()
			}
		}
	}()
	return pr, nil
}

// Stop ends probing and returns the report.
func (pr *Prober) Stop() ProbeReport {
	pr.cancel()
	pr.wg.Wait()
	pr.mu.Lock()
	defer pr.mu.Unlock()
	return ProbeReport{New: append([]ProbeAttempt(nil), pr.new...), Long: append([]ProbeAttempt(nil), pr.long...)}
}

// ProbeReport is everything a Prober saw.
type ProbeReport struct {
	New  []ProbeAttempt
	Long []ProbeAttempt
}

// Failed counts failed attempts in [from, to) (zero times: unbounded) and
// returns the first failure.
func Failed(as []ProbeAttempt, from, to time.Time) (n, total int, first *ProbeAttempt) {
	for i := range as {
		a := &as[i]
		if (!from.IsZero() && a.At.Before(from)) || (!to.IsZero() && !a.At.Before(to)) {
			continue
		}
		total++
		if a.Err != nil {
			n++
			if first == nil {
				first = a
			}
		}
	}
	return n, total, first
}
