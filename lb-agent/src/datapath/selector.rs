//! User-defined selectors for the kernel path (docs/policies.md,
//! "User-defined selector"): load a user's object against the pin path,
//! check it against the ABI (`lb_common::selector`), self-test it with
//! BPF_PROG_TEST_RUN, and put its programs in the service's slot of
//! `SELECTORS_XDP`/`SELECTORS_TC`. The writer (`MapWriter`) calls this for
//! a service whose model names a selector, and turns the service's
//! `svc_flags::SELECTOR` on only once it is in place; any failure leaves the
//! service on its built-in algorithm, and is returned (and logged).
//!
//! Who may name what (docs/security.md): `example:NAME` is built in; a bare
//! NAME is `<--selector-dir>/NAME.o`; an absolute path is loaded only when
//! the desired state is the agent's own `--config` file ([`SelectorSource`],
//! [`resolve`]). A path from the controller's stream is refused: the service
//! keeps its algorithm and the refusal is its selector's error.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, PerCpuValues, ProgramArray},
    programs::{Program, ProgramFd, TestRun, TestRunOptions},
};
use lb_api::validate::SelectorRef;
use lb_common::{SelectorArgs, map_names, selector};

/// Where a bare selector NAME is looked for (`--selector-dir`): `NAME.o` in it.
pub const DEFAULT_SELECTOR_DIR: &str = "/var/lib/rpclb/selectors";

/// Where the agent's selectors come from, and who may name a path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SelectorSource {
    /// `--selector-dir`: a bare NAME is `<dir>/NAME.o`.
    pub dir: PathBuf,
    /// Whether a selector may be an absolute path: only when the desired
    /// state is the agent's own `--config` file (the node's admin wrote
    /// it), never from the controller's stream.
    pub paths: bool,
}

impl Default for SelectorSource {
    /// The default directory; paths refused.
    fn default() -> Self {
        SelectorSource {
            dir: DEFAULT_SELECTOR_DIR.into(),
            paths: false,
        }
    }
}

/// The object a selector names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    /// Built into the agent.
    Example(&'static [u8]),
    /// A file on the node.
    File(PathBuf),
}

/// What `name` loads, by who may name what ([`SelectorSource`]).
pub fn resolve(name: &str, from: &SelectorSource) -> Result<Object, SelectorError> {
    let refused = |why: String| SelectorError::Refused {
        source_name: name.to_string(),
        why,
    };
    match lb_api::validate::selector(name).map_err(refused)? {
        SelectorRef::Example(e) if e == lb_api::validate::EXAMPLE_GEO_SELECTOR => {
            Ok(Object::Example(EXAMPLE_GEO_OBJECT))
        }
        SelectorRef::Example(e) => Err(refused(format!("no example {e} in this agent"))),
        SelectorRef::Name(n) => Ok(Object::File(from.dir.join(format!("{n}.o")))),
        SelectorRef::Path(p) if from.paths => Ok(Object::File(p.into())),
        SelectorRef::Path(_) => Err(refused(
            "a path is loaded only from the agent's own --config file; from the controller \
             a selector is example:geo or a NAME (<--selector-dir>/NAME.o)"
                .into(),
        )),
    }
}

/// Refuses an object file that a user other than its owner could have
/// written (the file or its directory writable by group or others): what
/// it holds runs in the kernel path of every flow of the service.
fn check_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    for p in [path, dir] {
        let mode = std::fs::metadata(p)
            .map_err(|e| format!("{}: {e}", p.display()))?
            .permissions()
            .mode();
        // The sticky bit (/tmp) keeps others from replacing the file.
        let sticky_dir = p == dir && mode & 0o1000 != 0;
        if mode & 0o022 != 0 && !sticky_dir {
            return Err(format!(
                "{} is writable by group or others (mode {:o})",
                p.display(),
                mode & 0o7777
            ));
        }
    }
    Ok(())
}

/// One service's selector as `/status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SelectorStatus {
    /// `namespace/name:port`.
    pub service: String,
    /// As the service names it.
    pub selector: String,
    /// `loaded`, or why not (the service uses its built-in algorithm).
    pub state: String,
}

impl SelectorStatus {
    pub const LOADED: &'static str = "loaded";

    pub fn loaded(&self) -> bool {
        self.state == Self::LOADED
    }
}

/// The example selector by client subnet (`lb-ebpf/src/bin/geo-selector.rs`),
/// built with the data path's object; `selector: example:geo`.
pub static EXAMPLE_GEO_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/geo-selector.o"));

/// The example's geography table, pinned under `<pin path>/selectors/`.
pub const GEO_MAP: &str = lb_common::geo::MAP;

/// Where the maps of selector objects that are not the data path's are
/// pinned (by name).
pub fn maps_dir(pin: &Path) -> PathBuf {
    pin.join("selectors")
}

#[derive(Debug, thiserror::Error)]
pub enum SelectorError {
    #[error("selector {source_name}: cannot read {path}: {error}")]
    Read {
        source_name: String,
        path: String,
        error: std::io::Error,
    },
    #[error("selector {source_name}: refused: {why}")]
    Refused { source_name: String, why: String },
    #[error("selector {source_name}: loading the object: {error}")]
    Load {
        source_name: String,
        error: Box<aya::EbpfError>,
    },
    #[error("selector {source_name}: not of the selector ABI: {why}")]
    Abi { source_name: String, why: String },
    #[error("selector {source_name}: program {program}: {error}")]
    Program {
        source_name: String,
        program: String,
        error: Box<aya::programs::ProgramError>,
    },
    #[error("selector {source_name}: map {map}: {error}")]
    Map {
        source_name: String,
        map: &'static str,
        error: Box<aya::maps::MapError>,
    },
    #[error("selector {source_name}: self-test failed: {why}")]
    SelfTest { source_name: String, why: String },
}

/// A selector in place: its object stays loaded while it serves.
pub struct Installed {
    /// As the service names it (`example:geo`, a NAME or a path).
    pub source: String,
    _ebpf: Ebpf,
}

/// Loads, checks and self-tests the selector `source` (`example:geo`, a
/// NAME or a path, as [`resolve`] allows from `from`), then puts it in
/// service `svc_id`'s slots. `n` is the service's candidate count, for the
/// self-test.
pub fn install(
    pin: &Path,
    source: &str,
    from: &SelectorSource,
    svc_id: u32,
    n: u32,
) -> Result<Installed, SelectorError> {
    let sn = || source.to_string();
    let bytes: std::borrow::Cow<[u8]> = match resolve(source, from)? {
        Object::Example(b) => b.into(),
        Object::File(path) => {
            let read = |error| SelectorError::Read {
                source_name: sn(),
                path: path.display().to_string(),
                error,
            };
            let bytes = std::fs::read(&path).map_err(read)?;
            check_mode(&path).map_err(|why| SelectorError::Refused {
                source_name: sn(),
                why,
            })?;
            bytes.into()
        }
    };
    let dir = maps_dir(pin);
    std::fs::create_dir_all(&dir).map_err(|error| SelectorError::Read {
        source_name: source.to_string(),
        path: dir.display().to_string(),
        error,
    })?;
    let mut loader = EbpfLoader::new();
    loader.default_map_pin_directory(&dir);
    // The data path's maps by name: the very same maps.
    let ours: Vec<(&str, PathBuf)> = map_names::ALL
        .iter()
        .chain(map_names::SELECTOR_MAPS)
        .map(|&m| (m, pin.join(m)))
        .collect();
    for (m, p) in &ours {
        loader.map_pin_path(m, p.as_path());
    }
    let mut ebpf = loader.load(&bytes).map_err(|e| SelectorError::Load {
        source_name: sn(),
        error: Box::new(e),
    })?;
    let abi = |why: String| SelectorError::Abi {
        source_name: sn(),
        why,
    };
    // The arguments map, of the ABI's shape, and the data path's own.
    let args_map = ebpf
        .map(map_names::SELECTOR_ARGS)
        .ok_or_else(|| abi(format!("it has no map {}", map_names::SELECTOR_ARGS)))?;
    PerCpuArray::<_, SelectorArgs>::try_from(args_map).map_err(|e| {
        abi(format!(
            "{}: {e} (expected a per-CPU array of {}-byte SelectorArgs)",
            map_names::SELECTOR_ARGS,
            size_of::<SelectorArgs>()
        ))
    })?;
    // One XDP and one TC program, nothing else.
    let mut xdp = None;
    let mut tc = None;
    for (name, p) in ebpf.programs() {
        match p {
            Program::Xdp(_) if xdp.is_none() => xdp = Some(name.to_string()),
            Program::SchedClassifier(_) if tc.is_none() => tc = Some(name.to_string()),
            _ => {
                return Err(abi(format!(
                    "program {name} ({:?}): expected exactly one XDP and one TC (classifier) program",
                    p.prog_type()
                )));
            }
        }
    }
    let (Some(xdp), Some(tc)) = (xdp, tc) else {
        return Err(abi(
            "expected one XDP and one TC (classifier) program".into()
        ));
    };
    let perr = |program: &str, e: aya::programs::ProgramError| SelectorError::Program {
        source_name: sn(),
        program: program.to_string(),
        error: Box::new(e),
    };
    let xdp_fd = match ebpf.program_mut(&xdp) {
        Some(Program::Xdp(x)) => {
            x.load().map_err(|e| perr(&xdp, e))?;
            x.fd().map_err(|e| perr(&xdp, e))?.try_clone()
        }
        _ => unreachable!("checked above"),
    }
    .map_err(|e| perr(&xdp, e.into()))?;
    let tc_fd = match ebpf.program_mut(&tc) {
        Some(Program::SchedClassifier(c)) => {
            c.load().map_err(|e| perr(&tc, e))?;
            c.fd().map_err(|e| perr(&tc, e))?.try_clone()
        }
        _ => unreachable!("checked above"),
    }
    .map_err(|e| perr(&tc, e.into()))?;
    self_test(pin, &mut ebpf, &xdp, &tc, svc_id, n).map_err(|why| SelectorError::SelfTest {
        source_name: sn(),
        why,
    })?;
    put(pin, svc_id, Some((&xdp_fd, &tc_fd))).map_err(|(map, e)| SelectorError::Map {
        source_name: sn(),
        map,
        error: Box::new(e),
    })?;
    Ok(Installed {
        source: source.to_string(),
        _ebpf: ebpf,
    })
}

/// Puts programs in (or, `None`, clears) service `svc_id`'s slots.
pub fn put(
    pin: &Path,
    svc_id: u32,
    progs: Option<(&ProgramFd, &ProgramFd)>,
) -> Result<(), (&'static str, aya::maps::MapError)> {
    for (i, name) in [map_names::SELECTORS_XDP, map_names::SELECTORS_TC]
        .into_iter()
        .enumerate()
    {
        let md = MapData::from_pin(pin.join(name)).map_err(|e| (name, e))?;
        let mut arr =
            ProgramArray::try_from(aya::maps::Map::ProgramArray(md)).map_err(|e| (name, e))?;
        match progs {
            Some((x, t)) => arr
                .set(svc_id, if i == 0 { x } else { t }, 0)
                .map_err(|e| (name, e))?,
            None => match arr.clear_index(&svc_id) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err((name, e)),
            },
        }
    }
    Ok(())
}

/// A 54-byte IPv4/TCP SYN to nowhere in particular: the self-test's frame.
fn test_frame() -> [u8; 54] {
    let mut f = [0u8; 54];
    f[12] = 0x08; // IPv4
    f[14] = 0x45;
    f[17] = 40; // total length
    f[22] = 64; // TTL
    f[23] = 6; // TCP
    f[26..30].copy_from_slice(&[192, 0, 2, 1]);
    f[30..34].copy_from_slice(&[192, 0, 2, 2]);
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&80u16.to_be_bytes());
    f[46] = 0x50;
    f[47] = 0x02; // SYN
    f
}

/// Runs each program once on a call in progress (state `ASKED`, return
/// index `RET_SELF_TEST`, where no program is): it must answer (an index
/// below `n`, or -1), set `ANSWERED`, and pass the packet.
fn self_test(
    pin: &Path,
    ebpf: &mut Ebpf,
    xdp: &str,
    tc: &str,
    svc_id: u32,
    n: u32,
) -> Result<(), String> {
    let md = MapData::from_pin(pin.join(map_names::SELECTOR_ARGS)).map_err(|e| e.to_string())?;
    let mut args: PerCpuArray<MapData, SelectorArgs> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(md)).map_err(|e| e.to_string())?;
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e.to_string())?;
    let asked = SelectorArgs {
        state: selector::ASKED,
        version: selector::VERSION,
        svc_id,
        ret: selector::RET_SELF_TEST,
        saddr: u32::from_ne_bytes([192, 0, 2, 1]),
        daddr: u32::from_ne_bytes([192, 0, 2, 2]),
        sport: 40000u16.to_be(),
        dport: 80u16.to_be(),
        proto: 6,
        n,
        answer: -1,
        ..Default::default()
    };
    let frame = test_frame();
    let result = (|| {
        for (name, pass) in [(xdp, 2u32), (tc, 0u32)] {
            let all = PerCpuValues::try_from(vec![asked; cpus]).map_err(|e| e.to_string())?;
            args.set(0, all, 0).map_err(|e| e.to_string())?;
            let mut out = vec![0u8; frame.len() + 64];
            let opts = TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..Default::default()
            };
            let r = match ebpf.program_mut(name) {
                Some(Program::Xdp(x)) => x.test_run(opts),
                Some(Program::SchedClassifier(c)) => c.test_run(opts),
                _ => unreachable!("checked by install"),
            }
            .map_err(|e| format!("{name}: BPF_PROG_TEST_RUN: {e}"))?;
            if r.return_value != pass {
                return Err(format!(
                    "{name} returned {} (expected {pass}: its tail call back fails in the self-test)",
                    r.return_value
                ));
            }
            let vals = args.get(&0, 0).map_err(|e| e.to_string())?;
            let answered: Vec<&SelectorArgs> = vals
                .iter()
                .filter(|a| a.state == selector::ANSWERED)
                .collect();
            match answered.as_slice() {
                [a] if a.answer >= -1 && a.answer < n as i32 => {}
                [a] => {
                    return Err(format!(
                        "{name} answered {} (expected -1 or an index below {n})",
                        a.answer
                    ));
                }
                _ => {
                    return Err(format!(
                        "{name} did not answer (is {} pinned by name, as in the SDK?)",
                        map_names::SELECTOR_ARGS
                    ));
                }
            }
        }
        Ok(())
    })();
    // Idle again on every CPU.
    let idle =
        PerCpuValues::try_from(vec![SelectorArgs::default(); cpus]).map_err(|e| e.to_string())?;
    args.set(0, idle, 0).map_err(|e| e.to_string())?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from(paths: bool) -> SelectorSource {
        SelectorSource {
            dir: "/srv/sel".into(),
            paths,
        }
    }

    /// Who may name what: a path over the stream (`paths: false`) is
    /// refused; from the agent's own --config it is the file; a NAME is
    /// `<dir>/NAME.o` from both; the example is built in.
    #[test]
    fn names_resolve_and_a_path_from_the_stream_is_refused() {
        for paths in [false, true] {
            assert_eq!(
                resolve("geo-eu", &from(paths)).unwrap(),
                Object::File("/srv/sel/geo-eu.o".into())
            );
            assert_eq!(
                resolve("example:geo", &from(paths)).unwrap(),
                Object::Example(EXAMPLE_GEO_OBJECT)
            );
        }
        assert_eq!(
            resolve("/opt/geo.o", &from(true)).unwrap(),
            Object::File("/opt/geo.o".into())
        );
        let e = resolve("/opt/geo.o", &from(false)).unwrap_err().to_string();
        assert!(
            e.starts_with("selector /opt/geo.o: refused: a path is loaded only from the agent's own --config file"),
            "{e}"
        );
        assert!(
            !SelectorSource::default().paths,
            "paths are refused unless allowed"
        );
        assert_eq!(
            SelectorSource::default().dir,
            Path::new(DEFAULT_SELECTOR_DIR)
        );
        // Never outside the directory, whatever the stream says.
        for bad in ["../../etc/x", "a/b", "Geo", ""] {
            let e = resolve(bad, &from(false)).unwrap_err().to_string();
            assert!(e.contains("refused"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn files_others_could_write_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("rpclb-sel-mode-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let f = dir.join("x.o");
        std::fs::write(&f, b"x").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(check_mode(&f), Ok(()));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(check_mode(&f).unwrap_err().contains("mode 666"));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o775)).unwrap();
        assert!(check_mode(&f).unwrap_err().contains("mode 775"));
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert_eq!(check_mode(&f), Ok(()), "a sticky directory");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
