//! `gitops-bootstrap` brings up a cluster for the GitOps agent and installs the agent.
//!
//! Providers:
//! - [`local`]: a real control plane (etcd, kube-apiserver, kube-controller-manager) built
//!   from Go modules and run on loopback. It is also the test environment of the whole
//!   project: the test harness in `tests/` starts clusters through this same code.

pub mod local;
