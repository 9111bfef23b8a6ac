//! One working tree kept between syncs: a new commit rewrites only the files that differ
//! from the commit the tree holds (the git tree diff), instead of writing every file of
//! the revision into a fresh directory.
//!
//! The tree holds a commit only while its marker file names it: the marker is removed
//! before the tree is touched and written once it is complete, so a tree left half
//! updated (a crash, a full disk) is never trusted and is checked out afresh, as it is
//! when there is no marker (as after a restart), the marked commit is not in the
//! mirror, or anything fails.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use git2::{Delta, DiffOptions, ObjectType, Oid, Repository, Tree};

use super::SourceError;

/// What [`Worktree::update`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    /// The tree already held the commit.
    Unchanged,
    /// Only the files that differ from the commit it held were written or removed.
    Incremental { files: usize },
    /// Every file was written into an emptied directory.
    Full,
}

/// A working tree at `dir`, kept by its marker `dir.commit`.
pub struct Worktree {
    dir: PathBuf,
    marker: PathBuf,
}

impl Worktree {
    /// The tree at `dir`. One left by an earlier process is not trusted (anything may
    /// have happened to it since): the first update checks out afresh.
    pub fn open(dir: impl Into<PathBuf>) -> Worktree {
        let dir = dir.into();
        let mut marker = dir.clone().into_os_string();
        marker.push(".commit");
        let _ = fs::remove_file(&marker);
        Worktree { dir, marker: marker.into() }
    }

    /// The directory the render reads.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The commit the tree holds, if it is complete.
    pub fn commit(&self) -> Option<Oid> {
        Oid::from_str(fs::read_to_string(&self.marker).ok()?.trim()).ok()
    }

    /// Makes the tree hold `commit` of `mirror`.
    pub fn update(&self, mirror: &Path, commit: Oid) -> Result<Update, SourceError> {
        let mirror_error = |action| move |source| SourceError::Mirror { path: mirror.to_owned(), action, source };
        let repo = Repository::open_bare(mirror).map_err(mirror_error("opening"))?;
        let tree = repo.find_commit(commit).and_then(|c| c.tree()).map_err(mirror_error("reading the commit"))?;
        let held = self.commit();
        if held == Some(commit) && self.dir.is_dir() {
            return Ok(Update::Unchanged);
        }
        let old = held.and_then(|held| repo.find_commit(held).and_then(|c| c.tree()).ok());
        let _ = fs::remove_file(&self.marker);
        if let Some(old) = old.filter(|_| self.dir.is_dir()) {
            match self.apply_diff(&repo, &old, &tree) {
                Ok(files) => {
                    self.mark(commit)?;
                    return Ok(Update::Incremental { files });
                }
                Err(e) => tracing::warn!(error = %e, "updating the working tree failed; checking it out afresh"),
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
        write_tree(&repo, &tree, &self.dir).map_err(|e| e.at(&self.dir))?;
        self.mark(commit)?;
        Ok(Update::Full)
    }

    fn mark(&self, commit: Oid) -> Result<(), SourceError> {
        fs::write(&self.marker, commit.to_string()).map_err(|e| DiffError::from(e).at(&self.marker))
    }

    /// Removes what `old` has and `new` lacks or changed, then writes what `new` adds or
    /// changed; returns how many paths it touched.
    fn apply_diff(&self, repo: &Repository, old: &Tree<'_>, new: &Tree<'_>) -> Result<usize, DiffError> {
        let mut options = DiffOptions::new();
        // Type changes (file ↔ symlink) as a removal and an addition.
        options.include_typechange(false);
        let diff = repo.diff_tree_to_tree(Some(old), Some(new), Some(&mut options))?;
        let mut removed = Vec::new();
        let mut written = Vec::new();
        for delta in diff.deltas() {
            let (old_file, new_file) = (delta.old_file(), delta.new_file());
            match delta.status() {
                Delta::Added => written.push((path_of(new_file.path())?, new_file.id(), new_file.mode())),
                Delta::Deleted => removed.push(path_of(old_file.path())?),
                Delta::Modified | Delta::Typechange => {
                    removed.push(path_of(old_file.path())?);
                    written.push((path_of(new_file.path())?, new_file.id(), new_file.mode()));
                }
                other => return Err(DiffError::Unexpected(other)),
            }
        }
        let touched = removed.len() + written.len();
        // Deepest first, so a directory that empties is removed before its parent is looked at.
        removed.sort_by(|a, b| b.cmp(a));
        for path in &removed {
            let full = self.dir.join(path);
            match fs::symlink_metadata(&full) {
                Ok(meta) if meta.is_dir() => fs::remove_dir_all(&full)?,
                Ok(_) => fs::remove_file(&full)?,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            // Git keeps no empty directory: one left empty may become a file of the new tree.
            for parent in full.ancestors().skip(1).take_while(|p| *p != self.dir) {
                if fs::remove_dir(parent).is_err() {
                    break;
                }
            }
        }
        for (path, id, mode) in written {
            write_entry(repo, &self.dir.join(path), id, mode)?;
        }
        Ok(touched)
    }
}

/// Writes every entry of `tree` under `dir` (created if missing). Written here rather
/// than by libgit2's checkout, which compares with the repository's HEAD and index: in
/// a mirror whose HEAD is another commit it may leave out a file (one that is a
/// directory in HEAD), and it writes an index into the mirror.
pub(super) fn write_tree(repo: &Repository, tree: &Tree<'_>, dir: &Path) -> Result<(), DiffError> {
    fs::create_dir_all(dir)?;
    for entry in tree.iter() {
        let path = path_of(Some(Path::new(entry.name()?)))?;
        let mode = mode_of(entry.filemode());
        match entry.kind() {
            Some(ObjectType::Tree) => {
                let subtree = repo.find_tree(entry.id())?;
                write_tree(repo, &subtree, &dir.join(path))?;
            }
            _ => write_entry(repo, &dir.join(path), entry.id(), mode)?,
        }
    }
    Ok(())
}

/// Writes one tree entry as `git checkout` does: a file (executable when its mode says
/// so) or a symlink; a submodule (a commit in the tree) is an empty directory.
fn write_entry(repo: &Repository, path: &Path, id: Oid, mode: git2::FileMode) -> Result<(), DiffError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    if mode == git2::FileMode::Commit {
        fs::create_dir_all(path)?;
        return Ok(());
    }
    let blob = repo.find_object(id, Some(ObjectType::Blob))?.peel_to_blob()?;
    if mode == git2::FileMode::Link {
        let target = std::str::from_utf8(blob.content()).map_err(|_| DiffError::SymlinkTarget(path.to_owned()))?;
        std::os::unix::fs::symlink(target, path)?;
        return Ok(());
    }
    fs::write(path, blob.content())?;
    if mode == git2::FileMode::BlobExecutable {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// A tree entry's raw mode as libgit2's diff reports it.
fn mode_of(raw: i32) -> git2::FileMode {
    match raw {
        0o100755 => git2::FileMode::BlobExecutable,
        0o120000 => git2::FileMode::Link,
        0o160000 => git2::FileMode::Commit,
        0o040000 => git2::FileMode::Tree,
        _ => git2::FileMode::Blob,
    }
}

fn path_of(path: Option<&Path>) -> Result<PathBuf, DiffError> {
    let path = path.ok_or(DiffError::NoPath)?;
    // A tree never holds `..` or an absolute path; refuse rather than write outside the tree.
    if path.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
        return Err(DiffError::OutsideTree(path.to_owned()));
    }
    Ok(path.to_owned())
}

/// Why writing the tree failed (after an incremental update, it is then checked out afresh).
#[derive(Debug, thiserror::Error)]
pub(super) enum DiffError {
    #[error(transparent)]
    Git(#[from] git2::Error),
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("a diff entry without a path")]
    NoPath,
    #[error("path {0} leaves the working tree")]
    OutsideTree(PathBuf),
    #[error("symlink {0}: target is not UTF-8")]
    SymlinkTarget(PathBuf),
    #[error("unexpected diff entry {0:?}")]
    Unexpected(Delta),
}

impl DiffError {
    pub(super) fn at(self, path: &Path) -> SourceError {
        SourceError::Worktree { path: path.to_owned(), message: self.to_string() }
    }
}

#[cfg(test)]
mod tests {
    //! Incremental == full: random sequences of commits (adds, edits, renames, deletes,
    //! moves between directories, symlinks, a file becoming a directory and back, the
    //! executable bit), each brought into one kept tree by its diff and compared with
    //! a fresh checkout of the same commit.

    use std::collections::BTreeMap;
    use std::os::unix::fs::PermissionsExt;

    use super::*;

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
                let entry = match mode_of(entry.filemode()) {
                    git2::FileMode::Link => Entry::Link(PathBuf::from(String::from_utf8(content).unwrap())),
                    mode => Entry::File { content, executable: mode == git2::FileMode::BlobExecutable },
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

    const DIRS: [&str; 4] = ["manifests", "manifests/app", "manifests/app/deep", "dashboards"];

    /// One random change to the author's working directory.
    fn change(rng: &mut Rng, work: &Path, step: usize) {
        let existing = paths(work);
        let pick = |rng: &mut Rng| existing.get(rng.below(existing.len().max(1))).cloned();
        let dir = DIRS[rng.below(DIRS.len())];
        let new_path = |rng: &mut Rng| PathBuf::from(dir).join(format!("f{}.yaml", rng.below(12)));
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
            0..=2 => write(&new_path(rng), format!("kind: ConfigMap # {step}\n")),
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
                let target = if rng.below(2) == 0 { "manifests/f1.yaml" } else { "manifests/app" };
                std::os::unix::fs::symlink(format!("{}{target}", "../".repeat(depth)), full).unwrap();
            }
            // a file becomes a directory (its path now holds files), or the reverse
            6 => {
                if let Some(path) = pick(rng) {
                    let full = work.join(&path);
                    fs::remove_file(&full).unwrap();
                    fs::create_dir_all(&full).unwrap();
                    fs::write(full.join("inner.yaml"), format!("kind: Secret # {step}\n")).unwrap();
                }
            }
            7 => {
                let inner: Vec<PathBuf> = existing.iter().filter(|p| p.ends_with("inner.yaml")).cloned().collect();
                if let Some(path) = inner.first() {
                    let dir = work.join(path.parent().unwrap());
                    fs::remove_dir_all(&dir).unwrap();
                    fs::write(dir, format!("kind: Service # {step}\n")).unwrap();
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

    #[test]
    fn an_incremental_update_gives_the_tree_a_fresh_checkout_gives() {
        for seed in 1..=12u64 {
            let author = tempfile::tempdir().unwrap();
            let repo = Repository::init(author.path()).unwrap();
            let kept = tempfile::tempdir().unwrap();
            let worktree = Worktree::open(kept.path().join("tree"));
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let mut commits = Vec::new();
            let mut incremental = 0;
            for step in 0..40 {
                for _ in 0..=rng.below(3) {
                    change(&mut rng, author.path(), step);
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
                let fresh = tempfile::tempdir().unwrap();
                super::super::checkout(&mirror, commit, fresh.path()).unwrap();
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
            }
            assert!(incremental > 30, "seed {seed}: only {incremental} of 40 updates were incremental");
        }
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
        assert_eq!(worktree.update(&mirror, third).unwrap(), Update::Incremental { files: 1 });
    }
}
