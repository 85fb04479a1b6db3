//! Where the audit writer's encoded lines go: the [`Sink`] trait (a trait object, so tests can
//! inject failures such as ENOSPC or short writes), the file and stdout sinks, opening a log for
//! appending, and the exclusive writer lock `<path>.lock` that keeps one writer per log.
//!
//! Owns no policy (retries, rotation, failure modes are the writer's). Never imports `config`,
//! the writer, the verifier or the reader.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::AuditError;

/// Where encoded lines go. A trait object so tests can inject failures (ENOSPC, short writes).
pub(super) trait Sink: Send {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;
    fn flush(&mut self) -> io::Result<()>;
    /// Current length for files; None for streams (no truncation, no rotation).
    fn size(&self) -> io::Result<Option<u64>>;
    fn truncate(&mut self, len: u64) -> io::Result<()>;
    fn sync(&mut self) -> io::Result<()>;
}

pub(super) struct FileSink(pub(super) File);

impl Sink for FileSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
    fn size(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.0.metadata()?.len()))
    }
    fn truncate(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

pub(super) struct StdoutSink(pub(super) io::Stdout);

impl Sink for StdoutSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
    fn size(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
    fn truncate(&mut self, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "stdout cannot be truncated",
        ))
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Opens the sink for a path (at start, on reopen, after rotation).
pub(super) type Opener = Arc<dyn Fn(&Path) -> io::Result<Box<dyn Sink>> + Send + Sync>;

pub(super) fn open_append(path: &Path) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Account names and client addresses are not for every local user.
        o.mode(0o640);
    }
    o.open(path)
}

pub(super) fn file_opener() -> Opener {
    Arc::new(|p: &Path| Ok(Box::new(FileSink(open_append(p)?)) as Box<dyn Sink>))
}

/// Takes the exclusive writer lock `<path>.lock` (non-blocking).
pub(super) fn take_writer_lock(path: &Path) -> Result<File, AuditError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock = PathBuf::from(name);
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock)
        .map_err(|source| AuditError::Open {
            path: lock.clone(),
            source,
        })?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(AuditError::InUse {
            path: path.to_path_buf(),
            lock,
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(AuditError::Open { path: lock, source }),
    }
}
