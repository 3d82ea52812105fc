// Package ipvsapi runs the IPVS backend inside the qemu guest against the
// real kube-apiserver of the e2e control plane on the host: qemu runs inside
// the control-plane namespace, so the guest reaches the apiserver at
// 10.0.2.2:6443 (qemu user networking maps it to that namespace's loopback).
// The guest side watches Services and EndpointSlices with pkg/watch, syncs
// pkg/ipvs from the tracker's snapshots, and checks real connections; it
// creates and changes the API objects itself, so the whole chain
// apiserver → watch → model → IPVS → packets is exercised in one place.
package ipvsapi
