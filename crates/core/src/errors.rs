//! Error text for users: an OS error by its name, and an error with its causes.
//!
//! The daemon answers the CLI with one line of text, so a wrapped `io::Error` is lost
//! unless the line names it: `No space left on device (ENOSPC)` says more to an
//! operator than `... at byte 4194304`, and more to a search engine than `os error 28`.

use std::error::Error;
use std::io;

use rustix::io::Errno;

/// The errno names worth knowing on a storage path. Others print as `os error N`.
const NAMES: &[(Errno, &str)] = &[
    (Errno::PERM, "EPERM"),
    (Errno::NOENT, "ENOENT"),
    (Errno::INTR, "EINTR"),
    (Errno::IO, "EIO"),
    (Errno::NXIO, "ENXIO"),
    (Errno::BADF, "EBADF"),
    (Errno::AGAIN, "EAGAIN"),
    (Errno::NOMEM, "ENOMEM"),
    (Errno::ACCESS, "EACCES"),
    (Errno::BUSY, "EBUSY"),
    (Errno::EXIST, "EEXIST"),
    (Errno::XDEV, "EXDEV"),
    (Errno::NODEV, "ENODEV"),
    (Errno::NOTDIR, "ENOTDIR"),
    (Errno::ISDIR, "EISDIR"),
    (Errno::INVAL, "EINVAL"),
    (Errno::NFILE, "ENFILE"),
    (Errno::MFILE, "EMFILE"),
    (Errno::FBIG, "EFBIG"),
    (Errno::NOSPC, "ENOSPC"),
    (Errno::SPIPE, "ESPIPE"),
    (Errno::ROFS, "EROFS"),
    (Errno::NAMETOOLONG, "ENAMETOOLONG"),
    (Errno::NOLCK, "ENOLCK"),
    (Errno::NOSYS, "ENOSYS"),
    (Errno::LOOP, "ELOOP"),
    (Errno::OVERFLOW, "EOVERFLOW"),
    (Errno::OPNOTSUPP, "EOPNOTSUPP"),
    (Errno::NOTCONN, "ENOTCONN"),
    (Errno::SHUTDOWN, "ESHUTDOWN"),
    (Errno::TIMEDOUT, "ETIMEDOUT"),
    (Errno::STALE, "ESTALE"),
    (Errno::DQUOT, "EDQUOT"),
    (Errno::CANCELED, "ECANCELED"),
];

/// The symbolic name of an OS error number (`ENOSPC`), if it is one we know.
pub fn errno_name(raw: i32) -> Option<&'static str> {
    NAMES.iter().find(|(e, _)| e.raw_os_error() == raw).map(|(_, n)| *n)
}

/// An `io::Error` as a user reads it: `No space left on device (ENOSPC)` for an OS
/// error with a known name, its usual text otherwise.
pub fn io_error_text(e: &io::Error) -> String {
    match (e.raw_os_error(), e.raw_os_error().and_then(errno_name)) {
        (Some(raw), Some(name)) => {
            let text = e.to_string();
            let text = text.strip_suffix(&format!(" (os error {raw})")).unwrap_or(&text).to_string();
            format!("{text} ({name})")
        }
        _ => e.to_string(),
    }
}

/// `e` and each of its causes, joined by `: ` (OS errors by name), for a one-line
/// report that must not lose the cause.
pub fn with_causes(e: &(dyn Error + 'static)) -> String {
    let mut text = one(e);
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = one(c);
        // Some errors print their cause themselves already.
        if !text.ends_with(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        cur = c.source();
    }
    text
}

fn one(e: &(dyn Error + 'static)) -> String {
    match e.downcast_ref::<io::Error>() {
        Some(io) => io_error_text(io),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("pre-writing the log at byte 4096")]
    struct Outer(#[source] io::Error);

    #[test]
    fn os_errors_by_name_with_their_causes() {
        let enospc = io::Error::from(Errno::NOSPC);
        assert_eq!(io_error_text(&enospc), "No space left on device (ENOSPC)");
        assert_eq!(with_causes(&Outer(enospc)), "pre-writing the log at byte 4096: No space left on device (ENOSPC)");
        assert_eq!(io_error_text(&io::Error::other("odd")), "odd");
        assert_eq!(errno_name(108), Some("ESHUTDOWN"));
        assert_eq!(errno_name(4095), None);
    }
}
