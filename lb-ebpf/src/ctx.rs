//! What the XDP and TC hooks have in common, and where they differ: packet
//! bounds, rewriting (direct writes vs. checksum helpers) and verdicts.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    helpers::{
        bpf_redirect, bpf_redirect_neigh, bpf_skb_change_head, bpf_skb_change_tail, bpf_xdp_adjust_head,
        bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use core::ffi::c_void;

use lb_common::xdp_iface;

use crate::{
    maps::XDP_IFACES,
    nat::{self, L4Csum},
    parse::Packet,
};

/// A verdict before it is turned into the hook's return code.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    /// Send back out of the ingress interface (the RST reply), as a redirect.
    Bounce,
    /// `bpf_redirect` to this ifindex.
    Redirect(u32),
    /// TC only: `bpf_redirect_neigh` to this ifindex (the kernel resolves
    /// the next hop and its MAC); a drop in XDP, which never makes one.
    RedirectNeigh(u32),
}

pub trait Ctx {
    /// Whether this hook uses the per-CPU flow cache (`flowcache`): XDP,
    /// whose rewrites are plain writes to the bytes.
    const FLOW_CACHE: bool;
    /// Whether this hook can send with `bpf_redirect_neigh` (TC, 5.10+).
    const NEIGH: bool;
    fn data(&self) -> usize;
    fn data_end(&self) -> usize;
    /// Length of the whole frame, which for an skb may extend past `data_end`
    /// (the non-linear part).
    fn frame_len(&self) -> usize;
    fn ifindex(&self) -> u32;
    fn raw(&self) -> *mut c_void;
    /// Whether a redirect from here into `ifindex` is delivered. Native XDP
    /// hands its frame to the target's driver, which may not take XDP frames
    /// (a veth whose peer has no XDP program drops them silently).
    fn can_redirect(&self, ifindex: u32) -> bool;
    /// What the L4 check field of `p` holds (see `nat`'s module docs).
    fn l4_csum_kind(&self, p: &Packet) -> L4Csum;
    /// Replace the 4-byte address at `off` (IPv4 src or dst), fixing the IP
    /// checksum at `ip_csum` and the L4 checksum at `l4_csum` (pseudo-header),
    /// which holds a `kind` checksum.
    #[allow(clippy::too_many_arguments)]
    fn rewrite_addr(
        &mut self,
        off: usize,
        old: u32,
        new: u32,
        ip_csum: usize,
        l4_csum: usize,
        kind: L4Csum,
        udp: bool,
    ) -> Option<()>;
    /// Replace the 4-byte address at `off`, fixing only the IP checksum at
    /// `ip_csum`: a later fragment, which has no L4 header.
    fn rewrite_ip(&mut self, off: usize, old: u32, new: u32, ip_csum: usize) -> Option<()>;
    /// Replace the 2-byte port at `off`, fixing the L4 checksum at `l4_csum`.
    fn rewrite_port(
        &mut self,
        off: usize,
        old: u16,
        new: u16,
        l4_csum: usize,
        kind: L4Csum,
        udp: bool,
    ) -> Option<()>;
    /// IPv6: replace the 4-byte word at `off` (a quarter of an address),
    /// fixing only the L4 checksum at `l4_csum` (pseudo-header; IPv6 has no
    /// header checksum), which holds a `kind` checksum.
    fn rewrite_word6(
        &mut self,
        off: usize,
        old: u32,
        new: u32,
        l4_csum: usize,
        kind: L4Csum,
        udp: bool,
    ) -> Option<()>;
    /// IPv6: what the L4 check field of `p` holds (`v6::classify`).
    fn l4_csum_kind6(&self, p: &crate::v6::Packet6) -> L4Csum;
    /// IPv6: set the MACs and decrement the hop limit (IPv6 header at `ip`)
    /// before a redirect.
    fn route_rewrite6(&mut self, ip: usize, smac: &[u8; 6], dmac: &[u8; 6]) -> Option<()>;
    /// Set the MACs and decrement the TTL (IPv4 header at `ip`) before a redirect.
    fn route_rewrite(&mut self, ip: usize, smac: &[u8; 6], dmac: &[u8; 6]) -> Option<()>;
    /// Shrink or grow the frame to exactly `len` bytes and copy `bytes` over it.
    fn replace<const N: usize>(&mut self, bytes: &[u8; N]) -> Option<()>;
    /// Add `n` bytes in front of the frame; then cut it to `len` bytes.
    fn reframe(&mut self, n: usize, len: usize) -> Option<()>;
    fn ret(&self, v: Verdict) -> u32;
    /// Tail-calls the user-defined selector of service `svc_id`
    /// (`SELECTORS_XDP`/`SELECTORS_TC`, `selector`); returns only if the
    /// slot is empty.
    fn tail_call_selector(&self, svc_id: u32);
}

/// Bounds-checked pointer to a `T` at `off` from the start of the frame.
#[inline(always)]
pub fn ptr_at<C: Ctx, T>(ctx: &C, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    if start + off + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut T)
}

pub struct Xdp<'a>(pub &'a XdpContext);

impl Ctx for Xdp<'_> {
    const FLOW_CACHE: bool = true;
    const NEIGH: bool = false;
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.data_end() - self.data()
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.0.ingress_ifindex() as u32
    }
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.0.ctx as *mut c_void
    }
    #[inline(always)]
    fn can_redirect(&self, ifindex: u32) -> bool {
        let flags = |i: u32| XDP_IFACES.get(i).copied().unwrap_or(0);
        flags(ifindex) & xdp_iface::REDIRECT_TARGET != 0
            || flags(self.ifindex()) & xdp_iface::GENERIC != 0
    }
    #[inline(always)]
    fn l4_csum_kind(&self, p: &Packet) -> L4Csum {
        nat::classify(self, p)
    }
    #[inline(always)]
    fn rewrite_addr(
        &mut self,
        off: usize,
        old: u32,
        new: u32,
        ip_csum: usize,
        l4_csum: usize,
        kind: L4Csum,
        udp: bool,
    ) -> Option<()> {
        let a: *mut u32 = ptr_at(self, off)?;
        let ic: *mut u16 = ptr_at(self, ip_csum)?;
        let lc: *mut u16 = ptr_at(self, l4_csum)?;
        unsafe {
            *a = new;
            *ic = nat::csum_update4(*ic, old, new);
            match kind {
                L4Csum::Full => *lc = nat::l4_fix(nat::csum_update4(*lc, old, new), udp),
                L4Csum::Seed | L4Csum::SeedUnverified => *lc = nat::seed_update4(*lc, old, new),
                L4Csum::None => {}
            }
        }
        Some(())
    }
    #[inline(always)]
    fn rewrite_word6(
        &mut self,
        off: usize,
        old: u32,
        new: u32,
        l4_csum: usize,
        kind: L4Csum,
        udp: bool,
    ) -> Option<()> {
        let a: *mut u32 = ptr_at(self, off)?;
        let lc: *mut u16 = ptr_at(self, l4_csum)?;
        unsafe {
            *a = new;
            match kind {
                L4Csum::Full => *lc = nat::l4_fix(nat::csum_update4(*lc, old, new), udp),
                L4Csum::Seed | L4Csum::SeedUnverified => *lc = nat::seed_update4(*lc, old, new),
                L4Csum::None => {}
            }
        }
        Some(())
    }
    #[inline(always)]
    fn l4_csum_kind6(&self, p: &crate::v6::Packet6) -> L4Csum {
        crate::v6::classify(self, p)
    }
    #[inline(always)]
    fn route_rewrite6(&mut self, ip: usize, smac: &[u8; 6], dmac: &[u8; 6]) -> Option<()> {
        let eth: *mut [u8; 12] = ptr_at(self, 0)?;
        let hop: *mut u8 = ptr_at(self, ip + 7)?;
        unsafe {
            let e = &mut *eth;
            e[..6].copy_from_slice(dmac);
            e[6..].copy_from_slice(smac);
            *hop -= 1;
        }
        Some(())
    }
    #[inline(always)]
    fn rewrite_ip(&mut self, off: usize, old: u32, new: u32, ip_csum: usize) -> Option<()> {
        let a: *mut u32 = ptr_at(self, off)?;
        let ic: *mut u16 = ptr_at(self, ip_csum)?;
        unsafe {
            *a = new;
            *ic = nat::csum_update4(*ic, old, new);
        }
        Some(())
    }
    #[inline(always)]
    fn rewrite_port(
        &mut self,
        off: usize,
        old: u16,
        new: u16,
        l4_csum: usize,
        kind: L4Csum,
        udp: bool,
    ) -> Option<()> {
        let p: *mut u16 = ptr_at(self, off)?;
        let lc: *mut u16 = ptr_at(self, l4_csum)?;
        unsafe {
            *p = new;
            // A port is not part of a seed.
            if kind == L4Csum::Full {
                *lc = nat::l4_fix(nat::csum_update2(*lc, old, new), udp);
            }
        }
        Some(())
    }
    #[inline(always)]
    fn route_rewrite(&mut self, ip: usize, smac: &[u8; 6], dmac: &[u8; 6]) -> Option<()> {
        let eth: *mut [u8; 12] = ptr_at(self, 0)?;
        let ttl: *mut u16 = ptr_at(self, ip + 8)?;
        let ic: *mut u16 = ptr_at(self, ip + 10)?;
        unsafe {
            let e = &mut *eth;
            e[..6].copy_from_slice(dmac);
            e[6..].copy_from_slice(smac);
            let old = *ttl;
            // TTL is the first byte of this word: in the native (LE) load it is the low byte.
            let new = old - 1;
            *ttl = new;
            *ic = nat::csum_update2(*ic, old, new);
        }
        Some(())
    }
    #[inline(always)]
    fn reframe(&mut self, n: usize, len: usize) -> Option<()> {
        if unsafe { bpf_xdp_adjust_head(self.0.ctx, -(n as i32)) } != 0 {
            return None;
        }
        let cur = (self.data_end() - self.data()) as i32;
        if unsafe { bpf_xdp_adjust_tail(self.0.ctx, len as i32 - cur) } != 0 {
            return None;
        }
        Some(())
    }
    #[inline(always)]
    fn replace<const N: usize>(&mut self, bytes: &[u8; N]) -> Option<()> {
        let cur = (self.data_end() - self.data()) as i32;
        if unsafe { bpf_xdp_adjust_tail(self.0.ctx, N as i32 - cur) } != 0 {
            return None;
        }
        let p: *mut [u8; N] = ptr_at(self, 0)?;
        unsafe { *p = *bytes };
        Some(())
    }
    #[inline(always)]
    fn tail_call_selector(&self, svc_id: u32) {
        unsafe { crate::maps::SELECTORS_XDP.tail_call(self.0, svc_id) };
    }
    #[inline(always)]
    fn ret(&self, v: Verdict) -> u32 {
        match v {
            Verdict::Pass => xdp_action::XDP_PASS,
            Verdict::Drop => xdp_action::XDP_DROP,
            // Not XDP_TX: on veth, XDP_TX of a frame that arrived as an skb was
            // counted but never delivered (kernel 6.18); a redirect to the
            // ingress interface is.
            Verdict::Bounce => unsafe { bpf_redirect(self.ifindex(), 0) as u32 },
            Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
            Verdict::RedirectNeigh(_) => xdp_action::XDP_DROP,
        }
    }
}

pub struct Tc<'a>(pub &'a TcContext);

const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

// The IPv4 header checksum in TC, by the arithmetic `bpf_l3_csum_replace`
// does: that helper only rewrites the field (`csum_replace4`/`csum_replace2`,
// include/net/checksum.h) and never reads or changes the skb's checksum
// state, which concerns the L4 checksum alone. These are those two functions
// step by step (32- and 16-bit adds with end-around carry, then the fold), so
// the bytes are the helper's for every input, and a direct write replaces
// its call. The L4 checksum stays with `bpf_l4_csum_replace` (`nat`'s docs).

/// `csum_add`: 32-bit one's complement add.
#[inline(always)]
fn csum_add(a: u32, b: u32) -> u32 {
    let r = a.wrapping_add(b);
    r.wrapping_add((r < b) as u32)
}

/// `csum_fold`: 32 bits folded to 16, complemented.
#[inline(always)]
fn csum_fold(s: u32) -> u16 {
    let r = (s >> 16) + (s & 0xffff);
    !(((r & 0xffff) + (r >> 16)) as u16)
}

/// `csum16_add`: 16-bit one's complement add.
#[inline(always)]
fn csum16_add(a: u16, b: u16) -> u16 {
    let r = a.wrapping_add(b);
    r.wrapping_add((r < b) as u16)
}

/// `csum_replace4(sum, from, to)`: the check field `hc` after a 4-byte word
/// changed from `old` to `new` (all as loaded from the packet).
#[inline(always)]
pub(crate) fn tc_l3_csum4(hc: u16, old: u32, new: u32) -> u16 {
    csum_fold(csum_add(csum_add(!(hc as u32), !old), new))
}

/// `csum_replace2(sum, old, new)`: the same for a 2-byte word.
#[inline(always)]
pub(crate) fn tc_l3_csum2(hc: u16, old: u16, new: u16) -> u16 {
    !csum16_add(csum16_add(!hc, !old), new)
}

impl Ctx for Tc<'_> {
    /// TC rewrites through the checksum helpers, which follow the skb's
    /// checksum state; the cache's one-add rewrite would not.
    const FLOW_CACHE: bool = false;
    const NEIGH: bool = true;
    #[inline(always)]
    fn data(&self) -> usize {
        self.0.data()
    }
    #[inline(always)]
    fn data_end(&self) -> usize {
        self.0.data_end()
    }
    #[inline(always)]
    fn frame_len(&self) -> usize {
        self.0.len() as usize
    }
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        unsafe { (*self.0.skb.skb).ifindex }
    }
    #[inline(always)]
    fn raw(&self) -> *mut c_void {
        self.0.skb.skb as *mut c_void
    }
    /// A TC redirect is an skb transmit, which every device takes.
    #[inline(always)]
    fn can_redirect(&self, _ifindex: u32) -> bool {
        true
    }
    /// Always `Full`: the helpers below read the skb's `ip_summed` and update
    /// a partial checksum as one (`BPF_F_PSEUDO_HDR`), and
    /// `BPF_F_MARK_MANGLED_0` keeps a UDP checksum of 0.
    #[inline(always)]
    fn l4_csum_kind(&self, _p: &Packet) -> L4Csum {
        L4Csum::Full
    }
    #[inline(always)]
    fn rewrite_addr(
        &mut self,
        off: usize,
        old: u32,
        new: u32,
        ip_csum: usize,
        l4_csum: usize,
        _kind: L4Csum,
        udp: bool,
    ) -> Option<()> {
        let mangled = if udp { BPF_F_MARK_MANGLED_0 } else { 0 };
        // The helper handles CHECKSUM_PARTIAL skbs (BPF_F_PSEUDO_HDR).
        self.0
            .l4_csum_replace(
                l4_csum,
                old as u64,
                new as u64,
                BPF_F_PSEUDO_HDR | mangled | 4,
            )
            .ok()?;
        // The helper may have moved the data: pointers only after it.
        let a: *mut u32 = ptr_at(self, off)?;
        let ic: *mut u16 = ptr_at(self, ip_csum)?;
        unsafe {
            *a = new;
            *ic = tc_l3_csum4(*ic, old, new);
        }
        Some(())
    }
    #[inline(always)]
    fn rewrite_word6(
        &mut self,
        off: usize,
        old: u32,
        new: u32,
        l4_csum: usize,
        _kind: L4Csum,
        udp: bool,
    ) -> Option<()> {
        let mangled = if udp { BPF_F_MARK_MANGLED_0 } else { 0 };
        self.0
            .l4_csum_replace(
                l4_csum,
                old as u64,
                new as u64,
                BPF_F_PSEUDO_HDR | mangled | 4,
            )
            .ok()?;
        let a: *mut u32 = ptr_at(self, off)?;
        unsafe { *a = new };
        Some(())
    }
    /// Always `Full`, as for IPv4: the helpers follow the skb.
    #[inline(always)]
    fn l4_csum_kind6(&self, _p: &crate::v6::Packet6) -> L4Csum {
        L4Csum::Full
    }
    #[inline(always)]
    fn route_rewrite6(&mut self, ip: usize, smac: &[u8; 6], dmac: &[u8; 6]) -> Option<()> {
        // Direct writes, as in XDP: no checksum covers these bytes.
        let eth: *mut [u8; 12] = ptr_at(self, 0)?;
        let hop: *mut u8 = ptr_at(self, ip + 7)?;
        unsafe {
            let e = &mut *eth;
            e[..6].copy_from_slice(dmac);
            e[6..].copy_from_slice(smac);
            *hop -= 1;
        }
        Some(())
    }
    #[inline(always)]
    fn rewrite_ip(&mut self, off: usize, old: u32, new: u32, ip_csum: usize) -> Option<()> {
        let a: *mut u32 = ptr_at(self, off)?;
        let ic: *mut u16 = ptr_at(self, ip_csum)?;
        unsafe {
            *a = new;
            *ic = tc_l3_csum4(*ic, old, new);
        }
        Some(())
    }
    #[inline(always)]
    fn rewrite_port(
        &mut self,
        off: usize,
        old: u16,
        new: u16,
        l4_csum: usize,
        _kind: L4Csum,
        udp: bool,
    ) -> Option<()> {
        let mangled = if udp { BPF_F_MARK_MANGLED_0 } else { 0 };
        self.0
            .l4_csum_replace(l4_csum, old as u64, new as u64, mangled | 2)
            .ok()?;
        let p: *mut u16 = ptr_at(self, off)?;
        unsafe { *p = new };
        Some(())
    }
    #[inline(always)]
    fn route_rewrite(&mut self, ip: usize, smac: &[u8; 6], dmac: &[u8; 6]) -> Option<()> {
        // As XDP does: direct writes, the IP checksum by arithmetic (see
        // `tc_l3_csum2`).
        let eth: *mut [u8; 12] = ptr_at(self, 0)?;
        let ttl: *mut u16 = ptr_at(self, ip + 8)?;
        let ic: *mut u16 = ptr_at(self, ip + 10)?;
        unsafe {
            let e = &mut *eth;
            e[..6].copy_from_slice(dmac);
            e[6..].copy_from_slice(smac);
            let old = *ttl;
            // TTL is the first byte of this word: in the native (LE) load it is the low byte.
            let new = old - 1;
            *ttl = new;
            *ic = tc_l3_csum2(*ic, old, new);
        }
        Some(())
    }
    #[inline(always)]
    fn reframe(&mut self, n: usize, len: usize) -> Option<()> {
        if unsafe { bpf_skb_change_head(self.0.skb.skb, n as u32, 0) } != 0 {
            return None;
        }
        if unsafe { bpf_skb_change_tail(self.0.skb.skb, len as u32, 0) } != 0 {
            return None;
        }
        Some(())
    }
    #[inline(always)]
    fn replace<const N: usize>(&mut self, bytes: &[u8; N]) -> Option<()> {
        if unsafe { bpf_skb_change_tail(self.0.skb.skb, N as u32, 0) } != 0 {
            return None;
        }
        self.0.store(0, bytes, 0).ok()
    }
    #[inline(always)]
    fn tail_call_selector(&self, svc_id: u32) {
        unsafe { crate::maps::SELECTORS_TC.tail_call(self.0, svc_id) };
    }
    #[inline(always)]
    fn ret(&self, v: Verdict) -> u32 {
        match v {
            Verdict::Pass => TC_ACT_OK as u32,
            Verdict::Drop => TC_ACT_SHOT as u32,
            // Not XDP_TX: on veth, XDP_TX of a frame that arrived as an skb was
            // counted but never delivered (kernel 6.18); a redirect to the
            // ingress interface is.
            Verdict::Bounce => unsafe { bpf_redirect(self.ifindex(), 0) as u32 },
            Verdict::Redirect(ifindex) => unsafe { bpf_redirect(ifindex, 0) as u32 },
            Verdict::RedirectNeigh(ifindex) => unsafe {
                bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as u32
            },
        }
    }
}
