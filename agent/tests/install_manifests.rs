//! The agent's own Deployment (`manifests/install/deployment.yaml`) is hardened as the
//! security standard asks, read with the agent's own renderer: non-root, read-only root
//! filesystem, no privilege escalation, no capabilities, seccomp RuntimeDefault, and
//! resource requests and limits on every container.

use std::path::Path;

use serde_json::Value;

#[test]
fn the_agents_deployment_is_locked_down() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/install/deployment.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let objects = gitops_agent::render::render_text(Path::new("manifests/install/deployment.yaml"), &text)
        .unwrap_or_else(|e| panic!("{e:?}"));
    let [deployment] = objects.as_slice() else { panic!("one Deployment, got {}", objects.len()) };
    let pod = &deployment.object["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_ne!(pod["securityContext"]["runAsUser"], 0);
    let containers = pod["containers"].as_array().unwrap();
    assert!(!containers.is_empty());
    for container in containers {
        let name = &container["name"];
        let security = &container["securityContext"];
        assert_eq!(security["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(security["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]), "{name}");
        assert_ne!(security["privileged"], true, "{name}");
        for bound in ["requests", "limits"] {
            for resource in ["cpu", "memory"] {
                let value = &container["resources"][bound][resource];
                assert!(matches!(value, Value::String(_)), "{name}: resources.{bound}.{resource} is set");
            }
        }
    }
}
