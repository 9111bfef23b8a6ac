//! `gitops-bootstrap` brings up a cluster for the GitOps agent and installs the agent.
//!
//! Providers:
//! - [`local`]: a real control plane (etcd, kube-apiserver, kube-controller-manager) built
//!   from Go modules and run on loopback. It is also the test environment of the whole
//!   project: the test harness in `tests/` starts clusters through this same code.
//! - [`eks`]: a VPC, IAM roles, an EKS cluster and node group on AWS, found again by tag.
//!
//! Both end in [`install`]: the agent's manifests, Secrets, and the wait for its first
//! sync; [`progress`] reports each step and shows the long waits.

pub mod eks;
pub mod install;
pub mod local;
pub mod progress;
