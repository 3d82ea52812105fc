// Package example is a tiny gRPC service that answers with the server's name
// (a pod name in the lab), for measuring how a client spreads RPCs over
// endpoints. It is declared by hand with the standard protobuf codec and a
// well-known message type, so no protoc step is needed.
package example

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// ServiceName and FullMethod name the service on the wire.
const (
	ServiceName = "miniproxy.example.Name"
	FullMethod  = "/" + ServiceName + "/Get"
)

// nameServer exists because grpc.ServiceDesc wants a HandlerType to check
// the registered implementation against.
type nameServer interface{ name() string }

type fixedName string

func (f fixedName) name() string { return string(f) }

var _ nameServer = fixedName("")

func getHandler(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
	if err := dec(new(emptypb.Empty)); err != nil {
		return nil, fmt.Errorf("decoding request: %w", err)
	}
	return wrapperspb.String(srv.(nameServer).name()), nil
}

// RegisterNameServer makes s answer Get with name.
func RegisterNameServer(s grpc.ServiceRegistrar, name string) {
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: ServiceName,
		HandlerType: (*nameServer)(nil),
		Methods:     []grpc.MethodDesc{{MethodName: "Get", Handler: getHandler}},
	}, fixedName(name))
}

// Name calls Get on cc and returns the answering server's name.
func Name(ctx context.Context, cc grpc.ClientConnInterface, opts ...grpc.CallOption) (string, error) {
	out := new(wrapperspb.StringValue)
	if err := cc.Invoke(ctx, FullMethod, new(emptypb.Empty), out, opts...); err != nil {
		return "", fmt.Errorf("%s: %w", FullMethod, err)
	}
	return out.GetValue(), nil
}
