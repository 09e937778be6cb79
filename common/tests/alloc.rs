//! `keep_freed_memory` in a process of its own (no test harness: the setting
//! must come before any thread allocates, as in the daemons' `main`).

#![allow(clippy::expect_used)] // a test that fails should stop loudly

use std::sync::atomic::AtomicBool;

/// Pages from `at` for `len` bytes the kernel has memory for (whole pages
/// inside the range), and how many whole pages there are.
fn resident_pages(at: *const u8, len: usize) -> (usize, usize) {
    let page = 4096;
    let start = (at as usize).next_multiple_of(page);
    let end = (at as usize + len) / page * page;
    let pages = (end - start) / page;
    let mut present = vec![0u8; pages];
    // SAFETY: the range lies inside the caller's allocation, page aligned;
    // `present` has one byte per page.
    let rc = unsafe {
        libc::mincore(
            start as *mut libc::c_void,
            end - start,
            present.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    (present.iter().filter(|&&b| b & 1 == 1).count(), pages)
}

fn main() {
    assert!(
        understudy_common::alloc::keep_freed_memory(),
        "glibc refused a setting"
    );
    // A chunk-sized buffer written and freed on one thread; one of the same
    // size allocated on another must be memory the process already has.
    // glibc's defaults give fresh memory: a mapping of its own (over the
    // mmap threshold), or the top of the other thread's arena. (The arena
    // setting's effect, across threads that live on, is the pipeline
    // bench's: see `alloc`'s module doc.)
    std::thread::spawn(|| drop(vec![1u8; 1 << 20]))
        .join()
        .expect("thread");
    let (resident, pages) = std::thread::spawn(|| {
        let buf: Vec<u8> = Vec::with_capacity(1 << 20);
        resident_pages(buf.as_ptr(), buf.capacity())
    })
    .join()
    .expect("thread");
    assert_eq!(
        resident, pages,
        "a freed chunk-sized buffer was not reused: {resident} of {pages} pages of the new one are resident"
    );
    println!("test a_buffer_freed_on_one_thread_is_reused_on_another ... ok");

    // The heap warmed ahead, as a backup does while it waits for its primary:
    // buffers of a frame's size allocated after it, on another thread, well
    // past the heap's peak so far, are all memory the process already has.
    let warmed = std::thread::spawn(|| {
        understudy_common::alloc::warm_heap(16 << 20, &AtomicBool::new(false))
    })
    .join()
    .expect("thread");
    assert_eq!(warmed, 16 << 20);
    let (resident, pages) = std::thread::spawn(|| {
        let frames: Vec<Vec<u8>> = (0..48).map(|_| Vec::with_capacity(258 << 10)).collect();
        frames.iter().fold((0, 0), |(r, p), f| {
            let (fr, fp) = resident_pages(f.as_ptr(), f.capacity());
            (r + fr, p + fp)
        })
    })
    .join()
    .expect("thread");
    assert_eq!(
        resident, pages,
        "the warmed heap was not there: {resident} of {pages} pages of 12 MiB of new buffers are resident"
    );
    // A primary that says Hello stops it before it touches anything more.
    assert_eq!(
        understudy_common::alloc::warm_heap(16 << 20, &AtomicBool::new(true)),
        0
    );
    println!("test a_warmed_heap_serves_the_next_buffers_without_faults ... ok");
}
