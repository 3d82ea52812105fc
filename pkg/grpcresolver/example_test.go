package grpcresolver_test

import (
	"context"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/client-go/kubernetes"

	"github.com/miniproxy/miniproxy/pkg/grpcresolver"
	"github.com/miniproxy/miniproxy/pkg/grpcresolver/example"
	"github.com/miniproxy/miniproxy/pkg/model"
)

// A client in a pod: the resolver watches Service "echo" in namespace "lab"
// and round_robin spreads RPCs over its eligible endpoints.
func ExampleNewBuilder() {
	var client kubernetes.Interface // e.g. kubernetes.NewForConfig(rest.InClusterConfig())
	b := grpcresolver.NewBuilder(client, grpcresolver.Options{
		Node: model.Node{Name: "node-1", Zone: "zone-a"}, // or $NODE_NAME / $NODE_ZONE
		OnUpdate: func(u grpcresolver.Update) {
			fmt.Println(u.At, u.Addresses, u.Err) // when gRPC learnt of a change
		},
	})
	cc, err := grpc.NewClient("miniproxy:///echo.lab:grpc",
		grpc.WithResolvers(b),
		grpc.WithDefaultServiceConfig(`{"loadBalancingConfig":[{"round_robin":{}}]}`),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		panic(err)
	}
	defer cc.Close()
	name, err := example.Name(context.Background(), cc)
	fmt.Println(name, err)
}
