//! Section `maglev`: `lb_agent::datapath::maglev::build` for M = 65537 and 1,000 backends, in
//! this (release) build. No network, no root needed for this part.

use std::net::Ipv4Addr;
use std::time::Instant;

use anyhow::{Result, ensure};
use lb_agent::datapath::maglev::{self, MaglevBackend};

use super::{Opts, Table, check_stop, count, header, median, verdict};

pub const M: u32 = 65_537;
pub const BACKENDS: u32 = 1_000;

pub fn section_maglev(opts: &Opts) -> Result<()> {
    header("3. Maglev table build");
    let backends: Vec<MaglevBackend> = (0..BACKENDS)
        .map(|i| MaglevBackend {
            id: i,
            key: maglev::backend_key(
                Ipv4Addr::new(10, 244, 100 + (i / 250) as u8, 1 + (i % 250) as u8),
                8080,
            ),
            weight: 1,
        })
        .collect();
    // One untimed build to warm caches and the allocator, and to check the table.
    let table = maglev::build(&backends, M)?;
    ensure!(table.len() == M as usize, "table has {} slots", table.len());
    let mut per = vec![0u32; BACKENDS as usize];
    for &id in &table {
        per[id as usize] += 1;
    }
    let (lo, hi) = (
        per.iter().copied().min().unwrap_or(0),
        per.iter().copied().max().unwrap_or(0),
    );
    let mut ms = Vec::with_capacity(opts.maglev_runs);
    for _ in 0..opts.maglev_runs {
        check_stop()?;
        let t = Instant::now();
        let tbl = maglev::build(&backends, M)?;
        let el = t.elapsed();
        std::hint::black_box(&tbl);
        ms.push(el.as_secs_f64() * 1e3);
    }
    let med = median(&ms);
    let mut t = Table::new(&[
        "build",
        "median ms",
        "min ms",
        "max ms",
        "slots per backend",
    ]);
    t.row(vec![
        format!(
            "M = {}, {} backends, weight 1, {} runs",
            count(u64::from(M)),
            count(u64::from(BACKENDS)),
            ms.len()
        ),
        format!("{med:.2}"),
        format!("{:.2}", super::min(&ms)),
        format!("{:.2}", super::max(&ms)),
        format!("{lo}..{hi}"),
    ]);
    print!("{}", t.render());
    verdict(
        "Maglev table, M = 65537, 1,000 backends",
        "< 5 ms",
        format!("{med:.2} ms (median of {})", ms.len()),
        Some(med < 5.0),
    );
    Ok(())
}
