package framework

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/restmapper"
)

// Manifest is deploy/daemonset.yaml parsed into typed objects. The tests run
// miniproxy with exactly the ClusterRole and ServiceAccount it declares, so a
// permission missing from the shipped manifest fails a test.
type Manifest struct {
	Path               string
	Docs               [][]byte // raw YAML documents, in order
	ServiceAccount     *corev1.ServiceAccount
	ClusterRole        *rbacv1.ClusterRole
	ClusterRoleBinding *rbacv1.ClusterRoleBinding
	DaemonSet          *appsv1.DaemonSet
}

// LoadManifest parses deploy/daemonset.yaml under the repository root.
func LoadManifest(root string) (*Manifest, error) {
	path := filepath.Join(root, "deploy", "daemonset.yaml")
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read manifest: %w", err)
	}
	m := &Manifest{Path: path}
	rd := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(raw)))
	dec := scheme.Codecs.UniversalDeserializer()
	for {
		doc, err := rd.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("split %s: %w", path, err)
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		obj, _, err := dec.Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("decode document %d of %s: %w", len(m.Docs)+1, path, err)
		}
		m.Docs = append(m.Docs, doc)
		switch o := obj.(type) {
		case *corev1.ServiceAccount:
			m.ServiceAccount = o
		case *rbacv1.ClusterRole:
			m.ClusterRole = o
		case *rbacv1.ClusterRoleBinding:
			m.ClusterRoleBinding = o
		case *appsv1.DaemonSet:
			m.DaemonSet = o
		}
	}
	switch {
	case m.ServiceAccount == nil:
		return nil, fmt.Errorf("%s: no ServiceAccount", path)
	case m.ClusterRole == nil:
		return nil, fmt.Errorf("%s: no ClusterRole", path)
	case m.ClusterRoleBinding == nil:
		return nil, fmt.Errorf("%s: no ClusterRoleBinding", path)
	case m.DaemonSet == nil:
		return nil, fmt.Errorf("%s: no DaemonSet", path)
	}
	return m, nil
}

func stripComments(doc []byte) []byte {
	var out [][]byte
	for _, l := range bytes.Split(doc, []byte("\n")) {
		if t := bytes.TrimSpace(l); len(t) > 0 && t[0] != '#' {
			out = append(out, l)
		}
	}
	return bytes.Join(out, []byte("\n"))
}

// ApplyManifest server-side applies every document of the manifest. With
// dryRun the apiserver validates and admits everything (RBAC escalation
// checks, PriorityClass, PodSecurity, defaulting) but stores nothing.
func ApplyManifest(ctx context.Context, cp *ControlPlane, m *Manifest, dryRun bool) error {
	dyn, err := dynamic.NewForConfig(cp.AdminConfig)
	if err != nil {
		return fmt.Errorf("dynamic client: %w", err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(cp.Admin.Discovery()))
	for i, doc := range m.Docs {
		js, err := utilyaml.ToJSON(doc)
		if err != nil {
			return fmt.Errorf("document %d to JSON: %w", i+1, err)
		}
		u := &unstructured.Unstructured{}
		if err := runtime.DecodeInto(unstructured.UnstructuredJSONScheme, js, u); err != nil {
			return fmt.Errorf("document %d: %w", i+1, err)
		}
		gvk := u.GroupVersionKind()
		mapping, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return fmt.Errorf("map %s: %w", gvk, err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(mapping.Resource)
		if mapping.Scope.Name() == meta.RESTScopeNameNamespace {
			ri = dyn.Resource(mapping.Resource).Namespace(u.GetNamespace())
		}
		opts := metav1.PatchOptions{FieldManager: "miniproxy-e2e", Force: ptrTo(true)}
		if dryRun {
			opts.DryRun = []string{metav1.DryRunAll}
		}
		if _, err := ri.Patch(ctx, u.GetName(), types.ApplyPatchType, js, opts); err != nil {
			return fmt.Errorf("apply %s %s/%s (dryRun=%v): %w", gvk.Kind, u.GetNamespace(), u.GetName(), dryRun, err)
		}
	}
	return nil
}

// applyRBAC creates the ServiceAccount, ClusterRole and binding exactly as
// the manifest declares them (not the DaemonSet: no kubelet runs here).
func applyRBAC(ctx context.Context, cp *ControlPlane, m *Manifest) error {
	c := cp.Admin
	if _, err := c.CoreV1().ServiceAccounts(m.ServiceAccount.Namespace).Create(ctx, m.ServiceAccount.DeepCopy(), metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create ServiceAccount: %w", err)
	}
	if _, err := c.RbacV1().ClusterRoles().Create(ctx, m.ClusterRole.DeepCopy(), metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create ClusterRole: %w", err)
	}
	if _, err := c.RbacV1().ClusterRoleBindings().Create(ctx, m.ClusterRoleBinding.DeepCopy(), metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("create ClusterRoleBinding: %w", err)
	}
	return nil
}

func ptrTo[T any](v T) *T { return &v }
