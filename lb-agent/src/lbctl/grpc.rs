//! `lbctl grpc [SERVICE]`: the gRPC mode per service and backend, from the
//! running agent's `/grpc` endpoint (`lb_agent::grpc_view`). The call rates
//! are lbctl's: it reads `/grpc` twice, `--interval` apart, and divides.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use lb_agent::grpc_view::{GrpcService, GrpcView};

use super::table::{Table, capped, count, left, rate, right};

/// GET http://`agent`/grpc.
pub fn fetch(agent: SocketAddr) -> Result<GrpcView> {
    super::status::get_json(agent, "/grpc", "the agent's gRPC view")
}

/// Two reads `interval` apart, with the rates between them (one read, no
/// rates, for a zero interval); only `service` if given.
pub fn sample(agent: SocketAddr, service: Option<&str>, interval: Duration) -> Result<GrpcView> {
    let first = fetch(agent)?;
    if let Some(s) = service {
        select(&first, s)?;
    }
    let mut v = if interval.is_zero() {
        first
    } else {
        let t0 = Instant::now();
        std::thread::sleep(interval);
        let mut second = fetch(agent)?;
        second.set_rates(&first, t0.elapsed().as_secs_f64());
        second
    };
    if let Some(s) = service {
        v.services = vec![select(&v, s)?];
    }
    Ok(v)
}

/// The service named `spec`: `namespace/name:port`, `namespace/name` when
/// it has one gRPC port, or `VIP:port[/tcp]`.
pub fn select(v: &GrpcView, spec: &str) -> Result<GrpcService> {
    let spec = spec.trim();
    let by_addr = |s: &&GrpcService| {
        s.addr == spec || s.addr.strip_suffix("/tcp") == Some(spec) || s.name == spec
    };
    if let Some(s) = v.services.iter().find(by_addr) {
        return Ok(s.clone());
    }
    let base: Vec<&GrpcService> = v
        .services
        .iter()
        .filter(|s| s.name.rsplit_once(':').is_some_and(|(b, _)| b == spec))
        .collect();
    match base.as_slice() {
        [one] => Ok((*one).clone()),
        [] => {
            let known: Vec<&str> = v.services.iter().map(|s| s.name.as_str()).collect();
            if known.is_empty() {
                bail!("no gRPC service {spec:?}: the agent serves no gRPC-mode service");
            }
            bail!(
                "no gRPC service {spec:?} (the agent's: {})",
                known.join(", ")
            )
        }
        many => bail!(
            "{spec:?} has several gRPC ports; name one: {}",
            many.iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn ms(v: u64) -> String {
    let d = Duration::from_millis(v);
    if v < 10_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        super::table::duration(d)
    }
}

/// One block per service: a line, then its backends.
pub fn table(v: &GrpcView) -> String {
    if v.services.is_empty() {
        return "no gRPC-mode services\n".into();
    }
    let mut out = String::new();
    for (i, s) in v.services.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "{}  {}  calls {}{}  active {}  errors {}",
            s.name,
            s.addr,
            count(s.calls),
            s.rate
                .map(|r| format!(" ({}/s)", rate(r)))
                .unwrap_or_default(),
            count(s.active),
            count(s.errors),
        ));
        match &s.outlier_detection {
            Some(o) => out.push_str(&format!(
                "  outlier ejection: {} failures, {}..{}, max {}%\n",
                o.consecutive_failures,
                ms(o.base_ejection_time.as_millis() as u64),
                ms(o.max_ejection_time.as_millis() as u64),
                o.max_ejection_percent
            )),
            None => out.push_str("  outlier ejection: off\n"),
        }
        let mut t = Table::new(vec![
            capped("BACKEND", 21),
            left("STATE"),
            left("HEALTH"),
            right("WEIGHT"),
            right("ACTIVE"),
            right("CALLS"),
            right("RATE/s"),
            right("ERRORS"),
            left("EJECTED"),
            right("EJECTIONS"),
            right("RETRIES"),
            right("T-RETRIES"),
            right("GOAWAYS"),
            right("ORCA-UTIL"),
            right("ORCA-WEIGHT"),
        ]);
        for b in &s.backends {
            t.row(vec![
                b.backend.clone(),
                b.status.clone(),
                b.health.clone(),
                b.weight.to_string(),
                super::view::with_limit(b.outstanding, b.limit),
                count(b.calls),
                b.rate.map(rate).unwrap_or_else(|| "-".into()),
                count(b.errors),
                if b.ejected_for_ms > 0 {
                    format!("for {}", ms(b.ejected_for_ms))
                } else {
                    "-".into()
                },
                count(b.ejections),
                count(b.retries),
                count(b.transparent_retries),
                count(b.goaways),
                b.orca_utilization
                    .map(|u| format!("{u:.2}"))
                    .unwrap_or_else(|| "-".into()),
                b.orca_weight
                    .map(|w| format!("{w:.1}"))
                    .unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_agent::grpc_view::GrpcBackend;

    fn backend(ip: &str, calls: u64, ejected_for_ms: u64) -> GrpcBackend {
        GrpcBackend {
            backend: format!("{ip}:50051"),
            weight: 1,
            status: "active".into(),
            health: "unchecked".into(),
            outstanding: 2,
            limit: None,
            calls,
            errors: calls / 2,
            codes: Default::default(),
            rate: None,
            ejected_for_ms,
            ejections: u64::from(ejected_for_ms > 0),
            consecutive_failures: 0,
            retries: 3,
            retries_throttled: 0,
            transparent_retries: 1,
            goaways: 4,
            connections: 5,
            orca_utilization: (ejected_for_ms > 0).then_some(0.25),
            orca_weight: (ejected_for_ms > 0).then_some(40.0),
        }
    }

    fn view(calls: u64) -> GrpcView {
        GrpcView {
            services: vec![
                GrpcService {
                    name: "lab/grpc:grpc".into(),
                    addr: "10.96.0.20:50051/tcp".into(),
                    calls,
                    active: 2,
                    errors: calls / 2,
                    codes: Default::default(),
                    rate: None,
                    outlier_detection: Some(lb_api::OutlierDetection {
                        consecutive_failures: 3,
                        base_ejection_time: Duration::from_millis(1500),
                        max_ejection_time: Duration::from_secs(300),
                        max_ejection_percent: 50,
                    }),
                    backends: vec![
                        backend("10.244.1.2", calls, 8200),
                        backend("10.244.2.2", calls, 0),
                    ],
                },
                GrpcService {
                    name: "lab/other:grpc".into(),
                    addr: "10.96.0.21:50051/tcp".into(),
                    calls: 0,
                    active: 0,
                    errors: 0,
                    codes: Default::default(),
                    rate: None,
                    outlier_detection: None,
                    backends: vec![],
                },
            ],
        }
    }

    #[test]
    fn rates_come_from_two_reads() {
        let mut v = view(300);
        v.set_rates(&view(100), 2.0);
        assert_eq!(v.services[0].rate, Some(100.0));
        assert_eq!(v.services[0].backends[1].rate, Some(100.0));
        let t = table(&v);
        assert_eq!(
            t.lines().next().unwrap(),
            "lab/grpc:grpc  10.96.0.20:50051/tcp  calls 300 (100.0/s)  active 2  errors 150  \
             outlier ejection: 3 failures, 1.5s..5m00s, max 50%"
        );
        let row: Vec<&str> = t
            .lines()
            .find(|l| l.starts_with("10.244.1.2:50051"))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(
            row,
            [
                "10.244.1.2:50051",
                "active",
                "unchecked",
                "1",
                "2",
                "300",
                "100.0",
                "150",
                "for",
                "8.2s",
                "1",
                "3",
                "1",
                "4",
                "0.25",
                "40.0"
            ]
        );
        let other: Vec<&str> = t
            .lines()
            .find(|l| l.starts_with("10.244.2.2:50051"))
            .unwrap()
            .split_whitespace()
            .collect();
        assert_eq!(other[other.len() - 2..], ["-", "-"], "no ORCA report");
        assert!(t.contains("lab/other:grpc  10.96.0.21:50051/tcp  calls 0 (0.0/s)  active 0  errors 0  outlier ejection: off"), "{t}");
    }

    #[test]
    fn services_are_found_by_name_base_name_or_address() {
        let v = view(1);
        for spec in [
            "lab/grpc:grpc",
            "lab/grpc",
            "10.96.0.20:50051",
            "10.96.0.20:50051/tcp",
        ] {
            assert_eq!(select(&v, spec).unwrap().name, "lab/grpc:grpc", "{spec}");
        }
        assert_eq!(
            select(&v, "lab/nope").unwrap_err().to_string(),
            "no gRPC service \"lab/nope\" (the agent's: lab/grpc:grpc, lab/other:grpc)"
        );
        assert!(
            select(&GrpcView::default(), "x")
                .unwrap_err()
                .to_string()
                .contains("serves no gRPC-mode service")
        );
    }
}
