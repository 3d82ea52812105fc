package framework

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// StopControlPlane stops kube-apiserver and then etcd, as a control-plane
// outage does (SIGTERM, SIGKILL after grace). etcd's data, the certificates
// and the service-account keys stay, so RestartControlPlane brings back the
// same cluster and every issued credential (the proxies' bound tokens) stays
// valid. Tests that stop the control plane use a cluster of their own
// (StartCluster on a new Env): the suite's shared one serves other tests.
func (cp *ControlPlane) StopControlPlane(grace time.Duration) error {
	var errs []error
	for i := len(cp.procs) - 1; i >= 0; i-- { // reverse start order: apiserver, etcd
		if err := cp.procs[i].Stop(grace); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// RestartControlPlane starts etcd and kube-apiserver again with exactly the
// command lines of their first start (logs appended to the same files) and
// returns once etcd is healthy and the apiserver's /readyz says ok.
func (cp *ControlPlane) RestartControlPlane(ctx context.Context, e *Env) error {
	for i, old := range cp.procs {
		if exited, _ := old.Exited(); !exited {
			return fmt.Errorf("%s still running; StopControlPlane first", old.Name)
		}
		p, err := restartProcess(old)
		if err != nil {
			return err
		}
		cp.procs[i] = p
		e.Defer("stop restarted "+p.Name, func() error {
			if err := p.Stop(30 * time.Second); err != nil {
				e.Log("teardown: %v", err)
			}
			return nil
		})
		switch p.Name {
		case "etcd":
			err = cp.waitEtcd(ctx, p)
		case "kube-apiserver":
			err = cp.waitAPIServer(ctx, p)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// restartProcess runs old's command line again (the same `ip netns exec`
// wrapper, so the same namespace), appending to its log.
func restartProcess(old *Process) (*Process, error) {
	lf, err := os.OpenFile(old.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("log file for restarted %s: %w", old.Name, err)
	}
	fmt.Fprintf(lf, "\n=== restarted by the e2e framework at %s ===\n", time.Now().Format(time.RFC3339Nano))
	cmd := exec.Command(old.Cmd.Path, old.Cmd.Args[1:]...)
	cmd.SysProcAttr = &unix.SysProcAttr{Setpgid: true, Pdeathsig: unix.SIGKILL}
	cmd.Stdout, cmd.Stderr = lf, lf
	if err := cmd.Start(); err != nil {
		lf.Close()
		return nil, fmt.Errorf("restart %s: %w", old.Name, err)
	}
	p := &Process{Name: old.Name, Cmd: cmd, LogPath: old.LogPath, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		lf.Close()
		close(p.done)
	}()
	return p, nil
}

func (cp *ControlPlane) waitEtcd(ctx context.Context, p *Process) error {
	hc := &http.Client{Transport: &http.Transport{DialContext: cp.NS.DialContext}, Timeout: 2 * time.Second}
	url := fmt.Sprintf("http://127.0.0.1:%d/health", etcdClientPort)
	err := poll(ctx, 60*time.Second, 100*time.Millisecond, func() (bool, error) {
		if exited, werr := p.Exited(); exited {
			return false, fmt.Errorf("restarted etcd exited: %v", werr)
		}
		resp, err := hc.Get(url)
		if err != nil {
			return false, nil
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK, nil
	})
	if err != nil {
		return fmt.Errorf("restarted etcd not healthy: %w\n%s", err, p.Logs(4000))
	}
	return nil
}

func (cp *ControlPlane) waitAPIServer(ctx context.Context, p *Process) error {
	rc := cp.Admin.Discovery().RESTClient()
	var last string
	err := poll(ctx, 180*time.Second, 250*time.Millisecond, func() (bool, error) {
		if exited, werr := p.Exited(); exited {
			return false, fmt.Errorf("restarted kube-apiserver exited: %v", werr)
		}
		body, err := rc.Get().AbsPath("/readyz").DoRaw(ctx)
		if err != nil {
			last = fmt.Sprintf("%v %s", err, body)
			return false, nil
		}
		return strings.TrimSpace(string(body)) == "ok", nil
	})
	if err != nil {
		return fmt.Errorf("restarted kube-apiserver not ready (last: %s): %w\n%s", last, err, p.Logs(6000))
	}
	return nil
}
