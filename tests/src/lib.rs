//! Test fixtures for the whole project: real Kubernetes control planes ([`cluster`])
//! and real git servers ([`git`]). Nothing here is a mock.

pub mod cluster;
pub mod git;
