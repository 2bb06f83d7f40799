//! Who may write the pin directory: the one place the agent and lbctl check it.
//!
//! Everything under the pin path (default `/sys/fs/bpf/rpclb`) is trusted: the agent adopts
//! the maps it finds there (a restart) and lbctl reports them. Whoever can write the
//! directory, or rename it or one of its parents, can swap in their own maps or links and
//! so steer the node's traffic or hide it. Hence:
//!
//! - the agent creates the directory with mode 0700 ([`create`]), and tightens one of its
//!   own that an older agent left at 0755;
//! - the agent and lbctl refuse ([`check`]) a pin directory that a group or other users can
//!   write, or that belongs to another user who is not root; and the same for every
//!   directory above it, except that a world-writable parent with the sticky bit (`/tmp`,
//!   and bpffs' own root, mode 1777) is fine: there, nobody can rename or remove an entry
//!   they do not own, and an entry made in advance by someone else is refused by owner;
//! - a symbolic link on the way must belong to root or to the current user: the link's
//!   owner decides where it points.
//!
//! Pinned objects themselves are created 0600 by the kernel (`bpf_obj_pin`).

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

/// Mode of the pin directory and of the directories the agent makes inside it.
pub const PIN_DIR_MODE: u32 = 0o700;

const S_ISVTX: u32 = 0o1000;
const GROUP_OR_OTHER_WRITE: u32 = 0o022;

/// Why a pin path is refused.
#[derive(Debug, thiserror::Error)]
pub enum PinPathError {
    #[error(
        "refusing pin path {pin}: {dir} is writable by {who} (mode {mode:04o}), so another \
         user could replace the pinned maps and links; only its owner may write it \
         (`chmod go-w {dir}`, after checking what is in it)"
    )]
    Writable {
        pin: PathBuf,
        dir: PathBuf,
        mode: u32,
        who: &'static str,
    },
    #[error(
        "refusing pin path {pin}: {dir} belongs to uid {uid}, neither root nor this user \
         (uid {me}), who could replace what is pinned under it"
    )]
    Owner {
        pin: PathBuf,
        dir: PathBuf,
        uid: u32,
        me: u32,
    },
    #[error("refusing pin path {pin}: {path} is not a directory")]
    NotDirectory { pin: PathBuf, path: PathBuf },
    #[error("pin path {pin}: {path}: {source}")]
    Io {
        pin: PathBuf,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Checks the pin directory `pin` and every directory above it, as the module docs say.
/// A `pin` that does not exist yet is fine if what exists above it is (the agent creates it
/// with [`create`]); lbctl reports a missing directory itself.
pub fn check(pin: &Path) -> Result<(), PinPathError> {
    check_as(pin, euid())
}

/// Creates the pin directory (mode 0700; missing parents 0755, owned by this user) unless it
/// exists, tightens it to 0700 if it is this user's and only looser by read or search bits,
/// then [`check`]s the result. Refuses, changing nothing, a path that [`check`] refuses.
pub fn create(pin: &Path) -> Result<(), PinPathError> {
    let me = euid();
    check_as(pin, me)?;
    let io = |path: &Path| {
        let (pin, path) = (pin.to_path_buf(), path.to_path_buf());
        move |source| PinPathError::Io { pin, path, source }
    };
    if let Some(parent) = pin.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    match std::fs::DirBuilder::new().mode(PIN_DIR_MODE).create(pin) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(pin)(e)),
    }
    // The umask may have cleared bits of 0700 (never added any): set it exactly. A directory
    // that existed is tightened only when it is ours and not group/other-writable (checked).
    let m = std::fs::symlink_metadata(pin).map_err(io(pin))?;
    if m.is_dir() && m.uid() == me && m.mode() & 0o7777 != PIN_DIR_MODE {
        std::fs::set_permissions(pin, std::fs::Permissions::from_mode(PIN_DIR_MODE))
            .map_err(io(pin))?;
    }
    check_as(pin, me)
}

/// Creates `dir` (inside a checked pin directory) with mode 0700 if it is missing.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    match std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PIN_DIR_MODE)
        .create(dir)
    {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
        _ => Ok(()),
    }
}

/// What [`mount_bpffs`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Mounted {
    /// `path` was bpffs already (systemd mounts it on most distributions).
    Already,
    /// A new bpffs is mounted on `path`.
    New,
}

/// Mounts a bpffs on `path` (made if missing) unless one is there already: the one step of
/// the agent's start that needs mount(2), hence CAP_SYS_ADMIN. On Kubernetes a small
/// privileged init container (`lb-agent mount-bpffs`, deploy/30-agent.yaml) runs it with
/// Bidirectional mount propagation, so that the mount reaches the host and the long-running
/// agent container needs neither.
pub fn mount_bpffs(path: &Path) -> std::io::Result<Mounted> {
    const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
    std::fs::create_dir_all(path)?;
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    // SAFETY: statfs fills the zeroed struct; c is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if (st.f_type as u64) & 0xffff_ffff == BPF_FS_MAGIC {
        return Ok(Mounted::Already);
    }
    // SAFETY: valid C strings; no mount data (bpffs' default root mode is 1777, sticky).
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Mounted::New)
}

fn check_as(pin: &Path, me: u32) -> Result<(), PinPathError> {
    let err_io = |path: &Path, source| PinPathError::Io {
        pin: pin.to_path_buf(),
        path: path.to_path_buf(),
        source,
    };
    let abs = if pin.is_absolute() {
        pin.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| err_io(Path::new("."), e))?
            .join(pin)
    };
    // 1. The path as written: each symbolic link on it must be root's or ours.
    let mut cur = PathBuf::new();
    for c in abs.components() {
        cur.push(c);
        if !matches!(c, Component::Normal(_)) {
            continue;
        }
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.file_type().is_symlink() && m.uid() != 0 && m.uid() != me => {
                return Err(PinPathError::Owner {
                    pin: pin.to_path_buf(),
                    dir: cur,
                    uid: m.uid(),
                    me,
                });
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
            Err(e) => return Err(err_io(&cur, e)),
        }
    }
    // 2. The directories it resolves to: the deepest one that exists and all above it.
    let mut existing = abs.as_path();
    let resolved = loop {
        match std::fs::canonicalize(existing) {
            Ok(p) => break p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match existing.parent() {
                Some(p) => existing = p,
                None => return Err(err_io(&abs, e)),
            },
            Err(e) => return Err(err_io(existing, e)),
        }
    };
    let leaf_exists = existing == abs.as_path();
    let mut dir = Some(resolved.as_path());
    let mut first = true;
    while let Some(d) = dir {
        let m = std::fs::metadata(d).map_err(|e| err_io(d, e))?;
        if !m.is_dir() {
            return Err(PinPathError::NotDirectory {
                pin: pin.to_path_buf(),
                path: d.to_path_buf(),
            });
        }
        let mode = m.mode() & 0o7777;
        let is_pin_dir = first && leaf_exists;
        // The pin directory itself never; a parent only with the sticky bit.
        if mode & GROUP_OR_OTHER_WRITE != 0 && (is_pin_dir || mode & S_ISVTX == 0) {
            return Err(PinPathError::Writable {
                pin: pin.to_path_buf(),
                dir: d.to_path_buf(),
                mode,
                who: if mode & 0o002 != 0 {
                    "every user"
                } else {
                    "its group"
                },
            });
        }
        if m.uid() != 0 && m.uid() != me {
            return Err(PinPathError::Owner {
                pin: pin.to_path_buf(),
                dir: d.to_path_buf(),
                uid: m.uid(),
                me,
            });
        }
        first = false;
        dir = d.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{chown, symlink};

    /// A private temp folder (0700, ours), removed on drop.
    struct Tmp(PathBuf);
    impl Tmp {
        fn new(name: &str) -> Tmp {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p = std::env::temp_dir()
                .join(format!("rpclb-pin-test-{}-{n}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::DirBuilder::new().mode(0o700).create(&p).unwrap();
            Tmp(p)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_new_pin_directory_is_0700() {
        let t = Tmp::new("new");
        let pin = t.0.join("a/b/rpclb");
        create(&pin).unwrap();
        assert_eq!(mode_of(&pin), 0o700);
        check(&pin).unwrap();
        // Again: nothing to do.
        create(&pin).unwrap();
        create_private_dir(&pin.join("links")).unwrap();
        assert_eq!(mode_of(&pin.join("links")), 0o700);
    }

    #[test]
    fn a_private_directory_is_accepted_and_an_open_one_refused() {
        let t = Tmp::new("modes");
        let pin = t.0.join("rpclb");
        std::fs::create_dir(&pin).unwrap();
        chmod(&pin, 0o700);
        check(&pin).unwrap();
        // Readable by others, not writable: accepted, and the agent tightens it.
        chmod(&pin, 0o755);
        check(&pin).unwrap();
        create(&pin).unwrap();
        assert_eq!(mode_of(&pin), 0o700);
        for (mode, who) in [
            (0o777, "every user"),
            (0o770, "its group"),
            (0o1777, "every user"),
        ] {
            chmod(&pin, mode);
            let e = check(&pin).unwrap_err();
            assert!(
                matches!(&e, PinPathError::Writable { dir, who: w, .. } if *dir == pin && *w == who),
                "{mode:o}: {e}"
            );
            assert!(e.to_string().contains("chmod go-w"), "{e}");
            // The agent refuses it too, and leaves it as it is.
            assert!(create(&pin).is_err());
            assert_eq!(mode_of(&pin), mode);
        }
    }

    #[test]
    fn every_parent_is_checked() {
        let t = Tmp::new("parents");
        let parent = t.0.join("p");
        let pin = parent.join("q/rpclb");
        std::fs::create_dir_all(&pin).unwrap();
        chmod(&pin, 0o700);
        check(&pin).unwrap();
        // A writable grandparent lets anyone rename the whole chain away.
        chmod(&parent, 0o777);
        let e = check(&pin).unwrap_err();
        assert!(
            matches!(&e, PinPathError::Writable { dir, .. } if *dir == parent),
            "{e}"
        );
        // Also when the pin directory does not exist yet.
        assert!(check(&parent.join("q/missing")).is_err());
        assert!(create(&parent.join("q/missing")).is_err());
        assert!(!parent.join("q/missing").exists());
        // The sticky bit (as /tmp and bpffs' root) makes a world-writable parent safe.
        chmod(&parent, 0o1777);
        check(&pin).unwrap();
        create(&parent.join("q/new")).unwrap();
        chmod(&parent, 0o755);
        check(&pin).unwrap();
    }

    #[test]
    fn a_symlink_is_followed_and_its_target_checked() {
        let t = Tmp::new("link");
        let real = t.0.join("real");
        std::fs::create_dir(&real).unwrap();
        chmod(&real, 0o700);
        let link = t.0.join("link");
        symlink(&real, &link).unwrap();
        check(&link).unwrap();
        chmod(&real, 0o777);
        assert!(matches!(
            check(&link),
            Err(PinPathError::Writable { dir, .. }) if dir == real
        ));
    }

    #[test]
    fn a_file_is_not_a_pin_directory() {
        let t = Tmp::new("file");
        let f = t.0.join("rpclb");
        std::fs::write(&f, "").unwrap();
        assert!(matches!(check(&f), Err(PinPathError::NotDirectory { .. })));
    }

    /// Needs root (chown): a directory, or a link, of another user who is not root.
    #[test]
    fn another_users_directory_or_link_is_refused() {
        if euid() != 0 {
            eprintln!("SKIP: chown needs root");
            return;
        }
        let t = Tmp::new("owner");
        let pin = t.0.join("rpclb");
        std::fs::create_dir(&pin).unwrap();
        chmod(&pin, 0o700);
        chown(&pin, Some(65534), Some(65534)).unwrap();
        let e = check(&pin).unwrap_err();
        assert!(matches!(&e, PinPathError::Owner { uid: 65534, .. }), "{e}");
        assert!(e.to_string().contains("uid 65534"), "{e}");
        // As that user, it is its own directory.
        check_as(&pin, 65534).unwrap();
        // A link owned by another user may be re-pointed by them.
        chown(&pin, Some(0), Some(0)).unwrap();
        let link = t.0.join("link");
        symlink(&pin, &link).unwrap();
        std::os::unix::fs::lchown(&link, Some(65534), Some(65534)).unwrap();
        assert!(matches!(
            check(&link),
            Err(PinPathError::Owner { dir, .. }) if dir == link
        ));
        check(&pin).unwrap();
    }
}
