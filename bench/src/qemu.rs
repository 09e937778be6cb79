//! QEMU as the yardstick: an idle QEMU VM (firmware only, `-accel kvm
//! -nodefaults`) migrated over QMP, its own figures read back from
//! `query-migrate`. The migration bench sets it beside each mode; the
//! pipeline bench beside protecting a VM of the same RAM from cold.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::Children;
use crate::wan::Wan;

/// QEMU's own figures for one migration.
#[derive(Clone, Copy, Debug)]
pub struct Migrated {
    /// `total-time`: from the `migrate` command to completion, ms.
    pub total_ms: f64,
    /// `downtime`: from the guest's stop to the last byte sent, ms (QEMU
    /// counts whole milliseconds).
    pub downtime_ms: f64,
    /// `ram.transferred`, MB.
    pub mb: f64,
}

/// `qemu-system-x86_64` on `PATH`, if installed.
pub fn find() -> Option<String> {
    which("qemu-system-x86_64")
}

/// `cmd`'s path on `PATH`.
fn which(cmd: &str) -> Option<String> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| PathBuf::from(d).join(cmd))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
}

/// One QMP command on a fresh connection to `sock`: its answer.
fn qmp(sock: &Path, command: &str) -> Result<serde_json::Value> {
    let stream = std::os::unix::net::UnixStream::connect(sock)
        .with_context(|| format!("QMP socket {}", sock.display()))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let mut line = String::new();
    reader.read_line(&mut line)?; // greeting
    writer.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    line.clear();
    reader.read_line(&mut line)?;
    writer.write_all(command.as_bytes())?;
    writer.write_all(b"\n")?;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            bail!("QEMU closed its QMP socket before answering {command}");
        }
        let v: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("QMP answered {line:?} to {command}"))?;
        if v.get("return").is_some() || v.get("error").is_some() {
            return Ok(v);
        }
    }
}

/// A QEMU VM of `mib` MiB, paused, its QMP socket at `sock`; with
/// `incoming` (host, port) it waits for a migration there, inside `wan`'s
/// far namespace if given.
fn vm(
    qemu: &str,
    mib: usize,
    sock: &Path,
    incoming: Option<(&str, u16)>,
    wan: Option<&Wan>,
) -> Result<Child> {
    let mut cmd = match wan {
        Some(wan) => wan.command(qemu),
        None => Command::new(qemu),
    };
    cmd.args([
        "-accel",
        "kvm",
        "-m",
        &format!("{mib}M"),
        "-nodefaults",
        "-display",
        "none",
        "-S",
        "-qmp",
        &format!("unix:{},server=on,wait=off", sock.display()),
    ]);
    if let Some((host, port)) = incoming {
        cmd.args(["-incoming", &format!("tcp:{host}:{port}")]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {qemu}"))
}

/// Migrates an idle QEMU VM of `mib` MiB to a second QEMU listening on
/// `port` (at `wan`'s far end, or on loopback), with QEMU's defaults or
/// `tuned` (multifd, zstd, no bandwidth cap); QMP sockets go in `dir`.
pub fn migrate(
    qemu: &str,
    mib: usize,
    dir: &Path,
    tuned: bool,
    wan: Option<&Wan>,
    port: u16,
) -> Result<Migrated> {
    std::fs::create_dir_all(dir)?;
    let (src_sock, dst_sock) = (dir.join("src.qmp"), dir.join("dst.qmp"));
    let host = wan.map_or("127.0.0.1".to_owned(), |w| w.far.to_string());
    // Killed however the migration ends.
    let mut vms = Children(Vec::new());
    vms.0
        .push(vm(qemu, mib, &dst_sock, Some((&host, port)), wan)?);
    vms.0.push(vm(qemu, mib, &src_sock, None, None)?);
    // QEMU has no readiness signal but its socket answering.
    let deadline = Instant::now() + Duration::from_secs(30);
    while qmp(&src_sock, "{\"execute\":\"query-status\"}").is_err()
        || qmp(&dst_sock, "{\"execute\":\"query-status\"}").is_err()
    {
        if Instant::now() > deadline {
            bail!("QEMU's QMP sockets in {} did not answer", dir.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The source runs (firmware only: an idle VM).
    qmp(&src_sock, "{\"execute\":\"cont\"}")?;
    std::thread::sleep(Duration::from_millis(300));
    if tuned {
        let multifd = "{\"execute\":\"migrate-set-capabilities\",\"arguments\":{\"capabilities\":[{\"capability\":\"multifd\",\"state\":true}]}}";
        qmp(&src_sock, multifd)?;
        qmp(&dst_sock, multifd)?;
        qmp(
            &src_sock,
            "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"max-bandwidth\":107374182400,\"multifd-compression\":\"zstd\"}}",
        )?;
        qmp(
            &dst_sock,
            "{\"execute\":\"migrate-set-parameters\",\"arguments\":{\"multifd-compression\":\"zstd\"}}",
        )?;
    }
    let started = qmp(
        &src_sock,
        &format!("{{\"execute\":\"migrate\",\"arguments\":{{\"uri\":\"tcp:{host}:{port}\"}}}}"),
    )?;
    if started.get("error").is_some() {
        bail!("QEMU refused the migration: {started}");
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    let info = loop {
        let v = qmp(&src_sock, "{\"execute\":\"query-migrate\"}")?;
        let status = v["return"]["status"].as_str().unwrap_or("").to_owned();
        if status == "completed" {
            break v["return"].clone();
        }
        if status == "failed" {
            bail!("QEMU's migration failed: {v}");
        }
        if Instant::now() > deadline {
            bail!("QEMU's migration did not end: {v}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let field = |v: &serde_json::Value, name: &str| {
        v.as_f64()
            .with_context(|| format!("query-migrate has no {name}: {info}"))
    };
    Ok(Migrated {
        total_ms: field(&info["total-time"], "total-time")?,
        downtime_ms: field(&info["downtime"], "downtime")?,
        mb: field(&info["ram"]["transferred"], "ram.transferred")? / 1e6,
    })
}
