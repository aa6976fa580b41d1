//! Replacing a file so a crash leaves the old content or the new, never half
//! of either: write a sibling, fsync it, rename over, fsync the directory.

use std::io::Write;
use std::path::Path;

/// Atomically replace `path` with `bytes` (blocking; call off the runtime).
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// Announce a bound address in `path` (for a listener on port 0): written
/// atomically, so whoever polls for the file never reads half an address.
pub async fn announce(path: &Path, addr: std::net::SocketAddr) -> std::io::Result<()> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || write(&path, addr.to_string().as_bytes()))
        .await
        .map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/state.json");
        super::write(&p, b"one").unwrap();
        super::write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!p.with_extension("tmp").exists());
    }
}
