//! The one mapping from volume errors to errnos (exhaustive: a new error variant does
//! not compile until it has an errno).

use csv_core::meta::MetaError;
use csv_core::volume::VolumeError;
use fuser::Errno;

/// The errno a FUSE reply carries for `e`.
pub fn errno(e: &VolumeError) -> Errno {
    match e {
        VolumeError::Meta(m) => meta_errno(m),
        VolumeError::Unavailable(_) => Errno::EIO,
        VolumeError::Lun(_) => Errno::EIO,
        VolumeError::Fenced => Errno::EIO,
        VolumeError::LockTimeout(_) => Errno::EIO,
        VolumeError::WriteBack(_) => Errno::EIO,
        VolumeError::WriteRevoked(_) => Errno::EPERM,
        VolumeError::WouldBlock => Errno::EAGAIN,
        VolumeError::Stale(_) => Errno::from_i32(libc::ESTALE),
        VolumeError::Invalid(_) => Errno::EINVAL,
        VolumeError::Geometry(_) => Errno::EIO,
    }
}

/// The errno for an operation on an inode the kernel names by number after a path lookup
/// (getattr, setattr, open). A file removed meanwhile, on this node or another, is ESTALE,
/// not ENOENT: the kernel then walks the path again with `LOOKUP_REVAL` and opens or stats
/// what the name means now (the file renamed over it on another node, say), or reports
/// ENOENT if nothing.
pub fn inode_errno(e: &VolumeError) -> Errno {
    match e {
        VolumeError::Meta(MetaError::NotFound) => Errno::from_i32(libc::ESTALE),
        e => errno(e),
    }
}

fn meta_errno(m: &MetaError) -> Errno {
    let code = match m {
        MetaError::NotFound => libc::ENOENT,
        MetaError::Exists => libc::EEXIST,
        MetaError::NotDir => libc::ENOTDIR,
        MetaError::IsDir => libc::EISDIR,
        MetaError::NotEmpty => libc::ENOTEMPTY,
        MetaError::NameTooLong => libc::ENAMETOOLONG,
        MetaError::InvalidName => libc::EINVAL,
        MetaError::NoSpace => libc::ENOSPC,
        MetaError::FileTooBig => libc::EFBIG,
        MetaError::TooManyLinks => libc::EMLINK,
        MetaError::Invalid(_) => libc::EINVAL,
        MetaError::NoAttr => libc::ENODATA,
        MetaError::NotPermitted => libc::EPERM,
        MetaError::Fenced { .. } => libc::EIO,
        MetaError::LockBusy { .. } => libc::EAGAIN,
        MetaError::SessionExpired(_) => libc::EIO,
        MetaError::NoVolume => libc::EIO,
    };
    Errno::from_i32(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_errors_map_to_the_posix_errno() {
        let e = |m| errno(&VolumeError::Meta(m)).code();
        assert_eq!(e(MetaError::NotFound), libc::ENOENT);
        assert_eq!(e(MetaError::NameTooLong), libc::ENAMETOOLONG);
        assert_eq!(e(MetaError::NoSpace), libc::ENOSPC);
        assert_eq!(e(MetaError::FileTooBig), libc::EFBIG);
        assert_eq!(errno(&VolumeError::Fenced).code(), libc::EIO);
        assert_eq!(errno(&VolumeError::Stale(3)).code(), libc::ESTALE);
        let gone = VolumeError::Meta(MetaError::NotFound);
        assert_eq!(inode_errno(&gone).code(), libc::ESTALE);
        assert_eq!(errno(&gone).code(), libc::ENOENT);
        assert_eq!(inode_errno(&VolumeError::Fenced).code(), libc::EIO);
    }
}
