//! Server-side apply of (multi-document) YAML manifests, e.g. deploy/*.yaml.
//!
//! The documents go to the apiserver as YAML (`application/apply-patch+yaml`):
//! the apiserver parses them, so no YAML crate is needed here. Only what
//! routes a document is read locally, line by line: the top-level
//! `apiVersion` and `kind` and `metadata.name` / `metadata.namespace`, in the
//! block style every manifest uses (flow-style `{...}` at those levels is not
//! supported). Discovery maps the kind to its resource and scope.

use std::path::Path;

use kube::api::{DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{self, Scope};
use kube::{Resource, ResourceExt};

use super::ControlPlane;

/// What routes one document of a manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DocHead {
    pub api_version: String,
    pub kind: String,
    pub name: String,
    pub namespace: Option<String>,
}

/// Splits a YAML stream into its documents (`---` lines), dropping those
/// that hold only comments and blank lines.
pub fn split_documents(yaml: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in yaml.lines() {
        if line == "---" || line.starts_with("--- ") || line.starts_with("---\t") {
            docs.push(String::new());
        } else if line == "..." {
            continue;
        } else {
            let d = docs.last_mut().unwrap();
            d.push_str(line);
            d.push('\n');
        }
    }
    docs.into_iter()
        .filter(|d| {
            d.lines().any(|l| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with('#')
            })
        })
        .collect()
}

fn scalar(v: &str) -> String {
    let v = v.trim();
    if let Some(inner) = v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        return inner.to_string();
    }
    if let Some(inner) = v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')) {
        return inner.replace("''", "'");
    }
    // An unquoted scalar ends at " #".
    v.split(" #").next().unwrap_or("").trim().to_string()
}

/// Reads a document's apiVersion, kind, metadata.name and .namespace.
pub fn doc_head(doc: &str) -> Result<DocHead, String> {
    let mut head = DocHead::default();
    let mut in_metadata = false;
    let mut meta_indent: Option<usize> = None;
    for line in doc.lines() {
        let t = line.trim_start();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        let indent = line.len() - t.len();
        let Some((key, value)) = t.split_once(':') else {
            continue;
        };
        if indent == 0 {
            in_metadata = key == "metadata";
            match key {
                "apiVersion" => head.api_version = scalar(value),
                "kind" => head.kind = scalar(value),
                _ => {}
            }
            continue;
        }
        if in_metadata {
            let level = *meta_indent.get_or_insert(indent);
            if indent == level {
                match key {
                    "name" => head.name = scalar(value),
                    "namespace" => head.namespace = Some(scalar(value)).filter(|s| !s.is_empty()),
                    _ => {}
                }
            }
        }
    }
    if head.api_version.is_empty() || head.kind.is_empty() || head.name.is_empty() {
        return Err(format!(
            "a document without apiVersion, kind or metadata.name (block style expected): {head:?}\n{doc}"
        ));
    }
    Ok(head)
}

impl ControlPlane {
    /// Server-side applies every document of `yaml` (field manager
    /// `lameduck-tests`, forced), in order; namespaced objects without a
    /// namespace go to `namespace`. Returns the objects as the apiserver
    /// stored them. Panics on the first failure.
    pub async fn apply_yaml(&self, yaml: &str, namespace: &str) -> Vec<DynamicObject> {
        let client = self.client();
        let mut applied = Vec::new();
        for doc in split_documents(yaml) {
            let head = doc_head(&doc).unwrap_or_else(|e| panic!("apply_yaml: {e}"));
            let (group, version) = match head.api_version.split_once('/') {
                Some((g, v)) => (g.to_string(), v.to_string()),
                None => (String::new(), head.api_version.clone()),
            };
            let gvk = GroupVersionKind::gvk(&group, &version, &head.kind);
            let (ar, caps) = discovery::pinned_kind(&client, &gvk)
                .await
                .unwrap_or_else(|e| panic!("apply_yaml: discovery of {gvk:?}: {e}"));
            let ns = match caps.scope {
                Scope::Namespaced => Some(
                    head.namespace
                        .clone()
                        .unwrap_or_else(|| namespace.to_string()),
                ),
                Scope::Cluster => None,
            };
            let url = DynamicObject::url_path(&ar, ns.as_deref());
            let pp = PatchParams::apply("lameduck-tests").force();
            let mut req = kube::core::Request::new(url)
                .patch(&head.name, &pp, &Patch::Apply(&serde_json::Value::Null))
                .unwrap_or_else(|e| panic!("apply_yaml: request for {head:?}: {e}"));
            // The document itself, as YAML (the content type is apply-patch+yaml).
            *req.body_mut() = doc.into_bytes();
            let obj: DynamicObject = client.request(req).await.unwrap_or_else(|e| {
                panic!(
                    "apply_yaml: {} {}/{}: {e}",
                    head.kind,
                    ns.as_deref().unwrap_or("-"),
                    head.name
                )
            });
            eprintln!(
                "k8s: applied {} {}{}",
                head.kind,
                obj.namespace().map(|n| format!("{n}/")).unwrap_or_default(),
                obj.name_any()
            );
            applied.push(obj);
        }
        applied
    }

    /// [`ControlPlane::apply_yaml`] on a file (relative paths are from the
    /// repository root).
    pub async fn apply_file(&self, path: impl AsRef<Path>, namespace: &str) -> Vec<DynamicObject> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(path.as_ref());
        let yaml = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        self.apply_yaml(&yaml, namespace).await
    }
}
