//! Measures the WAN links the benchmarks use, as TCP sees them: `cargo run
//! --release -p understudy-bench --bin wan-probe [MBIT RTT_MS]...` (root).

use std::time::Duration;

use anyhow::{Context, Result};
use understudy_bench::wan::{LinkSpec, Wan};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let specs: Vec<LinkSpec> = if args.is_empty() {
        vec![
            LinkSpec::new(1000, Duration::from_millis(1)),
            LinkSpec::new(100, Duration::from_millis(50)),
        ]
    } else {
        args.chunks(2)
            .map(|p| -> Result<LinkSpec> {
                let mbit = p[0].parse().context("MBIT")?;
                let rtt: u64 = p.get(1).context("RTT_MS")?.parse().context("RTT_MS")?;
                Ok(LinkSpec::new(mbit, Duration::from_millis(rtt)))
            })
            .collect::<Result<_>>()?
    };
    for spec in specs {
        let wan = Wan::new(&spec)?;
        let (rtt, mbit) = wan.probe(Duration::from_secs(3))?;
        println!(
            "{}: TCP round trip {:.2} ms, one stream {:.0} Mbit/s",
            spec.name,
            rtt.as_secs_f64() * 1e3,
            mbit
        );
    }
    Ok(())
}
