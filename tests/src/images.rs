//! Images for pods on the node ([`crate::cluster::node`]), made from host files and
//! imported into the node's containerd: nothing is pulled from anywhere.

use std::path::PathBuf;
use std::sync::OnceLock;

use gitops_bootstrap::local::LocalControlPlane;
use gitops_bootstrap::local::image::{Image, ImageFile};

/// Debian's busybox-static: one static binary with a shell.
pub const BUSYBOX: &str = "/bin/busybox";
pub const BUSYBOX_IMAGE: &str = "gitops.local/busybox:1";

/// Imports [`BUSYBOX_IMAGE`] into `plane`'s node, once per process, and returns its
/// reference (pods use it with `imagePullPolicy: Never`).
pub fn busybox(plane: &LocalControlPlane) -> &'static str {
    static IMPORTED: OnceLock<()> = OnceLock::new();
    IMPORTED.get_or_init(|| {
        let archive = plane.state_dir().join("busybox.tar");
        Image {
            reference: BUSYBOX_IMAGE.into(),
            files: vec![ImageFile { path: "/bin/busybox", source: PathBuf::from(BUSYBOX) }],
            entrypoint: vec!["/bin/busybox".into()],
        }
        .write_archive(&archive)
        .expect("writing the busybox image");
        plane.import_image(&archive).expect("importing the busybox image");
    });
    BUSYBOX_IMAGE
}
