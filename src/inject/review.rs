//! One AdmissionReview (`admission.k8s.io/v1`) in, one out.
//!
//! Only Pod CREATEs are mutated; anything else the webhook is sent (another
//! kind, another operation, a pod it cannot read as one) is allowed as it
//! is, with a warning: a misconfigured webhook must not block the cluster.
//! A body that is not an AdmissionReview is the caller's error (HTTP 400).

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::Value;

use super::patch::{Injection, Outcome, inject};
use super::settings::SidecarSettings;

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an admission.k8s.io/v1 AdmissionReview: {0}")]
    Malformed(serde_json::Error),
    #[error("the AdmissionReview has no request")]
    NoRequest,
    #[error("apiVersion {0:?}: only admission.k8s.io/v1 is served")]
    Version(String),
    #[error("cannot encode the patch: {0}")]
    Patch(String),
}

/// The answer to one review, and what the injector decided (for metrics and logs).
pub struct Reviewed {
    pub response: AdmissionReview<DynamicObject>,
    /// None when the request was not a pod creation.
    pub outcome: Option<Outcome>,
    pub namespace: String,
    pub pod: String,
}

pub fn review(body: &[u8], settings: &SidecarSettings) -> Result<Reviewed, ReviewError> {
    let review: AdmissionReview<DynamicObject> =
        serde_json::from_slice(body).map_err(ReviewError::Malformed)?;
    if review.types.api_version != "admission.k8s.io/v1" {
        return Err(ReviewError::Version(review.types.api_version));
    }
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| ReviewError::NoRequest)?;
    let namespace = request.namespace.clone().unwrap_or_default();
    let response = AdmissionResponse::from(&request);
    let is_pod = request.kind.group.is_empty() && request.kind.kind == "Pod";
    let object = request.object.as_ref().filter(|_| is_pod);
    let (Operation::Create, Some(object)) = (&request.operation, object) else {
        let mut response = response;
        response.warnings = Some(vec![format!(
            "lameduck injector: {:?} of {} is not a Pod creation; allowed unchanged",
            request.operation, request.kind.kind,
        )]);
        return Ok(Reviewed {
            response: response.into_review(),
            outcome: None,
            namespace,
            pod: request.name,
        });
    };
    let pod_json = serde_json::to_value(object).unwrap_or(Value::Null);
    // Pods from a controller have only generateName at this point.
    let pod = object
        .metadata
        .name
        .clone()
        .or_else(|| object.metadata.generate_name.clone())
        .unwrap_or_default();
    let Injection {
        outcome,
        patch,
        warnings,
    } = inject(&pod_json, settings);
    let mut response = if patch.0.is_empty() {
        response
    } else {
        response
            .with_patch(patch)
            .map_err(|e| ReviewError::Patch(e.to_string()))?
    };
    if !warnings.is_empty() {
        response.warnings = Some(warnings);
    }
    Ok(Reviewed {
        response: response.into_review(),
        outcome: Some(outcome),
        namespace,
        pod,
    })
}
