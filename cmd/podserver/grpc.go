package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// GRPCMethod is the full name of the name service's only method.
const GRPCMethod = "/podserver.Name/Get"

// namer is the handler type grpc.ServiceDesc checks the implementation
// against; the implementation is just the pod name.
type namer interface{ podName() string }

type podName string

func (p podName) podName() string { return string(p) }

func getName(srv any, _ context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	if err := dec(new(emptypb.Empty)); err != nil {
		return nil, fmt.Errorf("decode request: %w", err)
	}
	return wrapperspb.String(srv.(namer).podName()), nil
}

// newGRPCServer returns a server answering GRPCMethod with name. A non-zero
// maxAge closes every connection after that long (with a GOAWAY, so in-flight
// RPCs finish), which is the server-side knob for spreading long-lived
// clients over new endpoints.
func newGRPCServer(name string, maxAge time.Duration) *grpc.Server {
	var opts []grpc.ServerOption
	if maxAge > 0 {
		opts = append(opts, grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionAge:      maxAge,
			MaxConnectionAgeGrace: 5 * time.Second,
		}))
	}
	s := grpc.NewServer(opts...)
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: "podserver.Name",
		HandlerType: (*namer)(nil),
		Methods:     []grpc.MethodDesc{{MethodName: "Get", Handler: getName}},
	}, podName(name))
	return s
}

// grpcClient calls GRPCMethod on target over a pool of channels and prints
// one line per RPC: "<unix-milliseconds> <server name>" (or "<ms> ERR <msg>").
// It runs inside a pod namespace so that name resolution (dns:/// against the
// cluster DNS) and the connections both happen from the pod, as in a real
// client. It stops after --rpcs calls or --duration, whichever comes first.
func grpcClient(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("grpc-client", flag.ExitOnError)
	target := fs.String("target", "", "gRPC target, e.g. dns://10.250.0.2:53/svc.ns.svc.cluster.local:9090 (required)")
	lb := fs.String("lb", "pick_first", "load-balancing policy: pick_first or round_robin")
	channels := fs.Int("channels", 1, "channels in the pool; RPC i uses channel i mod channels")
	rpcs := fs.Int("rpcs", 1000, "RPCs to make (0: until --duration)")
	interval := fs.Duration("interval", 0, "pause between RPCs")
	duration := fs.Duration("duration", time.Minute, "upper bound on the run")
	_ = fs.Parse(args)
	if *target == "" {
		return errors.New("grpc-client: --target is required")
	}
	ctx, cancel := context.WithTimeout(ctx, *duration)
	defer cancel()
	sc := fmt.Sprintf(`{"loadBalancingConfig":[{%q:{}}]}`, *lb)
	var pool []*grpc.ClientConn
	for i := 0; i < max(1, *channels); i++ {
		cc, err := grpc.NewClient(*target, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithDefaultServiceConfig(sc))
		if err != nil {
			return fmt.Errorf("channel %d to %s: %w", i, *target, err)
		}
		defer cc.Close()
		pool = append(pool, cc)
	}
	// Unbuffered on purpose: a caller may follow the output while the
	// client runs (the lab waits for the first answers before it scales).
	out := os.Stdout
	for i := 0; (*rpcs == 0 || i < *rpcs) && ctx.Err() == nil; i++ {
		rctx, rcancel := context.WithTimeout(ctx, 2*time.Second)
		reply := new(wrapperspb.StringValue)
		err := pool[i%len(pool)].Invoke(rctx, GRPCMethod, new(emptypb.Empty), reply, grpc.WaitForReady(true))
		rcancel()
		now := time.Now().UnixMilli()
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			fmt.Fprintf(out, "%d ERR %s\n", now, strings.ReplaceAll(err.Error(), "\n", " "))
		} else {
			fmt.Fprintf(out, "%d %s\n", now, reply.GetValue())
		}
		if *interval > 0 {
			select {
			case <-ctx.Done():
			case <-time.After(*interval):
			}
		}
	}
	return nil
}
