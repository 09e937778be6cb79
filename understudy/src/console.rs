//! Connects a guest console to this process's stdin and stdout.
//!
//! Standard output carries guest bytes only (so the output of two runs can be
//! concatenated and compared); everything understudy itself says goes to
//! standard error.

use std::io::{Read, Write};
use std::thread::JoinHandle;

use crossbeam_channel::Receiver;
use understudy_vmm::ConsoleInput;

/// Copies guest output to stdout until the VM's console closes. Join the
/// returned thread after stopping the VM to flush every byte.
pub fn pump_output(output: Receiver<u8>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let stdout = std::io::stdout();
        let mut buf = Vec::with_capacity(4096);
        while let Ok(first) = output.recv() {
            buf.push(first);
            buf.extend(output.try_iter());
            let mut out = stdout.lock();
            if out.write_all(&buf).and_then(|()| out.flush()).is_err() {
                return; // stdout closed: nobody is reading
            }
            buf.clear();
        }
    })
}

/// Copies stdin to the guest's COM1 until stdin ends or the VM does. The thread
/// is detached: a read blocked on a terminal cannot be interrupted.
pub fn pump_input(input: ConsoleInput) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if !input.send(&buf[..n]) {
                        return;
                    }
                }
            }
        }
    });
}
