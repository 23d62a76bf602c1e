// Command kubecheck validates lameduck's Kubernetes manifests without a cluster.
//
//	kubecheck [-mode native|regular|any] [-namespace NS] [-rehearse LAMEDUCK_BIN] FILE|- ...
//
// Every YAML document is decoded strictly (unknown or duplicated fields and
// wrong types are errors) into the real API types: k8s.io/api for Deployment,
// Service, ServiceAccount, Role and RoleBinding, the Prometheus Operator's
// types for PodMonitor. All but the PodMonitor then go through the API
// server's own create-time validation
// (k8s.io/kubernetes/pkg/apis/.../validation, after the same defaulting and
// conversion to the internal types), and its warnings are printed; pod
// templates are also held to the Pod Security Standards' "restricted" level
// (k8s.io/pod-security-admission, the PodSecurity admission plugin's checks). Then the
// lameduck wiring is checked: the sidecar's flags, ports, probes and drain
// hooks, the app's preStop on /drained, the grace period against
// --drain-timeout, the pod identity from the downward API and the
// ServiceAccount token against the RBAC in the input (see checkAPIAccess),
// the hardening, and that the Service and PodMonitor select the pods and
// point at lameduck's ports.
//
// With -rehearse, each Deployment's pod deletion is also replayed against a
// real lameduck binary on loopback (see rehearse.go): the rendered arguments,
// the drain trigger of the mode and the app's GET /drained hook.
//
// Not covered: admission beyond Pod Security (webhooks, quotas, limit ranges) and
// anything that depends on the cluster (its version, feature gates other
// than the defaults of k8s.io/kubernetes v1.37, installed CRDs): a manifest
// can pass here and still be refused by a particular cluster.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/url"
	"os"
	"regexp"
	"strconv"
	"strings"
	"time"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation/field"
	"k8s.io/kubernetes/pkg/api/legacyscheme"
	podutil "k8s.io/kubernetes/pkg/api/pod"
	"k8s.io/kubernetes/pkg/apis/apps"
	_ "k8s.io/kubernetes/pkg/apis/apps/install"
	appsvalidation "k8s.io/kubernetes/pkg/apis/apps/validation"
	"k8s.io/kubernetes/pkg/apis/core"
	_ "k8s.io/kubernetes/pkg/apis/core/install"
	corevalidation "k8s.io/kubernetes/pkg/apis/core/validation"
	_ "k8s.io/kubernetes/pkg/apis/rbac/install"
	psaapi "k8s.io/pod-security-admission/api"
	psapolicy "k8s.io/pod-security-admission/policy"
	"sigs.k8s.io/yaml"
)

const sidecarName = "lameduck"

type checker struct {
	mode     string
	problems []string
	notes    []string
	warnings []string
}

func (c *checker) fail(format string, args ...any) {
	c.problems = append(c.problems, fmt.Sprintf(format, args...))
}

func main() {
	mode := flag.String("mode", "any", "expected sidecar mode: native, regular or any")
	rehearseBin := flag.String("rehearse", "", "path to a lameduck binary: also replay each Deployment's pod deletion against it, on loopback")
	flag.StringVar(&defaultNamespace, "namespace", defaultNamespace, "the namespace of objects without metadata.namespace (as kubectl apply -n)")
	flag.Parse()
	if flag.NArg() == 0 {
		fmt.Fprintln(os.Stderr, "usage: kubecheck [-mode native|regular|any] [-namespace NS] [-rehearse LAMEDUCK_BIN] FILE|- ...")
		os.Exit(2)
	}
	if *mode != "native" && *mode != "regular" && *mode != "any" {
		fmt.Fprintf(os.Stderr, "kubecheck: -mode %q: want native, regular or any\n", *mode)
		os.Exit(2)
	}
	c := &checker{mode: *mode}
	in := &inputs{}
	for _, name := range flag.Args() {
		data, err := readInput(name)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kubecheck: %v\n", err)
			os.Exit(2)
		}
		for i, doc := range splitDocs(data) {
			where := fmt.Sprintf("%s (document %d)", name, i+1)
			if err := in.decode(doc); err != nil {
				c.fail("%s: %v", where, err)
			}
		}
	}
	if in.empty() && len(c.problems) == 0 {
		c.fail("no Deployment, Service, PodMonitor, ServiceAccount, Role or RoleBinding found")
	}
	for _, d := range in.deps {
		c.apiValidateDeployment(d)
		c.checkDeployment(d, in)
		if *rehearseBin != "" {
			c.rehearse(*rehearseBin, d)
		}
	}
	for _, s := range in.svcs {
		c.apiValidateService(s)
		c.checkService(s, in.deps)
	}
	for _, p := range in.pms {
		c.checkPodMonitor(p, in.deps)
	}
	c.apiValidateRBAC(in)
	for _, n := range c.notes {
		fmt.Println("ok:", n)
	}
	for _, w := range c.warnings {
		fmt.Println("warning:", w)
	}
	for _, p := range c.problems {
		fmt.Println("FAIL:", p)
	}
	if len(c.problems) > 0 {
		fmt.Printf("kubecheck: %d problem(s)\n", len(c.problems))
		os.Exit(1)
	}
}

func readInput(name string) ([]byte, error) {
	if name == "-" {
		return io.ReadAll(os.Stdin)
	}
	return os.ReadFile(name)
}

var docSep = regexp.MustCompile(`(?m)^---[ \t]*(#.*)?$`)

// splitDocs splits a YAML stream on "---" lines and drops documents that
// hold only comments and blank lines (helm template emits some).
func splitDocs(data []byte) [][]byte {
	var out [][]byte
	for _, part := range docSep.Split(string(data), -1) {
		empty := true
		for _, line := range strings.Split(part, "\n") {
			t := strings.TrimSpace(line)
			if t != "" && !strings.HasPrefix(t, "#") {
				empty = false
				break
			}
		}
		if !empty {
			out = append(out, []byte(part))
		}
	}
	return out
}

// inputs holds every decoded object of the input files.
type inputs struct {
	deps     []*appsv1.Deployment
	svcs     []*corev1.Service
	pms      []*monitoringv1.PodMonitor
	sas      []*corev1.ServiceAccount
	roles    []*rbacv1.Role
	bindings []*rbacv1.RoleBinding
}

func (in *inputs) empty() bool {
	return len(in.deps)+len(in.svcs)+len(in.pms)+len(in.sas)+len(in.roles)+len(in.bindings) == 0
}

// strict decodes doc into a new T, refusing unknown fields and wrong types.
func strict[T any](kind string, doc []byte) (*T, error) {
	var v T
	if err := yaml.UnmarshalStrict(doc, &v); err != nil {
		return nil, fmt.Errorf("%s: %v", kind, err)
	}
	return &v, nil
}

func (in *inputs) decode(doc []byte) error {
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
	}
	if err := yaml.Unmarshal(doc, &meta); err != nil {
		return fmt.Errorf("not YAML: %v", err)
	}
	var err error
	switch meta.APIVersion + "/" + meta.Kind {
	case "apps/v1/Deployment":
		var d *appsv1.Deployment
		if d, err = strict[appsv1.Deployment](meta.Kind, doc); err == nil {
			in.deps = append(in.deps, d)
		}
	case "v1/Service":
		var s *corev1.Service
		if s, err = strict[corev1.Service](meta.Kind, doc); err == nil {
			in.svcs = append(in.svcs, s)
		}
	case "monitoring.coreos.com/v1/PodMonitor":
		var p *monitoringv1.PodMonitor
		if p, err = strict[monitoringv1.PodMonitor](meta.Kind, doc); err == nil {
			in.pms = append(in.pms, p)
		}
	case "v1/ServiceAccount":
		var sa *corev1.ServiceAccount
		if sa, err = strict[corev1.ServiceAccount](meta.Kind, doc); err == nil {
			in.sas = append(in.sas, sa)
		}
	case "rbac.authorization.k8s.io/v1/Role":
		var r *rbacv1.Role
		if r, err = strict[rbacv1.Role](meta.Kind, doc); err == nil {
			in.roles = append(in.roles, r)
		}
	case "rbac.authorization.k8s.io/v1/RoleBinding":
		var b *rbacv1.RoleBinding
		if b, err = strict[rbacv1.RoleBinding](meta.Kind, doc); err == nil {
			in.bindings = append(in.bindings, b)
		}
	default:
		// ClusterRole and ClusterRoleBinding included: lameduck needs nothing
		// cluster-wide, so its manifests have no business holding them.
		return fmt.Errorf("unexpected object %s %q (this checker knows Deployment, Service, PodMonitor, ServiceAccount, Role, RoleBinding)", meta.APIVersion, meta.Kind)
	}
	return err
}

// findSidecar returns the lameduck container and whether it is a native sidecar.
func findSidecar(spec *corev1.PodSpec) (*corev1.Container, bool) {
	for i := range spec.InitContainers {
		if spec.InitContainers[i].Name == sidecarName {
			return &spec.InitContainers[i], true
		}
	}
	for i := range spec.Containers {
		if spec.Containers[i].Name == sidecarName {
			return &spec.Containers[i], false
		}
	}
	return nil, false
}

// flags parses "--name=value" and "--name value" arguments.
func flags(args []string) map[string]string {
	out := map[string]string{}
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "--") {
			continue
		}
		name := strings.TrimPrefix(a, "--")
		if k, v, ok := strings.Cut(name, "="); ok {
			out[k] = v
			continue
		}
		if i+1 < len(args) && !strings.HasPrefix(args[i+1], "--") {
			out[name] = args[i+1]
			i++
		} else {
			out[name] = ""
		}
	}
	return out
}

// The contract's defaults (docs/CONTRACT.md), used when a flag is absent.
var flagDefaults = map[string]string{
	"listen":        "0.0.0.0:8000",
	"admin-listen":  "0.0.0.0:9901",
	"upstream":      "127.0.0.1:8080",
	"drain-delay":   "5s",
	"drain-timeout": "25s",
}

func flagValue(f map[string]string, c *corev1.Container, name string) string {
	if v, ok := f[name]; ok {
		return v
	}
	env := "LAMEDUCK_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))
	for _, e := range c.Env {
		if e.Name == env {
			return e.Value
		}
	}
	return flagDefaults[name]
}

func portOf(addr string) (int32, error) {
	i := strings.LastIndex(addr, ":")
	if i < 0 {
		return 0, fmt.Errorf("%q has no port", addr)
	}
	p, err := strconv.ParseInt(addr[i+1:], 10, 32)
	if err != nil || p <= 0 || p > 65535 {
		return 0, fmt.Errorf("%q: bad port", addr)
	}
	return int32(p), nil
}

// parseDuration accepts Go durations and bare seconds, the subset the
// manifests and the chart use.
func parseDuration(s string) (time.Duration, error) {
	if n, err := strconv.Atoi(s); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	return time.ParseDuration(s)
}

func resolvePort(p intstr.IntOrString, c *corev1.Container) (int32, error) {
	if p.Type == intstr.Int {
		return p.IntVal, nil
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort, nil
		}
	}
	return 0, fmt.Errorf("named port %q not declared on container %q", p.StrVal, c.Name)
}

func (c *checker) checkDeployment(d *appsv1.Deployment, in *inputs) {
	where := "Deployment/" + d.Name
	spec := &d.Spec.Template.Spec
	before := len(c.problems)

	sel, err := metaSelector(d.Spec.Selector)
	if err != nil {
		c.fail("%s: selector: %v", where, err)
	} else if !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
		c.fail("%s: spec.selector does not match the pod template's labels", where)
	}

	ld, native := findSidecar(spec)
	if ld == nil {
		c.fail("%s: no container named %q in initContainers or containers", where, sidecarName)
		return
	}
	switch {
	case native && (ld.RestartPolicy == nil || *ld.RestartPolicy != corev1.ContainerRestartPolicyAlways):
		c.fail("%s: %q is an init container without restartPolicy: Always: it would block the pod's start forever", where, sidecarName)
	case !native && ld.RestartPolicy != nil:
		c.fail("%s: %q is a regular container and must not set restartPolicy", where, sidecarName)
	}
	if c.mode == "native" && !native {
		c.fail("%s: expected a native sidecar (initContainers), found lameduck in containers", where)
	}
	if c.mode == "regular" && native {
		c.fail("%s: expected lameduck as a regular container, found it in initContainers", where)
	}
	if ld.Image == "" {
		c.fail("%s: %q has no image", where, sidecarName)
	}

	f := flags(ld.Args)
	if len(ld.Command) > 0 {
		c.fail("%s: %q sets command; the image's ENTRYPOINT is /lameduck, use args", where, sidecarName)
	}
	listenPort, err := portOf(flagValue(f, ld, "listen"))
	if err != nil {
		c.fail("%s: --listen: %v", where, err)
	}
	adminPort, err := portOf(flagValue(f, ld, "admin-listen"))
	if err != nil {
		c.fail("%s: --admin-listen: %v", where, err)
	}
	upstream := flagValue(f, ld, "upstream")
	if !strings.HasPrefix(upstream, "127.0.0.1:") && !strings.HasPrefix(upstream, "localhost:") && !strings.HasPrefix(upstream, "[::1]:") {
		c.fail("%s: --upstream=%s: the app should be reached over loopback", where, upstream)
	}
	delay, err := parseDuration(flagValue(f, ld, "drain-delay"))
	if err != nil {
		c.fail("%s: --drain-delay: %v", where, err)
	}
	timeout, err := parseDuration(flagValue(f, ld, "drain-timeout"))
	if err != nil {
		c.fail("%s: --drain-timeout: %v", where, err)
	}
	if timeout < delay {
		c.fail("%s: --drain-timeout (%v) < --drain-delay (%v)", where, timeout, delay)
	}
	if v, ok := f["mode"]; ok && v != "http" && v != "tcp" {
		c.fail("%s: --mode=%s: want http or tcp", where, v)
	}
	if v, ok := f["upstream-protocol"]; ok && v != "http1" && v != "http2" {
		c.fail("%s: --upstream-protocol=%s: want http1 or http2", where, v)
	}
	if v, ok := f["log-format"]; ok && v != "json" && v != "text" {
		c.fail("%s: --log-format=%s: want json or text", where, v)
	}
	kubeMode := flagValue(f, ld, "kubernetes")
	if kubeMode != "auto" && kubeMode != "on" && kubeMode != "off" {
		c.fail("%s: --kubernetes=%s: want auto, on or off", where, kubeMode)
	}

	declared := map[int32]bool{}
	for _, p := range ld.Ports {
		declared[p.ContainerPort] = true
	}
	if !declared[listenPort] || !declared[adminPort] {
		c.fail("%s: %q must declare its proxy port %d and admin port %d", where, sidecarName, listenPort, adminPort)
	}

	// Probes: readiness /ready, liveness /live, on the admin port.
	c.checkProbe(where, "readinessProbe", ld.ReadinessProbe, ld, "/ready", adminPort, true)
	c.checkProbe(where, "livenessProbe", ld.LivenessProbe, ld, "/live", adminPort, true)
	c.checkProbe(where, "startupProbe", ld.StartupProbe, ld, "/live", adminPort, false)

	// Grace period vs the drain deadline.
	grace := int64(30)
	if spec.TerminationGracePeriodSeconds != nil {
		grace = *spec.TerminationGracePeriodSeconds
	}
	timeoutSec := int64(math.Ceil(timeout.Seconds()))
	if grace <= timeoutSec {
		c.fail("%s: terminationGracePeriodSeconds %d must exceed --drain-timeout %v", where, grace, timeout)
	}

	// The Kubernetes API: the pod's identity, --deadline-margin, the token
	// and what it grants.
	if kubeMode != "off" {
		c.checkPodIdentity(where, ld)
		c.checkDeadlineMargin(where, f, ld, native, grace)
	}
	api := c.checkAPIAccess(where, d, kubeMode, in)

	// lameduck's own drain hook (native) / none (regular: SIGTERM starts the drain).
	if native {
		h := preStop(ld)
		if h == nil || h.Exec == nil {
			c.fail("%s: native sidecar %q needs a preStop exec hook running `lameduck drain --wait` (its SIGTERM comes only after the app exits)", where, sidecarName)
		} else {
			cmd := h.Exec.Command
			hf := flags(cmd)
			_, wait := hf["wait"]
			if len(cmd) < 2 || !strings.HasSuffix(cmd[0], "lameduck") || cmd[1] != "drain" || !wait {
				c.fail("%s: %q preStop should be [/lameduck drain --admin=127.0.0.1:%d --wait --timeout=...], got %q", where, sidecarName, adminPort, cmd)
			}
			if a := hf["admin"]; a != "" {
				if !strings.HasPrefix(a, "127.0.0.1:") {
					c.fail("%s: %q preStop --admin=%s: POST /drain is accepted from loopback only", where, sidecarName, a)
				} else if p, err := portOf(a); err != nil || p != adminPort {
					c.fail("%s: %q preStop --admin=%s does not match --admin-listen port %d", where, sidecarName, a, adminPort)
				}
			}
			c.checkHookTimeout(where, sidecarName+" preStop --timeout", hf["timeout"], timeout, grace)
		}
	} else if h := preStop(ld); h != nil {
		c.fail("%s: regular-container %q should have no preStop: its SIGTERM starts the drain, a hook would only delay it", where, sidecarName)
	}

	// The app containers: preStop waits on /drained.
	apps := 0
	for i := range spec.Containers {
		app := &spec.Containers[i]
		if app.Name == sidecarName {
			continue
		}
		apps++
		h := preStop(app)
		if h == nil || h.HTTPGet == nil {
			c.fail("%s: app container %q needs a preStop httpGet on lameduck's /drained", where, app.Name)
			continue
		}
		u, err := url.Parse(h.HTTPGet.Path)
		if err != nil || u.Path != "/drained" {
			c.fail("%s: app container %q preStop path %q: want /drained?timeout=...", where, app.Name, h.HTTPGet.Path)
			continue
		}
		if h.HTTPGet.Port.Type != intstr.Int || h.HTTPGet.Port.IntVal != adminPort {
			c.fail("%s: app container %q preStop port %s: want lameduck's admin port %d by number (a name would be looked up in the app container)", where, app.Name, h.HTTPGet.Port.String(), adminPort)
		}
		if h.HTTPGet.Host != "" {
			c.fail("%s: app container %q preStop sets host; leave it empty (the pod IP)", where, app.Name)
		}
		c.checkHookTimeout(where, app.Name+" preStop /drained timeout", u.Query().Get("timeout"), timeout, grace)
	}
	if apps == 0 {
		c.fail("%s: no app container beside lameduck", where)
	}

	// Hardening and resources, every container.
	all := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
	for i := range all {
		ct := &all[i]
		c.checkHardening(where, spec.SecurityContext, ct)
		if ct.Resources.Requests.Cpu().IsZero() || ct.Resources.Requests.Memory().IsZero() {
			c.fail("%s: container %q has no cpu/memory requests", where, ct.Name)
		}
		if ct.Resources.Limits.Memory().IsZero() {
			c.fail("%s: container %q has no memory limit", where, ct.Name)
		}
	}

	if len(c.problems) == before {
		kind := "regular container"
		if native {
			kind = "native sidecar"
		}
		c.notes = append(c.notes, fmt.Sprintf("%s: lameduck as %s; proxy :%d, admin :%d; drain-delay %v, drain-timeout %v < grace %ds; %d app container(s) wait on /drained; API: %s",
			where, kind, listenPort, adminPort, delay, timeout, grace, apps, api))
	}
}

func (c *checker) checkHookTimeout(where, what, v string, drainTimeout time.Duration, grace int64) {
	if v == "" {
		c.fail("%s: %s is not set: the hook should stop waiting around --drain-timeout", where, what)
		return
	}
	d, err := parseDuration(v)
	if err != nil {
		c.fail("%s: %s=%q: %v", where, what, v, err)
		return
	}
	if d < drainTimeout {
		c.fail("%s: %s=%v is shorter than --drain-timeout %v: the hook would give up before the drain ends", where, what, d, drainTimeout)
	}
	if d > time.Duration(grace)*time.Second {
		c.fail("%s: %s=%v exceeds the grace period %ds", where, what, d, grace)
	}
}

func preStop(c *corev1.Container) *corev1.LifecycleHandler {
	if c.Lifecycle == nil {
		return nil
	}
	return c.Lifecycle.PreStop
}

func (c *checker) checkProbe(where, name string, p *corev1.Probe, ct *corev1.Container, path string, port int32, required bool) {
	if p == nil {
		if required {
			c.fail("%s: %q has no %s", where, ct.Name, name)
		}
		return
	}
	if p.HTTPGet == nil {
		c.fail("%s: %q %s should be an httpGet on %s", where, ct.Name, name, path)
		return
	}
	if p.HTTPGet.Path != path {
		c.fail("%s: %q %s path %q, want %q", where, ct.Name, name, p.HTTPGet.Path, path)
	}
	got, err := resolvePort(p.HTTPGet.Port, ct)
	if err != nil {
		c.fail("%s: %q %s: %v", where, ct.Name, name, err)
	} else if got != port {
		c.fail("%s: %q %s port %d, want the admin port %d", where, ct.Name, name, got, port)
	}
}

func (c *checker) checkHardening(where string, pod *corev1.PodSecurityContext, ct *corev1.Container) {
	sc := ct.SecurityContext
	nonRoot := sc != nil && sc.RunAsNonRoot != nil && *sc.RunAsNonRoot
	if !nonRoot && pod != nil && pod.RunAsNonRoot != nil && *pod.RunAsNonRoot && (sc == nil || sc.RunAsNonRoot == nil) {
		nonRoot = true
	}
	if !nonRoot {
		c.fail("%s: container %q: runAsNonRoot is not true", where, ct.Name)
	}
	uidSet := (sc != nil && sc.RunAsUser != nil) || (pod != nil && pod.RunAsUser != nil)
	if !uidSet {
		c.fail("%s: container %q: no runAsUser (the kubelet cannot check runAsNonRoot against a named image user)", where, ct.Name)
	}
	if sc == nil {
		c.fail("%s: container %q has no securityContext", where, ct.Name)
		return
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		c.fail("%s: container %q: readOnlyRootFilesystem is not true", where, ct.Name)
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		c.fail("%s: container %q: allowPrivilegeEscalation is not false", where, ct.Name)
	}
	dropAll := false
	if sc.Capabilities != nil {
		for _, cap := range sc.Capabilities.Drop {
			if cap == "ALL" {
				dropAll = true
			}
		}
		if len(sc.Capabilities.Add) > 0 {
			c.fail("%s: container %q adds capabilities %v", where, ct.Name, sc.Capabilities.Add)
		}
	}
	if !dropAll {
		c.fail("%s: container %q does not drop ALL capabilities", where, ct.Name)
	}
}

func (c *checker) checkService(s *corev1.Service, deps []*appsv1.Deployment) {
	where := "Service/" + s.Name
	before := len(c.problems)
	if len(s.Spec.Selector) == 0 {
		c.fail("%s: no selector", where)
		return
	}
	sel := labels.SelectorFromSet(s.Spec.Selector)
	var target *appsv1.Deployment
	for _, d := range deps {
		if sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			target = d
		}
	}
	if target == nil {
		c.fail("%s: selector %v matches no Deployment's pods in the input", where, s.Spec.Selector)
		return
	}
	ld, native := findSidecar(&target.Spec.Template.Spec)
	if ld == nil {
		return // reported with the Deployment
	}
	listenPort, err := portOf(flagValue(flags(ld.Args), ld, "listen"))
	if err != nil {
		return // reported with the Deployment
	}
	for _, p := range s.Spec.Ports {
		switch {
		case p.TargetPort.Type == intstr.String && native:
			c.fail("%s: port %q: targetPort %q by name; before Kubernetes 1.32 names on native sidecars do not resolve (kubernetes/kubernetes#127958), use %d", where, p.Name, p.TargetPort.StrVal, listenPort)
		case p.TargetPort.Type == intstr.String:
			if got, err := resolvePort(p.TargetPort, ld); err != nil || got != listenPort {
				c.fail("%s: port %q: targetPort %q is not lameduck's proxy port %d", where, p.Name, p.TargetPort.StrVal, listenPort)
			}
		case p.TargetPort.IntVal == 0 && p.Port != listenPort:
			c.fail("%s: port %q: no targetPort and port %d is not lameduck's proxy port %d", where, p.Name, p.Port, listenPort)
		case p.TargetPort.IntVal != 0 && p.TargetPort.IntVal != listenPort:
			c.fail("%s: port %q: targetPort %d bypasses lameduck (proxy port %d)", where, p.Name, p.TargetPort.IntVal, listenPort)
		}
	}
	if len(c.problems) == before {
		c.notes = append(c.notes, fmt.Sprintf("%s: selects Deployment/%s, targets lameduck :%d", where, target.Name, listenPort))
	}
}

func (c *checker) checkPodMonitor(p *monitoringv1.PodMonitor, deps []*appsv1.Deployment) {
	where := "PodMonitor/" + p.Name
	before := len(c.problems)
	sel, err := metaSelector(&p.Spec.Selector)
	if err != nil {
		c.fail("%s: selector: %v", where, err)
		return
	}
	if sel.Empty() {
		c.fail("%s: empty selector would scrape every pod", where)
		return
	}
	var target *appsv1.Deployment
	for _, d := range deps {
		if sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			target = d
		}
	}
	if target == nil {
		c.fail("%s: selector matches no Deployment's pods in the input", where)
		return
	}
	ld, _ := findSidecar(&target.Spec.Template.Spec)
	if ld == nil {
		return
	}
	adminPort, err := portOf(flagValue(flags(ld.Args), ld, "admin-listen"))
	if err != nil {
		return
	}
	if len(p.Spec.PodMetricsEndpoints) == 0 {
		c.fail("%s: no podMetricsEndpoints", where)
	}
	for i, ep := range p.Spec.PodMetricsEndpoints {
		if ep.Path != "" && ep.Path != "/metrics" {
			c.fail("%s: endpoint %d: path %q, lameduck serves /metrics", where, i, ep.Path)
		}
		switch {
		case ep.Port != nil && *ep.Port != "":
			got, err := resolvePort(intstr.FromString(*ep.Port), ld)
			if err != nil || got != adminPort {
				c.fail("%s: endpoint %d: port %q is not lameduck's admin port %d", where, i, *ep.Port, adminPort)
			}
		case ep.PortNumber != nil:
			if *ep.PortNumber != adminPort {
				c.fail("%s: endpoint %d: portNumber %d is not lameduck's admin port %d", where, i, *ep.PortNumber, adminPort)
			}
		default:
			c.fail("%s: endpoint %d: no port", where, i)
		}
	}
	if len(c.problems) == before {
		c.notes = append(c.notes, fmt.Sprintf("%s: selects Deployment/%s, scrapes lameduck :%d/metrics", where, target.Name, adminPort))
	}
}

func metaSelector(ls *metav1.LabelSelector) (labels.Selector, error) {
	if ls == nil {
		return nil, errors.New("missing")
	}
	return metav1.LabelSelectorAsSelector(ls)
}

// apiValidateDeployment runs what the API server runs on create: defaulting,
// conversion to the internal type, apps validation (which includes the pod
// template's), plus the pod-template warnings it would return.
func (c *checker) apiValidateDeployment(d *appsv1.Deployment) {
	where := "Deployment/" + d.Name
	obj := d.DeepCopy()
	obj.Namespace = nsOrDefault(obj.Namespace) // as if applied to a namespace
	legacyscheme.Scheme.Default(obj)
	var in apps.Deployment
	if err := legacyscheme.Scheme.Convert(obj, &in, nil); err != nil {
		c.fail("%s: conversion to the internal type: %v", where, err)
		return
	}
	opts := podutil.GetValidationOptionsFromPodTemplate(&in.Spec.Template, nil)
	errs := appsvalidation.ValidateDeployment(&in, opts)
	c.apiErrors(where, errs)
	for _, w := range podutil.GetWarningsForPodTemplate(context.Background(), field.NewPath("spec", "template"), &in.Spec.Template, nil) {
		c.warnings = append(c.warnings, where+": "+w)
	}
	if len(errs) == 0 {
		c.notes = append(c.notes, where+": passes the API server's create validation (k8s.io/kubernetes v1.37)")
	}
	c.podSecurity(where, &obj.Spec.Template.ObjectMeta, &obj.Spec.Template.Spec)
}

// podSecurity evaluates the pod template against the Pod Security Standards'
// "restricted" level, with the checks the PodSecurity admission plugin runs.
func (c *checker) podSecurity(where string, meta *metav1.ObjectMeta, spec *corev1.PodSpec) {
	ev, err := psapolicy.NewEvaluator(psapolicy.DefaultChecks(), nil)
	if err != nil {
		c.fail("%s: pod security evaluator: %v", where, err)
		return
	}
	lv := psaapi.LevelVersion{Level: psaapi.LevelRestricted, Version: psaapi.LatestVersion()}
	res := psapolicy.AggregateCheckResults(ev.EvaluatePod(lv, meta, spec))
	if !res.Allowed {
		c.fail("%s: violates Pod Security %q: %s", where, psaapi.LevelRestricted, res.ForbiddenReason())
		return
	}
	c.notes = append(c.notes, where+": pod template meets the Pod Security Standards' \"restricted\" level")
}

func (c *checker) apiValidateService(s *corev1.Service) {
	where := "Service/" + s.Name
	obj := s.DeepCopy()
	obj.Namespace = nsOrDefault(obj.Namespace)
	legacyscheme.Scheme.Default(obj)
	var in core.Service
	if err := legacyscheme.Scheme.Convert(obj, &in, nil); err != nil {
		c.fail("%s: conversion to the internal type: %v", where, err)
		return
	}
	errs := corevalidation.ValidateServiceCreate(&in)
	c.apiErrors(where, errs)
	if len(errs) == 0 {
		c.notes = append(c.notes, where+": passes the API server's create validation (k8s.io/kubernetes v1.37)")
	}
}

// apiValidated reports errs, or notes that the object passed.
func (c *checker) apiValidated(where string, errs field.ErrorList) {
	c.apiErrors(where, errs)
	if len(errs) == 0 {
		c.notes = append(c.notes, where+": passes the API server's create validation (k8s.io/kubernetes v1.37)")
	}
}

func (c *checker) apiErrors(where string, errs field.ErrorList) {
	for _, e := range errs {
		c.fail("%s: API validation: %v", where, e)
	}
}
