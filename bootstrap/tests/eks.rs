//! `gitops-bootstrap up/down --provider eks` and `token`, against a real moto server
//! (PyPI `moto[server]`) on loopback; the install step goes to a real local control
//! plane through `--install-kubeconfig`. Every resource is read back through the AWS SDK.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use aws_sdk_ec2::types::Filter;
use base64::Engine;
use gitops_bootstrap::eks::{self, Aws, CLUSTER_TAG};
use gitops_bootstrap::local::{self, LocalControlPlane, Options};

mod common;
use common::kubectl;

const REGION: &str = "us-west-2";

/// A moto server on a free loopback port, killed on drop.
struct Moto {
    child: Child,
    url: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    fn start() -> Moto {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = dir.path().join("moto.log");
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            // Without it AWS-managed policies such as AmazonEKSClusterPolicy cannot be attached.
            .env("MOTO_IAM_LOAD_MANAGED_POLICIES", "true")
            .env("MOTO_ENABLE_RECORDING", "True")
            .env("MOTO_RECORDER_FILEPATH", dir.path().join("recording"))
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.path().join("moto.err")).unwrap())
            .spawn()
            .expect("python3 -m moto.server (pip install 'moto[server]')");
        let moto = Moto { child, url: format!("http://127.0.0.1:{port}"), log, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not listen on {port}; see {}", moto.log.display());
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    fn post(&self, path: &str) -> String {
        http_request("POST", &format!("{}{path}", self.url))
    }

    /// The AWS actions moto received between `start-recording` and now.
    fn recorded_actions(&self) -> Vec<String> {
        let text = http_request("GET", &format!("{}/moto-api/recorder/download-recording", self.url));
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let entry: serde_json::Value = serde_json::from_str(line).unwrap();
                let body = entry["body"].as_str().unwrap_or_default();
                // moto stores binary-looking bodies base64-encoded.
                let body = if entry["body_encoded"] == true {
                    String::from_utf8_lossy(&base64::engine::general_purpose::STANDARD.decode(body).unwrap_or_default())
                        .into_owned()
                } else {
                    body.to_owned()
                };
                let action = body.split('&').find_map(|p| p.strip_prefix("Action="));
                match action {
                    Some(action) => action.to_owned(),
                    // EKS is REST: the method and path say what it is.
                    None => format!(
                        "{} {}",
                        entry["method"].as_str().unwrap_or_default(),
                        entry["url"].as_str().unwrap_or_default()
                    ),
                }
            })
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One plain HTTP/1.0 request on loopback; returns the body.
fn http_request(method: &str, url: &str) -> String {
    use std::io::Write;
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap();
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    write!(stream, "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    assert!(head.contains(" 200"), "{method} {url}: {head}");
    body.to_owned()
}

/// The environment every `gitops-bootstrap` and SDK call of a test uses: moto, fixed
/// credentials, and a HOME of its own (no ~/.aws of the machine's).
fn aws_env(moto: &Moto, home: &Path) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", moto.url.clone()),
        ("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE".into()),
        ("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into()),
        ("AWS_REGION", REGION.into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ("HOME", home.display().to_string()),
    ]
}

fn bootstrap(env: &[(&'static str, String)], args: &[&str]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gitops-bootstrap"));
    command.args(args).stdin(Stdio::null()).env_remove("AWS_PROFILE");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn ok(args: &[&str], output: Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "gitops-bootstrap {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// SDK clients against moto, with the test's credentials (set explicitly, not through
/// the environment: the tests of this file run in parallel, each with its own moto).
async fn sdk(env: &[(&'static str, String)]) -> Aws {
    let get = |key: &str| env.iter().find(|(k, _)| *k == key).unwrap().1.clone();
    let credentials = aws_credential_types::Credentials::new(
        get("AWS_ACCESS_KEY_ID"),
        get("AWS_SECRET_ACCESS_KEY"),
        None,
        None,
        "test",
    );
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(eks::http_client())
        .region(aws_config::Region::new(REGION))
        .endpoint_url(get("AWS_ENDPOINT_URL"))
        .credentials_provider(credentials)
        .load()
        .await;
    Aws::new(&config)
}

fn ours(cluster: &str) -> Filter {
    Filter::builder().name(format!("tag:{CLUSTER_TAG}")).values(cluster).build()
}

/// Counts of this cluster's resources in moto: what a second `up` must not change.
#[derive(Debug, PartialEq)]
struct Counts {
    vpcs: usize,
    subnets: usize,
    gateways: usize,
    nat_gateways: usize,
    addresses: usize,
    route_tables: usize,
    roles: usize,
    clusters: usize,
    node_groups: usize,
    oidc_providers: usize,
}

async fn counts(aws: &Aws, cluster: &str) -> Counts {
    let ec2 = &aws.ec2;
    let vpcs = ec2.describe_vpcs().filters(ours(cluster)).send().await.unwrap().vpcs().len();
    let subnets = ec2.describe_subnets().filters(ours(cluster)).send().await.unwrap().subnets().len();
    let gateways =
        ec2.describe_internet_gateways().filters(ours(cluster)).send().await.unwrap().internet_gateways().len();
    let nat_gateways = ec2
        .describe_nat_gateways()
        .send()
        .await
        .unwrap()
        .nat_gateways()
        .iter()
        .filter(|n| n.state().map(|s| s.as_str()) != Some("deleted"))
        .filter(|n| n.tags().iter().any(|t| t.key() == Some(CLUSTER_TAG) && t.value() == Some(cluster)))
        .count();
    let addresses = ec2.describe_addresses().filters(ours(cluster)).send().await.unwrap().addresses().len();
    let route_tables = ec2.describe_route_tables().filters(ours(cluster)).send().await.unwrap().route_tables().len();
    let mut roles = 0;
    for suffix in ["eks-cluster", "eks-node"] {
        if aws.iam.get_role().role_name(format!("{cluster}-{suffix}")).send().await.is_ok() {
            roles += 1;
        }
    }
    let clusters = aws.eks.list_clusters().send().await.unwrap().clusters().iter().filter(|c| *c == cluster).count();
    let node_groups = if clusters > 0 {
        aws.eks.list_nodegroups().cluster_name(cluster).send().await.unwrap().nodegroups().len()
    } else {
        0
    };
    let mut oidc_providers = 0;
    for provider in aws.iam.list_open_id_connect_providers().send().await.unwrap().open_id_connect_provider_list() {
        let arn = provider.arn().unwrap();
        let got = aws.iam.get_open_id_connect_provider().open_id_connect_provider_arn(arn).send().await.unwrap();
        if got.tags().iter().any(|t| t.key() == CLUSTER_TAG && t.value() == cluster) {
            oidc_providers += 1;
        }
    }
    Counts {
        vpcs,
        subnets,
        gateways,
        nat_gateways,
        addresses,
        route_tables,
        roles,
        clusters,
        node_groups,
        oidc_providers,
    }
}

fn none() -> Counts {
    Counts {
        vpcs: 0,
        subnets: 0,
        gateways: 0,
        nat_gateways: 0,
        addresses: 0,
        route_tables: 0,
        roles: 0,
        clusters: 0,
        node_groups: 0,
        oidc_providers: 0,
    }
}

/// Everything `up` makes has the settings asked for.
async fn check_settings(aws: &Aws, cluster: &str) {
    let ec2 = &aws.ec2;
    let vpc = ec2.describe_vpcs().filters(ours(cluster)).send().await.unwrap().vpcs()[0].clone();
    assert_eq!(vpc.cidr_block(), Some("10.0.0.0/16"));
    let vpc_id = vpc.vpc_id().unwrap();

    let subnets = ec2.describe_subnets().filters(ours(cluster)).send().await.unwrap().subnets().to_vec();
    let tag = |s: &aws_sdk_ec2::types::Subnet, key: &str| {
        s.tags().iter().find(|t| t.key() == Some(key)).and_then(|t| t.value()).map(str::to_owned)
    };
    let zones: BTreeSet<_> = subnets.iter().filter_map(|s| s.availability_zone()).collect();
    assert_eq!(zones.len(), 3, "three zones by default: {zones:?}");
    for subnet in &subnets {
        assert_eq!(subnet.vpc_id(), Some(vpc_id));
        assert_eq!(tag(subnet, &format!("kubernetes.io/cluster/{cluster}")).as_deref(), Some("shared"));
        let public = tag(subnet, "gitops.scale.dev/resource").unwrap().starts_with("public-");
        let role = if public { "kubernetes.io/role/elb" } else { "kubernetes.io/role/internal-elb" };
        assert_eq!(tag(subnet, role).as_deref(), Some("1"), "{:?}", subnet.tags());
    }

    let igw =
        ec2.describe_internet_gateways().filters(ours(cluster)).send().await.unwrap().internet_gateways()[0].clone();
    assert!(igw.attachments().iter().any(|a| a.vpc_id() == Some(vpc_id)), "the internet gateway is attached");

    let tables = ec2.describe_route_tables().filters(ours(cluster)).send().await.unwrap().route_tables().to_vec();
    assert_eq!(tables.len(), 4, "one public table, one private table per zone");
    for table in &tables {
        let default = table.routes().iter().find(|r| r.destination_cidr_block() == Some("0.0.0.0/0")).unwrap();
        let public = table.tags().iter().any(|t| t.value() == Some("public-rt"));
        if public {
            assert_eq!(default.gateway_id(), igw.internet_gateway_id());
            assert_eq!(table.associations().len(), 3);
        } else {
            assert!(default.nat_gateway_id().is_some_and(|id| id.starts_with("nat-")), "{default:?}");
            assert_eq!(table.associations().len(), 1);
        }
    }

    let cluster_role = aws.iam.get_role().role_name(format!("{cluster}-eks-cluster")).send().await.unwrap();
    assert!(cluster_role.role().unwrap().tags().iter().any(|t| t.key() == CLUSTER_TAG && t.value() == cluster));
    let policies = |role: String| async move {
        let attached = aws.iam.list_attached_role_policies().role_name(role).send().await.unwrap();
        attached.attached_policies().iter().filter_map(|p| p.policy_name().map(str::to_owned)).collect::<Vec<_>>()
    };
    assert_eq!(policies(format!("{cluster}-eks-cluster")).await, ["AmazonEKSClusterPolicy"]);
    let node_policies: BTreeSet<String> = policies(format!("{cluster}-eks-node")).await.into_iter().collect();
    let want: BTreeSet<String> =
        ["AmazonEKSWorkerNodePolicy", "AmazonEKS_CNI_Policy", "AmazonEC2ContainerRegistryReadOnly"]
            .into_iter()
            .map(String::from)
            .collect();
    assert_eq!(node_policies, want);

    let described = aws.eks.describe_cluster().name(cluster).send().await.unwrap();
    let described = described.cluster().unwrap();
    assert_eq!(described.version(), Some("1.33"));
    assert_eq!(described.tags().unwrap().get(CLUSTER_TAG).map(String::as_str), Some(cluster));
    let vpc_config = described.resources_vpc_config().unwrap();
    assert!(vpc_config.endpoint_public_access() && vpc_config.endpoint_private_access());
    assert_eq!(vpc_config.public_access_cidrs(), ["203.0.113.0/24"]);
    assert_eq!(vpc_config.subnet_ids().len(), 6);

    let group = aws.eks.describe_nodegroup().cluster_name(cluster).nodegroup_name(format!("{cluster}-nodes")).send();
    let group = group.await.unwrap();
    let group = group.nodegroup().unwrap();
    assert_eq!(group.instance_types(), ["m6i.large"]);
    let scaling = group.scaling_config().unwrap();
    assert_eq!((scaling.min_size(), scaling.desired_size(), scaling.max_size()), (Some(1), Some(2), Some(3)));
    assert_eq!(group.subnets().len(), 3, "nodes in the private subnets");
    assert!(group.node_role().unwrap().ends_with(&format!("{cluster}-eks-node")));
}

#[tokio::test(flavor = "multi_thread")]
async fn up_creates_everything_up_again_creates_nothing_down_removes_it() {
    let moto = Moto::start();
    let home = tempfile::tempdir().unwrap();
    let env = aws_env(&moto, home.path());
    let aws = sdk(&env).await;
    let cluster = "scale";

    // The agent is installed into a local control plane standing in for the cluster.
    let plane_dir = tempfile::tempdir().unwrap();
    let plane =
        LocalControlPlane::start(&Options::new(plane_dir.path(), local::Lifetime::TiedToThisProcess)).await.unwrap();
    let token_file = home.path().join("token");
    std::fs::write(&token_file, "s3cr3t-token\n").unwrap();
    let kubeconfig = home.path().join("kubeconfig");

    let args = [
        "up",
        "--provider",
        "eks",
        "--cluster-name",
        cluster,
        "--region",
        REGION,
        "--repo",
        "https://git.example.com/scale/deploy.git",
        "--public-access-cidr",
        "203.0.113.0/24",
        "--instance-type",
        "m6i.large",
        "--nodes-min",
        "1",
        "--nodes-desired",
        "2",
        "--nodes-max",
        "3",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--install-kubeconfig",
        plane.kubeconfig().to_str().unwrap(),
        "--git-token-file",
        token_file.to_str().unwrap(),
        "--agent-image",
        "registry.example.com/gitops-agent:test",
        "--no-wait",
    ];

    let dry = ok(&args, bootstrap(&env, &[&args[..], &["--dry-run"]].concat()));
    assert!(dry.contains("would create VPC"), "{dry}");
    assert_eq!(counts(&aws, cluster).await, none(), "--dry-run changes nothing");

    let first = ok(&args, bootstrap(&env, &args));
    let created = counts(&aws, cluster).await;
    assert_eq!(
        created,
        Counts {
            vpcs: 1,
            subnets: 6,
            gateways: 1,
            nat_gateways: 1,
            addresses: 1,
            route_tables: 4,
            roles: 2,
            clusters: 1,
            node_groups: 1,
            oidc_providers: 1,
        },
        "{first}"
    );
    check_settings(&aws, cluster).await;

    // The kubeconfig authenticates through `gitops-bootstrap token`.
    let written = std::fs::read_to_string(&kubeconfig).unwrap();
    assert!(written.contains("client.authentication.k8s.io/v1beta1"), "{written}");
    assert!(written.contains(r#"args: ["token", "--cluster", "scale", "--region", "us-west-2"]"#), "{written}");

    // The install: manifests applied under their own inventory, Secrets made.
    let admin = plane.kubeconfig();
    let image = kubectl(
        admin,
        &[
            "-n",
            "gitops-system",
            "get",
            "deploy",
            "gitops-agent",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ],
    );
    assert_eq!(image, "registry.example.com/gitops-agent:test");
    let repo = kubectl(
        admin,
        &[
            "-n",
            "gitops-system",
            "get",
            "deploy",
            "gitops-agent",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].env[?(@.name=='GITOPS_REPO')].value}",
        ],
    );
    assert_eq!(repo, "https://git.example.com/scale/deploy.git");
    let token = kubectl(admin, &["-n", "gitops-system", "get", "secret", "gitops-git", "-o", "jsonpath={.data.token}"]);
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(token).unwrap(), b"s3cr3t-token");
    let password =
        kubectl(admin, &["-n", "scale", "get", "secret", "scale-postgres", "-o", "jsonpath={.data.password}"]);
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(&password).unwrap().len(), 32);
    let plain = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(&password).unwrap()).unwrap();
    assert!(!first.contains(&plain), "the password is never printed");

    // A second `up` finds everything: not one create call reaches AWS.
    moto.post("/moto-api/recorder/reset-recording");
    moto.post("/moto-api/recorder/start-recording");
    let second = ok(&args, bootstrap(&env, &args));
    moto.post("/moto-api/recorder/stop-recording");
    let actions = moto.recorded_actions();
    assert!(actions.iter().any(|a| a == "DescribeVpcs"), "the recording works: {actions:?}");
    let writes: Vec<&String> = actions
        .iter()
        .filter(|a| {
            ["Create", "Allocate", "Attach", "Associate", "Modify", "Replace", "Put", "Tag"]
                .iter()
                .any(|w| a.starts_with(w))
                || a.starts_with("POST ")
        })
        .collect();
    assert!(writes.is_empty(), "a second up makes no create call: {writes:?}\n{second}");
    assert!(second.contains("nothing created"), "{second}");
    assert_eq!(counts(&aws, cluster).await, created);
    let again = kubectl(admin, &["-n", "scale", "get", "secret", "scale-postgres", "-o", "jsonpath={.data.password}"]);
    assert_eq!(again, password, "a second up keeps the database password");

    // Down: the agent first, then all of AWS; and again, with nothing left to do.
    let down = [
        "down",
        "--provider",
        "eks",
        "--cluster-name",
        cluster,
        "--region",
        REGION,
        "--install-kubeconfig",
        admin.to_str().unwrap(),
    ];
    let output = ok(&down, bootstrap(&env, &down));
    assert!(output.find("removed the agent").unwrap() < output.find("deleted VPC").unwrap(), "{output}");
    assert_eq!(counts(&aws, cluster).await, none(), "{output}");
    let deployments = kubectl(admin, &["-n", "gitops-system", "get", "deploy", "-o", "name"]);
    assert_eq!(deployments, "", "the agent's Deployment is gone");
    let output = ok(&down, bootstrap(&env, &down));
    assert!(output.contains("no EKS cluster"), "{output}");
}

/// A role without the cluster's tag: someone else's.
async fn foreign_role(aws: &Aws, name: &str) {
    let trust = r#"{"Version":"2012-10-17","Statement":[]}"#;
    aws.iam.create_role().role_name(name).assume_role_policy_document(trust).send().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn an_up_that_failed_half_way_resumes_without_duplicates() {
    let moto = Moto::start();
    let home = tempfile::tempdir().unwrap();
    let env = aws_env(&moto, home.path());
    let aws = sdk(&env).await;
    let cluster = "resume";

    // Someone else's role under the name `up` wants: IAM refuses to create it, half-way
    // through (the network is made by then).
    foreign_role(&aws, "resume-eks-node").await;
    let kubeconfig = home.path().join("kubeconfig");
    let args = [
        "up",
        "--provider",
        "eks",
        "--cluster-name",
        cluster,
        "--region",
        REGION,
        "--repo",
        "https://git.example.com/x.git",
        "--zones",
        "2",
        "--nat-per-zone",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--no-install",
    ];
    let failed = bootstrap(&env, &args);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("IAM role resume-eks-node exists but is not tagged"), "{stderr}");
    let half = counts(&aws, cluster).await;
    assert_eq!((half.vpcs, half.subnets, half.nat_gateways, half.clusters), (1, 4, 2, 0), "{half:?}");

    aws.iam.delete_role().role_name("resume-eks-node").send().await.unwrap();
    // A dry run lists only what is missing (the node role and what needs it), and changes nothing.
    let before = counts(&aws, cluster).await;
    let dry = ok(&args, bootstrap(&env, &[&args[..], &["--dry-run"]].concat()));
    let planned: Vec<&str> = dry.lines().filter_map(|l| l.trim_start().strip_prefix("would create ")).collect();
    let missing = [
        "IAM role resume-eks-node",
        "attachment of AmazonEKSWorkerNodePolicy to resume-eks-node",
        "attachment of AmazonEKS_CNI_Policy to resume-eks-node",
        "attachment of AmazonEC2ContainerRegistryReadOnly to resume-eks-node",
        "EKS cluster resume",
        "IAM OIDC provider",
        "node group resume-nodes",
    ];
    assert_eq!(planned.len(), missing.len(), "{dry}");
    for (planned, missing) in planned.iter().zip(missing) {
        assert!(planned.starts_with(missing), "{planned:?} is not {missing:?}:\n{dry}");
    }
    assert!(dry.contains("found    VPC") && dry.contains("found    IAM role resume-eks-cluster"), "{dry}");
    assert!(dry.contains("dry run: 7 resources would be created"), "{dry}");
    assert_eq!(counts(&aws, cluster).await, before, "--dry-run changes nothing");
    let resumed = ok(&args, bootstrap(&env, &args));
    assert!(resumed.contains("found    VPC"), "{resumed}");
    assert_eq!(
        counts(&aws, cluster).await,
        Counts {
            vpcs: 1,
            subnets: 4,
            gateways: 1,
            nat_gateways: 2,
            addresses: 2,
            route_tables: 3,
            roles: 2,
            clusters: 1,
            node_groups: 1,
            oidc_providers: 1,
        },
        "{resumed}"
    );

    // --keep-vpc keeps the network and removes the rest.
    let down = [
        "down",
        "--provider",
        "eks",
        "--cluster-name",
        cluster,
        "--region",
        REGION,
        "--keep-vpc",
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    let output = ok(&down, bootstrap(&env, &down));
    let kept = counts(&aws, cluster).await;
    assert_eq!((kept.vpcs, kept.subnets, kept.clusters, kept.roles), (1, 4, 0, 0), "{output}");
    let down = [
        "down",
        "--provider",
        "eks",
        "--cluster-name",
        cluster,
        "--region",
        REGION,
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
    ];
    ok(&down, bootstrap(&env, &down));
    assert_eq!(counts(&aws, cluster).await, none());

    // Nor does `down` delete a role of its name that is not tagged as the cluster's.
    foreign_role(&aws, "resume-eks-node").await;
    let output = ok(&down, bootstrap(&env, &down));
    assert!(output.contains("IAM role resume-eks-node is not tagged as this cluster's: left alone"), "{output}");
    assert!(aws.iam.get_role().role_name("resume-eks-node").send().await.is_ok(), "{output}");
}

#[test]
fn token_is_a_presigned_get_caller_identity_url_for_the_cluster() {
    let home = tempfile::tempdir().unwrap();
    let args = ["token", "--cluster", "scale", "--region", "eu-central-1"];
    let output = Command::new(env!("CARGO_BIN_EXE_gitops-bootstrap"))
        .args(args)
        .env("HOME", home.path())
        .env_remove("AWS_PROFILE")
        .env("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
        .env("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
        .env("AWS_SESSION_TOKEN", "session-token")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let before = std::time::SystemTime::now();
    let credential: serde_json::Value = serde_json::from_str(&ok(&args, output)).unwrap();
    assert_eq!(credential["kind"], "ExecCredential");
    assert_eq!(credential["apiVersion"], "client.authentication.k8s.io/v1beta1");

    let token = credential["status"]["token"].as_str().unwrap();
    let encoded = token.strip_prefix("k8s-aws-v1.").expect("the token's prefix");
    assert!(!encoded.contains('=') && !encoded.contains('+') && !encoded.contains('/'), "base64url without padding");
    let url = String::from_utf8(base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(encoded).unwrap()).unwrap();
    let (base, query) = url.split_once('?').unwrap();
    assert_eq!(base, "https://sts.eu-central-1.amazonaws.com/");
    let params: std::collections::BTreeMap<String, String> = query
        .split('&')
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap();
            (k.to_owned(), percent_decode(v))
        })
        .collect();
    assert_eq!(params["Action"], "GetCallerIdentity");
    assert_eq!(params["Version"], "2011-06-15");
    assert_eq!(params["X-Amz-Algorithm"], "AWS4-HMAC-SHA256");
    assert_eq!(params["X-Amz-Expires"], "60");
    assert_eq!(params["X-Amz-SignedHeaders"], "host;x-k8s-aws-id", "the cluster name is signed");
    assert!(params["X-Amz-Credential"].starts_with("AKIAIOSFODNN7EXAMPLE/"), "{}", params["X-Amz-Credential"]);
    assert!(params["X-Amz-Credential"].ends_with("/eu-central-1/sts/aws4_request"));
    assert_eq!(params["X-Amz-Security-Token"], "session-token");
    assert_eq!(params["X-Amz-Signature"].len(), 64);

    // kubectl renews a minute before EKS's 15 minutes run out.
    let expiry = credential["status"]["expirationTimestamp"].as_str().unwrap();
    let expiry: std::time::SystemTime = expiry.parse::<k8s_openapi::jiff::Timestamp>().unwrap().into();
    let lifetime = expiry.duration_since(before).unwrap_or_default().as_secs();
    assert!((13 * 60..=14 * 60).contains(&lifetime), "{lifetime} s");
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            out.push(u8::from_str_radix(&value[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}
