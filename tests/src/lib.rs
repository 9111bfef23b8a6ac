//! Test fixtures for the whole project: real Kubernetes control planes ([`cluster`]),
//! real git servers ([`git`]), real kustomize and helm with a chart repository ([`render`]) and the agent running against them ([`agent`]). Nothing
//! here is a mock.

pub mod agent;
pub mod cluster;
pub mod git;
pub mod images;
pub mod prometheus;
pub mod render;
pub mod requests;
