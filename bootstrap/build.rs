//! Lists repo-template's symlinks for `local::agent::repo_from_template`: `include_dir!`
//! embeds what a symlink points to as a copy, and a user's repository should get the
//! link itself (clusters/*/dashboards share the repository's dashboards/).

use std::path::Path;

fn symlinks(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).expect("repo-template is readable").map(Result::unwrap).collect();
    entries.sort_by_key(|entry| entry.file_name());
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type().expect("a file type");
        if kind.is_symlink() {
            let target = std::fs::read_link(&path).expect("a symlink's target");
            let relative = path.strip_prefix(root).expect("under repo-template");
            out.push((relative.display().to_string(), target.display().to_string()));
        } else if kind.is_dir() {
            symlinks(root, &path, out);
        }
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../repo-template");
    println!("cargo::rerun-if-changed={}", root.display());
    let mut found = Vec::new();
    symlinks(&root, &root, &mut found);
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("template_symlinks.rs");
    std::fs::write(out, format!("&{found:?}")).expect("OUT_DIR is writable");
}
