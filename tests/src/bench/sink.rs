//! The restoring sink: a tiny XDP program, assembled here, that copies a template frame over
//! every frame it receives and drops it.
//!
//! Why: in live-frames mode BPF_PROG_TEST_RUN copies `data_in` into a page only when its
//! page pool allocates that page. Pages come back to the pool when the receiver drops the
//! frame and are reused with whatever the program left in them: on reuse only the xdp_buff
//! pointers are reset (net/bpf/test_run.c, `reset_ctx`), not the bytes. A DNAT program
//! therefore sees its own output from the second use of a page on (here: only the first 64
//! frames of a run of 100,000 were load-balanced; the rest were the rewritten frame, a
//! conntrack miss and XDP_PASS). The sink on the receiving veth writes the original frame back
//! before the page returns to the pool, so every run of the program sees the frame that was
//! asked for. The sink does the same copy for the baseline, whose frames arrive unchanged, so
//! both sides of a comparison pay the same sink cost.
//!
//! Raw bpf(2) is used because aya loads programs only from ELF objects and the kernel object
//! (lb-ebpf) is not this benchmark's to change. The program is 15 + 2 x (LEN / 8 + tail)
//! instructions, loaded once, attached with BPF_LINK_CREATE (closing the link fd detaches it).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};

pub(super) const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
pub(super) const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_DRV_MODE: u32 = 1 << 2;
pub(super) const XDP_DROP: i32 = 1;
const XDP_PASS: i32 = 2;
/// Template map value size; frames up to this long can be restored.
pub const MAX_LEN: usize = 256;

pub(super) fn sys_bpf(cmd: libc::c_long, attr: &mut [u8]) -> io::Result<RawFd> {
    // SAFETY: attr is a valid, zero-padded bpf_attr of attr.len() bytes; pointers inside it
    // point to buffers that outlive the call.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as RawFd)
}

pub(super) fn put32(a: &mut [u8], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

pub(super) fn put64(a: &mut [u8], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// One `struct bpf_insn`.
pub(super) fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (dst & 0xf) | (src << 4);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

// Opcodes (include/uapi/linux/bpf.h, bpf_common.h).
pub(super) const MOV64_REG: u8 = 0xbf;
pub(super) const MOV64_IMM: u8 = 0xb7;
pub(super) const ADD64_IMM: u8 = 0x07;
pub(super) const LD_IMM64: u8 = 0x18;
pub(super) const ST_W_IMM: u8 = 0x62;
pub(super) const JEQ_IMM: u8 = 0x15;
pub(super) const JGT_REG: u8 = 0x2d;
pub(super) const CALL: u8 = 0x85;
pub(super) const EXIT: u8 = 0x95;
const LDX: [(usize, u8); 4] = [(8, 0x79), (4, 0x61), (2, 0x69), (1, 0x71)];
const STX: [(usize, u8); 4] = [(8, 0x7b), (4, 0x63), (2, 0x6b), (1, 0x73)];
pub(super) const PSEUDO_MAP_FD: u8 = 1;
pub(super) const HELPER_MAP_LOOKUP: i32 = 1;

/// The program: look up the template, check `data + len <= data_end`, copy `len` bytes of
/// the template over the frame, return XDP_DROP.
fn program(map_fd: RawFd, len: usize) -> Vec<[u8; 8]> {
    let mut p = vec![
        insn(MOV64_REG, 6, 1, 0, 0),                 // r6 = ctx
        insn(ST_W_IMM, 10, 0, -4, 0),                // *(u32 *)(r10 - 4) = 0 (key)
        insn(MOV64_REG, 2, 10, 0, 0),                // r2 = r10
        insn(ADD64_IMM, 2, 0, 0, -4),                // r2 -= 4
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map_fd), // r1 = &map
        insn(0, 0, 0, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP), // r0 = lookup(map, &key)
        insn(JEQ_IMM, 0, 0, i16::MAX, 0),       // if r0 == NULL goto drop (patched)
        insn(0x61, 7, 6, 0, 0),                 // r7 = ctx->data
        insn(0x61, 8, 6, 4, 0),                 // r8 = ctx->data_end
        insn(MOV64_REG, 1, 7, 0, 0),            // r1 = r7
        insn(ADD64_IMM, 1, 0, 0, len as i32),   // r1 += len
        insn(JGT_REG, 1, 8, i16::MAX, 0),       // if r1 > r8 goto drop (patched)
    ];
    let mut off = 0usize;
    while off < len {
        let (i, &(size, ldx)) = LDX
            .iter()
            .enumerate()
            .find(|(_, (s, _))| off + s <= len)
            .expect("size 1 always fits");
        p.push(insn(ldx, 1, 0, off as i16, 0)); // r1 = *(size *)(r0 + off)
        p.push(insn(STX[i].1, 7, 1, off as i16, 0)); // *(size *)(r7 + off) = r1
        off += size;
    }
    let drop_at = p.len();
    p.push(insn(MOV64_IMM, 0, 0, 0, XDP_DROP));
    p.push(insn(EXIT, 0, 0, 0, 0));
    for at in [7usize, 12] {
        let rel = (drop_at - at - 1) as i16;
        p[at][2..4].copy_from_slice(&rel.to_le_bytes());
    }
    p
}

/// A loaded restoring sink (program + template map) and the links that attach it.
pub struct Sink {
    len: usize,
    map: OwnedFd,
    prog: OwnedFd,
    links: Vec<OwnedFd>,
}

impl Sink {
    /// Load a sink for frames of exactly `len` bytes (shorter frames are dropped untouched).
    pub fn load(len: usize) -> Result<Sink> {
        if len == 0 || len > MAX_LEN {
            bail!("sink frame length {len} not in 1..={MAX_LEN}");
        }
        let mut a = [0u8; 72];
        put32(&mut a, 0, BPF_MAP_TYPE_ARRAY);
        put32(&mut a, 4, 4);
        put32(&mut a, 8, MAX_LEN as u32);
        put32(&mut a, 12, 1);
        a[28..40].copy_from_slice(b"bench_sink_t"); // map_name
        let fd = sys_bpf(BPF_MAP_CREATE, &mut a).context("BPF_MAP_CREATE (sink template)")?;
        // SAFETY: a fresh fd we own.
        let map = unsafe { OwnedFd::from_raw_fd(fd) };
        let prog = load_xdp(&program(map.as_raw_fd(), len), b"bench_sink")?;
        Ok(Sink {
            len,
            map,
            prog,
            links: Vec::new(),
        })
    }

    /// The frame to write back into every frame received from now on.
    pub fn set_template(&self, frame: &[u8]) -> Result<()> {
        if frame.len() != self.len {
            bail!(
                "sink restores {}-byte frames, got a {}-byte template",
                self.len,
                frame.len()
            );
        }
        let mut value = [0u8; MAX_LEN];
        value[..frame.len()].copy_from_slice(frame);
        let key = 0u32;
        let mut a = [0u8; 32];
        put32(&mut a, 0, self.map.as_raw_fd() as u32);
        put64(&mut a, 8, &key as *const u32 as u64);
        put64(&mut a, 16, value.as_ptr() as u64);
        sys_bpf(BPF_MAP_UPDATE_ELEM, &mut a).context("BPF_MAP_UPDATE_ELEM (sink template)")?;
        Ok(())
    }

    /// Attach natively (driver mode) to `ifindex` of the calling thread's network namespace.
    pub fn attach_here(&mut self, ifindex: u32) -> Result<()> {
        self.links.push(link_xdp(&self.prog, ifindex)?);
        Ok(())
    }
}

/// Load an XDP program from raw instructions.
pub(super) fn load_xdp(insns: &[[u8; 8]], name: &[u8]) -> Result<OwnedFd> {
    let insns: Vec<u8> = insns.concat();
    let license = c"GPL";
    let mut log = vec![0u8; 1 << 16];
    let mut load = |level: u32| {
        let mut a = [0u8; 72];
        put32(&mut a, 0, BPF_PROG_TYPE_XDP);
        put32(&mut a, 4, (insns.len() / 8) as u32);
        put64(&mut a, 8, insns.as_ptr() as u64);
        put64(&mut a, 16, license.as_ptr() as u64);
        if level > 0 {
            put32(&mut a, 24, level);
            put32(&mut a, 28, log.len() as u32);
            put64(&mut a, 32, log.as_mut_ptr() as u64);
        }
        let n = name.len().min(15);
        a[48..48 + n].copy_from_slice(&name[..n]); // prog_name
        put32(&mut a, 68, BPF_XDP); // expected_attach_type
        sys_bpf(BPF_PROG_LOAD, &mut a)
    };
    match load(0) {
        // SAFETY: a fresh fd we own.
        Ok(fd) => Ok(unsafe { OwnedFd::from_raw_fd(fd) }),
        Err(e) => {
            let _ = load(1);
            let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
            bail!(
                "BPF_PROG_LOAD ({}): {e}\n{}",
                String::from_utf8_lossy(name),
                String::from_utf8_lossy(&log[..end])
            );
        }
    }
}

/// Attach `prog` natively to `ifindex` of the calling thread's namespace; closing the returned
/// link fd detaches it.
fn link_xdp(prog: &OwnedFd, ifindex: u32) -> Result<OwnedFd> {
    let mut a = [0u8; 16];
    put32(&mut a, 0, prog.as_raw_fd() as u32);
    put32(&mut a, 4, ifindex);
    put32(&mut a, 8, BPF_XDP);
    put32(&mut a, 12, XDP_FLAGS_DRV_MODE);
    let fd = sys_bpf(BPF_LINK_CREATE, &mut a)
        .with_context(|| format!("BPF_LINK_CREATE (XDP native, ifindex {ifindex})"))?;
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `return XDP_PASS`: the control for the lab section, to tell what native XDP on a veth costs
/// by itself from what the load balancer costs.
pub struct PassProg {
    prog: OwnedFd,
}

impl PassProg {
    pub fn load() -> Result<PassProg> {
        let insns = [insn(MOV64_IMM, 0, 0, 0, XDP_PASS), insn(EXIT, 0, 0, 0, 0)];
        Ok(PassProg {
            prog: load_xdp(&insns, b"bench_pass")?,
        })
    }

    /// Attach to `ifindex` of the calling thread's namespace; drop the link to detach.
    pub fn attach_here(&self, ifindex: u32) -> Result<OwnedFd> {
        link_xdp(&self.prog, ifindex)
    }
}
