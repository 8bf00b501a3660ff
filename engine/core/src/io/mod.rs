//! Reading files the user names (pipeline files, plugin libraries, tokenizers, text inputs).
//!
//! Only regular files are read, and only up to a size limit: `/dev/zero` would be read until
//! memory ran out, and opening a FIFO blocks until something writes to it.

pub mod blocks;
pub mod gguf;
pub mod tokenizer;
pub mod weights;

use std::fs::{File, Metadata};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A limit for small text files written by hand (pipeline files, JSON configs).
pub const SMALL_FILE: u64 = 16 << 20;
/// A limit for large inputs: tokenizers, plugin libraries, calibration and evaluation text.
pub const LARGE_FILE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is {kind}, not a regular file: vibee reads only regular files")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{path} is larger than the {} vibee reads from such a file", size(*limit))]
    TooLarge { path: PathBuf, limit: u64 },
    #[error("{path} is not UTF-8 text")]
    NotText { path: PathBuf },
}

/// `bytes` for people: MiB when it is whole MiB.
fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// What `metadata` describes, in words, for errors.
fn kind(metadata: &Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = metadata.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a named pipe (FIFO)"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a plain file"
    }
}

/// The metadata of `path` (links followed), which must be a regular file. Checked before
/// opening it: opening a FIFO would block.
pub fn check_regular_file(path: &Path) -> Result<Metadata, FileError> {
    let metadata = std::fs::metadata(path).map_err(|source| FileError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !metadata.is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind(&metadata),
        });
    }
    Ok(metadata)
}

/// Opens the regular file `path` for reading.
pub fn open_regular_file(path: &Path) -> Result<File, FileError> {
    let io = |source| FileError::Io {
        path: path.to_path_buf(),
        source,
    };
    check_regular_file(path)?;
    // Non-blocking, so that a FIFO swapped in after the check cannot block the open; reads of a
    // regular file ignore the flag.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io)?;
    // The path may have been replaced between the check and the open: check what was opened.
    let metadata = file.metadata().map_err(io)?;
    if !metadata.is_file() {
        return Err(FileError::NotRegular {
            path: path.to_path_buf(),
            kind: kind(&metadata),
        });
    }
    Ok(file)
}

/// The bytes of the regular file `path`, at most `limit` of them.
pub fn read_regular_file(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let too_large = || FileError::TooLarge {
        path: path.to_path_buf(),
        limit,
    };
    let file = open_regular_file(path)?;
    let size = file
        .metadata()
        .map_err(|source| FileError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    if size > limit {
        return Err(too_large());
    }
    // Read at most one byte past the limit: a file that grows while read is still bounded.
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| FileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

/// The UTF-8 text of the regular file `path`, at most `limit` bytes of it.
pub fn read_regular_text(path: &Path, limit: u64) -> Result<String, FileError> {
    String::from_utf8(read_regular_file(path, limit)?).map_err(|_| FileError::NotText {
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vibee-io-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_regular_file_is_read_within_its_limit() {
        let dir = scratch("regular");
        let path = dir.join("a.txt");
        std::fs::write(&path, "hello").unwrap();
        assert_eq!(read_regular_text(&path, 5).unwrap(), "hello");
        let err = read_regular_file(&path, 4).unwrap_err().to_string();
        assert!(err.contains("a.txt is larger than the 4 bytes"), "{err}");
        assert_eq!(size(SMALL_FILE), "16 MiB");
        std::fs::write(&path, [0xff, 0xfe]).unwrap();
        let err = read_regular_text(&path, 5).unwrap_err().to_string();
        assert!(err.contains("is not UTF-8"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn devices_directories_and_fifos_are_refused_without_blocking() {
        let dir = scratch("special");
        let fifo = dir.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        let started = Instant::now();
        for (path, kind) in [
            (Path::new("/dev/zero"), "is a device"),
            (fifo.as_path(), "is a named pipe (FIFO)"),
            (dir.as_path(), "is a directory"),
        ] {
            let err = read_regular_file(path, SMALL_FILE).unwrap_err().to_string();
            assert!(
                err.contains(kind) && err.contains("not a regular file"),
                "{err}"
            );
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        let err = read_regular_file(&dir.join("missing"), 1).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
