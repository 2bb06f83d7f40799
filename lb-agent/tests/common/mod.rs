//! Shared by the root-only lb-agent tests: the addresses and a frame builder
//! with correct checksums.
#![allow(dead_code)]

use std::net::Ipv4Addr;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const UDP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
pub const FIN: u8 = 0x01;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

fn csum(data: &[u8]) -> u16 {
    let mut s = 0u32;
    for c in data.chunks(2) {
        s += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Ethernet + IPv4 + TCP/UDP with correct checksums.
pub fn frame(
    proto: u8,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend(sport.to_be_bytes());
    l4.extend(dport.to_be_bytes());
    if proto == 6 {
        l4.extend(1000u32.to_be_bytes());
        l4.extend(if flags & ACK != 0 { 1u32 } else { 0 }.to_be_bytes());
        l4.extend([5 << 4, flags]);
        l4.extend(65535u16.to_be_bytes());
        l4.extend([0, 0, 0, 0]);
    } else {
        l4.extend(12u16.to_be_bytes());
        l4.extend([0, 0]);
        l4.extend(*b"ping");
    }
    let mut pseudo = Vec::new();
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend([0, proto]);
    pseudo.extend((l4.len() as u16).to_be_bytes());
    pseudo.extend(&l4);
    let c = csum(&pseudo).to_be_bytes();
    let at = if proto == 6 { 16 } else { 6 };
    l4[at..at + 2].copy_from_slice(&c);
    let mut ip = vec![0x45, 0];
    ip.extend(((20 + l4.len()) as u16).to_be_bytes());
    ip.extend([0, 7, 0x40, 0, 64, proto, 0, 0]);
    ip.extend(src.octets());
    ip.extend(dst.octets());
    let c = csum(&ip).to_be_bytes();
    ip[10..12].copy_from_slice(&c);
    let mut f = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
    f.extend(ip);
    f.extend(l4);
    f
}
