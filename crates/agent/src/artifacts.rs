//! Collecting an attempt's artifacts from its working dir, so that a
//! declared path names nothing but what the attempt itself could read
//! there: not a file behind a symlink it planted (or one committed to a
//! workspace's repository), not a file its user may not read.
//!
//! Key design decision: every path is resolved by the kernel beneath the
//! working dir without following any symlink (`openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`; where the kernel lacks it, a
//! walk one component at a time with `O_NOFOLLOW`), and when the attempt
//! ran as another user, its directories are listed and its files opened
//! by a thread of the agent that has become that user for the rest of its
//! short life (`Reader`). The thread switches with the raw `setgroups`,
//! `setresgid` and `setresuid` system calls: Linux keeps credentials per
//! thread, and only the libc wrappers spread a change to every thread of
//! the process. The agent then hashes and uploads through the descriptors
//! that thread opened: permission was checked at open, as the attempt's
//! user.

use std::ffi::{CStr, CString, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use drover_proto::jobs::Assignment;
use drover_proto::workflows::valid_artifact_path;
use tokio::sync::oneshot;

use crate::executor::{self, ExecOptions, Placement};
use crate::process::{self, UserIds};

/// Why an attempt's artifacts were not all collected; `path` is the
/// declared path (or one under a declared directory).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    #[error("artifact path '{path}' is not a plain relative path")]
    NotPlain { path: String },
    #[error("declared artifact '{path}' was not produced")]
    NotProduced { path: String },
    #[error("artifact '{path}' is or passes through a symlink; symlinks are never followed")]
    Symlink { path: String },
    #[error("artifact '{path}' cannot be read by the user the attempt ran as")]
    Unreadable { path: String },
    #[error("artifact '{path}' is neither a regular file nor a directory")]
    NotAFile { path: String },
    #[error("artifact '{path}': {source}")]
    Inspect { path: String, source: io::Error },
    #[error("cannot open the working dir {dir}: {source}")]
    WorkDir { dir: PathBuf, source: io::Error },
    #[error("cannot read artifacts as user '{user}': {source}")]
    User {
        user: String,
        source: process::UserError,
    },
    #[error("cannot take on user '{user}' (uid {uid}) to read artifacts: {source}")]
    BecomeUser {
        user: String,
        uid: u32,
        source: io::Error,
    },
    #[error("cannot start the thread that reads artifacts: {0}")]
    Thread(io::Error),
    #[error("the thread that reads artifacts ended")]
    ReaderGone,
}

/// The user whose permissions `a`'s artifacts are read with: the one its
/// process sandbox switched to, when this agent switches users. `None`
/// reads them as the agent: the attempt ran as the agent, or in a
/// container, which sees only its mounts (a symlink out of them is never
/// followed, and a hard link cannot cross into them).
pub(crate) fn reader_user(a: &Assignment, opts: &ExecOptions) -> Option<String> {
    if !opts.can_switch_users {
        return None;
    }
    match executor::place(a, opts) {
        Ok(Placement::Process {
            sandbox: Some(p), ..
        }) => p.user.clone(),
        _ => None,
    }
}

enum Request {
    List {
        declared: Vec<String>,
        reply: oneshot::Sender<Result<Vec<String>, Error>>,
    },
    Open {
        path: String,
        reply: oneshot::Sender<Result<File, Error>>,
    },
}

/// A thread that lists and opens files beneath one working dir, as the
/// attempt's user when it has one. It ends when the `Reader` is dropped;
/// its credentials end with it, so no other work ever runs with them.
pub(crate) struct Reader {
    requests: std::sync::mpsc::Sender<Request>,
}

impl Reader {
    /// Opens `root` (as the agent: the attempt cannot replace its own
    /// working dir, whose parent is the agent's) and then takes on
    /// `user`'s identity, if given.
    pub(crate) async fn start(root: PathBuf, user: Option<String>) -> Result<Reader, Error> {
        let (requests, incoming) = std::sync::mpsc::channel::<Request>();
        let (ready, started) = oneshot::channel();
        std::thread::Builder::new()
            .name("drover-artifacts".to_owned())
            .spawn(move || {
                let root = match prepare(&root, user.as_deref()) {
                    Ok(fd) => {
                        let _ = ready.send(Ok(()));
                        fd
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                while let Ok(request) = incoming.recv() {
                    match request {
                        Request::List { declared, reply } => {
                            let _ = reply.send(list(root.as_fd(), &declared));
                        }
                        Request::Open { path, reply } => {
                            let _ = reply.send(open_file(root.as_fd(), &path));
                        }
                    }
                }
            })
            .map_err(Error::Thread)?;
        started.await.map_err(|_| Error::ReaderGone)??;
        Ok(Reader { requests })
    }

    /// The files to upload for `declared` paths, relative to the working
    /// dir: a declared file, or every regular file under a declared
    /// directory. A declared symlink (or one on the way) is an error; one
    /// inside a declared directory is skipped.
    pub(crate) async fn list(&self, declared: Vec<String>) -> Result<Vec<String>, Error> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::List { declared, reply })
            .map_err(|_| Error::ReaderGone)?;
        answer.await.map_err(|_| Error::ReaderGone)?
    }

    /// Opens one listed file for reading.
    pub(crate) async fn open(&self, path: String) -> Result<File, Error> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(Request::Open { path, reply })
            .map_err(|_| Error::ReaderGone)?;
        answer.await.map_err(|_| Error::ReaderGone)?
    }
}

fn prepare(root: &Path, user: Option<&str>) -> Result<OwnedFd, Error> {
    let dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(root)
        .map_err(|source| Error::WorkDir {
            dir: root.to_owned(),
            source,
        })?;
    if let Some(user) = user {
        let ids = process::resolve_user(user).map_err(|source| Error::User {
            user: user.to_owned(),
            source,
        })?;
        become_user(ids).map_err(|source| Error::BecomeUser {
            user: user.to_owned(),
            uid: ids.uid,
            source,
        })?;
    }
    Ok(OwnedFd::from(dir))
}

#[cfg(any(target_arch = "x86", target_arch = "arm"))]
mod calls {
    pub(super) const SETGROUPS: libc::c_long = libc::SYS_setgroups32;
    pub(super) const SETRESGID: libc::c_long = libc::SYS_setresgid32;
    pub(super) const SETRESUID: libc::c_long = libc::SYS_setresuid32;
}
#[cfg(not(any(target_arch = "x86", target_arch = "arm")))]
mod calls {
    pub(super) const SETGROUPS: libc::c_long = libc::SYS_setgroups;
    pub(super) const SETRESGID: libc::c_long = libc::SYS_setresgid;
    pub(super) const SETRESUID: libc::c_long = libc::SYS_setresuid;
}

/// Makes the calling thread (only) `ids`, with no supplementary groups,
/// as `Command::uid` makes an attempt's process. Once its uids are not 0
/// the thread has no capabilities left, so there is no way back.
#[allow(unsafe_code)]
fn become_user(ids: UserIds) -> io::Result<()> {
    let ok = |rc: libc::c_long| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // The kernel reads these as 32-bit ids, whatever the width of a long.
    let (uid, gid) = (ids.uid as libc::c_long, ids.gid as libc::c_long);
    let no_groups: libc::c_long = 0;
    // SAFETY: raw system calls with integer arguments (setgroups gets an
    // empty list: size 0 and a null pointer, which it never reads). The
    // kernel applies them to the calling thread alone.
    unsafe {
        ok(libc::syscall(
            calls::SETGROUPS,
            no_groups,
            std::ptr::null::<libc::gid_t>(),
        ))?;
        ok(libc::syscall(calls::SETRESGID, gid, gid, gid))?;
        ok(libc::syscall(calls::SETRESUID, uid, uid, uid))?;
    }
    // SAFETY: geteuid(2) takes nothing and reads this thread's credentials.
    let euid = unsafe { libc::geteuid() };
    if euid != ids.uid {
        return Err(io::Error::other(format!(
            "the thread still runs as uid {euid}"
        )));
    }
    Ok(())
}

/// How paths are resolved: beneath the starting directory, no symlink
/// anywhere (nor /proc's magic links).
const RESOLVE: u64 =
    libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;

/// Opens `rel` (a plain relative path) beneath `dir` with `flags`,
/// following no symlink: `ELOOP` when one is on the way or at the end,
/// `EXDEV` for a path that would leave `dir`.
#[allow(unsafe_code)]
pub(crate) fn open_beneath(
    dir: BorrowedFd<'_>,
    rel: &str,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    if !valid_artifact_path(rel) {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    let path = CString::new(rel).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is three integers; all zero is a valid value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = RESOLVE;
    // SAFETY: openat2(2) reads the NUL-terminated path and `how`, both
    // alive for the call, with the size of `how` we pass; `dir` is an
    // open descriptor borrowed for the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd >= 0 {
        // SAFETY: the kernel just returned this descriptor to us alone.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        // A kernel before 5.6, or a seccomp filter that refuses calls it
        // does not know: the walk is as strict, one call per component.
        Some(libc::ENOSYS | libc::EPERM) => walk_beneath(dir, rel, flags),
        _ => Err(e),
    }
}

/// `open_beneath` without `openat2`: each component opened relative to
/// the previous one with `O_NOFOLLOW`, every directory on the way checked
/// to be one (`O_PATH | O_NOFOLLOW` yields a symlink itself, not its
/// target).
#[allow(unsafe_code)]
pub(crate) fn walk_beneath(
    dir: BorrowedFd<'_>,
    rel: &str,
    flags: libc::c_int,
) -> io::Result<OwnedFd> {
    if !valid_artifact_path(rel) {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    let parts: Vec<&str> = rel.split('/').collect();
    let mut current: Option<OwnedFd> = None;
    for (i, part) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        let at = current.as_ref().map_or(dir, |fd| fd.as_fd());
        let name = CString::new(*part).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let how = if last { flags } else { libc::O_PATH };
        // SAFETY: openat(2) reads the NUL-terminated name, alive for the
        // call; `at` is an open descriptor.
        let fd = unsafe {
            libc::openat(
                at.as_raw_fd(),
                name.as_ptr(),
                how | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor to us alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if !last {
            let file = File::from(fd);
            let kind = file.metadata()?.file_type();
            if kind.is_symlink() {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            if !kind.is_dir() {
                return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
            }
            current = Some(OwnedFd::from(file));
        } else {
            current = Some(fd);
        }
    }
    current.ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Opens an entry for reading (never blocking on a FIFO) with what it is.
fn open_entry(root: BorrowedFd<'_>, rel: &str) -> io::Result<(File, std::fs::Metadata)> {
    let fd = open_beneath(
        root,
        rel,
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
    )?;
    let file = File::from(fd);
    let meta = file.metadata()?;
    Ok((file, meta))
}

/// What an error of `open_beneath` means for an artifact.
fn classify(path: &str, e: io::Error) -> Error {
    let path = path.to_owned();
    match e.raw_os_error() {
        Some(libc::ENOENT | libc::ENOTDIR) => Error::NotProduced { path },
        Some(libc::ELOOP) => Error::Symlink { path },
        Some(libc::EACCES | libc::EPERM) => Error::Unreadable { path },
        Some(libc::EXDEV) => Error::NotPlain { path },
        _ => Error::Inspect { path, source: e },
    }
}

fn open_file(root: BorrowedFd<'_>, path: &str) -> Result<File, Error> {
    let (file, meta) = open_entry(root, path).map_err(|e| classify(path, e))?;
    if !meta.is_file() {
        return Err(Error::NotAFile {
            path: path.to_owned(),
        });
    }
    Ok(file)
}

fn list(root: BorrowedFd<'_>, declared: &[String]) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for rel in declared {
        if !valid_artifact_path(rel) {
            return Err(Error::NotPlain { path: rel.clone() });
        }
        let (_, meta) = open_entry(root, rel).map_err(|e| classify(rel, e))?;
        if meta.is_file() {
            out.push(rel.clone());
            continue;
        }
        if !meta.is_dir() {
            return Err(Error::NotAFile { path: rel.clone() });
        }
        // Paths, not descriptors, wait on the stack: a wide tree does not
        // hold one descriptor per directory.
        let mut stack = vec![rel.clone()];
        while let Some(dir_rel) = stack.pop() {
            let (dir, _) = open_entry(root, &dir_rel).map_err(|e| classify(&dir_rel, e))?;
            let mut names = read_names(dir).map_err(|source| Error::Inspect {
                path: dir_rel.clone(),
                source,
            })?;
            names.sort();
            for name in names {
                let Ok(name) = name.into_string() else {
                    tracing::warn!(dir = %dir_rel, "skipping an entry whose name is not UTF-8 inside an artifact directory");
                    continue;
                };
                let child = format!("{dir_rel}/{name}");
                if !valid_artifact_path(&child) {
                    continue;
                }
                match open_entry(root, &child) {
                    Ok((_, m)) if m.is_dir() => stack.push(child),
                    Ok((_, m)) if m.is_file() => out.push(child),
                    Ok(_) => {
                        tracing::warn!(path = %child, "skipping what is not a regular file inside an artifact directory")
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                        tracing::warn!(path = %child, "skipping a symlink inside an artifact directory")
                    }
                    // A socket cannot be opened at all.
                    Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                        tracing::warn!(path = %child, "skipping what is not a regular file inside an artifact directory")
                    }
                    Err(e) => return Err(classify(&child, e)),
                }
            }
        }
    }
    Ok(out)
}

/// The names in a directory (without `.` and `..`).
#[allow(unsafe_code)]
fn read_names(dir: File) -> io::Result<Vec<OsString>> {
    let fd = dir.into_raw_fd();
    // SAFETY: fdopendir(3) takes ownership of `fd`, an open directory we
    // own; on failure it is still ours and closed here.
    let stream = unsafe { libc::fdopendir(fd) };
    if stream.is_null() {
        let e = io::Error::last_os_error();
        // SAFETY: `fd` is still ours: fdopendir failed.
        unsafe { libc::close(fd) };
        return Err(e);
    }
    let mut names = Vec::new();
    let result = loop {
        // SAFETY: errno is thread-local; readdir(3) reports its errors
        // only through it, so it is cleared first.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: `stream` is an open directory stream used by this
        // thread alone.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            break match e.raw_os_error() {
                Some(0) | None => Ok(()),
                Some(_) => Err(e),
            };
        }
        // SAFETY: readdir returned an entry whose d_name is NUL-terminated
        // and valid until the next readdir on this stream.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) };
        let bytes = name.to_bytes();
        if bytes != b"." && bytes != b".." {
            names.push(OsString::from_vec(bytes.to_vec()));
        }
    };
    // SAFETY: closes the stream (and its descriptor) we opened above.
    unsafe { libc::closedir(stream) };
    result.map(|()| names)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    type Open = fn(BorrowedFd<'_>, &str, libc::c_int) -> io::Result<OwnedFd>;

    fn root(dir: &Path) -> OwnedFd {
        OwnedFd::from(File::open(dir).unwrap())
    }

    /// A working dir with a file, a directory with files, and symlinks
    /// out of it (to a directory and to a file) and inside it.
    fn tree() -> (tempfile::TempDir, tempfile::TempDir) {
        let work = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "secret").unwrap();
        let w = work.path();
        std::fs::write(w.join("a.txt"), "a").unwrap();
        std::fs::create_dir_all(w.join("out/sub")).unwrap();
        std::fs::write(w.join("out/one"), "1").unwrap();
        std::fs::write(w.join("out/sub/two"), "2").unwrap();
        symlink(outside.path(), w.join("d")).unwrap();
        symlink(outside.path().join("secret"), w.join("out/leak")).unwrap();
        symlink("a.txt", w.join("near")).unwrap();
        symlink(outside.path(), w.join("out/dir-leak")).unwrap();
        (work, outside)
    }

    #[test]
    fn paths_resolve_beneath_without_symlinks_both_ways() {
        let (work, _outside) = tree();
        let fd = root(work.path());
        // (path, the errno wanted, or None for success)
        let cases = [
            ("a.txt", None),
            ("out/sub/two", None),
            ("out", None),
            ("d/secret", Some(libc::ELOOP)),
            ("d", Some(libc::ELOOP)),
            ("near", Some(libc::ELOOP)),
            ("out/leak", Some(libc::ELOOP)),
            ("out/dir-leak/secret", Some(libc::ELOOP)),
            ("missing", Some(libc::ENOENT)),
            ("a.txt/x", Some(libc::ENOTDIR)),
            ("../x", Some(libc::EXDEV)),
            ("/etc/passwd", Some(libc::EXDEV)),
        ];
        for (path, want) in cases {
            for (how, open) in [("openat2", open_beneath as Open), ("walk", walk_beneath)] {
                let got = open(fd.as_fd(), path, libc::O_RDONLY);
                match (got, want) {
                    (Ok(_), None) => {}
                    (Err(e), Some(errno)) => {
                        assert_eq!(e.raw_os_error(), Some(errno), "{how} {path}: {e}")
                    }
                    (got, want) => panic!("{how} {path}: got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn listing_skips_symlinks_inside_and_refuses_declared_ones() {
        let (work, _outside) = tree();
        let fd = root(work.path());
        let got = list(fd.as_fd(), &["a.txt".into(), "out".into()]).unwrap();
        assert_eq!(got, ["a.txt", "out/one", "out/sub/two"]);
        // (declared, the error wanted)
        let cases = [
            (
                "d/secret",
                "artifact 'd/secret' is or passes through a symlink; symlinks are never followed",
            ),
            (
                "near",
                "artifact 'near' is or passes through a symlink; symlinks are never followed",
            ),
            ("nope", "declared artifact 'nope' was not produced"),
            ("../x", "artifact path '../x' is not a plain relative path"),
        ];
        for (declared, want) in cases {
            let err = list(fd.as_fd(), &[declared.to_owned()]).unwrap_err();
            assert_eq!(err.to_string(), want, "{declared}");
            let err = open_file(fd.as_fd(), declared).unwrap_err();
            assert_eq!(err.to_string(), want, "{declared}");
        }
        let err = open_file(fd.as_fd(), "out").unwrap_err();
        assert!(matches!(err, Error::NotAFile { .. }), "{err}");
    }

    /// A thread that became another user opens what that user may, and
    /// only that; the other threads keep the agent's credentials.
    #[test]
    fn the_reader_opens_files_as_the_attempt_user() {
        if !crate::config::running_as_root() {
            // Switching users needs root; the integration tests run the
            // agent as root and check this end to end.
            return;
        }
        let work = tempfile::tempdir().unwrap();
        let nobody = process::resolve_user("nobody").unwrap();
        let w = work.path();
        std::fs::write(w.join("mine"), "mine").unwrap();
        std::fs::write(w.join("locked"), "locked").unwrap();
        std::fs::set_permissions(w.join("locked"), std::fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::lchown(w, Some(nobody.uid), Some(nobody.gid)).unwrap();
        std::os::unix::fs::lchown(w.join("mine"), Some(nobody.uid), Some(nobody.gid)).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let reader = Reader::start(w.to_owned(), Some("nobody".into()))
                .await
                .unwrap();
            let mut f = reader.open("mine".into()).await.unwrap();
            let mut text = String::new();
            io::Read::read_to_string(&mut f, &mut text).unwrap();
            assert_eq!(text, "mine");
            let err = reader.open("locked".into()).await.unwrap_err();
            assert_eq!(
                err.to_string(),
                "artifact 'locked' cannot be read by the user the attempt ran as"
            );
            // As the agent, the same file opens.
            let reader = Reader::start(w.to_owned(), None).await.unwrap();
            assert!(reader.open("locked".into()).await.is_ok());
        });
        // This thread kept the agent's credentials: it reads what only
        // root may.
        assert_eq!(std::fs::read(w.join("locked")).unwrap(), b"locked");
    }
}
