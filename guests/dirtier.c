/*
 * dirtier: writes to a working set of params[0] pages starting at 4 MiB at
 * params[1] pages per second (0 = as fast as it can), one 8-byte word per page
 * visit, and prints "work N" (total pages written) every params[2] ms
 * (default 1000). BOOT->work_done carries the same total for benchmarks.
 */
#include "guest.h"

#define WORKING_SET_GPA 0x400000UL
#define PAGE 4096UL
/* Pages written between two synchronous exits (see below). */
#define SYNC_PAGES 64
/* An unclaimed port (the POST diagnostic port): writing it is a cheap exit. */
#define SYNC_PORT 0x80

static u64 seq, cursor;

static void dirty(u64 pages, u64 working_set) {
    while (pages) {
        u64 chunk = pages < SYNC_PAGES ? pages : SYNC_PAGES;
        pages -= chunk;
        while (chunk--) {
            volatile u64 *word =
                (volatile u64 *)(WORKING_SET_GPA + cursor * PAGE + (seq & 511) * 8);
            *word = seq;
            seq++;
            if (++cursor == working_set) cursor = 0;
        }
        /* A synchronous exit every SYNC_PAGES pages: the VMM's deterministic
         * mode delivers interrupts and pauses only at exits, so a guest that
         * computes without one would starve its timer and its checkpoints. */
        outb(SYNC_PORT, 0);
    }
    BOOT->work_done = seq;
}

void guest_main(void) {
    u64 working_set = BOOT->params[0] ? BOOT->params[0] : 256;
    u64 rate = BOOT->params[1];
    u64 report = BOOT->params[2] ? BOOT->params[2] : 1000;
    u64 budget = 0; /* page-milliseconds owed at the configured rate */
    console_init(0);
    irq_init(1 << IRQ_TIMER);
    if (rate == 0) enable_interrupts(); /* the tick handler only bumps ticks */
    u64 last = BOOT->ticks;
    u64 next_report = last + report;
    for (;;) {
        if (rate == 0) {
            dirty(64, working_set);
        } else {
            idle();
            u64 now = BOOT->ticks;
            u64 elapsed = now - last;
            last = now;
            if (elapsed > 100) elapsed = 100; /* no burst after a long stop */
            budget += rate * elapsed;
            dirty(budget / 1000, working_set);
            budget %= 1000;
        }
        if ((i64)(BOOT->ticks - next_report) >= 0) {
            puts("work ");
            put_u64(seq);
            putc('\n');
            next_report = BOOT->ticks + report;
        }
    }
}
