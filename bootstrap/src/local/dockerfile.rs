//! The project's own images, built from its Dockerfiles by Debian's buildah: no daemon,
//! chroot isolation, and a scratch storage directory removed after each build. The
//! Dockerfiles name public bases by default; here every base is the Debian base of
//! [`super::image::debian_base`], passed as a build argument, so nothing is pulled.
//!
//! A built image is a docker-archive under `cache/images/NAME-HASH/`, keyed by its
//! Dockerfile, build arguments, base, and every file of its context: an unchanged image
//! is not built again, and a changed binary or source file builds a new one.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

use super::Error;
use super::build::build_once;
use super::image::hex;

/// The name of the Debian base inside the build (what the docker-archive calls it).
const BASE_REFERENCE: &str = "gitops.local/debian:bookworm";

/// An image to build from one of the project's Dockerfiles.
#[derive(Debug, Clone)]
pub struct Dockerfile {
    /// The image's name in the node's registry, e.g. `gitops-agent`.
    pub name: &'static str,
    /// The Dockerfile's text.
    pub text: &'static str,
    /// The build context.
    pub context: Vec<ContextFile>,
    /// Build arguments besides the bases (every `*_IMAGE` argument is set to the base).
    pub args: Vec<(&'static str, String)>,
    /// The Dockerfile's base-image arguments, all set to the Debian base.
    pub bases: &'static [&'static str],
}

/// A file of a build context.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContextFile {
    /// Its path inside the context.
    pub path: PathBuf,
    pub contents: Vec<u8>,
    /// Whether it is a program (mode 755, else 644): COPY keeps the mode.
    pub executable: bool,
}

/// A built image, ready for [`super::node::push_image`].
#[derive(Debug, Clone)]
pub struct Built {
    pub name: &'static str,
    pub archive: PathBuf,
    /// The reference the archive holds the image under.
    pub archived_as: String,
    /// A tag naming this build's content, so a new build rolls out under a new name.
    pub tag: String,
}

/// The agent's image from `agent/Dockerfile`, around `binary` (a `gitops-agent` cargo
/// built) and the kustomize and helm of `tools`.
pub fn agent(binary: &Path, tools: &super::build::RenderTools) -> Result<Dockerfile, Error> {
    let program = |name: &str, path: &Path| {
        let contents = fs::read(path).map_err(|e| Error::io(path, e))?;
        Ok::<_, Error>(ContextFile { path: PathBuf::from(name), contents, executable: true })
    };
    Ok(Dockerfile {
        name: "gitops-agent",
        text: include_str!("../../../agent/Dockerfile"),
        context: vec![
            program("gitops-agent", binary)?,
            program("kustomize", &tools.kustomize)?,
            program("helm", &tools.helm)?,
        ],
        args: vec![("BINARY_FROM", "prebuilt".to_owned())],
        bases: &["RUNTIME_IMAGE"],
    })
}

/// The Scale pipeline's images, which `up` pushes to the node's registry, and the local
/// cluster's S3 endpoint that its batch job reads.
pub fn scale() -> [Dockerfile; 4] {
    [scale_viewer(), scale_midi_batch(), scale_postgres(), local_s3()]
}

/// The monitoring stack's images (kube-prometheus-stack on the local node): Alertmanager
/// from Debian's package; Prometheus, the operator, its config reloader and
/// kube-state-metrics around the Go programs of `programs`.
pub fn monitoring(programs: &super::build::MonitoringPrograms) -> Result<[Dockerfile; 5], Error> {
    let alertmanager = Dockerfile {
        name: "alertmanager",
        text: include_str!("../../images/monitoring/alertmanager.Dockerfile"),
        context: Vec::new(),
        args: Vec::new(),
        bases: &["BASE_IMAGE"],
    };
    let go = |name, binary: &Path| {
        let program = binary.file_name().expect("a built program has a name").to_string_lossy().into_owned();
        let contents = fs::read(binary).map_err(|e| Error::io(binary, e))?;
        Ok::<_, Error>(Dockerfile {
            name,
            text: include_str!("../../images/monitoring/go.Dockerfile"),
            context: vec![ContextFile { path: PathBuf::from(&program), contents, executable: true }],
            args: vec![("PROGRAM", program)],
            bases: &["BASE_IMAGE"],
        })
    };
    Ok([
        go("prometheus", &programs.prometheus)?,
        alertmanager,
        go("prometheus-operator", &programs.operator)?,
        go("prometheus-config-reloader", &programs.config_reloader)?,
        go("kube-state-metrics", &programs.kube_state_metrics)?,
    ])
}

/// Builds (or finds in the cache) every image the local cluster's repository names,
/// [`scale()`] and [`monitoring()`], on the Debian base.
pub fn build_local_cluster(cache: &Path) -> Result<Vec<Built>, Error> {
    let base = super::image::debian_base(cache)?;
    let programs = super::build::ensure_monitoring_programs(cache)?;
    scale().into_iter().chain(monitoring(&programs)?).map(|image| build(cache, &base, &image)).collect()
}

/// The pipeline's PostgreSQL from repo-template's `apps/scale/postgres/Dockerfile`:
/// Debian's postgresql-15, laid out as the public `postgres:15-bookworm` the manifest names.
fn scale_postgres() -> Dockerfile {
    Dockerfile {
        name: "scale-postgres",
        text: include_str!("../../../repo-template/apps/scale/postgres/Dockerfile"),
        context: template_context("apps/scale", &["postgres"]),
        args: Vec::new(),
        bases: &["BASE_IMAGE"],
    }
}

/// The Scale viewer's image, from repo-template's `apps/scale/viewer/Dockerfile`.
fn scale_viewer() -> Dockerfile {
    Dockerfile {
        name: "scale-viewer",
        text: include_str!("../../../repo-template/apps/scale/viewer/Dockerfile"),
        context: template_context("apps/scale", &["viewer", "requirements-viewer.txt"]),
        args: Vec::new(),
        bases: &["PYTHON_IMAGE"],
    }
}

/// The midi batch job's image, from repo-template's `apps/scale/batch/Dockerfile`, with
/// PySpark from PyPI (its `pip` flavour).
fn scale_midi_batch() -> Dockerfile {
    Dockerfile {
        name: "scale-midi-batch",
        text: include_str!("../../../repo-template/apps/scale/batch/Dockerfile"),
        context: template_context("apps/scale", &["batch", "requirements-batch.txt"]),
        args: vec![("SPARK_FROM", "pip".to_owned())],
        bases: &["BASE_IMAGE"],
    }
}

/// moto's S3 server holding the MIDI corpus, from repo-template's `apps/local-s3/`.
fn local_s3() -> Dockerfile {
    Dockerfile {
        name: "scale-local-s3",
        text: include_str!("../../../repo-template/apps/local-s3/Dockerfile"),
        context: template_context("apps/local-s3", &["serve.py"]),
        args: Vec::new(),
        bases: &["BASE_IMAGE"],
    }
}

/// The files and directories `entries` of repo-template's `dir`, an image's build
/// context: only what its Dockerfile copies, so that changing another image's files
/// (or the pipeline's tests) rebuilds nothing here.
fn template_context(dir: &str, entries: &[&str]) -> Vec<ContextFile> {
    fn add(entry: &include_dir::DirEntry<'_>, base: &Path, out: &mut Vec<ContextFile>) {
        match entry {
            include_dir::DirEntry::Dir(dir) => dir.entries().iter().for_each(|entry| add(entry, base, out)),
            include_dir::DirEntry::File(file) => {
                let path = file.path().strip_prefix(base).expect("under the context").to_owned();
                out.push(ContextFile { path, contents: file.contents().to_vec(), executable: false });
            }
        }
    }
    let root = super::agent::REPO_TEMPLATE.get_dir(dir).expect("repo-template has the context");
    let mut out = Vec::new();
    for entry in root.entries() {
        if entries.iter().any(|name| entry.path().file_name().is_some_and(|n| n == *name)) {
            add(entry, root.path(), &mut out);
        }
    }
    out
}

/// Builds `image` on the Debian base at `base` (a docker-archive), unless the cache has it.
pub fn build(cache: &Path, base: &Path, image: &Dockerfile) -> Result<Built, Error> {
    let mut hash = Sha256::new();
    hash.update(image.text.as_bytes());
    hash.update(base.display().to_string().as_bytes());
    for (name, value) in &image.args {
        hash.update(format!("{name}={value}\n").as_bytes());
    }
    for base_arg in image.bases {
        hash.update(format!("{base_arg}\n").as_bytes());
    }
    let mut context = image.context.clone();
    context.sort();
    for file in &context {
        hash.update(format!("{} {}\n", file.path.display(), file.executable).as_bytes());
        hash.update(&file.contents);
    }
    let tag = hex(&hash.finalize()[..6]);
    let key = format!("{}-{tag}", image.name);
    let dir = cache.join("images").join(&key);
    let archive = dir.join("image.tar");
    let archived_as = format!("gitops.local/{}:{tag}", image.name);
    build_once(cache, &key, &archive, || {
        let started = Instant::now();
        eprintln!("building image {} ({key}) with buildah", image.name);
        let staging = dir.with_extension("partial");
        let _ = fs::remove_dir_all(&staging);
        let result = build_in(&staging, base, image, &context, &archived_as);
        if result.is_ok() {
            fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            let built = staging.join("image.tar");
            fs::rename(&built, &archive).map_err(|e| Error::io(&archive, e))?;
            eprintln!("built image {} in {:.1}s", image.name, started.elapsed().as_secs_f64());
            remove_older_builds(cache, image.name, &key);
        }
        let _ = fs::remove_dir_all(&staging);
        result
    })?;
    Ok(Built { name: image.name, archive, archived_as, tag })
}

/// One buildah build in `staging`: the context, a storage of its own, the build, and
/// the image written as a docker-archive to `staging/image.tar`.
fn build_in(
    staging: &Path,
    base: &Path,
    image: &Dockerfile,
    context: &[ContextFile],
    archived_as: &str,
) -> Result<(), Error> {
    let context_dir = staging.join("context");
    // Made even when empty: buildah wants a context, and some images copy nothing.
    fs::create_dir_all(&context_dir).map_err(|e| Error::io(&context_dir, e))?;
    for file in context {
        use std::os::unix::fs::PermissionsExt;
        let target = context_dir.join(&file.path);
        let parent = target.parent().expect("a file inside the context");
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        fs::write(&target, &file.contents).map_err(|e| Error::io(&target, e))?;
        let mode = if file.executable { 0o755 } else { 0o644 };
        fs::set_permissions(&target, fs::Permissions::from_mode(mode)).map_err(|e| Error::io(&target, e))?;
    }
    let dockerfile = staging.join("Dockerfile");
    fs::write(&dockerfile, image.text).map_err(|e| Error::io(&dockerfile, e))?;
    let storage = [
        format!("--root={}", staging.join("storage").display()),
        format!("--runroot={}", staging.join("run").display()),
        "--storage-driver=vfs".to_owned(),
    ];
    let buildah = |args: Vec<String>| {
        let out =
            Command::new("buildah").args(&storage).args(&args).output().map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound => Error::Missing {
                    what: "buildah".into(),
                    fix: "apt-get install buildah (it builds the images)".into(),
                },
                _ => Error::Spawn { program: "buildah".into(), source },
            })?;
        if out.status.success() {
            return Ok(());
        }
        let output = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = output.trim().lines().collect();
        Err(Error::Command {
            command: format!("buildah {}", args.join(" ")),
            output: tail[tail.len().saturating_sub(20)..].join("\n"),
        })
    };
    buildah(vec!["pull".into(), "--quiet".into(), format!("docker-archive:{}", base.display())])?;
    let mut bud = vec![
        "bud".to_owned(),
        "--isolation=chroot".into(),
        // RUN steps that fetch (apt, pip) go through the host's network, like a docker build.
        "--network=host".into(),
        format!("--file={}", dockerfile.display()),
        format!("--tag={archived_as}"),
    ];
    for base_arg in image.bases {
        bud.push(format!("--build-arg={base_arg}={BASE_REFERENCE}"));
    }
    for (name, value) in &image.args {
        bud.push(format!("--build-arg={name}={value}"));
    }
    bud.push(context_dir.display().to_string());
    buildah(bud)?;
    let out = staging.join("image.tar");
    buildah(vec![
        "push".into(),
        "--quiet".into(),
        archived_as.into(),
        format!("docker-archive:{}:{archived_as}", out.display()),
    ])
}

/// Removes the earlier builds of image `name`: each binary cargo builds makes a new
/// agent image (~230 MB), and only the newest is used.
fn remove_older_builds(cache: &Path, name: &str, keep: &str) {
    let Ok(entries) = fs::read_dir(cache.join("images")) else { return };
    for entry in entries.flatten() {
        let dir_name = entry.file_name().to_string_lossy().into_owned();
        let is_build = dir_name
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|hash| hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit()));
        if is_build && dir_name != keep {
            let _ = fs::remove_dir_all(entry.path());
            let _ = fs::remove_file(cache.join(format!("{dir_name}.lock")));
        }
    }
}
