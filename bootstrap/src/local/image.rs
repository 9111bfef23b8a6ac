//! Container images made here, as docker-archive tars (what `ctr images import` and
//! `docker load` read): one layer, one config, no daemon. Either a few files of this
//! machine ([`Image`]), or a Debian root filesystem from this machine's apt sources
//! ([`debian_base`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::Error;
use super::build::build_once;

/// The name the Debian base is pushed as, in the node's registry.
pub const DEBIAN_IMAGE: &str = "debian:bookworm";
/// How the base is made: Debian's smallest variant that still has apt, `/bin/sh` and
/// `getent`, plus what distroless/cc adds (OpenSSL, CA certificates), which the agent's
/// image is built on elsewhere.
const MMDEBSTRAP: [&str; 4] = ["--variant=minbase", "--include=libssl3,ca-certificates", "--quiet", "bookworm"];
/// Bumped when [`write_docker_archive`] writes something else, so cached bases are rebuilt.
const ARCHIVE_FORMAT: &str = "docker-archive with history";
/// Where apt's sources are, which decide what mmdebstrap fetches.
const APT_SOURCES: [&str; 2] = ["/etc/apt/sources.list", "/etc/apt/sources.list.d"];
/// The certificate authorities this machine adds to Debian's. The base trusts them too,
/// so builds on it (apt, pip, Maven) work wherever this machine's own downloads do,
/// for example behind a proxy that re-signs TLS; no pod reaches past the machine.
const LOCAL_CAS: &str = "/usr/local/share/ca-certificates";

/// A file of the host, placed in the image's single layer.
#[derive(Debug, Clone)]
pub struct ImageFile {
    /// Its absolute path inside the image.
    pub path: &'static str,
    pub source: PathBuf,
}

/// An image made of a few host files.
#[derive(Debug, Clone)]
pub struct Image {
    /// e.g. `gitops.local/pause:1`.
    pub reference: String,
    pub files: Vec<ImageFile>,
    pub entrypoint: Vec<String>,
}

impl Image {
    /// Writes the image to `out` as a docker-archive tar.
    pub fn write_archive(&self, out: &Path) -> Result<(), Error> {
        write_docker_archive(out, &self.reference, &self.layer()?, &self.entrypoint)
    }

    /// The layer: each file at its path, with the directories above it.
    fn layer(&self) -> Result<Vec<u8>, Error> {
        let mut layer = tar::Builder::new(Vec::new());
        let mut dirs: Vec<&Path> = Vec::new();
        for file in &self.files {
            let inside = Path::new(file.path.trim_start_matches('/'));
            let mut parents: Vec<&Path> = inside.ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()).collect();
            parents.reverse();
            for dir in parents {
                if !dirs.contains(&dir) {
                    let mut header = tar::Header::new_gnu();
                    header.set_entry_type(tar::EntryType::Directory);
                    header.set_mode(0o755);
                    header.set_size(0);
                    layer.append_data(&mut header, dir, std::io::empty()).map_err(|e| Error::io(dir, e))?;
                    dirs.push(dir);
                }
            }
            let data = fs::read(&file.source).map_err(|e| Error::io(&file.source, e))?;
            append(&mut layer, inside, 0o755, &data).map_err(|e| Error::io(&file.source, e))?;
        }
        layer.into_inner().map_err(|e| Error::io(Path::new(&self.reference), e))
    }
}

/// `layer` (an uncompressed tar) as the one layer of image `reference`, written to `out`.
fn write_docker_archive(out: &Path, reference: &str, layer: &[u8], entrypoint: &[String]) -> Result<(), Error> {
    let diff_id = format!("sha256:{}", hex(&Sha256::digest(layer)));
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Entrypoint": entrypoint, "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        // One entry per layer: buildah checks that images built on this one have as
        // many history entries as layers.
        "history": [{ "created_by": format!("gitops-bootstrap: {reference}") }],
    })
    .to_string();
    let config_name = format!("{}.json", hex(&Sha256::digest(config.as_bytes())));
    let manifest = serde_json::json!([{
        "Config": config_name,
        "RepoTags": [reference],
        "Layers": ["layer.tar"],
    }])
    .to_string();

    let mut archive = tar::Builder::new(Vec::new());
    for (name, data) in
        [("layer.tar", layer), (&config_name, config.as_bytes()), ("manifest.json", manifest.as_bytes())]
    {
        append(&mut archive, name, 0o644, data).map_err(|e| Error::io(out, e))?;
    }
    let bytes = archive.into_inner().map_err(|e| Error::io(out, e))?;
    fs::write(out, bytes).map_err(|e| Error::io(out, e))
}

/// The docker-archive of the Debian bookworm base (`gitops.local/debian:bookworm`),
/// made by mmdebstrap from this machine's apt sources on first use and cached under
/// `cache/images/`, keyed by a hash of how it is made and of those sources.
pub fn debian_base(cache: &Path) -> Result<PathBuf, Error> {
    let mut hash = Sha256::new();
    hash.update(MMDEBSTRAP.join(" ").as_bytes());
    hash.update(ARCHIVE_FORMAT.as_bytes());
    let mut local_cas: Vec<PathBuf> = fs::read_dir(LOCAL_CAS)
        .map(|entries| {
            entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "crt")).collect()
        })
        .unwrap_or_default();
    local_cas.sort();
    let mut hooks = Vec::new();
    if !local_cas.is_empty() {
        let files: Vec<String> = local_cas.iter().map(|p| p.display().to_string()).collect();
        hooks.push(format!("--customize-hook=copy-in {} {LOCAL_CAS}", files.join(" ")));
        hooks.push("--customize-hook=chroot \"$1\" update-ca-certificates".to_owned());
    }
    for ca in &local_cas {
        hash.update(fs::read(ca).map_err(|e| Error::io(ca, e))?);
    }
    for source in APT_SOURCES {
        let files = match fs::read_dir(source) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => vec![PathBuf::from(source)],
        };
        let mut files: Vec<PathBuf> = files.into_iter().filter(|f| f.is_file()).collect();
        files.sort();
        for file in files {
            hash.update(file.display().to_string().as_bytes());
            hash.update(fs::read(&file).map_err(|e| Error::io(&file, e))?);
        }
    }
    let key = format!("debian-bookworm-{}", hex(&hash.finalize()[..6]));
    let dir = cache.join("images").join(&key);
    let archive = dir.join("image.tar");
    build_once(cache, &key, &archive, || {
        let staging = dir.with_extension("partial");
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
        let rootfs = staging.join("rootfs.tar");
        eprintln!("building the Debian bookworm base image (mmdebstrap) into {}", dir.display());
        let started = Instant::now();
        let out = Command::new("mmdebstrap")
            .args(MMDEBSTRAP)
            .args(&hooks)
            .arg(&rootfs)
            .output()
            .map_err(|source| Error::Spawn { program: "mmdebstrap".into(), source })?;
        if !out.status.success() {
            return Err(Error::Command {
                command: format!("mmdebstrap {} {} {}", MMDEBSTRAP.join(" "), hooks.join(" "), rootfs.display()),
                output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        let layer = fs::read(&rootfs).map_err(|e| Error::io(&rootfs, e))?;
        let reference = format!("gitops.local/{DEBIAN_IMAGE}");
        write_docker_archive(&staging.join("image.tar"), &reference, &layer, &[])?;
        fs::remove_file(&rootfs).map_err(|e| Error::io(&rootfs, e))?;
        fs::rename(&staging, &dir).map_err(|e| Error::io(&dir, e))?;
        eprintln!("built the Debian base in {:.1?}", started.elapsed());
        Ok(())
    })?;
    Ok(archive)
}

fn append(archive: &mut tar::Builder<Vec<u8>>, name: impl AsRef<Path>, mode: u32, data: &[u8]) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_mode(mode);
    header.set_size(data.len() as u64);
    archive.append_data(&mut header, name, data)
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_names_its_layer_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("hello");
        fs::write(&source, "#!/bin/sh\necho hi\n").unwrap();
        let image = Image {
            reference: "gitops.local/hello:1".into(),
            files: vec![ImageFile { path: "/usr/bin/hello", source }],
            entrypoint: vec!["/usr/bin/hello".into()],
        };
        let out = dir.path().join("image.tar");
        image.write_archive(&out).unwrap();

        let mut archive = tar::Archive::new(fs::File::open(&out).unwrap());
        let mut names = Vec::new();
        let mut manifest = String::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().display().to_string();
            if name == "manifest.json" {
                std::io::Read::read_to_string(&mut entry, &mut manifest).unwrap();
            }
            names.push(name);
        }
        assert_eq!(names[0], "layer.tar");
        let manifest: serde_json::Value = serde_json::from_str(&manifest).unwrap();
        assert_eq!(manifest[0]["RepoTags"][0], "gitops.local/hello:1");
        assert_eq!(manifest[0]["Config"].as_str().unwrap(), names[1]);
    }
}
