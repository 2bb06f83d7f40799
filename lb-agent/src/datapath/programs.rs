//! The object's two program sets and the choice between them
//! (`--bpf-programs auto|full|compat`).
//!
//! `full` (`rpclb_xdp`, `rpclb_tc`) uses BPF atomic fetch-and-add and
//! compare-and-swap (BPF_ATOMIC with BPF_FETCH / BPF_CMPXCHG, Linux 5.12+)
//! and `bpf_ktime_get_coarse_ns` (5.11+). `compat` (`rpclb_xdp_compat`,
//! `rpclb_tc_compat`) is the same code without them, for older kernels
//! (Debian 11 and Amazon Linux 2 run 5.10); lb-ebpf/src/set.rs says what it
//! gives up. `auto` loads `full` and, when the kernel refuses it (the
//! verifier, or EINVAL from BPF_PROG_LOAD), `compat`, with one WARN line
//! that names the kernel, the set and the reason.

use aya::programs::ProgramError;
use lb_common::prog_names;

use super::DatapathError;

/// `--bpf-programs`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BpfPrograms {
    /// The full set, else the compat set when the kernel refuses it.
    #[default]
    Auto,
    Full,
    Compat,
}

impl std::str::FromStr for BpfPrograms {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(BpfPrograms::Auto),
            "full" => Ok(BpfPrograms::Full),
            "compat" => Ok(BpfPrograms::Compat),
            _ => Err(format!(
                "unknown program set {s:?} (expected auto, full or compat)"
            )),
        }
    }
}

/// A program set of the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramSet {
    Full,
    Compat,
}

impl ProgramSet {
    pub fn as_str(self) -> &'static str {
        match self {
            ProgramSet::Full => "full",
            ProgramSet::Compat => "compat",
        }
    }

    pub fn xdp(self) -> &'static str {
        match self {
            ProgramSet::Full => prog_names::XDP,
            ProgramSet::Compat => prog_names::XDP_COMPAT,
        }
    }

    pub fn tc(self) -> &'static str {
        match self {
            ProgramSet::Full => prog_names::TC,
            ProgramSet::Compat => prog_names::TC_COMPAT,
        }
    }

    /// The set's IPv6 XDP program (tail-called by [`Self::xdp`]).
    pub fn xdp6(self) -> &'static str {
        match self {
            ProgramSet::Full => prog_names::XDP6,
            ProgramSet::Compat => prog_names::XDP6_COMPAT,
        }
    }

    /// The set's IPv6 TC program (tail-called by [`Self::tc`]).
    pub fn tc6(self) -> &'static str {
        match self {
            ProgramSet::Full => prog_names::TC6,
            ProgramSet::Compat => prog_names::TC6_COMPAT,
        }
    }
}

/// Exactly that set (no fallback).
impl From<ProgramSet> for BpfPrograms {
    fn from(s: ProgramSet) -> Self {
        match s {
            ProgramSet::Full => BpfPrograms::Full,
            ProgramSet::Compat => BpfPrograms::Compat,
        }
    }
}

impl std::fmt::Display for ProgramSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the full set needs that older kernels lack (for messages).
pub const FULL_NEEDS: &str = "Linux 5.12+: BPF atomic fetch-and-add and compare-and-swap, \
     bpf_ktime_get_coarse_ns";

/// A BPF_PROG_LOAD that failed, as the decision sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadFailure {
    /// The syscall's errno, if the kernel answered at all.
    pub errno: Option<i32>,
    /// The verifier's log (may be empty).
    pub log: String,
}

impl LoadFailure {
    pub fn of(e: &ProgramError) -> Self {
        match e {
            ProgramError::LoadError {
                io_error,
                verifier_log,
            } => LoadFailure {
                errno: io_error.raw_os_error(),
                log: verifier_log.to_string(),
            },
            _ => LoadFailure {
                errno: None,
                log: String::new(),
            },
        }
    }

    /// The kernel refused the program itself (the verifier: EINVAL for an
    /// unknown instruction or helper, EACCES or E2BIG for the rest), rather
    /// than the caller (EPERM) or something before the syscall.
    pub fn is_refusal(&self) -> bool {
        matches!(self.errno, Some(libc::EINVAL | libc::EACCES | libc::E2BIG))
    }

    /// The verifier's reason in one line: a known marker of an old kernel
    /// ("BPF_STX uses reserved fields", "invalid func unknown#160"), else
    /// the log's last line that is not a statistic.
    pub fn reason(&self) -> String {
        const MARKERS: &[&str] = &[
            "reserved fields",
            "unknown#",
            "invalid func",
            "unknown opcode",
            "invalid atomic",
        ];
        let lines: Vec<&str> = self
            .log
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let stat = |l: &&&str| {
            ["processed ", "verification time", "stack depth"]
                .iter()
                .any(|p| l.starts_with(p))
        };
        let line = lines
            .iter()
            .find(|l| MARKERS.iter().any(|m| l.contains(m)))
            .or_else(|| lines.iter().rev().find(|l| !stat(l)));
        let errno = match self.errno {
            Some(n) => std::io::Error::from_raw_os_error(n).to_string(),
            None => "no answer".into(),
        };
        match line {
            Some(l) => {
                let mut l = l.to_string();
                if l.len() > 160 {
                    let mut cut = 160;
                    while !l.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    l.truncate(cut);
                    l.push_str("...");
                }
                format!("{errno}: {l}")
            }
            None => errno,
        }
    }
}

/// What follows a failed load of the full set.
#[derive(Debug)]
pub enum AfterFull {
    /// Load the compat set; the string is the WARN line's reason.
    Compat(String),
    /// Stop: the error to report.
    Fail(DatapathError),
}

/// The decision after the full set's program `name` failed to load with
/// `source` (`f`: `LoadFailure::of(&source)`) on kernel `kernel` (`uname
/// -r`), with `--bpf-programs choice`.
pub fn after_full_failed(
    choice: BpfPrograms,
    name: &'static str,
    source: ProgramError,
    f: &LoadFailure,
    kernel: &str,
) -> AfterFull {
    if !f.is_refusal() {
        return AfterFull::Fail(DatapathError::Program {
            name,
            source: Box::new(source),
        });
    }
    match choice {
        BpfPrograms::Auto => AfterFull::Compat(format!(
            "Linux {kernel} refused the full program set ({name}: {}); the full set needs \
             {FULL_NEEDS}; loaded the compat set",
            f.reason()
        )),
        BpfPrograms::Full | BpfPrograms::Compat => AfterFull::Fail(DatapathError::Refused {
            set: ProgramSet::Full.as_str(),
            kernel: kernel.to_string(),
            why: format!("{name}: {}", f.reason()),
            hint: format!(
                "the full set needs {FULL_NEEDS}; --bpf-programs compat (or auto) loads the \
                 set made for older kernels"
            ),
        }),
    }
}

/// The running kernel's release (`uname -r`), or "unknown".
pub fn kernel_release() -> String {
    // SAFETY: uname fills a zeroed utsname; its fields are NUL-terminated.
    unsafe {
        let mut u: libc::utsname = std::mem::zeroed();
        if libc::uname(&mut u) != 0 {
            return "unknown".into();
        }
        std::ffi::CStr::from_ptr(u.release.as_ptr())
            .to_string_lossy()
            .into_owned()
    }
}

/// The kernel's (major, minor), from [`kernel_release`].
pub fn kernel_version() -> Option<(u32, u32)> {
    parse_version(&kernel_release())
}

fn parse_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether this kernel is new enough for the full set (5.12+). Tests use
/// it to skip the full set's runs on older kernels; the agent itself asks
/// the kernel (`auto`), since distributions backport BPF features.
pub fn kernel_has_full_set() -> bool {
    kernel_version().is_some_and(|v| v >= (5, 12))
}

/// Instructions of the object that a kernel before 5.12 (or 5.11) refuses,
/// per program: BPF_ATOMIC other than a plain add (`imm != BPF_ADD`: fetch
/// variants, xchg, cmpxchg) and calls of `bpf_ktime_get_coarse_ns` (helper
/// 160). Used by the tests below, and handy when changing lb-ebpf.
pub mod scan {
    /// `BPF_STX | BPF_ATOMIC | BPF_W` and `... | BPF_DW`.
    const ATOMIC_W: u8 = 0xc3;
    const ATOMIC_DW: u8 = 0xdb;
    /// `BPF_JMP | BPF_CALL`.
    const CALL: u8 = 0x85;
    const BPF_ADD: i32 = 0;
    pub const KTIME_GET_COARSE_NS: i32 = 160;

    /// What a stretch of instructions holds that old kernels refuse.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct Newer {
        /// (instruction index, imm) of atomics other than a plain add.
        pub atomics: Vec<(usize, i32)>,
        /// Instruction indexes of helper 160 calls.
        pub coarse_clock: Vec<usize>,
        pub instructions: usize,
    }

    pub fn instructions(code: &[u8]) -> Newer {
        let mut n = Newer::default();
        for (i, ins) in code.chunks_exact(8).enumerate() {
            let imm = i32::from_le_bytes([ins[4], ins[5], ins[6], ins[7]]);
            let src = ins[1] >> 4;
            match ins[0] {
                ATOMIC_W | ATOMIC_DW if imm != BPF_ADD => n.atomics.push((i, imm)),
                // src 0: a helper (1 is a bpf-to-bpf call, 2 a kfunc).
                CALL if src == 0 && imm == KTIME_GET_COARSE_NS => n.coarse_clock.push(i),
                _ => {}
            }
            n.instructions += 1;
        }
        n
    }

    /// A function's code in a little-endian ELF64 object: (section name,
    /// bytes) for each function symbol, by name.
    pub fn functions(elf: &[u8]) -> Option<Vec<(String, String, &[u8])>> {
        let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
        let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
        let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
        if elf.get(..4)? != b"\x7fELF" || elf[4] != 2 || elf[5] != 1 {
            return None;
        }
        let shoff = u64_at(0x28)? as usize;
        let shentsize = u16_at(0x3a)? as usize;
        let shnum = u16_at(0x3c)? as usize;
        let shstrndx = u16_at(0x3e)? as usize;
        // (name offset, type, offset, size, link, entsize)
        let sec = |i: usize| {
            let b = shoff + i * shentsize;
            Some((
                u32_at(b)? as usize,
                u32_at(b + 4)?,
                u64_at(b + 0x18)? as usize,
                u64_at(b + 0x20)? as usize,
                u32_at(b + 0x28)? as usize,
                u64_at(b + 0x38)? as usize,
            ))
        };
        let cstr = |off: usize| {
            let s = elf.get(off..)?;
            let end = s.iter().position(|&c| c == 0)?;
            std::str::from_utf8(&s[..end]).ok()
        };
        let shstr = sec(shstrndx)?.2;
        let sec_name = |i: usize| cstr(shstr + sec(i)?.0);
        const SHT_SYMTAB: u32 = 2;
        const STT_FUNC: u8 = 2;
        let symtab = (0..shnum).find(|&i| sec(i).is_some_and(|s| s.1 == SHT_SYMTAB))?;
        let (_, _, off, size, link, ent) = sec(symtab)?;
        let strtab = sec(link)?.2;
        let mut out = Vec::new();
        for s in (off..off + size).step_by(ent.max(24)) {
            let info = *elf.get(s + 4)?;
            if info & 0xf != STT_FUNC {
                continue;
            }
            let name = cstr(strtab + u32_at(s)? as usize)?;
            let shndx = u16_at(s + 6)? as usize;
            let value = u64_at(s + 8)? as usize;
            let len = u64_at(s + 16)? as usize;
            let (_, _, soff, ssize, _, _) = sec(shndx)?;
            if value + len > ssize {
                return None;
            }
            let code = elf.get(soff + value..soff + value + len)?;
            out.push((sec_name(shndx)?.to_string(), name.to_string(), code));
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_error(errno: i32, log: &str) -> LoadFailure {
        LoadFailure {
            errno: Some(errno),
            log: log.into(),
        }
    }

    #[test]
    fn choices_parse() {
        assert_eq!("auto".parse(), Ok(BpfPrograms::Auto));
        assert_eq!("full".parse(), Ok(BpfPrograms::Full));
        assert_eq!("compat".parse(), Ok(BpfPrograms::Compat));
        assert!("fast".parse::<BpfPrograms>().is_err());
        assert_eq!(ProgramSet::Compat.xdp(), "rpclb_xdp_compat");
        assert_eq!(ProgramSet::Full.tc(), "rpclb_tc");
    }

    #[test]
    fn reasons_name_the_old_kernels_refusal() {
        let f = load_error(
            libc::EINVAL,
            "0: R1=ctx(id=0,off=0,imm=0) R10=fp0\nBPF_STX uses reserved fields\n\
             processed 0 insns (limit 1000000)\n",
        );
        assert!(f.is_refusal());
        assert_eq!(
            f.reason(),
            "Invalid argument (os error 22): BPF_STX uses reserved fields"
        );
        let f = load_error(
            libc::EINVAL,
            "12: (85) call unknown#160\ninvalid func unknown#160\n",
        );
        assert!(f.reason().ends_with("call unknown#160"), "{}", f.reason());
        let f = load_error(
            libc::EACCES,
            "R2 invalid mem access 'inv'\nprocessed 7 insns\n",
        );
        assert!(f.reason().ends_with("R2 invalid mem access 'inv'"));
        assert!(!load_error(libc::EPERM, "").is_refusal());
    }

    /// A 5.10 kernel's answer to the full set, as `LoadFailure::of` reads
    /// aya's `ProgramError::LoadError` (whose log type is aya_obj's).
    fn refusal() -> LoadFailure {
        load_error(
            libc::EINVAL,
            "BPF_STX uses reserved fields\nprocessed 0 insns (limit 1000000)\n",
        )
    }

    #[test]
    fn auto_falls_back_to_compat_when_the_kernel_refuses_full() {
        match after_full_failed(
            BpfPrograms::Auto,
            "rpclb_xdp",
            ProgramError::NotLoaded,
            &refusal(),
            "5.10.0-33-amd64",
        ) {
            AfterFull::Compat(why) => {
                assert!(why.contains("Linux 5.10.0-33-amd64"), "{why}");
                assert!(why.contains("full program set"), "{why}");
                assert!(why.contains("compat"), "{why}");
            }
            AfterFull::Fail(e) => panic!("auto must fall back: {e}"),
        }
    }

    #[test]
    fn full_on_a_kernel_that_refuses_it_is_a_clear_error() {
        match after_full_failed(
            BpfPrograms::Full,
            "rpclb_xdp",
            ProgramError::NotLoaded,
            &refusal(),
            "5.10.0-33-amd64",
        ) {
            AfterFull::Compat(why) => panic!("--bpf-programs full must not fall back: {why}"),
            AfterFull::Fail(e) => {
                assert!(matches!(e, DatapathError::Refused { .. }));
                let msg = e.to_string();
                assert!(msg.contains("5.10.0-33-amd64"), "{msg}");
                assert!(msg.contains("full program set"), "{msg}");
                assert!(msg.contains("Linux 5.12+"), "{msg}");
                assert!(msg.contains("BPF_STX uses reserved fields"), "{msg}");
                assert!(msg.contains("--bpf-programs compat"), "{msg}");
            }
        }
    }

    #[test]
    fn other_failures_do_not_fall_back() {
        let f = load_error(libc::EPERM, "");
        assert!(matches!(
            after_full_failed(
                BpfPrograms::Auto,
                "rpclb_xdp",
                ProgramError::NotLoaded,
                &f,
                "6.1.0"
            ),
            AfterFull::Fail(DatapathError::Program { .. })
        ));
    }

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("5.10.0-33-amd64"), Some((5, 10)));
        assert_eq!(parse_version("6.12.48+deb13-cloud-amd64"), Some((6, 12)));
        assert_eq!(
            parse_version("5.10.240-238.955.amzn2.x86_64"),
            Some((5, 10))
        );
        assert_eq!(parse_version("x"), None);
    }

    /// The compat programs hold nothing that Linux 5.10 refuses; the full
    /// ones do (which shows the scan finds it). Subprograms in `.text`
    /// (bpf-to-bpf calls, `memcpy`, ...) are linked into the programs that
    /// call them: those not generic over the set are shared by both, so they
    /// must be clean too; those monomorphised for `Full` are not checked.
    #[test]
    fn compat_programs_have_no_fetch_atomics_and_no_coarse_clock() {
        let obj = super::super::EBPF_OBJECT;
        let funcs = scan::functions(obj).expect("an ELF64 little-endian eBPF object");
        let find = |name: &str| {
            funcs
                .iter()
                .find(|f| f.1 == name)
                .unwrap_or_else(|| panic!("{name} is not in the object"))
        };
        for set in [ProgramSet::Compat, ProgramSet::Full] {
            for name in [set.xdp(), set.tc(), set.xdp6(), set.tc6()] {
                let n = scan::instructions(find(name).2);
                assert!(n.instructions > 100, "{name}: {n:?}");
                match set {
                    ProgramSet::Compat => {
                        assert_eq!(
                            n.atomics,
                            Vec::<(usize, i32)>::new(),
                            "{name}: fetch/cmpxchg atomics"
                        );
                        assert_eq!(
                            n.coarse_clock,
                            Vec::<usize>::new(),
                            "{name}: bpf_ktime_get_coarse_ns"
                        );
                    }
                    ProgramSet::Full => {
                        assert!(!n.atomics.is_empty(), "{name}: {n:?}");
                        assert!(!n.coarse_clock.is_empty(), "{name}: {n:?}");
                    }
                }
            }
        }
        // A subprogram monomorphised for the full set only (its mangled name
        // names `set::Full`, e.g. `conntrack::first_reply::<Full>`) is linked
        // into the full programs only; every other one must be clean.
        let full_only = |name: &str| name.contains("3set4Full") && !name.contains("Compat");
        for (sec, name, code) in funcs.iter().filter(|f| f.0 == ".text" && !full_only(&f.1)) {
            let n = scan::instructions(code);
            assert_eq!(n.atomics, Vec::<(usize, i32)>::new(), "{sec} {name}");
            assert_eq!(n.coarse_clock, Vec::<usize>::new(), "{sec} {name}");
        }
    }
}
