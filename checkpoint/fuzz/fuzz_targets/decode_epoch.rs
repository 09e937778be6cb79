//! Fuzzes the epoch decoder, which reads bytes from the network: any input
//! must give an error or a staged epoch, never a panic, hang or huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use understudy_checkpoint::epoch::fuzzing::decode_arbitrary;

fuzz_target!(|data: &[u8]| {
    decode_arbitrary(data);
});
