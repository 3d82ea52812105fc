package main

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// kubeadmConfig is the shape kubeadm writes: every field listed, most at
// their zero value. Only the fields set to something are worth a warning.
const kubeadmConfig = `apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: 2h
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
featureGates:
  NFTablesProxyMode: true
  SomethingOff: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: nftables
nftables:
  masqueradeAll: false
  masqueradeBit: 16
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: -999
portRange: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
`

func TestIgnoredConfigFields(t *testing.T) {
	got, err := ignoredConfigFields([]byte(kubeadmConfig))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"bindAddress=0.0.0.0",
		"conntrack.tcpEstablishedTimeout=2h",
		"featureGates.NFTablesProxyMode=true",
		"oomScoreAdj=-999",
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("ignored fields\n got %q\nwant %q", got, want)
	}
}

func TestConfigFileWarnsAboutIgnoredFields(t *testing.T) {
	path := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(path, []byte(kubeadmConfig), 0o600); err != nil {
		t.Fatal(err)
	}
	o, err := parseOptions([]string{"--config", path, "--hostname-override", "n1"})
	if err != nil {
		t.Fatal(err)
	}
	// nftables.masqueradeBit is honoured in nftables mode.
	if o.Mode != "nftables" || o.MasqueradeBit != 16 {
		t.Errorf("mode %s masquerade bit %d, want nftables and 16 from the file", o.Mode, o.MasqueradeBit)
	}
	var buf bytes.Buffer
	o.warnIgnoredConfig(slog.New(slog.NewTextHandler(&buf, nil)))
	line := buf.String()
	for _, f := range []string{"level=WARN", "featureGates.NFTablesProxyMode=true", "bindAddress=0.0.0.0", "oomScoreAdj=-999"} {
		if !strings.Contains(line, f) {
			t.Errorf("warning %q does not mention %q", line, f)
		}
	}
	if strings.Count(line, "\n") != 1 {
		t.Errorf("want one warning line, got %q", line)
	}

	// A file with only implemented fields warns about nothing.
	if err := os.WriteFile(path, []byte("kind: KubeProxyConfiguration\nmode: iptables\nclusterCIDR: 10.0.0.0/8\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	o, err = parseOptions([]string{"--config", path, "--hostname-override", "n1"})
	if err != nil {
		t.Fatal(err)
	}
	buf.Reset()
	o.warnIgnoredConfig(slog.New(slog.NewTextHandler(&buf, nil)))
	if buf.Len() != 0 {
		t.Errorf("no field is ignored, but got %q", buf.String())
	}
}
