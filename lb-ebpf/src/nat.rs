//! DNAT/SNAT rewrites, incremental checksums (RFC 1624) and the RST reply.
//!
//! Checksum words are used exactly as loaded from the packet (network byte
//! order in a native integer): one's-complement sums do not depend on byte
//! order, so no swapping is needed.
//!
//! # Full and partial L4 checksums
//!
//! A TCP or UDP packet that the kernel itself sends through a device with tx
//! checksum offload (every veth by default, so every pod's packets) is
//! CHECKSUM_PARTIAL: its check field holds only the *seed*, the folded,
//! uncomplemented sum of the pseudo-header (addresses, protocol, L4 length).
//! Whoever finally transmits it (a NIC, or the stack in software for a device
//! without the offload) sums the L4 header and payload onto the seed. The same
//! holds for packets that GRO merged (`tcp_gro_complete`). A veth hands such
//! skbs on unchanged, so both XDP hooks see seeds: native XDP on a veth (the
//! skb becomes an `xdp_buff`, and an `XDP_PASS` keeps its state) and generic
//! XDP on any device. Packets from a wire carry full checksums.
//!
//! The two need different updates. For a full checksum, RFC 1624:
//! `HC' = ~(~HC + ~m + m')` for every changed word `m`. For a seed, only the
//! pseudo-header words count, and without the complements:
//! `S' = S + ~m + m'` for each address word; a port is not in the seed (the
//! final sum picks it up from the header). Updating a seed as a full checksum
//! corrupts it, and the corruption only shows once the checksum is completed.
//!
//! TC sees the skb: `bpf_l4_csum_replace` with `BPF_F_PSEUDO_HDR` follows
//! its `ip_summed` (`inet_proto_csum_replace4`), so TC needs nothing here
//! (its IPv4 header checksum, which no `ip_summed` concerns, is computed as
//! `bpf_l3_csum_replace` would: `ctx.rs`). An
//! XDP program sees only bytes; no kfunc exposes `ip_summed` (the
//! `bpf_xdp_metadata_rx_*` kfuncs of 6.18 give the hash, timestamp and VLAN
//! tag only, and only in native mode). So [`classify`] reads the bytes:
//!
//! - UDP with checksum 0 has none, and keeps 0.
//! - A check field different from the seed of the packet as it arrived (the
//!   pseudo-header sum, a handful of additions) is a full checksum. This is
//!   the common path: one comparison more than before.
//! - A check field equal to that seed is a seed, or a full checksum that
//!   happens to equal it (1 in 65,536 full packets; the same segment would
//!   then collide again on every retransmission). The segment is verified as
//!   a full checksum ([`sum_segment`]: `bpf_csum_diff` over 512- and 64-byte chunks,
//!   then words, at most [`VERIFY_MAX`] bytes): if it verifies, it is
//!   full, else a seed. The bytes of a seed that also verifies (1 in 65,536
//!   seeds) are identical to those of a colliding full checksum; no rule can
//!   tell them apart, and this one treats them as full. Either way 1 in 65,536
//!   packets of one kind is mangled: with this rule, seeds (which verify by
//!   chance) rather than full checksums (which collide by chance). Where seeds
//!   are most of the traffic (an XDP hook on a pod's veth) the other rule
//!   would mangle fewer packets; where they are rare (a NIC) this one does.
//! - A seed-valued check on a segment longer than [`VERIFY_MAX`] (9,216
//!   bytes) is taken for a seed unverified (counted: `pass_csum_unverified`).
//!   Native XDP frames of a program without frags support are shorter than a
//!   page; in generic XDP the longer ones are GSO or GRO packets, which are
//!   always partial, while a full checksum would need an MTU above 9,216 and
//!   a 1 in 65,536 collision.
//!
//! A UDP seed is never 0 (the folded sum of a non-zero pseudo-header), and an
//! updated seed stays non-zero, so "no checksum" is never confused with it.
//!
//! A packet with a seed is never redirected (see `main.rs`): a redirected
//! frame leaves native XDP as an `xdp_frame`, which has no checksum state, so
//! the seed would reach the receiver as if it were a full checksum. In generic
//! XDP the skb keeps its state either way, but the program cannot tell the two
//! modes apart. So a seed is updated as a seed and handed to the stack
//! (`pass_csum_partial`), which completes it in software or hands it to the
//! offload, exactly as for the pod's own packets.

use aya_ebpf::helpers::bpf_csum_diff;
use lb_common::reason;

use crate::{
    ctx::{Ctx, ptr_at},
    parse::{IP_OFF, L4_OFF, Packet, TCP_ACK, TCP_RST},
};

/// What the L4 check field of a packet holds, and so how it is updated.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum L4Csum {
    /// A full checksum (or, in TC, whatever the skb says: the helpers know).
    Full,
    /// UDP checksum 0: no checksum; stays 0.
    None,
    /// A CHECKSUM_PARTIAL seed, the full-checksum reading ruled out.
    Seed,
    /// A seed-valued check on a segment too long to verify, taken for a seed.
    SeedUnverified,
}

impl L4Csum {
    #[inline(always)]
    pub fn is_seed(self) -> bool {
        matches!(self, L4Csum::Seed | L4Csum::SeedUnverified)
    }

    /// The reason counted when a packet with this checksum is handed to the
    /// stack instead of being redirected.
    #[inline(always)]
    pub fn pass_reason(self) -> u32 {
        if self == L4Csum::SeedUnverified {
            reason::PASS_CSUM_UNVERIFIED
        } else {
            reason::PASS_CSUM_PARTIAL
        }
    }
}

#[inline(always)]
pub fn fold(mut s: u64) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// New checksum after a 32-bit field changed from `old` to `new`.
#[inline(always)]
pub fn csum_update4(hc: u16, old: u32, new: u32) -> u16 {
    let o = !old;
    let s = (!hc) as u64
        + (o & 0xffff) as u64
        + (o >> 16) as u64
        + (new & 0xffff) as u64
        + (new >> 16) as u64;
    !fold(s)
}

/// New checksum after a 16-bit field changed from `old` to `new`.
#[inline(always)]
pub fn csum_update2(hc: u16, old: u16, new: u16) -> u16 {
    let s = (!hc) as u64 + (!old) as u64 + new as u64;
    !fold(s)
}

/// New seed after a 32-bit pseudo-header field (an address) changed from
/// `old` to `new`: the sum moves by `new - old`, with no complements. A
/// non-zero seed stays non-zero.
#[inline(always)]
pub fn seed_update4(seed: u16, old: u32, new: u32) -> u16 {
    let o = !old;
    fold(
        seed as u64
            + (o & 0xffff) as u64
            + (o >> 16) as u64
            + (new & 0xffff) as u64
            + (new >> 16) as u64,
    )
}

/// The seed of a packet: the folded, uncomplemented pseudo-header sum of
/// addresses, protocol and L4 length (`len`, host order), as the kernel
/// writes it into the check field of a CHECKSUM_PARTIAL packet
/// (`~tcp_v4_check(len, saddr, daddr, 0)`, `udp4_hwcsum`). Never 0.
#[inline(always)]
pub fn pseudo_sum(saddr: u32, daddr: u32, proto: u8, len: u16) -> u16 {
    fold(
        (saddr & 0xffff) as u64
            + (saddr >> 16) as u64
            + (daddr & 0xffff) as u64
            + (daddr >> 16) as u64
            + (proto as u16).to_be() as u64
            + len.to_be() as u64,
    )
}

/// Longest L4 segment whose checksum [`classify`] verifies: a 9,000-byte MTU
/// fits.
pub const VERIFY_MAX: usize = 9216;

/// The L4 length (IPv4 total length - 20) read again from the packet, with a
/// volatile load, and cut to 14 bits (more than [`VERIFY_MAX`]).
///
/// For the verifier's sake: a step of [`sum_segment`] that starts from this
/// fresh value looks the same on every way out of the previous step's loop,
/// so the verifier checks it once, not once per way out (which multiplied to
/// some 800,000 verified instructions, and 2 s to load, against 40,000 and
/// 0.1 s this way). Nothing writes the packet meanwhile, so the value is the
/// one `classify` started from.
#[inline(always)]
fn fresh_len<C: Ctx>(ctx: &C) -> Option<usize> {
    let t: *const u16 = ptr_at(ctx, IP_OFF + 2)?;
    let tot = u16::from_be(unsafe { core::ptr::read_volatile(t) }) as usize;
    Some(tot.wrapping_sub(20) & 0x3fff)
}

/// Adds to `*sum` the sums of `count` (at most `MAX`) `N`-byte chunks, from
/// `done` bytes into the segment on: `bpf_csum_diff` for big chunks, a
/// 4-byte load for `N == 4`. `None` past the frame's end.
#[inline(always)]
fn sum_chunks<C: Ctx, const N: usize, const MAX: usize>(
    ctx: &C,
    done: usize,
    count: usize,
    sum: &mut u64,
) -> Option<()> {
    let base = ctx.data() + L4_OFF + done;
    let end = ctx.data_end();
    // Hidden from LLVM, which knows `count <= MAX` where the caller checked
    // the length and would drop the `i < MAX` test: the verifier then bounds
    // the loop by what it derives for `count` (5.10's and 6.1's: 127 rounds of 512
    // bytes for a 16-bit length, past the 64 KiB it allows a packet
    // pointer's offset: "invalid access to packet, off=65058 size=512").
    let count = crate::opaque(count);
    let mut i = 0;
    while i < MAX && i < count {
        let p = base + i * N;
        // Hidden from LLVM, which would otherwise rewrite the check as a
        // compare against `end + 1`: the verifier refuses arithmetic on the
        // packet's end.
        if crate::opaque(p + N) > end {
            return None;
        }
        if N == 4 {
            *sum += unsafe { *(p as *const u32) } as u64;
        } else {
            let s = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, N as u32, 0) };
            if s < 0 {
                return None;
            }
            *sum += s as u64 & 0xffff_ffff;
        }
        i += 1;
    }
    Some(())
}

/// One's-complement sum (unfolded) of the `len` bytes at `L4_OFF`, an odd
/// last byte padded with zero; `None` if longer than [`VERIFY_MAX`] (or past
/// the end of the frame, which `parse` rules out). `bpf_csum_diff` over 512-byte chunks, then
/// 64-byte ones, then 4-byte words and the last 0 to 3 bytes: every loop is
/// bounded by a constant, and each access is checked against the frame's end.
/// The loops stay short (at most 18, 7 and 15 rounds): a 127-round word loop
/// passed 6.18's verifier but not 6.1's ("the sequence of 8193 jumps is too
/// complex"). Measured (plain test
/// runs): a 512-byte `bpf_csum_diff` about 22 ns, a word about 1 ns; a
/// 64-byte `bpf_csum_diff` costs about as much as the 16 words it replaces.
#[inline(always)]
fn sum_segment<C: Ctx>(ctx: &C, len: usize) -> Option<u64> {
    if len > VERIFY_MAX {
        return None;
    }
    let mut sum = 0u64;
    sum_chunks::<C, 512, { VERIFY_MAX / 512 }>(ctx, 0, len / 512, &mut sum)?;
    let len = fresh_len(ctx)?;
    sum_chunks::<C, 64, 7>(ctx, len & !511, (len & 511) / 64, &mut sum)?;
    let len = fresh_len(ctx)?;
    sum_chunks::<C, 4, 15>(ctx, len & !63, (len & 63) / 4, &mut sum)?;
    let len = fresh_len(ctx)?;
    let p = ctx.data() + L4_OFF + (len & !3);
    let end = ctx.data_end();
    if len & 2 != 0 {
        if p + 2 > end {
            return None;
        }
        sum += unsafe { *(p as *const u16) } as u64;
    }
    if len & 1 != 0 {
        let b = p + (len & 2);
        if b + 1 > end {
            return None;
        }
        // The last byte is the high-order byte of a zero-padded word: in
        // the native (little-endian) load order, the low byte.
        sum += u16::from_ne_bytes([unsafe { *(b as *const u8) }, 0]) as u64;
    }
    Some(sum)
}

/// What the L4 check field of `p` holds, from the bytes alone (XDP); see the
/// module docs.
#[inline(always)]
pub fn classify<C: Ctx>(ctx: &C, p: &Packet) -> L4Csum {
    let c: *const u16 = match ptr_at(ctx, p.l4_csum) {
        Some(c) => c,
        None => return L4Csum::Full,
    };
    let c = unsafe { *c };
    let udp = p.is_udp();
    let len = p.tot_len.wrapping_sub(20);
    let seed = pseudo_sum(p.saddr, p.daddr, p.proto, len);
    if let Some(r) = first_test(c, udp, seed) {
        return r;
    }
    // The sender completes the checksum before it fragments (ip_do_fragment
    // calls skb_checksum_help): a first fragment holds a full checksum of
    // the whole datagram, which the fragment alone cannot verify.
    if p.frag != crate::parse::FRAG_NONE {
        return L4Csum::Full;
    }
    if udp {
        // The kernel seeds a UDP datagram that fills its IP payload.
        let ul: *const u16 = match ptr_at(ctx, L4_OFF + 4) {
            Some(u) => u,
            None => return L4Csum::Full,
        };
        if u16::from_be(unsafe { *ul }) != len {
            return L4Csum::Full;
        }
    }
    match sum_segment(ctx, len as usize) {
        Some(s) if fold(s + seed as u64) == 0xffff => L4Csum::Full,
        Some(_) => L4Csum::Seed,
        None => L4Csum::SeedUnverified,
    }
}

/// Whether the L4 check field at `l4_csum` of a packet (not a fragment;
/// addresses, protocol and IPv4 total length as given) is a full checksum by
/// [`classify`]'s first test alone: set (for UDP) and different from the
/// packet's seed. `false` also where `classify` would go on to verify.
#[inline(always)]
pub fn plainly_full<C: Ctx>(
    ctx: &C,
    l4_csum: usize,
    saddr: u32,
    daddr: u32,
    proto: u8,
    tot_len: u16,
) -> bool {
    match ptr_at::<C, u16>(ctx, l4_csum) {
        Some(c) => plainly_full_field(unsafe { *c }, saddr, daddr, proto, tot_len),
        None => false,
    }
}

/// [`plainly_full`] of the check field's value `c`.
#[inline(always)]
pub fn plainly_full_field(c: u16, saddr: u32, daddr: u32, proto: u8, tot_len: u16) -> bool {
    let seed = pseudo_sum(saddr, daddr, proto, tot_len.wrapping_sub(20));
    matches!(
        first_test(c, proto == lb_common::proto::UDP, seed),
        Some(L4Csum::Full)
    )
}

/// [`classify`]'s first test, on the check field `c`: `None` (UDP without a
/// checksum), `Full` (not the packet's `seed`), or no answer yet (it looks
/// like a seed).
#[inline(always)]
fn first_test(c: u16, udp: bool, seed: u16) -> Option<L4Csum> {
    if udp && c == 0 {
        Some(L4Csum::None)
    } else if c != seed {
        Some(L4Csum::Full)
    } else {
        None
    }
}

/// A computed UDP checksum of 0 is sent as 0xffff (0 means "none").
#[inline(always)]
pub fn l4_fix(c: u16, udp: bool) -> u16 {
    if udp && c == 0 { 0xffff } else { c }
}

/// Client -> VIP becomes client -> backend, and the client's source port
/// becomes `sport` unless that is 0 (a flow whose own port collided). Sets
/// `p.csum`.
#[inline(always)]
pub fn dnat<C: Ctx>(ctx: &mut C, p: &mut Packet, ip: u32, port: u16, sport: u16) -> Option<()> {
    let udp = p.is_udp();
    let k = ctx.l4_csum_kind(p);
    p.csum = k;
    ctx.rewrite_addr(IP_OFF + 16, p.daddr, ip, IP_OFF + 10, p.l4_csum, k, udp)?;
    ctx.rewrite_port(L4_OFF + 2, p.dport, port, p.l4_csum, k, udp)?;
    p.daddr = ip;
    p.dport = port;
    if sport != 0 {
        ctx.rewrite_port(L4_OFF, p.sport, sport, p.l4_csum, k, udp)?;
        p.sport = sport;
    }
    Some(())
}

/// Backend -> client becomes VIP -> client, and the destination port goes
/// back to the client's own `dport` unless that is 0 (no rewrite). Sets
/// `p.csum`.
#[inline(always)]
pub fn snat<C: Ctx>(ctx: &mut C, p: &mut Packet, ip: u32, port: u16, dport: u16) -> Option<()> {
    let udp = p.is_udp();
    let k = ctx.l4_csum_kind(p);
    p.csum = k;
    ctx.rewrite_addr(IP_OFF + 12, p.saddr, ip, IP_OFF + 10, p.l4_csum, k, udp)?;
    ctx.rewrite_port(L4_OFF, p.sport, port, p.l4_csum, k, udp)?;
    p.saddr = ip;
    p.sport = port;
    if dport != 0 {
        ctx.rewrite_port(L4_OFF + 2, p.dport, dport, p.l4_csum, k, udp)?;
        p.dport = dport;
    }
    Some(())
}

/// Ethernet + IPv4 + TCP, no options, no payload.
pub const RST_LEN: usize = 54;

/// `s` plus `words` big-endian 16-bit words of `b` from `from`.
#[inline(always)]
pub fn sum_words<const N: usize>(b: &[u8; N], from: usize, words: usize, mut s: u64) -> u64 {
    let mut i = 0;
    while i < words {
        s += u16::from_be_bytes([b[from + 2 * i], b[from + 2 * i + 1]]) as u64;
        i += 1;
    }
    s
}

/// The Ethernet header of an answer at the front of `b`: the MACs of `eth`
/// (the received frame's first 12 bytes) swapped, then `ethertype`.
#[inline(always)]
pub fn put_eth<const N: usize>(b: &mut [u8; N], eth: &[u8; 12], ethertype: u16) {
    let mut i = 0;
    while i < 6 {
        b[i] = eth[6 + i];
        b[6 + i] = eth[i];
        i += 1;
    }
    let t = ethertype.to_be_bytes();
    b[12] = t[0];
    b[13] = t[1];
}

/// The RST|ACK answer to a SYN for a service with no usable backend, as the
/// client would get from a closed port: addresses and ports swapped,
/// `ack = seq + 1 + payload`, IP id 0, DF, TTL 64.
#[inline(always)]
pub fn build_rst(eth: &[u8; 12], p: &Packet) -> [u8; RST_LEN] {
    let mut b = [0u8; RST_LEN];
    b[..6].copy_from_slice(&eth[6..12]);
    b[6..12].copy_from_slice(&eth[..6]);
    b[12] = 0x08;
    // IPv4
    b[14] = 0x45;
    b[16..18].copy_from_slice(&40u16.to_be_bytes());
    b[20] = 0x40; // DF
    b[22] = 64;
    b[23] = 6;
    b[26..30].copy_from_slice(&p.daddr.to_ne_bytes());
    b[30..34].copy_from_slice(&p.saddr.to_ne_bytes());
    let ipc = !fold(sum_words(&b, 14, 10, 0));
    b[24..26].copy_from_slice(&ipc.to_be_bytes());
    // TCP
    b[34..36].copy_from_slice(&p.dport.to_ne_bytes());
    b[36..38].copy_from_slice(&p.sport.to_ne_bytes());
    let ack = u32::from_be(p.seq)
        .wrapping_add(1)
        .wrapping_add(p.payload_len);
    b[42..46].copy_from_slice(&ack.to_be_bytes());
    b[46] = 5 << 4;
    b[47] = TCP_RST | TCP_ACK;
    // Pseudo-header: addresses, protocol, TCP length (20).
    let s = sum_words(&b, 26, 4, 6 + 20);
    let tc = !fold(sum_words(&b, 34, 10, s));
    b[50..52].copy_from_slice(&tc.to_be_bytes());
    b
}
