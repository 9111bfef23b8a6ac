//! Incremental == full, for random sequences of commits (adds, edits, renames,
//! deletes, moves between directories, symlinks to files and directories, a file
//! becoming a directory and back, the executable bit, now and then a jump back to an
//! earlier commit as a force push or a revert makes):
//! - the working tree the agent keeps, updated by each commit's tree diff, holds what
//!   the commit holds (read from git's objects), as a fresh checkout does;
//! - a renderer kept across the commits, which decodes only the files whose text
//!   changed, gives the objects and errors a fresh renderer gives on a fresh checkout.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use git2::{ObjectType, Oid, Repository};
use gitops_agent::render::{Capabilities, Edits, Renderer, Tools};
use gitops_agent::source::{Update, Worktree, checkout};

/// xorshift64*: the sequences are random, and the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A working directory's files: path → what it is.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    File { content: Vec<u8>, executable: bool },
    Link(PathBuf),
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let relative = path.strip_prefix(root).unwrap().to_owned();
            if relative.starts_with(".git") {
                continue;
            }
            let meta = fs::symlink_metadata(&path).unwrap();
            if meta.file_type().is_symlink() {
                out.insert(relative, Entry::Link(fs::read_link(&path).unwrap()));
            } else if meta.is_dir() {
                walk(root, &path, out);
            } else {
                let executable = meta.permissions().mode() & 0o111 != 0;
                out.insert(relative, Entry::File { content: fs::read(&path).unwrap(), executable });
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// What `commit` holds, read from git's objects: what any checkout must give.
fn committed(repo: &Repository, commit: Oid) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let tree = repo.find_commit(commit).unwrap().tree().unwrap();
    tree.walk(git2::TreeWalkMode::PreOrder, |dir, entry| {
        if entry.kind() == Some(ObjectType::Blob) {
            let path = PathBuf::from(dir).join(entry.name().unwrap());
            let content = repo.find_blob(entry.id()).unwrap().content().to_vec();
            let entry = match entry.filemode() {
                0o120000 => Entry::Link(PathBuf::from(String::from_utf8(content).unwrap())),
                mode => Entry::File { content, executable: mode == 0o100755 },
            };
            out.insert(path, entry);
        }
        git2::TreeWalkResult::Ok
    })
    .unwrap();
    out
}

/// The regular files and links of the author's working directory.
fn paths(root: &Path) -> Vec<PathBuf> {
    snapshot(root).into_keys().collect()
}

/// A file's text: mostly objects (names repeat, so files sometimes define the same
/// object twice), sometimes a List, floats and big numbers, or YAML that does not parse.
fn manifest(rng: &mut Rng, step: usize) -> String {
    let name = format!("cm-{}", rng.below(400));
    match rng.below(25) {
        0 => format!(
            "apiVersion: v1\nkind: ConfigMapList\nitems:\n- metadata: {{name: {name}-a}}\n  data: {{s: '{step}'}}\n- metadata: {{name: {name}-b}}\n"
        ),
        1 => format!("apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}\ndata: [unclosed {step}\n"),
        2 => format!(
            "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: {name}\nspec:\n  ratio: 0.{step}7\n  tiny: 1e-300\n  \
             big: 12345678901234567890\n  on: yes\n  mode: 0755\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}-x}}\n"
        ),
        _ => format!("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  step: \"{step}\"\n"),
    }
}

const DIRS: [&str; 5] = ["manifests", "manifests/app", "manifests/app/deep", "dashboards", "shared"];

/// One random change to the author's working directory; symlinks only with `links`.
fn change(rng: &mut Rng, work: &Path, step: usize, links: bool) {
    let existing = paths(work);
    let pick = |rng: &mut Rng| existing.get(rng.below(existing.len().max(1))).cloned();
    let dir = DIRS[rng.below(DIRS.len())];
    let new_path = |rng: &mut Rng| match dir {
        "shared" => PathBuf::from(dir).join(format!("s{}.yaml", rng.below(4))),
        _ => PathBuf::from(dir).join(format!("f{}.yaml", rng.below(12))),
    };
    let write = |path: &Path, content: String| {
        let full = work.join(path);
        if fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(&full).unwrap();
        }
        fs::create_dir_all(full.parent().unwrap()).unwrap();
        let _ = fs::remove_file(&full);
        fs::write(full, content).unwrap();
    };
    match rng.below(9) {
        // add or edit
        5 if !links => write(&new_path(rng), manifest(rng, step)),
        0..=2 => write(&new_path(rng), manifest(rng, step)),
        3 => {
            if let Some(path) = pick(rng) {
                fs::remove_file(work.join(path)).unwrap();
            }
        }
        // rename or move to another directory
        4 => {
            if let Some(path) = pick(rng) {
                let to = new_path(rng);
                if to != path && !work.join(&to).exists() {
                    fs::create_dir_all(work.join(&to).parent().unwrap()).unwrap();
                    fs::rename(work.join(&path), work.join(&to)).unwrap();
                }
            }
        }
        // a symlink to a file or a directory, relative as in a repository
        5 => {
            let link = PathBuf::from(dir).join(format!("l{}.yaml", rng.below(4)));
            let full = work.join(&link);
            if fs::symlink_metadata(&full).is_ok_and(|m| m.is_dir()) {
                fs::remove_dir_all(&full).unwrap();
            }
            let _ = fs::remove_file(&full);
            fs::create_dir_all(full.parent().unwrap()).unwrap();
            let depth = link.components().count() - 1;
            // Into shared/, which is rendered only through links: a commit may change what a
            // link shows without touching the link.
            let target = match rng.below(6) {
                0 => "shared".to_owned(),
                _ => format!("shared/s{}.yaml", rng.below(4)),
            };
            std::os::unix::fs::symlink(format!("{}{target}", "../".repeat(depth)), full).unwrap();
        }
        // a file becomes a directory (its path now holds files), or the reverse
        6 => {
            if let Some(path) = pick(rng) {
                let full = work.join(&path);
                fs::remove_file(&full).unwrap();
                fs::create_dir_all(&full).unwrap();
                fs::write(full.join("inner.yaml"), manifest(rng, step)).unwrap();
            }
        }
        7 => {
            let inner: Vec<PathBuf> = existing.iter().filter(|p| p.ends_with("inner.yaml")).cloned().collect();
            if let Some(path) = inner.first() {
                let dir = work.join(path.parent().unwrap());
                fs::remove_dir_all(&dir).unwrap();
                fs::write(dir, manifest(rng, step)).unwrap();
            }
        }
        _ => {
            if let Some(path) = pick(rng) {
                let full = work.join(path);
                if fs::symlink_metadata(&full).is_ok_and(|m| m.is_file()) {
                    let mode = fs::metadata(&full).unwrap().permissions().mode() ^ 0o111;
                    fs::set_permissions(&full, fs::Permissions::from_mode(mode)).unwrap();
                }
            }
        }
    }
}

/// New text for one to three of the author's regular files, as most commits make.
fn edit_in_place(rng: &mut Rng, work: &Path, step: usize) {
    let files: Vec<PathBuf> =
        paths(work).into_iter().filter(|p| fs::symlink_metadata(work.join(p)).is_ok_and(|m| m.is_file())).collect();
    for _ in 0..=rng.below(3) {
        if let Some(file) = files.get(rng.below(files.len().max(1))) {
            fs::write(work.join(file), manifest(rng, step)).unwrap();
        }
    }
}

/// The author's commits in a bare mirror, as the agent's fetch leaves them (no
/// index: a checkout from the author's own repository would consult its index).
fn mirrored(author: &Repository, mirror: &Path) -> PathBuf {
    let bare = Repository::open_bare(mirror).or_else(|_| Repository::init_bare(mirror)).unwrap();
    let url = author.path().to_str().unwrap().to_owned();
    bare.remote_anonymous(&url).unwrap().fetch(&["+refs/heads/*:refs/heads/*"], None, None).unwrap();
    mirror.to_owned()
}

fn commit_all(repo: &Repository, step: usize) -> Oid {
    let mut index = repo.index().unwrap();
    index.add_all(["*"], git2::IndexAddOption::DEFAULT, None).unwrap();
    index.update_all(["*"], None).unwrap();
    index.write().unwrap();
    let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
    let signature = git2::Signature::now("t", "t@example.com").unwrap();
    let parent = repo.head().ok().and_then(|h| h.peel_to_commit().ok());
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    repo.commit(Some("HEAD"), &signature, &signature, &format!("step {step}"), &tree, &parents).unwrap()
}

/// Sequences, and commits in each.
const SEEDS: u64 = 8;
const STEPS: usize = 30;

/// What a render gives, errors as the user reads them.
fn rendered(renderer: &Renderer, root: &Path) -> String {
    shown(renderer.render(root, "monitoring", &Capabilities::default()))
}

fn shown(render: Result<gitops_agent::render::Rendered, Vec<gitops_agent::render::RenderError>>) -> String {
    match render {
        Ok(rendered) => format!("{rendered:#?}"),
        Err(errors) => errors.iter().map(|e| format!("{e}\n")).collect(),
    }
}

#[test]
fn incremental_checkouts_and_renders_equal_full_ones() {
    let mut all_ok = 0;
    let mut edits_only = 0;
    for seed in 1..=SEEDS {
        let author = tempfile::tempdir().unwrap();
        let repo = Repository::init(author.path()).unwrap();
        let kept = tempfile::tempdir().unwrap();
        let worktree = Worktree::open(kept.path().join("tree"));
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut commits = Vec::new();
        let mut incremental = 0;
        let caps = Capabilities::default();
        let renderer = Renderer::new(Tools::default());
        let mut rendered_ok = 0;
        for step in 0..STEPS {
            // Half the sequences without symlinks: only there may a render skip the walk,
            // when a commit only edits files, which those do often.
            let links = seed % 2 == 0;
            if !links && rng.below(2) == 0 {
                edit_in_place(&mut rng, author.path(), step);
            } else {
                for _ in 0..=rng.below(3) {
                    change(&mut rng, author.path(), step, links);
                }
            }
            commits.push(commit_all(&repo, step));
            // Now and then back to an earlier commit, as a force push or a revert does.
            let commit = match rng.below(8) {
                0 => commits[rng.below(commits.len())],
                _ => *commits.last().unwrap(),
            };
            let mirror = mirrored(&repo, &kept.path().join("mirror"));
            let update = worktree.update(&mirror, commit).unwrap();
            incremental += matches!(update, Update::Incremental { .. }) as usize;
            edits_only += matches!(update, Update::Incremental { edited: Some(_), .. }) as usize;
            let fresh = tempfile::tempdir().unwrap();
            checkout(&mirror, commit, fresh.path()).unwrap();
            let expected = committed(&repo, commit);
            assert_eq!(snapshot(fresh.path()), expected, "seed {seed}, step {step}: a fresh checkout of {commit}");
            let (kept_files, fresh_files) = (snapshot(worktree.dir()), expected);
            let differing: Vec<&PathBuf> = kept_files
                .iter()
                .filter(|(p, e)| fresh_files.get(*p) != Some(e))
                .map(|(p, _)| p)
                .chain(fresh_files.keys().filter(|p| !kept_files.contains_key(*p)))
                .collect();
            assert!(
                differing.is_empty(),
                "seed {seed}, step {step}: the kept tree differs from a fresh checkout of {commit} at {differing:?}"
            );
            assert_eq!(worktree.commit(), Some(commit));
            // As the sync loop renders: told what the commit edited, when that is all it did.
            let since = match &update {
                Update::Incremental { from, edited: Some(files), .. } => Some((from.to_string(), files.clone())),
                _ => None,
            };
            let edits = since.as_ref().map(|(since, files)| Edits { since, files });
            let revision = commit.to_string();
            let kept = renderer.render_revision(worktree.dir(), "monitoring", &caps, Some(&revision), edits);
            let (kept, fresh) = (shown(kept), rendered(&Renderer::new(Tools::default()), fresh.path()));
            assert_eq!(kept, fresh, "seed {seed}, step {step}: the kept renderer's objects differ from a fresh render");
            rendered_ok += kept.starts_with("Rendered") as usize;
        }
        assert!(incremental > STEPS * 3 / 4, "seed {seed}: only {incremental} of {STEPS} updates were incremental");
        all_ok += rendered_ok;
    }
    // Errors must agree too, but most renders should succeed, so that reused objects are compared.
    let renders = SEEDS as usize * STEPS;
    assert!(all_ok > renders / 4, "only {all_ok} of {renders} renders succeeded");
    // The renders that read only the edited files must have been tried, too.
    assert!(edits_only > renders / 20, "only {edits_only} of {renders} commits only edited files");
}

#[test]
fn a_tree_without_its_marker_is_checked_out_afresh() {
    let author = tempfile::tempdir().unwrap();
    let repo = Repository::init(author.path()).unwrap();
    fs::create_dir_all(author.path().join("manifests")).unwrap();
    fs::write(author.path().join("manifests/a.yaml"), "a").unwrap();
    let first = commit_all(&repo, 0);
    let kept = tempfile::tempdir().unwrap();
    let mirror = mirrored(&repo, &kept.path().join("mirror"));
    let worktree = Worktree::open(kept.path().join("tree"));
    assert_eq!(worktree.update(&mirror, first).unwrap(), Update::Full);
    assert_eq!(worktree.update(&mirror, first).unwrap(), Update::Unchanged);
    // Something outside the agent wrote into the tree, and the agent restarted.
    fs::write(worktree.dir().join("manifests/stray.yaml"), "stray").unwrap();
    fs::write(author.path().join("manifests/a.yaml"), "b").unwrap();
    let second = commit_all(&repo, 1);
    let mirror = mirrored(&repo, &mirror);
    let worktree = Worktree::open(kept.path().join("tree"));
    assert_eq!(worktree.commit(), None, "a tree from before a restart is not trusted");
    assert_eq!(worktree.update(&mirror, second).unwrap(), Update::Full);
    assert!(!worktree.dir().join("manifests/stray.yaml").exists());
    fs::write(author.path().join("manifests/b.yaml"), "c").unwrap();
    let third = commit_all(&repo, 2);
    let mirror = mirrored(&repo, &mirror);
    // An added file is no edit: the render must walk the tree to find it.
    let added = Update::Incremental { from: second, files: 1, edited: None };
    assert_eq!(worktree.update(&mirror, third).unwrap(), added);
    fs::write(author.path().join("manifests/a.yaml"), "d").unwrap();
    let fourth = commit_all(&repo, 3);
    let mirror = mirrored(&repo, &mirror);
    let edited = Update::Incremental { from: third, files: 2, edited: Some(vec!["manifests/a.yaml".into()]) };
    assert_eq!(worktree.update(&mirror, fourth).unwrap(), edited);
}
