package main

// lameduck's use of the Kubernetes API (--kubernetes auto|on|off): the pod's
// identity from the downward API, --deadline-margin, and the ServiceAccount
// token checked against the ServiceAccount, Role and RoleBinding in the
// input (deploy/rbac.yaml, the chart's templates/rbac.yaml).

import (
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/kubernetes/pkg/api/legacyscheme"
	"k8s.io/kubernetes/pkg/apis/core"
	corevalidation "k8s.io/kubernetes/pkg/apis/core/validation"
	"k8s.io/kubernetes/pkg/apis/rbac"
	rbacvalidation "k8s.io/kubernetes/pkg/apis/rbac/validation"
)

// lameduckGrants is what lameduck's drain uses (src/kube, docs/kubernetes.md)
// as "group/resource verb": exactly what deploy/rbac.yaml grants.
var lameduckGrants = []string{
	"/pods get",
	"discovery.k8s.io/endpointslices list",
	"discovery.k8s.io/endpointslices watch",
	"events.k8s.io/events create",
	"events.k8s.io/events patch",
}

// checkPodIdentity: POD_NAME and POD_NAMESPACE (the --pod-name and
// --pod-namespace defaults) from the downward API. A fixed value would be
// wrong for every pod but one; without them --kubernetes=auto runs without
// the API and =on refuses to start.
func (c *checker) checkPodIdentity(where string, ld *corev1.Container) {
	for _, want := range []struct{ env, path string }{
		{"POD_NAME", "metadata.name"},
		{"POD_NAMESPACE", "metadata.namespace"},
	} {
		var found *corev1.EnvVar
		for i := range ld.Env {
			if ld.Env[i].Name == want.env {
				found = &ld.Env[i] // the last one wins, as in the kubelet
			}
		}
		switch {
		case found == nil:
			c.fail("%s: %q has no env %s: --kubernetes needs the pod's identity from the downward API (valueFrom.fieldRef.fieldPath: %s)", where, sidecarName, want.env, want.path)
		case found.ValueFrom == nil || found.ValueFrom.FieldRef == nil:
			c.fail("%s: %q env %s must come from valueFrom.fieldRef (fieldPath: %s), not a fixed value", where, sidecarName, want.env, want.path)
		case found.ValueFrom.FieldRef.FieldPath != want.path:
			c.fail("%s: %q env %s: fieldRef.fieldPath %q, want %q", where, sidecarName, want.env, found.ValueFrom.FieldRef.FieldPath, want.path)
		}
	}
}

// checkDeadlineMargin: with the API, the drain deadline is the earlier of
// --drain-timeout and deletionTimestamp (deletion + grace period) minus
// --deadline-margin. In a native sidecar the app has exited before lameduck's
// SIGTERM, so any margin below the grace period works (the default 2s too).
// As a regular container lameduck drains first and the app is sent SIGTERM
// after it: the margin is the app's shutdown time, which only the manifest
// knows, so it must be given explicitly (the chart: appShutdownSeconds).
func (c *checker) checkDeadlineMargin(where string, f map[string]string, ld *corev1.Container, native bool, grace int64) {
	v := flagValue(f, ld, "deadline-margin")
	if v == "" {
		if !native {
			c.fail("%s: regular-container %q without --deadline-margin: the app is sent SIGTERM only after the drain, so the margin before the pod's SIGKILL is the app's shutdown time; set it (e.g. the grace period minus --drain-timeout)", where, sidecarName)
		}
		return
	}
	m, err := parseDuration(v)
	if err != nil {
		c.fail("%s: --deadline-margin=%s: %v", where, v, err)
		return
	}
	if m >= time.Duration(grace)*time.Second {
		c.fail("%s: --deadline-margin=%v is not below the grace period %ds: the deadline would fall at the deletion", where, m, grace)
	}
	if !native && m < time.Second {
		c.fail("%s: --deadline-margin=%v for a regular-container %q: the app is sent SIGTERM after the drain and gets only this long before SIGKILL", where, m, sidecarName)
	}
}

// defaultNamespace is where objects without metadata.namespace are taken to
// be applied (-namespace; helm template's --namespace, kubectl's -n).
var defaultNamespace = "default"

func nsOrDefault(ns string) string {
	if ns == "" {
		return defaultNamespace
	}
	return ns
}

// checkAPIAccess: a mounted ServiceAccount token is held to lameduck's RBAC.
// The token is a credential in every container of the pod, so it is allowed
// (automountServiceAccountToken true, or unset) only together with lameduck's
// own ServiceAccount, present in the input, bound by a RoleBinding in the
// pod's namespace to a Role granting exactly lameduckGrants: no more (the app
// container can read the token too), no less (a missing verb silently
// degrades the drain to its fixed timings). Without a token lameduck drains
// on --drain-delay / --drain-timeout, which is fine unless --kubernetes=on.
// Returns a summary for the Deployment's note.
func (c *checker) checkAPIAccess(where string, d *appsv1.Deployment, kubeMode string, in *inputs) string {
	spec := &d.Spec.Template.Spec
	ns := nsOrDefault(d.Namespace)
	saName := spec.ServiceAccountName
	if saName == "" {
		saName = spec.DeprecatedServiceAccount
	}
	if saName == "" {
		saName = "default"
	}
	var sa *corev1.ServiceAccount
	for _, s := range in.sas {
		if s.Name == saName && nsOrDefault(s.Namespace) == ns {
			sa = s
		}
	}
	mounted := true // the API's default
	switch {
	case spec.AutomountServiceAccountToken != nil:
		mounted = *spec.AutomountServiceAccountToken
	case sa != nil && sa.AutomountServiceAccountToken != nil:
		mounted = *sa.AutomountServiceAccountToken
	}
	if !mounted {
		if kubeMode == "on" {
			c.fail("%s: --kubernetes=on but the ServiceAccount token is not mounted: lameduck would refuse to start", where)
		}
		return "off (no ServiceAccount token; fixed drain timings)"
	}
	if kubeMode == "off" {
		c.fail("%s: the ServiceAccount token is mounted but --kubernetes=off: nothing uses it; set automountServiceAccountToken: false", where)
		return "off"
	}
	if saName == "default" {
		c.fail("%s: the token of the namespace's default ServiceAccount is mounted: run the pods as lameduck's ServiceAccount (deploy/rbac.yaml, the chart's serviceAccount/rbac) or set automountServiceAccountToken: false", where)
		return "?"
	}
	if sa == nil {
		c.fail("%s: serviceAccountName %q: no such ServiceAccount in %s in the input (deploy/rbac.yaml, the chart's serviceAccount.create); the token would be mounted without the Role that says what it may do", where, saName, ns)
		return "?"
	}
	granted := map[string]bool{}
	bound := 0
	for _, b := range in.bindings {
		if nsOrDefault(b.Namespace) != ns {
			continue
		}
		binds := false
		for _, s := range b.Subjects {
			if s.Kind == rbacv1.ServiceAccountKind && s.Name == saName && nsOrDefault(s.Namespace) == ns {
				binds = true
			}
		}
		if !binds {
			continue
		}
		bound++
		if b.RoleRef.Kind != "Role" || b.RoleRef.APIGroup != rbacv1.GroupName {
			c.fail("%s: RoleBinding/%s binds %s %q to ServiceAccount %q: lameduck needs a Role in its namespace, nothing cluster-wide", where, b.Name, b.RoleRef.Kind, b.RoleRef.Name, saName)
			continue
		}
		var role *rbacv1.Role
		for _, r := range in.roles {
			if r.Name == b.RoleRef.Name && nsOrDefault(r.Namespace) == ns {
				role = r
			}
		}
		if role == nil {
			c.fail("%s: RoleBinding/%s refers to Role %q, not in %s in the input", where, b.Name, b.RoleRef.Name, ns)
			continue
		}
		c.roleGrants(where, role, granted)
	}
	if bound == 0 {
		c.fail("%s: no RoleBinding in %s binds ServiceAccount %q (deploy/rbac.yaml, the chart's rbac.create): lameduck's API requests would all be refused", where, ns, saName)
		return "?"
	}
	var missing, extra []string
	for _, g := range lameduckGrants {
		if !granted[g] {
			missing = append(missing, g)
		}
	}
	for g := range granted {
		if !slices.Contains(lameduckGrants, g) {
			extra = append(extra, g)
		}
	}
	sort.Strings(extra)
	if len(missing) > 0 {
		c.fail("%s: ServiceAccount %q lacks %s (lameduck's drain uses exactly: %s)", where, saName, strings.Join(missing, ", "), strings.Join(lameduckGrants, ", "))
	}
	if len(extra) > 0 {
		c.fail("%s: ServiceAccount %q grants more than lameduck uses: %s (every container of the pod holds its token)", where, saName, strings.Join(extra, ", "))
	}
	return fmt.Sprintf("ServiceAccount %s, token mounted, Role grants exactly lameduck's %d verbs", saName, len(lameduckGrants))
}

// roleGrants adds a Role's "group/resource verb" pairs to granted; wildcards
// and resourceNames are refused (a wildcard grants more than anyone can
// review, and lameduck's own pod name is not known in advance).
func (c *checker) roleGrants(where string, r *rbacv1.Role, granted map[string]bool) {
	for i, rule := range r.Rules {
		if len(rule.ResourceNames) > 0 {
			c.fail("%s: Role/%s rule %d: resourceNames: lameduck's pod names are generated, a Role cannot name them", where, r.Name, i)
		}
		for _, g := range rule.APIGroups {
			for _, res := range rule.Resources {
				for _, v := range rule.Verbs {
					if g == "*" || res == "*" || v == "*" {
						c.fail("%s: Role/%s rule %d: wildcard (%q %q %q): grant lameduck's verbs by name", where, r.Name, i, g, res, v)
						continue
					}
					granted[g+"/"+res+" "+v] = true
				}
			}
		}
	}
}

// apiValidateRBAC runs the API server's create validation on the
// ServiceAccounts, Roles and RoleBindings.
func (c *checker) apiValidateRBAC(in *inputs) {
	for _, s := range in.sas {
		where := "ServiceAccount/" + s.Name
		obj := s.DeepCopy()
		obj.Namespace = nsOrDefault(obj.Namespace)
		legacyscheme.Scheme.Default(obj)
		var internal core.ServiceAccount
		if err := legacyscheme.Scheme.Convert(obj, &internal, nil); err != nil {
			c.fail("%s: conversion to the internal type: %v", where, err)
			continue
		}
		c.apiValidated(where, corevalidation.ValidateServiceAccount(&internal))
	}
	for _, r := range in.roles {
		where := "Role/" + r.Name
		obj := r.DeepCopy()
		obj.Namespace = nsOrDefault(obj.Namespace)
		legacyscheme.Scheme.Default(obj)
		var internal rbac.Role
		if err := legacyscheme.Scheme.Convert(obj, &internal, nil); err != nil {
			c.fail("%s: conversion to the internal type: %v", where, err)
			continue
		}
		c.apiValidated(where, rbacvalidation.ValidateRole(&internal))
	}
	for _, b := range in.bindings {
		where := "RoleBinding/" + b.Name
		obj := b.DeepCopy()
		obj.Namespace = nsOrDefault(obj.Namespace)
		legacyscheme.Scheme.Default(obj)
		var internal rbac.RoleBinding
		if err := legacyscheme.Scheme.Convert(obj, &internal, nil); err != nil {
			c.fail("%s: conversion to the internal type: %v", where, err)
			continue
		}
		c.apiValidated(where, rbacvalidation.ValidateRoleBinding(&internal))
	}
}
