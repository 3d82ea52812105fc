package main

import (
	"fmt"
	"log/slog"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"
)

// honouredConfigFields are the KubeProxyConfiguration fields miniproxy reads
// (applyConfigFile), as JSON paths. A mode's own section (iptables.*,
// ipvs.*, nftables.*) is honoured when that mode runs and, as in kube-proxy,
// has no effect otherwise; it is not reported as ignored.
var honouredConfigFields = map[string]bool{
	"apiVersion": true, "kind": true,
	"clientConnection.kubeconfig": true,
	"hostnameOverride":            true,
	"mode":                        true,
	"clusterCIDR":                 true,
	"detectLocalMode":             true,
	"healthzBindAddress":          true,
	"metricsBindAddress":          true,
	"nodePortAddresses":           true,
	"enableProfiling":             true,
	"iptables.syncPeriod":         true, "iptables.minSyncPeriod": true,
	"iptables.masqueradeAll": true, "iptables.masqueradeBit": true, "iptables.localhostNodePorts": true,
	"nftables.syncPeriod": true, "nftables.minSyncPeriod": true,
	"nftables.masqueradeAll": true, "nftables.masqueradeBit": true,
	"ipvs.syncPeriod": true, "ipvs.minSyncPeriod": true, "ipvs.scheduler": true, "ipvs.strictARP": true,
}

// ignoredConfigFields returns the fields of a KubeProxyConfiguration file
// that are set but that miniproxy does not implement, as sorted JSON paths
// with their values ("featureGates.NFTablesProxyMode=true"). A field left at
// its zero value (null, "", 0, "0s", false, {} or []) is not reported:
// generated files (kubeadm's) list every field, mostly unset, and only a
// value someone chose can be a surprise. featureGates are listed gate by
// gate, since none of them changes what miniproxy does.
func ignoredConfigFields(data []byte) ([]string, error) {
	var doc map[string]any
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return nil, err
	}
	var out []string
	var walk func(path string, v any)
	walk = func(path string, v any) {
		if honouredConfigFields[path] || zeroConfigValue(v) {
			return
		}
		if m, ok := v.(map[string]any); ok {
			for k, sub := range m {
				p := k
				if path != "" {
					p = path + "." + k
				}
				walk(p, sub)
			}
			return
		}
		out = append(out, fmt.Sprintf("%s=%v", path, v))
	}
	walk("", doc)
	sort.Strings(out)
	return out, nil
}

// zeroConfigValue reports whether v (decoded from JSON) is a zero value,
// recursively for objects.
func zeroConfigValue(v any) bool {
	switch x := v.(type) {
	case nil:
		return true
	case bool:
		return !x
	case float64:
		return x == 0
	case string:
		// Durations and quantities are strings: "0s", "0".
		return x == "" || x == "0" || x == "0s"
	case []any:
		return len(x) == 0
	case map[string]any:
		for _, sub := range x {
			if !zeroConfigValue(sub) {
				return false
			}
		}
		return true
	}
	return false
}

// warnIgnoredConfig logs one warning naming every KubeProxyConfiguration
// field that is set in --config but not implemented (see
// ignoredConfigFields), so a setting that silently does nothing is visible.
func (o *Options) warnIgnoredConfig(log *slog.Logger) {
	if len(o.ignoredConfig) == 0 {
		return
	}
	log.Warn("--config sets KubeProxyConfiguration fields miniproxy does not implement; they have no effect",
		"config", o.ConfigFile, "fields", strings.Join(o.ignoredConfig, ", "))
}
