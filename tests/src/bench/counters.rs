//! Section 6: what one traffic-counter update costs: a per-CPU entry against a shared
//! entry with atomic adds, on one CPU and on two CPUs at once (the shared entry's cache
//! line then moves between them on every update).
//!
//! Three tiny XDP programs, assembled here like the sink: `return XDP_DROP`; look up entry
//! `key` of a per-CPU array and add 1 and 154 to its first two u64 with plain adds; the same
//! on a shared array with BPF_ATOMIC adds (what `lb-ebpf/src/stats.rs` does for
//! `BACKEND_STATS`). Each runs with BPF_PROG_TEST_RUN in plain mode and `repeat`: the frame
//! is never changed nor transmitted, so no namespace is needed. The updates come back to
//! back, so the two-CPU rows are the worst case of one hot counter; the data path touches a
//! counter once per ~200 ns packet.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Barrier;

use anyhow::{Context, Result};

use super::sink::{
    ADD64_IMM, BPF_MAP_CREATE, BPF_MAP_TYPE_ARRAY, CALL, EXIT, HELPER_MAP_LOOKUP, JEQ_IMM,
    LD_IMM64, MOV64_IMM, MOV64_REG, PSEUDO_MAP_FD, ST_W_IMM, XDP_DROP, insn, load_xdp, put32,
    put64, sys_bpf,
};
use super::{Opts, Table, check_stop, header, median, ns, pin_to_cpu};

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_MAP_TYPE_PERCPU_ARRAY: u32 = 6;
/// BPF_STX | BPF_DW | BPF_ATOMIC, with imm = BPF_ADD.
const ATOMIC_ADD64: u8 = 0xdb;
const LDX_DW: u8 = 0x79;
const STX_DW: u8 = 0x7b;
/// Entries of the counter maps (32-byte values, as `Counters`).
const ENTRIES: u32 = 8;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Trivial,
    PerCpu,
    Atomic,
}

fn create_map(map_type: u32) -> Result<OwnedFd> {
    let mut a = [0u8; 72];
    put32(&mut a, 0, map_type);
    put32(&mut a, 4, 4);
    put32(&mut a, 8, 32);
    put32(&mut a, 12, ENTRIES);
    a[28..40].copy_from_slice(b"bench_counts");
    let fd = sys_bpf(BPF_MAP_CREATE, &mut a).context("BPF_MAP_CREATE (bench counters)")?;
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn program(kind: Kind, map_fd: RawFd, key: u32) -> Vec<[u8; 8]> {
    if kind == Kind::Trivial {
        return vec![insn(MOV64_IMM, 0, 0, 0, XDP_DROP), insn(EXIT, 0, 0, 0, 0)];
    }
    let mut p = vec![
        insn(ST_W_IMM, 10, 0, -4, key as i32), // *(u32 *)(r10 - 4) = key
        insn(MOV64_REG, 2, 10, 0, 0),          // r2 = r10
        insn(ADD64_IMM, 2, 0, 0, -4),          // r2 -= 4
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map_fd), // r1 = &map
        insn(0, 0, 0, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP), // r0 = lookup(map, &key)
        insn(JEQ_IMM, 0, 0, 0, 0),              // if r0 == NULL goto out (patched)
    ];
    for (off, add) in [(0i16, 1i32), (8, 154)] {
        if kind == Kind::Atomic {
            p.push(insn(MOV64_IMM, 1, 0, 0, add)); // r1 = add
            p.push(insn(ATOMIC_ADD64, 0, 1, off, 0)); // lock *(u64 *)(r0 + off) += r1
        } else {
            p.push(insn(LDX_DW, 1, 0, off, 0)); // r1 = *(u64 *)(r0 + off)
            p.push(insn(ADD64_IMM, 1, 0, 0, add)); // r1 += add
            p.push(insn(STX_DW, 0, 1, off, 0)); // *(u64 *)(r0 + off) = r1
        }
    }
    let out = p.len();
    p[6][2..4].copy_from_slice(&((out - 7) as i16).to_le_bytes());
    p.push(insn(MOV64_IMM, 0, 0, 0, XDP_DROP));
    p.push(insn(EXIT, 0, 0, 0, 0));
    p
}

/// One BPF_PROG_TEST_RUN of `repeat` runs; the kernel's mean ns per run (whole ns).
fn run(prog: &OwnedFd, frame: &[u8], repeat: u32) -> Result<f64> {
    let mut a = [0u8; 80];
    put32(&mut a, 0, prog.as_raw_fd() as u32);
    put32(&mut a, 8, frame.len() as u32);
    put64(&mut a, 16, frame.as_ptr() as u64);
    put32(&mut a, 32, repeat);
    sys_bpf(BPF_PROG_TEST_RUN, &mut a).context("BPF_PROG_TEST_RUN (bench counters)")?;
    Ok(u32::from_ne_bytes(a[36..40].try_into().unwrap()) as f64)
}

struct Case {
    what: &'static str,
    kind: Kind,
    /// One key per CPU that runs at once.
    keys: &'static [u32],
}

pub fn section_counters(opts: &Opts) -> Result<()> {
    header("6. Counter update: per-CPU vs shared with atomic adds");
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let percpu = create_map(BPF_MAP_TYPE_PERCPU_ARRAY)?;
    let shared = create_map(BPF_MAP_TYPE_ARRAY)?;
    let load = |kind: Kind, key: u32| {
        let map = if kind == Kind::Atomic {
            &shared
        } else {
            &percpu
        };
        load_xdp(&program(kind, map.as_raw_fd(), key), b"bench_count")
    };
    // Entries are 32 bytes: 1 and 2 share a cache line, 1 and 5 do not.
    let mut cases = vec![
        Case {
            what: "return XDP_DROP (the floor)",
            kind: Kind::Trivial,
            keys: &[1],
        },
        Case {
            what: "per-CPU entry, plain adds, 1 CPU",
            kind: Kind::PerCpu,
            keys: &[1],
        },
        Case {
            what: "shared entry, atomic adds, 1 CPU",
            kind: Kind::Atomic,
            keys: &[1],
        },
    ];
    if cpus >= 2 {
        cases.extend([
            Case {
                what: "per-CPU entry, plain adds, 2 CPUs",
                kind: Kind::PerCpu,
                keys: &[1, 1],
            },
            Case {
                what: "shared entry, atomic adds, 2 CPUs, same entry",
                kind: Kind::Atomic,
                keys: &[1, 1],
            },
            Case {
                what: "shared, atomic, 2 CPUs, neighbour entries (one line)",
                kind: Kind::Atomic,
                keys: &[1, 2],
            },
            Case {
                what: "shared, atomic, 2 CPUs, entries on separate lines",
                kind: Kind::Atomic,
                keys: &[1, 5],
            },
        ]);
    }
    let frame = [0u8; 64];
    let repeat = (opts.repeat * 5).clamp(10_000, 10_000_000);
    let mut rows: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..opts.rounds {
        for (i, c) in cases.iter().enumerate() {
            check_stop()?;
            let progs = c
                .keys
                .iter()
                .map(|&k| load(c.kind, k))
                .collect::<Result<Vec<_>>>()?;
            let start = Barrier::new(progs.len());
            let per_cpu: Vec<f64> = std::thread::scope(|s| {
                let handles: Vec<_> = progs
                    .iter()
                    .enumerate()
                    .map(|(cpu, p)| {
                        let (start, frame) = (&start, &frame);
                        s.spawn(move || {
                            pin_to_cpu(cpu);
                            start.wait();
                            run(p, frame, repeat)
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("bench thread"))
                    .collect::<Result<Vec<f64>>>()
            })?;
            rows[i].push(per_cpu.iter().sum::<f64>() / per_cpu.len() as f64);
        }
    }
    println!(
        "{} runs per BPF_PROG_TEST_RUN, {} rounds interleaved; ns per run as the kernel reports \
         it (whole ns), mean of the CPUs that ran at once",
        super::count(u64::from(repeat)),
        opts.rounds
    );
    let floor = median(&rows[0]);
    let mut t = Table::new(&["case", "ns/run median", "min..max", "minus floor"]);
    for (c, r) in cases.iter().zip(&rows) {
        t.row(vec![
            c.what.into(),
            ns(median(r)),
            format!("{}..{}", ns(super::min(r)), ns(super::max(r))),
            ns(median(r) - floor),
        ]);
    }
    print!("{}", t.render());
    if cpus < 2 {
        println!("one CPU: the two-CPU rows need two");
    }
    Ok(())
}
