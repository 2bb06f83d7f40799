//! ICMP port unreachable for a UDP datagram to a service with no usable
//! backend (as kube-proxy's REJECT), built in place: the frame grows by 28
//! bytes at the front, so the datagram's IPv4 and UDP headers, as received,
//! sit where the ICMP message quotes them; new Ethernet, IPv4 and ICMP headers
//! go in front, and the frame is cut after the quote. No copy on the stack:
//! the callers' frames leave little of the 512 bytes.
//!
//! ```text
//! before: [eth 14][ip 20][udp 8][payload ...]
//! after:  [eth 14][ip 20][icmp 8][ip 20][udp 8]      70 bytes
//! ```
//! The reply goes from the service address to the client, TOS 0xc0
//! (internetwork control, as Linux sends ICMP errors), IP id 0, TTL 64.

use crate::ctx::{Ctx, ptr_at};
use crate::nat::{fold, put_eth};

/// Ethernet + IPv4 + ICMP header + the quoted IPv4 (no options) and UDP headers.
pub const PORT_UNREACHABLE_LEN: usize = 70;
const GROW: usize = 28;
const QUOTE: usize = 42;

/// Rewrites the frame (a UDP datagram, IPv4 header without options at 14)
/// into the ICMP port unreachable answer. `None`: the frame could not be
/// resized; it may be half-written, so drop it.
#[inline(always)]
pub fn port_unreachable<C: Ctx>(ctx: &mut C, saddr: u32, daddr: u32) -> Option<()> {
    ctx.reframe(GROW, PORT_UNREACHABLE_LEN)?;
    // The old Ethernet header is at 28..42 now: swap its MACs into 0..12.
    let old: *mut [u8; 12] = ptr_at(ctx, GROW)?;
    let eth: *mut [u8; 14] = ptr_at(ctx, 0)?;
    let quote: *mut [u16; 14] = ptr_at(ctx, QUOTE)?;
    let ip: *mut [u8; 20] = ptr_at(ctx, 14)?;
    let icmp: *mut [u8; 8] = ptr_at(ctx, 34)?;
    unsafe {
        put_eth(&mut *eth, &*old, 0x0800);
        // IPv4: from the service address (the datagram's destination) to the client.
        let h = &mut *ip;
        let (src, dst) = (daddr.to_ne_bytes(), saddr.to_ne_bytes());
        *h = [
            0x45, 0xc0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0, src[0], src[1], src[2], src[3], dst[0],
            dst[1], dst[2], dst[3],
        ];
        let mut s: u64 = 0x45c0 + 56 + 0x4001;
        s += u16::from_be_bytes([src[0], src[1]]) as u64
            + u16::from_be_bytes([src[2], src[3]]) as u64;
        s += u16::from_be_bytes([dst[0], dst[1]]) as u64
            + u16::from_be_bytes([dst[2], dst[3]]) as u64;
        let c = (!fold(s)).to_be_bytes();
        h[10] = c[0];
        h[11] = c[1];
        // ICMP type 3 code 3; the checksum covers the quote too.
        let q = &*quote;
        let mut s: u64 = 0x0303;
        let mut i = 0;
        while i < 14 {
            s += u16::from_be(q[i]) as u64;
            i += 1;
        }
        let c = (!fold(s)).to_be_bytes();
        *icmp = [3, 3, c[0], c[1], 0, 0, 0, 0];
    }
    Some(())
}
