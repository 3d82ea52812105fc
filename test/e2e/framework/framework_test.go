package framework

import (
	"crypto/x509"
	"encoding/pem"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// The shipped ClusterRole grants what a service proxy needs and nothing
// broader; this runs without root or an apiserver.
func TestLoadManifestLeastPrivilege(t *testing.T) {
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	m, err := LoadManifest(root)
	if err != nil {
		t.Fatal(err)
	}
	allowed := map[string]bool{}
	for _, r := range m.ClusterRole.Rules {
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					if g == "*" || res == "*" || v == "*" {
						t.Errorf("wildcard in rule %+v", r)
					}
					allowed[g+"/"+res+"/"+v] = true
				}
			}
		}
	}
	for _, want := range []string{
		"/services/list", "/services/watch", "/nodes/list", "/nodes/watch",
		"discovery.k8s.io/endpointslices/list", "discovery.k8s.io/endpointslices/watch",
		"events.k8s.io/events/create", "events.k8s.io/events/patch",
	} {
		if !allowed[want] {
			t.Errorf("ClusterRole lacks %s", want)
		}
	}
	for k := range allowed {
		if strings.HasPrefix(k, "/secrets") || strings.HasSuffix(k, "/delete") || strings.HasPrefix(k, "/pods") || strings.HasPrefix(k, "/events/") {
			t.Errorf("ClusterRole grants %s, which miniproxy never needs", k)
		}
	}
	b := m.ClusterRoleBinding
	if b.RoleRef.Name != m.ClusterRole.Name || len(b.Subjects) != 1 ||
		b.Subjects[0].Name != m.ServiceAccount.Name || b.Subjects[0].Namespace != m.ServiceAccount.Namespace {
		t.Errorf("binding %+v does not bind ClusterRole %s to ServiceAccount %s/%s", b, m.ClusterRole.Name, m.ServiceAccount.Namespace, m.ServiceAccount.Name)
	}
	c := m.DaemonSet.Spec.Template.Spec.Containers[0]
	if !slices.ContainsFunc(c.Command, func(s string) bool { return strings.HasPrefix(s, "--proxy-mode=") }) {
		t.Errorf("DaemonSet command %v has no --proxy-mode", c.Command)
	}
	if c.LivenessProbe == nil || c.LivenessProbe.HTTPGet == nil || c.LivenessProbe.HTTPGet.Port.IntValue() != healthzPort {
		t.Errorf("liveness probe must hit the healthz port %d", healthzPort)
	}
}

func TestPKIChains(t *testing.T) {
	dir := t.TempDir()
	p, err := newPKI(dir)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, _, err := p.issue("srv", "kube-apiserver", nil, []net.IP{net.ParseIP(ControlPlaneIP)}, []string{"kubernetes"}, true)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(certPEM)
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(p.caCert)
	if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: ControlPlaneIP, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Errorf("serving cert does not verify for %s: %v", ControlPlaneIP, err)
	}
	clientPEM, _, err := p.issue("admin", "admin", []string{"system:masters"}, nil, nil, false)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ = pem.Decode(clientPEM)
	ccert, _ := x509.ParseCertificate(blk.Bytes)
	if _, err := ccert.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err == nil {
		t.Error("client certificate must not be valid for server auth")
	}
	if ccert.Subject.Organization[0] != "system:masters" {
		t.Errorf("admin cert orgs = %v", ccert.Subject.Organization)
	}
	if _, _, err := p.serviceAccountKeys(); err != nil {
		t.Fatal(err)
	}
}

func TestMatrixTracksOutcomes(t *testing.T) {
	m := NewMatrix(ModeIndependent, "iptables", "nftables")
	t.Run("pass", func(t *testing.T) { m.Track(t, "feature A", "iptables") })
	t.Run("skip", func(t *testing.T) { m.Track(t, "feature A", "nftables").Skip("not built yet") })
	// A pass never overwrites a recorded failure.
	m.Set(Result{Feature: "feature B", Mode: "iptables", Status: "fail", Reason: "boom | pipe"})
	m.Set(Result{Feature: "feature B", Mode: "iptables", Status: "pass"})
	dir := t.TempDir()
	if err := m.Write(dir, "header"); err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(dir, "e2e-matrix.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"| feature | mode-independent | iptables | nftables |",
		"| feature A | — | pass | skip: not built yet |",
		"| feature B | — | fail: boom / pipe | — |",
	} {
		if !strings.Contains(string(md), want) {
			t.Errorf("matrix lacks %q:\n%s", want, md)
		}
	}
	if got := m.Summary(); got["pass"] != 1 || got["skip"] != 1 || got["fail"] != 1 {
		t.Errorf("summary = %v", got)
	}
}
