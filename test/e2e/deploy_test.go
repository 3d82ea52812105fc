package e2e

import (
	"context"
	"slices"
	"testing"
	"time"

	authorizationv1 "k8s.io/api/authorization/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/miniproxy/miniproxy/test/e2e/framework"
)

// TestDeployManifest applies deploy/daemonset.yaml with server-side dry run:
// the real apiserver validates, defaults and admits every object (the
// system-node-critical PriorityClass, privileged pods, RBAC escalation).
func TestDeployManifest(t *testing.T) {
	row := suite.Matrix.Track(t, "deploy/daemonset.yaml server-side dry run", framework.ModeIndependent)
	c := suite.Cluster(t, row)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	ds := c.Manifest.DaemonSet
	pod := ds.Spec.Template.Spec
	if !pod.HostNetwork {
		t.Error("DaemonSet must use hostNetwork")
	}
	if pod.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName = %q, want system-node-critical", pod.PriorityClassName)
	}
	if !slices.ContainsFunc(pod.Tolerations, func(tol corev1.Toleration) bool { return tol.Operator == "Exists" && tol.Key == "" }) {
		t.Error("DaemonSet must tolerate every taint (operator: Exists, no key)")
	}
	if pod.ServiceAccountName != c.Manifest.ServiceAccount.Name {
		t.Errorf("serviceAccountName = %q, want %q", pod.ServiceAccountName, c.Manifest.ServiceAccount.Name)
	}

	if err := framework.ApplyManifest(ctx, c.CP, c.Manifest, true); err != nil {
		t.Fatalf("server-side dry-run apply: %v", err)
	}
	// Dry run must not have stored the DaemonSet.
	if _, err := c.Admin.AppsV1().DaemonSets(ds.Namespace).Get(ctx, ds.Name, metav1.GetOptions{}); err == nil {
		t.Error("dry run stored the DaemonSet")
	}
}

// TestProxyIdentityIsLeastPrivilege checks what the ServiceAccount from the
// manifest may and may not do, as the apiserver's authorizer answers it.
func TestProxyIdentityIsLeastPrivilege(t *testing.T) {
	row := suite.Matrix.Track(t, "miniproxy RBAC least privilege", framework.ModeIndependent)
	c := suite.Cluster(t, row)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sa := c.Manifest.ServiceAccount
	user := "system:serviceaccount:" + sa.Namespace + ":" + sa.Name
	cases := []struct {
		group, resource, verb string
		want                  bool
	}{
		{"", "services", "list", true},
		{"", "services", "watch", true},
		{"", "nodes", "watch", true},
		{"discovery.k8s.io", "endpointslices", "list", true},
		{"discovery.k8s.io", "endpointslices", "watch", true},
		{"events.k8s.io", "events", "create", true},
		{"events.k8s.io", "events", "patch", true},
		{"", "events", "create", false},
		{"events.k8s.io", "events", "update", false},
		{"", "secrets", "list", false},
		{"", "services", "update", false},
		{"discovery.k8s.io", "endpointslices", "create", false},
		{"", "pods", "list", false},
	}
	for _, tc := range cases {
		sar := &authorizationv1.SubjectAccessReview{Spec: authorizationv1.SubjectAccessReviewSpec{
			User:   user,
			Groups: []string{"system:serviceaccounts", "system:serviceaccounts:" + sa.Namespace, "system:authenticated"},
			ResourceAttributes: &authorizationv1.ResourceAttributes{
				Group: tc.group, Resource: tc.resource, Verb: tc.verb,
			},
		}}
		got, err := c.Admin.AuthorizationV1().SubjectAccessReviews().Create(ctx, sar, metav1.CreateOptions{})
		if err != nil {
			t.Fatalf("SubjectAccessReview: %v", err)
		}
		if got.Status.Allowed != tc.want {
			t.Errorf("%s %s.%s: allowed=%v, want %v (%s)", tc.verb, tc.resource, tc.group, got.Status.Allowed, tc.want, got.Status.Reason)
		}
	}
}
