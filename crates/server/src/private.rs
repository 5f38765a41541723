//! Files the server keeps are its own: the data dir and a local artifact
//! dir are 0700, the SQLite database and its WAL files 0600. Created so,
//! and corrected (with a warning) when an earlier version or an operator
//! left them readable by other local users.

use std::path::Path;

/// Mode of the server's directories.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the server's files.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and its parents) and makes it 0700, warning when an
/// existing one was open to others.
pub fn dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    restrict(dir, DIR_MODE)
}

/// Makes an existing file 0600 (a missing one is fine), warning when it
/// was open to others.
pub fn file(path: &Path) -> std::io::Result<()> {
    match std::fs::metadata(path) {
        Ok(_) => restrict(path, FILE_MODE),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The SQLite database of a `sqlite:` URL and its WAL and shared-memory
/// files: 0600. Other URLs are left alone.
pub fn sqlite_files(url: &str) -> std::io::Result<()> {
    let Some(path) = sqlite_path(url) else {
        return Ok(());
    };
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut name = path.clone().into_os_string();
        name.push(suffix);
        file(Path::new(&name))?;
    }
    Ok(())
}

/// The file of a `sqlite:` URL; `None` for other URLs and in-memory ones.
pub fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let path = rest.trim_start_matches("//");
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    Some(path.into())
}

#[cfg(unix)]
fn restrict(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let current = std::fs::metadata(path)?.permissions().mode() & 0o777;
    // Reading or writing by others is what matters; a directory that lets
    // others pass (0711, `drover up`'s data dir, above its agent's working
    // dirs) lists nothing and opens only what is open itself.
    if current & 0o066 != 0 {
        tracing::warn!(
            path = %path.display(),
            was = format!("{current:o}"),
            now = format!("{mode:o}"),
            "was readable by other local users; made private"
        );
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

#[cfg(not(unix))]
fn restrict(_: &Path, _: u32) -> std::io::Result<()> {
    Ok(())
}

/// Writes a new file readable by its owner only (mode 0600), synced;
/// fails if it exists, so two replicas creating a key at once never both
/// believe their own.
pub fn create_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(FILE_MODE);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn dirs_and_files_become_private() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("data");
        dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        dir(&d).unwrap();
        assert_eq!(mode(&d), 0o700);
        let db = d.join("drover.db");
        std::fs::write(&db, b"x").unwrap();
        std::fs::write(d.join("drover.db-wal"), b"x").unwrap();
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        sqlite_files(&format!("sqlite://{}", db.display())).unwrap();
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&d.join("drover.db-wal")), 0o600);
        // Missing files and other engines are fine.
        sqlite_files("postgres://u@h/db").unwrap();
        file(&d.join("missing")).unwrap();
    }
}
