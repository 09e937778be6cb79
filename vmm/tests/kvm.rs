//! KVM tests of the microVM: real /dev/kvm, real guests. They fail (never
//! skip) when /dev/kvm is missing.

use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use understudy_vmm::loader::{BOOT_INFO_GPA, BOOT_INFO_WORK_DONE, DIRTIER_WORKING_SET_GPA};
use understudy_vmm::memory::MIN_RAM_BYTES;
use understudy_vmm::{
    BootOptions, BuiltinBoot, BuiltinGuest, Console, GuestRam, PAGE_SIZE, RamBacking, RawCode, Vm,
    VmEnd, snapshot,
};

fn require_kvm() {
    if let Err(e) = understudy_vmm::open_kvm() {
        panic!("these tests need /dev/kvm: {e}");
    }
}

fn boot(boot: BuiltinBoot, dirty_logging: bool) -> (Vm, Console) {
    require_kvm();
    let ram = GuestRam::new(32 << 20, RamBacking::Anonymous).unwrap();
    Vm::boot(
        ram,
        &boot.clone(),
        BootOptions {
            boot_record: Some(boot),
            start_paused: false,
            dirty_logging,
        },
    )
    .unwrap()
}

/// Reads console output until a full line satisfying `pred` arrives.
fn read_until(out: &Receiver<u8>, deadline: Duration, pred: impl Fn(&str) -> bool) -> Vec<String> {
    let end = Instant::now() + deadline;
    let mut lines = Vec::new();
    let mut line = Vec::new();
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        match out.recv_timeout(left) {
            Ok(b'\n') => {
                let text = String::from_utf8_lossy(&line).into_owned();
                line.clear();
                let done = pred(&text);
                lines.push(text);
                if done {
                    return lines;
                }
            }
            Ok(b) => line.push(b),
            Err(_) => break,
        }
    }
    panic!("no matching line within {deadline:?}; got {lines:?} and partial {line:?}");
}

#[test]
fn counter_counts() {
    let (vm, console) = boot(BuiltinBoot::counter(5), false);
    let lines = read_until(&console.output, Duration::from_secs(20), |l| l == "count 3");
    assert_eq!(lines, ["count 0", "count 1", "count 2", "count 3"]);
    assert_eq!(vm.stop(), VmEnd::Stopped);
}
