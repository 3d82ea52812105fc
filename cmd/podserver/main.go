// Command podserver is what a test "pod" runs: it answers every TCP line,
// every UDP datagram and every HTTP request with its own name, so a client can
// count which endpoint served each connection.
//
//	podserver serve --name web-0 --tcp 8080 --udp 8080 --http 8081
//	podserver client --proto tcp --addr 10.96.0.10:80 --count 100
//	podserver grpc-client --target dns://10.250.0.2/grpc.lab.svc.cluster.local:9090 --lb round_robin
//	podserver pause
//
// TCP: the server answers each line it reads with "<name>\n" and keeps the
// connection open until the client closes it, so one connection can be probed
// again later (for example across a proxy restart). UDP: each datagram is
// answered with "<name>\n" from the port it arrived on. HTTP: GET on any path
// returns "<name>\n". gRPC: the unary method /podserver.Name/Get
// (google.protobuf.Empty → google.protobuf.StringValue) returns the name; the
// service is declared by hand with well-known types, so no protoc step is
// needed and any client can call it with grpc.ClientConn.Invoke.
// --grpc-max-connection-age sets the server's MaxConnectionAge keepalive
// parameter, which makes clients reconnect (and so re-pick an endpoint).
//
// The client subcommand is for people poking at a lab by hand
// (`ip netns exec POD bin/podserver client ...`); the e2e framework dials from
// inside the pod's namespace in-process instead.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		usage()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(ctx, os.Args[2:])
	case "client":
		err = client(ctx, os.Args[2:])
	case "grpc-client":
		err = grpcClient(ctx, os.Args[2:])
	case "pause":
		// A pod sandbox's process in the kubelet test bed's pause image:
		// it holds the pod's namespaces and does nothing until stopped.
		<-ctx.Done()
	default:
		usage()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "podserver:", err)
		os.Exit(1)
	}
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: podserver serve --name N [--tcp PORT] [--udp PORT] [--http PORT] [--grpc PORT] [--grpc-max-connection-age D] [--addr IP]\n       podserver client --proto tcp|udp --addr HOST:PORT [--count N] [--timeout D]\n       podserver grpc-client --target T [--lb pick_first|round_robin] [--channels N] [--rpcs N] [--interval D] [--duration D]\n       podserver pause")
	os.Exit(2)
}

func serve(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	name := fs.String("name", "", "name to answer with (required)")
	addr := fs.String("addr", "", "address to bind (default: all)")
	tcpPorts := fs.String("tcp", "8080", "comma-separated TCP ports (empty: none)")
	udpPorts := fs.String("udp", "8080", "comma-separated UDP ports (empty: none)")
	httpPorts := fs.String("http", "", "comma-separated HTTP ports (empty: none)")
	grpcPorts := fs.String("grpc", "", "comma-separated gRPC ports (empty: none)")
	maxAge := fs.Duration("grpc-max-connection-age", 0, "gRPC MaxConnectionAge (0: unlimited)")
	_ = fs.Parse(args)
	if *name == "" {
		return errors.New("serve: --name is required")
	}
	reply := []byte(*name + "\n")

	var wg sync.WaitGroup
	errc := make(chan error, 16)
	for _, p := range split(*tcpPorts) {
		ln, err := net.Listen("tcp", net.JoinHostPort(*addr, p))
		if err != nil {
			return fmt.Errorf("listen tcp %s: %w", p, err)
		}
		context.AfterFunc(ctx, func() { _ = ln.Close() })
		wg.Go(func() { errc <- serveTCP(ctx, ln, reply) })
	}
	for _, p := range split(*udpPorts) {
		pc, err := net.ListenPacket("udp", net.JoinHostPort(*addr, p))
		if err != nil {
			return fmt.Errorf("listen udp %s: %w", p, err)
		}
		context.AfterFunc(ctx, func() { _ = pc.Close() })
		wg.Go(func() { errc <- serveUDP(ctx, pc, reply) })
	}
	for _, p := range split(*httpPorts) {
		ln, err := net.Listen("tcp", net.JoinHostPort(*addr, p))
		if err != nil {
			return fmt.Errorf("listen http %s: %w", p, err)
		}
		srv := &http.Server{
			Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
				_, _ = w.Write(reply)
			}),
			ReadHeaderTimeout: 10 * time.Second,
		}
		context.AfterFunc(ctx, func() { _ = srv.Close() })
		wg.Go(func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("http: %w", err)
			}
		})
	}
	for _, p := range split(*grpcPorts) {
		ln, err := net.Listen("tcp", net.JoinHostPort(*addr, p))
		if err != nil {
			return fmt.Errorf("listen grpc %s: %w", p, err)
		}
		srv := newGRPCServer(*name, *maxAge)
		context.AfterFunc(ctx, srv.Stop)
		wg.Go(func() {
			if err := srv.Serve(ln); err != nil {
				errc <- fmt.Errorf("grpc: %w", err)
			}
		})
	}
	// The framework waits for this line before it publishes the endpoint.
	fmt.Printf("podserver %s ready tcp=%s udp=%s http=%s grpc=%s\n", *name, *tcpPorts, *udpPorts, *httpPorts, *grpcPorts)
	select {
	case <-ctx.Done():
		wg.Wait()
		return nil
	case err := <-errc:
		return err
	}
}

func split(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func serveTCP(ctx context.Context, ln net.Listener, reply []byte) error {
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("accept: %w", err)
		}
		go func() {
			defer c.Close()
			context.AfterFunc(ctx, func() { _ = c.Close() })
			r := bufio.NewReader(c)
			for {
				if _, err := r.ReadString('\n'); err != nil {
					return
				}
				if _, err := c.Write(reply); err != nil {
					return
				}
			}
		}()
	}
}

func serveUDP(ctx context.Context, pc net.PacketConn, reply []byte) error {
	buf := make([]byte, 2048)
	for {
		_, from, err := pc.ReadFrom(buf)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("udp read: %w", err)
		}
		_, _ = pc.WriteTo(reply, from)
	}
}

// client opens count short connections (or UDP flows, one socket each) and
// prints how many each server name answered, plus failures.
func client(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	proto := fs.String("proto", "tcp", "tcp or udp")
	addr := fs.String("addr", "", "HOST:PORT to connect to (required)")
	count := fs.Int("count", 1, "number of connections / flows")
	timeout := fs.Duration("timeout", 2*time.Second, "per-connection timeout")
	_ = fs.Parse(args)
	if *addr == "" {
		return errors.New("client: --addr is required")
	}
	counts := map[string]int{}
	for i := 0; i < *count && ctx.Err() == nil; i++ {
		name, err := ask(ctx, *proto, *addr, *timeout)
		if err != nil {
			counts["<error>"]++
			fmt.Fprintln(os.Stderr, err)
			continue
		}
		counts[name]++
	}
	names := make([]string, 0, len(counts))
	for n := range counts {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Printf("%s %d\n", n, counts[n])
	}
	return nil
}

func ask(ctx context.Context, proto, addr string, timeout time.Duration) (string, error) {
	d := net.Dialer{Timeout: timeout}
	c, err := d.DialContext(ctx, proto, addr)
	if err != nil {
		return "", fmt.Errorf("dial %s %s: %w", proto, addr, err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := io.WriteString(c, "hello\n"); err != nil {
		return "", fmt.Errorf("write %s: %w", addr, err)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read %s: %w", addr, err)
	}
	return strings.TrimSpace(line), nil
}
