/*
 * counter: prints "count N" (N = 0, 1, 2, ...) on COM1 every params[0]
 * milliseconds (default 50). The count lives in guest RAM, so a guest resumed
 * from a checkpoint carries on from where it was, with no gap and no repeat.
 */
#include "guest.h"

static u64 count;

void guest_main(void) {
    u64 interval = BOOT->params[0] ? BOOT->params[0] : 50;
    console_init(0);
    irq_init(1 << IRQ_TIMER);
    for (;;) {
        puts("count ");
        put_u64(count);
        putc('\n');
        count++;
        BOOT->work_done = count;
        /* Measured from now, not from the last deadline: after a long stop
         * the guest paces itself again instead of printing a burst. */
        u64 next = BOOT->ticks + interval;
        while ((i64)(BOOT->ticks - next) < 0) idle();
    }
}
