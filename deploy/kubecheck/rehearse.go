package main

// The -rehearse mode: replays a pod deletion against the real lameduck binary
// with the exact arguments and hooks a manifest renders, on loopback.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
)

// loopbackArgs rewrites the listener flags to 127.0.0.1:0 (ephemeral ports),
// keeping every other argument as rendered.
func loopbackArgs(args []string) []string {
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		a := args[i]
		for _, f := range []string{"--listen", "--admin-listen"} {
			if a == f && i+1 < len(args) {
				out = append(out, f+"=127.0.0.1:0")
				i++
				a = ""
				break
			}
			if strings.HasPrefix(a, f+"=") {
				a = f + "=127.0.0.1:0"
				break
			}
		}
		if a != "" {
			out = append(out, a)
		}
	}
	return out
}

type logLine struct {
	Message string `json:"message"`
	Admin   string `json:"admin"`
	Outcome string `json:"outcome"`
}

// rehearse starts the sidecar as rendered, runs the drain the way the kubelet
// would for this mode (native: the sidecar's preStop exec hook; regular:
// SIGTERM), with the app's preStop GET /drained issued at the same moment,
// then stops lameduck the way the kubelet would and checks the exit.
func (c *checker) rehearse(bin string, d *appsv1.Deployment) {
	where := "Deployment/" + d.Name
	spec := &d.Spec.Template.Spec
	ld, native := findSidecar(spec)
	if ld == nil {
		return
	}
	var appHook *corev1.HTTPGetAction
	for i := range spec.Containers {
		if h := preStop(&spec.Containers[i]); spec.Containers[i].Name != sidecarName && h != nil && h.HTTPGet != nil {
			appHook = h.HTTPGet
		}
	}
	if appHook == nil {
		return // reported by checkDeployment
	}
	timeout, err := parseDuration(flagValue(flags(ld.Args), ld, "drain-timeout"))
	if err != nil {
		return
	}

	cmd := exec.Command(bin, loopbackArgs(ld.Args)...)
	env, home, err := rehearsalEnv(d, ld)
	if err != nil {
		c.fail("%s: rehearsal: %v", where, err)
		return
	}
	defer os.RemoveAll(home)
	cmd.Env = env
	stderr, err := cmd.StderrPipe()
	if err != nil {
		c.fail("%s: rehearsal: %v", where, err)
		return
	}
	if err := cmd.Start(); err != nil {
		c.fail("%s: rehearsal: cannot start %s: %v", where, bin, err)
		return
	}
	exited := make(chan error, 1)
	lines := make(chan logLine, 64)
	var logs strings.Builder
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			logs.WriteString(sc.Text() + "\n")
			var l logLine
			if json.Unmarshal(sc.Bytes(), &l) == nil {
				select {
				case lines <- l:
				default:
				}
			}
		}
		close(lines)
		exited <- cmd.Wait()
	}()
	kill := func() { _ = cmd.Process.Kill() }

	// Wait for the "listening" line, which names the bound admin address.
	var admin string
	deadline := time.After(10 * time.Second)
	for admin == "" {
		select {
		case l, ok := <-lines:
			if !ok {
				err := <-exited
				c.fail("%s: rehearsal: lameduck refused the rendered arguments (%v):\n%s", where, err, logs.String())
				return
			}
			if l.Message == "listening" {
				admin = l.Admin
			}
		case <-deadline:
			kill()
			c.fail("%s: rehearsal: no \"listening\" line within 10s", where)
			return
		}
	}
	go func() {
		for range lines {
		}
	}()

	// t=0: the app's hook and the drain trigger, concurrently.
	u, _ := url.Parse(appHook.Path)
	type result struct {
		code int
		body string
		err  error
		at   time.Duration
	}
	t0 := time.Now()
	appDone := make(chan result, 1)
	go func() {
		resp, err := (&http.Client{}).Get("http://" + admin + u.RequestURI())
		if err != nil {
			appDone <- result{err: err, at: time.Since(t0)}
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		appDone <- result{code: resp.StatusCode, body: strings.TrimSpace(string(b)), at: time.Since(t0)}
	}()
	hookDone := make(chan error, 1)
	if native {
		h := preStop(ld)
		if h == nil || h.Exec == nil || len(h.Exec.Command) == 0 {
			kill()
			return // reported by checkDeployment
		}
		args := append([]string{}, h.Exec.Command[1:]...)
		for i, a := range args {
			if strings.HasPrefix(a, "--admin=") {
				args[i] = "--admin=" + admin
			} else if a == "--admin" && i+1 < len(args) {
				args[i+1] = admin
			}
		}
		go func() {
			out, err := exec.Command(bin, args...).CombinedOutput()
			if err != nil {
				err = fmt.Errorf("%v: %s", err, strings.TrimSpace(string(out)))
			}
			hookDone <- err
		}()
	} else {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		hookDone <- nil
	}

	limit := timeout + 5*time.Second
	var app result
	select {
	case app = <-appDone:
	case <-time.After(limit):
		kill()
		c.fail("%s: rehearsal: the app's preStop GET %s did not return within %v", where, appHook.Path, limit)
		return
	}
	if app.err != nil || app.code != http.StatusOK {
		kill()
		c.fail("%s: rehearsal: the app's preStop GET %s -> %d %v %s", where, appHook.Path, app.code, app.err, app.body)
		return
	}
	select {
	case err := <-hookDone:
		if err != nil {
			kill()
			c.fail("%s: rehearsal: lameduck's preStop hook failed: %v", where, err)
			return
		}
	case <-time.After(limit):
		kill()
		c.fail("%s: rehearsal: lameduck's preStop hook did not return within %v", where, limit)
		return
	}
	// The app exits; the kubelet then sends SIGTERM to a native sidecar. A
	// regular container is already on its way out (drain + capped linger).
	if native {
		_ = cmd.Process.Signal(syscall.SIGTERM)
	}
	select {
	case err := <-exited:
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			code = -1
		}
		if code != 0 {
			c.fail("%s: rehearsal: lameduck exited %d after a drain with nothing in flight:\n%s", where, code, logs.String())
			return
		}
	case <-time.After(limit):
		kill()
		c.fail("%s: rehearsal: lameduck still running %v after the drain", where, limit)
		return
	}
	if !strings.Contains(logs.String(), "Kubernetes API not used") && !strings.Contains(kubeModeOf(ld), "off") {
		c.warnings = append(c.warnings, where+": rehearsal: lameduck did not log that it runs without the Kubernetes API")
	}
	mode := "SIGTERM (regular container)"
	if native {
		mode = "its preStop exec hook (native sidecar)"
	}
	c.notes = append(c.notes, fmt.Sprintf("%s: rehearsed with %s: drain started by %s, app's GET %s -> 200 after %.1fs, lameduck exited 0",
		where, bin, mode, appHook.Path, app.at.Seconds()))
}

// rehearsalEnv is the sidecar's environment as the kubelet would set it, for
// a rehearsal off-cluster: the literal env values, the downward API's
// metadata.name / metadata.namespace (a made-up pod name, the Deployment's
// namespace), PATH, and nothing that could point lameduck at a real
// cluster: no KUBECONFIG, no KUBERNETES_SERVICE_HOST, HOME an empty
// temporary directory (no ~/.kube/config). --kubernetes=auto then finds no
// configuration and drains on the rendered fixed timings, as it does in a
// pod without a token. Returns the environment and the directory to remove.
func rehearsalEnv(d *appsv1.Deployment, ld *corev1.Container) ([]string, string, error) {
	home, err := os.MkdirTemp("", "kubecheck-rehearsal-")
	if err != nil {
		return nil, "", err
	}
	env := []string{"HOME=" + home, "PATH=" + os.Getenv("PATH")}
	field := map[string]string{
		"metadata.name":      d.Name + "-5d8f7c6b9-rh7x2",
		"metadata.namespace": nsOrDefault(d.Namespace),
	}
	for _, e := range ld.Env {
		switch {
		case e.ValueFrom == nil:
			env = append(env, e.Name+"="+e.Value)
		case e.ValueFrom.FieldRef != nil && field[e.ValueFrom.FieldRef.FieldPath] != "":
			env = append(env, e.Name+"="+field[e.ValueFrom.FieldRef.FieldPath])
		}
	}
	return env, home, nil
}

// kubeModeOf is the rendered --kubernetes value ("" when absent: auto).
func kubeModeOf(ld *corev1.Container) string {
	return flagValue(flags(ld.Args), ld, "kubernetes")
}
