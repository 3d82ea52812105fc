package main

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/miniproxy/miniproxy/pkg/model"
	"github.com/miniproxy/miniproxy/pkg/takeover"
)

// takeOver removes, once this mode's rules are in, what would otherwise keep
// answering beside them: kube-proxy's objects of every mode (pkg/takeover,
// which logs each), then miniproxy's own objects of its other modes (a mode
// switch), through each backend's Cleanup, which removes only what that
// mode owns (and restores route_localnet if miniproxy had turned it on).
func takeOver(ctx context.Context, log *slog.Logger, o *Options) error {
	start := time.Now()
	var errs []error
	// kube-proxy's objects first, each logged (the shared KUBE- names of
	// iptables mode included), then what only miniproxy's other modes own.
	self := takeover.Self{Mode: o.Mode, Variant: takeover.DetectVariant(ctx, nil)}
	for _, f := range []model.Family{model.IPv4, model.IPv6} {
		if o.proxyConfig.HasFamily(f) {
			self.Families = append(self.Families, f)
		}
	}
	if _, err := takeover.Run(ctx, takeover.Options{Self: self, Log: log.With("component", "takeover")}); err != nil {
		errs = append(errs, err)
	}
	for _, mode := range modes {
		if mode == o.Mode {
			continue
		}
		oo := *o
		oo.Mode = mode
		b, err := newBackend(log, &oo)
		if err != nil {
			// No IPVS in the kernel, no iptables binaries: that mode
			// cannot have left anything.
			log.Debug("nothing of mode to remove", "mode", mode, "reason", err)
			continue
		}
		if err := b.Cleanup(ctx); err != nil {
			errs = append(errs, err)
		} else {
			log.Info("removed miniproxy's objects of its other mode, if any", "mode", mode)
		}
		if err := b.Close(); err != nil {
			log.Debug("closing the other mode's backend", "mode", mode, "err", err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	log.Info("leftovers of kube-proxy and of miniproxy's other modes checked", "mode", o.Mode, "took", time.Since(start).Round(time.Millisecond))
	return nil
}
