//! `flotilla runner install DEST`: copies the running `flotilla` binary to `DEST`.
//!
//! The first init container of a runner pod (the Flotilla image) runs it to put the wrapper
//! into a volume shared with the job container, whose image knows nothing of Flotilla. The
//! copy is atomic: written to a temporary file next to `DEST`, flushed to disk, made
//! executable (`0755`) and renamed over `DEST`, so a half-written binary is never run.

use std::fmt;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::record::{EXIT_NOT_RUN, Record};
use crate::backend::local::now_ms;

/// What [`install`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The binary copied.
    pub from: PathBuf,
    /// Where it is now.
    pub to: PathBuf,
    /// Its size.
    pub bytes: u64,
}

impl fmt::Display for Installed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Installed {} ({} bytes) as {}",
            self.from.display(),
            self.bytes,
            self.to.display()
        )
    }
}

/// Copies the running executable to `dest` (creating its directory), then writes one system
/// line record to `out` saying what it did, or why it could not. Returns the exit status: 0,
/// or [`EXIT_NOT_RUN`] on failure.
pub fn install(dest: &Path, mut out: impl Write) -> u8 {
    let (code, line) = match copy_self(dest) {
        Ok(installed) => (0, installed.to_string()),
        Err(e) => (
            EXIT_NOT_RUN,
            format!("could not install flotilla as {}: {e}", dest.display()),
        ),
    };
    let _ =
        writeln!(out, "{}", Record::system(now_ms(), line).to_line()).and_then(|()| out.flush());
    code
}

/// The copy itself: [`std::env::current_exe`] to `dest`, atomically.
pub fn copy_self(dest: &Path) -> io::Result<Installed> {
    let from = std::env::current_exe()?;
    let name = dest.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not name a file", dest.display()),
        )
    })?;
    let dir = match dest.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);

    let copied = (|| {
        let mut source = File::open(&from)?;
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o700)
            .open(&tmp)?;
        let bytes = io::copy(&mut source, &mut file)?;
        // Set explicitly: the mode given to open is cut by the umask.
        file.set_permissions(Permissions::from_mode(0o755))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, dest)?;
        Ok(bytes)
    })();
    let bytes = match copied {
        Ok(bytes) => bytes,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    // Makes the rename itself durable; some file systems cannot sync a directory, and the
    // binary is in place either way.
    let _ = File::open(dir).and_then(|d| d.sync_all());
    Ok(Installed {
        from,
        to: dest.to_path_buf(),
        bytes,
    })
}
