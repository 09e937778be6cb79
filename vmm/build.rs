//! Builds the built-in guests in `../guests` with the machine's gcc, ld and objcopy
//! into flat binaries in `OUT_DIR`, which `src/loader.rs` embeds with `include_bytes!`.

use std::path::PathBuf;
use std::process::Command;

const GUESTS: &[&str] = &["counter", "dirtier", "kv"];
const CFLAGS: &[&str] = &[
    "-m64",
    "-ffreestanding",
    "-fno-pic",
    "-fno-pie",
    "-no-pie",
    "-nostdlib",
    "-static",
    "-mno-red-zone",
    // Plain integer code only: KVM's instruction emulator on the development
    // machines cannot run SSE/AVX.
    "-mgeneral-regs-only",
    "-O2",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-builtin",
    "-fno-tree-loop-distribute-patterns",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-Wl,--build-id=none",
    "-Wl,--no-warn-rwx-segments",
];

fn main() {
    // At run time, not env!(): Cargo reuses a compiled build script across
    // checkouts of the same source, so a path baked in may be another one's.
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let src = manifest.join("../guests");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_default());
    println!("cargo:rerun-if-changed={}", src.display());
    let cc = std::env::var("UNDERSTUDY_GUEST_CC").unwrap_or_else(|_| "gcc".to_owned());
    for guest in GUESTS {
        let elf = out.join(format!("{guest}.elf"));
        let bin = out.join(format!("{guest}.bin"));
        run(Command::new(&cc)
            .args(CFLAGS)
            .arg("-T")
            .arg(src.join("link.ld"))
            .arg("-o")
            .arg(&elf)
            .arg(src.join("start.S"))
            .arg(src.join("lib.c"))
            .arg(src.join(format!("{guest}.c"))));
        run(Command::new("objcopy")
            .args(["-O", "binary"])
            .arg(&elf)
            .arg(&bin));
    }
}

fn run(cmd: &mut Command) {
    let shown = format!("{cmd:?}");
    match cmd.status() {
        Ok(status) if status.success() => {}
        Ok(status) => panic!(
            "building the built-in guests failed ({status}): {shown}\n\
             install gcc and binutils (Debian: apt-get install gcc binutils)"
        ),
        Err(err) => panic!(
            "cannot run {shown}: {err}\n\
             install gcc and binutils (Debian: apt-get install gcc binutils)"
        ),
    }
}
