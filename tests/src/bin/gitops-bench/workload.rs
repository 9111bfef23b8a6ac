//! The objects a benchmark applies: the same objects as YAML files in a git repository
//! (for the agent and kubectl) and as JSON values (for the ceiling client), made from one
//! generator so the three contenders apply exactly the same thing.

use serde_json::{Value, json};

/// What a repository of N objects holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// ConfigMaps with a few keys.
    ConfigMaps,
    /// Deployments, Services (headless: the local control plane's service range is a
    /// /24) and ServiceAccounts, a third each.
    Mix,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::ConfigMaps => "ConfigMaps",
            Workload::Mix => "Deployments+Services+ServiceAccounts",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Workload::ConfigMaps => "cm",
            Workload::Mix => "mix",
        }
    }

    /// Object `i` of a repository, without a namespace (each contender supplies its own).
    pub fn object(self, i: usize, version: &str) -> Value {
        match self {
            Workload::ConfigMaps => config_map(i, version),
            Workload::Mix => match i % 3 {
                0 => deployment(i),
                1 => service(i),
                _ => service_account(i),
            },
        }
    }

    /// `manifests/NAME.yaml` of object `i`.
    pub fn file_name(self, i: usize) -> String {
        format!("manifests/{}-{i:05}.yaml", self.short())
    }
}

/// `cm-NNNNN`: the ConfigMap every push and drift measurement changes one of.
pub fn config_map_name(i: usize) -> String {
    format!("cm-{i:05}")
}

pub fn config_map(i: usize, version: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": config_map_name(i), "labels": { "app": "bench", "shard": (i % 10).to_string() } },
        "data": {
            "version": version,
            "index": i.to_string(),
            "settings.properties": format!("color=blue\nsize={i}\nenabled=true\n"),
        },
    })
}

/// A batch job spec (`jobs/NAME.yaml`) whose runs stay suspended: the benchmark times
/// the agent making the run, not a pod starting.
pub fn job(name: &str, version: &str) -> Value {
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": { "name": name },
        "spec": {
            "suspend": true,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{ "name": "run", "image": "busybox:1.36", "args": ["echo", version] }],
                },
            },
        },
    })
}

fn labels(i: usize) -> Value {
    json!({ "app": format!("app-{i:05}"), "tier": "bench" })
}

fn deployment(i: usize) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": format!("app-{i:05}"), "labels": labels(i) },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": labels(i) },
            "template": {
                "metadata": { "labels": labels(i) },
                "spec": {
                    "serviceAccountName": "default",
                    "containers": [{
                        "name": "app",
                        "image": "registry.example/app:1.0",
                        "ports": [{ "containerPort": 8080, "name": "http" }],
                        "env": [{ "name": "INDEX", "value": i.to_string() }],
                        "resources": {
                            "requests": { "cpu": "10m", "memory": "16Mi" },
                            "limits": { "cpu": "100m", "memory": "64Mi" },
                        },
                    }],
                },
            },
        },
    })
}

fn service(i: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": { "name": format!("svc-{i:05}"), "labels": labels(i) },
        "spec": {
            "clusterIP": "None",
            "selector": labels(i),
            "ports": [{ "name": "http", "port": 80, "targetPort": "http" }],
        },
    })
}

fn service_account(i: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": { "name": format!("sa-{i:05}"), "labels": labels(i) },
    })
}

/// Block-style YAML of a JSON value, as people write manifests. Strings are written as
/// JSON strings, which are valid YAML double-quoted scalars, so nothing is reinterpreted.
pub fn to_yaml(value: &Value) -> String {
    let mut out = String::new();
    write_block(value, 0, &mut out);
    out
}

fn write_block(value: &Value, indent: usize, out: &mut String) {
    let pad = " ".repeat(indent);
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                out.push_str(&format!("{pad}{key}:"));
                write_child(v, indent, out);
            }
        }
        Value::Array(items) => {
            for item in items {
                out.push_str(&format!("{pad}-"));
                match item {
                    Value::Object(map) if !map.is_empty() => {
                        // The first key on the dash's line, the rest under it.
                        let mut first = true;
                        for (key, v) in map {
                            if first {
                                out.push_str(&format!(" {key}:"));
                                first = false;
                            } else {
                                out.push_str(&format!("{pad}  {key}:"));
                            }
                            write_child(v, indent + 2, out);
                        }
                    }
                    other => write_child(other, indent, out),
                }
            }
        }
        scalar => out.push_str(&format!("{pad}{}\n", scalar_text(scalar))),
    }
}

fn write_child(value: &Value, indent: usize, out: &mut String) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            write_block(value, indent + 2, out);
        }
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            write_block(value, indent + 2, out);
        }
        scalar => out.push_str(&format!(" {}\n", scalar_text(scalar))),
    }
}

fn scalar_text(value: &Value) -> String {
    match value {
        Value::Object(_) => "{}".to_owned(),
        Value::Array(_) => "[]".to_owned(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_block_style() {
        let value = json!({ "a": { "b": [ { "c": 1, "d": "x" }, "y" ] }, "e": {} });
        assert_eq!(to_yaml(&value), "a:\n  b:\n    - c: 1\n      d: \"x\"\n    - \"y\"\ne: {}\n");
    }
}
