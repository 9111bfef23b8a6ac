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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Update {
    /// The tree already held the commit.
    Unchanged,
    /// Only the files that differ from the commit it held (`from`) were written or
    /// removed. `edited`: when the commit only changed regular files in place (no file
    /// added, removed, renamed or turned into a link, no link changed), those files'
    /// paths, so that the render need not walk the tree to find what changed.
    Incremental { from: Oid, files: usize, edited: Option<Vec<PathBuf>> },
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
                Ok((files, edited)) => {
                    self.mark(commit)?;
                    return Ok(Update::Incremental { from: held.expect("an old tree is the held one"), files, edited });
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
    /// changed; returns how many paths it touched, and the edited files (see [`Update`]).
    fn apply_diff(
        &self,
        repo: &Repository,
        old: &Tree<'_>,
        new: &Tree<'_>,
    ) -> Result<(usize, Option<Vec<PathBuf>>), DiffError> {
        let mut options = DiffOptions::new();
        // Type changes (file ↔ symlink) as a removal and an addition.
        options.include_typechange(false);
        let diff = repo.diff_tree_to_tree(Some(old), Some(new), Some(&mut options))?;
        let mut removed = Vec::new();
        let mut written = Vec::new();
        let mut edited = Some(Vec::new());
        let regular = |mode| matches!(mode, git2::FileMode::Blob | git2::FileMode::BlobExecutable);
        for delta in diff.deltas() {
            let (old_file, new_file) = (delta.old_file(), delta.new_file());
            let in_place = delta.status() == Delta::Modified && regular(old_file.mode()) && regular(new_file.mode());
            match (&mut edited, in_place) {
                (Some(edited), true) => edited.push(path_of(new_file.path())?),
                _ => edited = None,
            }
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
        Ok((touched, edited))
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
