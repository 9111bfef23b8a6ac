//! The GitOps agent library.
