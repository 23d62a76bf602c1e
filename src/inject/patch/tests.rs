//! Patch generation on Pods as the apiserver sends them (defaulted; the
//! base pod is from an AdmissionReview kube-apiserver v1.37.2 sent in
//! tests/inject.rs, recorded with LAMEDUCK_RECORD_REVIEWS=1 into
//! `testdata/review-pod.json`, managedFields removed),
//! each patch applied with an RFC 6902 implementation and the result checked.

use super::*;
use crate::inject::review::review;

const RECORDED_REVIEW: &str = include_str!("../testdata/review-pod.json");

fn settings() -> SidecarSettings {
    serde_json::from_value(json!({"image": {"repository": "lameduck", "tag": "0.1.0"}}))
        .expect("settings")
}

/// The Pod of the recorded review.
fn recorded_pod() -> Value {
    let review: Value = serde_json::from_str(RECORDED_REVIEW).expect("recorded review");
    review["request"]["object"].clone()
}

fn patched(pod: &Value, injection: &Injection) -> Value {
    let mut pod = pod.clone();
    json_patch::patch(&mut pod, &injection.patch.0).expect("the patch applies");
    pod
}

fn containers<'a>(pod: &'a Value, key: &str) -> Vec<&'a str> {
    pod["spec"][key]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

#[test]
fn a_plain_pod_gets_the_native_sidecar_and_the_hook() {
    let pod = recorded_pod();
    let injection = inject(&pod, &settings());
    assert_eq!(injection.outcome, Outcome::Injected);
    let out = patched(&pod, &injection);
    // The recorded pod's app declares one port, 3000: the one to proxy to.
    let mut expected = settings();
    expected.upstream_port = 3000;
    let expected = expected.validate().unwrap();
    let mut container = expected.container();
    // The token, mounted as the ServiceAccount admission mounted it into the app.
    container["volumeMounts"] = pod["spec"]["containers"][0]["volumeMounts"].clone();
    assert_eq!(out["spec"]["initContainers"][0], container);
    assert_eq!(out["spec"]["initContainers"][0]["restartPolicy"], "Always");
    assert_eq!(
        out["spec"]["containers"][0]["lifecycle"]["preStop"],
        expected.app_pre_stop()
    );
    assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 30);
    let annotations = &out["metadata"]["annotations"];
    assert_eq!(annotations[STATUS_ANNOTATION], "injected");
    assert_eq!(annotations["prometheus.io/port"], "9901");
    // Everything else of the pod is as it was.
    assert_eq!(
        out["spec"]["containers"][0]["image"],
        pod["spec"]["containers"][0]["image"]
    );
    assert_eq!(out["spec"]["volumes"], pod["spec"]["volumes"]);
}

#[test]
fn an_injected_pod_is_left_alone() {
    let pod = recorded_pod();
    let once = patched(&pod, &inject(&pod, &settings()));
    let again = inject(&once, &settings());
    assert_eq!(again.outcome, Outcome::AlreadyInjected);
    assert!(again.patch.0.is_empty());
    // Also when only the container is there (injected by the chart's template).
    let mut by_chart = pod.clone();
    by_chart["spec"]["initContainers"] = json!([{"name": "lameduck", "image": "x"}]);
    assert_eq!(
        inject(&by_chart, &settings()).outcome,
        Outcome::AlreadyInjected
    );
}

#[test]
fn absent_arrays_and_maps_are_created_whole() {
    let pod = json!({"metadata": {"name": "bare"}, "spec": {"containers": [{"name": "app", "image": "a"}]}});
    let injection = inject(&pod, &settings());
    let paths: Vec<String> = injection
        .patch
        .0
        .iter()
        .map(|op| op.path().to_string())
        .collect();
    assert!(
        paths.contains(&"/spec/initContainers".to_owned()),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"/metadata/annotations".to_owned()),
        "{paths:?}"
    );
    assert!(
        paths.contains(&"/spec/containers/0/lifecycle".to_owned()),
        "{paths:?}"
    );
    let out = patched(&pod, &injection);
    assert_eq!(containers(&out, "initContainers"), ["lameduck"]);
    assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 30);
}

#[test]
fn keys_with_slashes_and_tildes_are_escaped() {
    let mut pod = recorded_pod();
    pod["metadata"]["annotations"] = json!({"a~b/c": "kept"});
    let injection = inject(&pod, &settings());
    let status_path = injection
        .patch
        .0
        .iter()
        .map(|op| op.path().to_string())
        .find(|p| p.contains("status"))
        .expect("a status annotation op");
    assert_eq!(status_path, "/metadata/annotations/lameduck.io~1status");
    let out = patched(&pod, &injection);
    assert_eq!(out["metadata"]["annotations"]["a~b/c"], "kept");
    assert_eq!(
        out["metadata"]["annotations"][STATUS_ANNOTATION],
        "injected"
    );
}

#[test]
fn existing_init_containers_run_after_the_sidecar() {
    let mut pod = recorded_pod();
    pod["spec"]["initContainers"] = json!([{"name": "migrate", "image": "m"}]);
    let out = patched(&pod, &inject(&pod, &settings()));
    assert_eq!(containers(&out, "initContainers"), ["lameduck", "migrate"]);
}

#[test]
fn an_apps_own_pre_stop_is_kept_and_recorded() {
    let mut pod = recorded_pod();
    let own = json!({"exec": {"command": ["/bin/flush"]}});
    pod["spec"]["containers"][0]["lifecycle"] =
        json!({"preStop": own, "postStart": {"exec": {"command": ["x"]}}});
    pod["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "worker", "image": "w", "lifecycle": {"postStart": {"exec": {"command": ["y"]}}}}));
    let injection = inject(&pod, &settings());
    assert_eq!(injection.outcome, Outcome::Injected);
    assert!(
        injection.warnings.iter().any(|w| w.contains("own preStop")),
        "{:?}",
        injection.warnings
    );
    let out = patched(&pod, &injection);
    assert_eq!(out["spec"]["containers"][0]["lifecycle"]["preStop"], own);
    // The second container had a lifecycle without preStop: only preStop is added.
    assert_eq!(
        out["spec"]["containers"][1]["lifecycle"]["postStart"]["exec"]["command"][0],
        "y"
    );
    assert!(out["spec"]["containers"][1]["lifecycle"]["preStop"]["httpGet"].is_object());
    let skipped = out["metadata"]["annotations"][NOTES_ANNOTATION]
        .as_str()
        .unwrap();
    assert!(skipped.contains("its own preStop kept"), "{skipped}");
}

#[test]
fn host_network_pods_are_skipped_not_refused() {
    let mut pod = recorded_pod();
    pod["spec"]["hostNetwork"] = json!(true);
    let injection = inject(&pod, &settings());
    assert!(matches!(injection.outcome, Outcome::Skipped(ref r) if r.contains("hostNetwork")));
    let out = patched(&pod, &injection);
    assert!(out["spec"].get("initContainers").is_none());
    assert!(
        out["metadata"]["annotations"][STATUS_ANNOTATION]
            .as_str()
            .unwrap()
            .starts_with("skipped: hostNetwork")
    );
}

#[test]
fn upstream_port_from_a_named_port_the_only_port_or_the_settings() {
    let arg = |pod: &Value| -> String {
        let out = patched(pod, &inject(pod, &settings()));
        out["spec"]["initContainers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .find(|a| a.starts_with("--upstream="))
            .unwrap()
            .to_owned()
    };
    let mut pod = recorded_pod();
    pod["spec"]["containers"][0]["ports"] =
        json!([{"name": "web", "containerPort": 3000, "protocol": "TCP"}]);
    assert_eq!(arg(&pod), "--upstream=127.0.0.1:3000");
    pod["spec"]["containers"][0]["ports"] = json!([
        {"name": "web", "containerPort": 3000, "protocol": "TCP"},
        {"name": "grpc", "containerPort": 9000, "protocol": "TCP"},
    ]);
    // Two ports and no annotation: the settings' port.
    assert_eq!(arg(&pod), "--upstream=127.0.0.1:8080");
    pod["metadata"]["annotations"] = json!({"lameduck.io/upstream-port": "grpc"});
    assert_eq!(arg(&pod), "--upstream=127.0.0.1:9000");
    pod["metadata"]["annotations"] = json!({"lameduck.io/upstream-port": "9100"});
    assert_eq!(arg(&pod), "--upstream=127.0.0.1:9100");
    // No ports at all: the settings' port.
    pod["metadata"]["annotations"] = json!({});
    pod["spec"]["containers"][0]
        .as_object_mut()
        .unwrap()
        .remove("ports");
    assert_eq!(arg(&pod), "--upstream=127.0.0.1:8080");
}

#[test]
fn annotations_set_the_layout_and_the_timings() {
    let mut pod = recorded_pod();
    pod["metadata"]["annotations"] = json!({
        "lameduck.io/native-sidecar": "false",
        "lameduck.io/drain-delay": "3s",
        "lameduck.io/drain-timeout": "40s",
        "lameduck.io/mode": "tcp",
    });
    let out = patched(&pod, &inject(&pod, &settings()));
    assert!(out["spec"].get("initContainers").is_none());
    let names = containers(&out, "containers");
    assert_eq!(names.last(), Some(&"lameduck"));
    let sidecar = out["spec"]["containers"]
        .as_array()
        .unwrap()
        .last()
        .unwrap();
    let args: Vec<&str> = sidecar["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.contains(&"--drain-delay=3s") && args.contains(&"--mode=tcp"),
        "{args:?}"
    );
    assert!(args.contains(&"--deadline-margin=5s"), "{args:?}");
    // ceil(40s) + 5s of app shutdown: raised from the pod's 30.
    assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 45);
}

#[test]
fn a_longer_grace_period_is_kept() {
    let mut pod = recorded_pod();
    pod["spec"]["terminationGracePeriodSeconds"] = json!(120);
    let out = patched(&pod, &inject(&pod, &settings()));
    assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 120);
}

#[test]
fn unreadable_annotations_skip_with_the_reason() {
    for (key, value, expect) in [
        ("lameduck.io/native-sidecar", "yes", "true or false"),
        ("lameduck.io/drain-delay", "soon", "drainDelay"),
        (
            "lameduck.io/drain-timeout",
            "2s",
            "drainTimeout (2s) must be >= drainDelay",
        ),
        (
            "lameduck.io/upstream-port",
            "nosuchport",
            "neither a port number",
        ),
        ("lameduck.io/mode", "udp", "mode"),
    ] {
        let mut pod = recorded_pod();
        pod["metadata"]["annotations"] = json!({key: value});
        let injection = inject(&pod, &settings());
        match &injection.outcome {
            Outcome::Skipped(reason) => assert!(reason.contains(expect), "{key}: {reason}"),
            other => panic!("{key}={value}: {other:?}"),
        }
        assert!(injection.warnings[0].contains("not injected"));
    }
}

#[test]
fn the_sidecars_ports_taken_by_the_app_skip() {
    let mut pod = recorded_pod();
    pod["spec"]["containers"][0]["ports"] = json!([{"containerPort": 9901}]);
    let injection = inject(&pod, &settings());
    assert!(matches!(injection.outcome, Outcome::Skipped(ref r) if r.contains("port 9901")));
}

#[test]
fn the_pods_own_scrape_annotations_are_kept() {
    let mut pod = recorded_pod();
    pod["metadata"]["annotations"] = json!({"prometheus.io/port": "8080"});
    let out = patched(&pod, &inject(&pod, &settings()));
    assert_eq!(out["metadata"]["annotations"]["prometheus.io/port"], "8080");
    assert!(
        out["metadata"]["annotations"]
            .get("prometheus.io/scrape")
            .is_none()
    );
}

#[test]
fn opt_out_label_wins() {
    let mut pod = recorded_pod();
    pod["metadata"]["labels"] = json!({INJECT_LABEL: "false"});
    assert!(matches!(
        inject(&pod, &settings()).outcome,
        Outcome::Skipped(_)
    ));
}

#[test]
fn the_recorded_review_is_answered_with_its_uid_and_a_base64_patch() {
    let reviewed = review(RECORDED_REVIEW.as_bytes(), &settings()).expect("review");
    let answer = serde_json::to_value(&reviewed.response).unwrap();
    let recorded: Value = serde_json::from_str(RECORDED_REVIEW).unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    assert_eq!(answer["response"]["uid"], recorded["request"]["uid"]);
    assert_eq!(answer["response"]["allowed"], true);
    assert_eq!(answer["response"]["patchType"], "JSONPatch");
    assert_eq!(reviewed.outcome, Some(Outcome::Injected));
}

#[test]
fn malformed_reviews_are_errors_not_panics() {
    for body in [
        &b""[..],
        b"{",
        b"[]",
        b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\"}",
        b"{\"apiVersion\":\"admission.k8s.io/v1beta1\",\"kind\":\"AdmissionReview\",\"request\":{}}",
        b"{\"apiVersion\":\"admission.k8s.io/v1\",\"kind\":\"AdmissionReview\",\"request\":{\"uid\":7}}",
    ] {
        assert!(review(body, &settings()).is_err(), "{:?}", String::from_utf8_lossy(body));
    }
}

#[test]
fn other_kinds_and_operations_are_allowed_unchanged() {
    let mut recorded: Value = serde_json::from_str(RECORDED_REVIEW).unwrap();
    recorded["request"]["operation"] = json!("UPDATE");
    let reviewed = review(recorded.to_string().as_bytes(), &settings()).unwrap();
    let answer = serde_json::to_value(&reviewed.response).unwrap();
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
    assert_eq!(reviewed.outcome, None);
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the annotations hold, the injector answers (injects or
        /// skips), its patch applies, and a second pass changes nothing.
        #[test]
        fn any_annotations_give_an_applicable_idempotent_patch(
            entries in proptest::collection::btree_map("(lameduck\\.io/[a-z-]{1,20}|[a-z~/.]{1,12})", "\\PC{0,12}", 0..6)
        ) {
            let mut pod = recorded_pod();
            pod["metadata"]["annotations"] = serde_json::to_value(&entries).unwrap();
            let first = inject(&pod, &settings());
            let out = patched(&pod, &first);
            let second = inject(&out, &settings());
            if first.outcome == Outcome::Injected {
                prop_assert_eq!(second.outcome, Outcome::AlreadyInjected);
            }
            for (k, v) in &entries {
                if !k.starts_with("lameduck.io/status") && !k.starts_with("lameduck.io/notes") && !k.starts_with("prometheus.io/") {
                    prop_assert_eq!(&out["metadata"]["annotations"][k], &json!(v));
                }
            }
        }
    }
}
