//! lbctl's pieces: opening the pinned state with plain errors, the views of
//! each command, and table formatting. Compiled into the `lbctl` binary only.

pub mod grpc;
pub mod selector;
pub mod status;
pub mod table;
pub mod view;

use std::path::Path;

use anyhow::{Result, anyhow};
use lb_agent::datapath::MapReader;

/// Opens the maps pinned under `pin`. Turns the usual failures into one
/// plain sentence: nothing pinned there, not allowed to read it, or a pin
/// directory that another user can write (`lb_agent::datapath::pin`).
pub fn open(pin: &Path) -> Result<MapReader> {
    let shown = pin.display();
    let missing =
        || anyhow!("no rpclb state at {shown}: is the agent running, or is --pin-path right?");
    let denied = || {
        anyhow!(
            "permission denied reading {shown}: lbctl reads BPF maps, run it as root (or with CAP_BPF)"
        )
    };
    match std::fs::metadata(pin) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(anyhow!("{shown} is not a directory: is --pin-path right?")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => return Err(denied()),
        Err(e) => return Err(anyhow!("{shown}: {e}")),
    }
    // What another user could have pinned there is not reported as the node's state.
    lb_agent::datapath::pin::check(pin)?;
    MapReader::open_pinned(pin).map_err(|e| match os_error(&e) {
        Some(libc::ENOENT) => missing(),
        Some(libc::EACCES) | Some(libc::EPERM) => denied(),
        _ => anyhow!(e).context(format!("reading the maps pinned at {shown}")),
    })
}

/// The OS error code at the bottom of an error chain, if any.
pub fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(x) = cur {
        if let Some(io) = x.downcast_ref::<std::io::Error>()
            && let Some(code) = io.raw_os_error()
        {
            return Some(code);
        }
        cur = x.source();
    }
    None
}
