/* Console, interrupt controller and timer helpers shared by all guests. */
#include "guest.h"

#define COM1 0x3f8
#define PIC1 0x20
#define PIC2 0xa0
#define PIT_CH0 0x40
#define PIT_CMD 0x43
#define PIT_HZ 1193182UL

void console_init(int rx_interrupts) {
    outb(COM1 + 3, 0x03);                    /* 8N1 */
    outb(COM1 + 4, 0x0b);                    /* DTR, RTS, OUT2 (IRQ gate) */
    outb(COM1 + 1, rx_interrupts ? 0x01 : 0); /* IER: received-data interrupt */
}

/* The 8250 the VMM emulates accepts a byte at once; on real hardware this
 * would poll LSR.THRE first. */
void putc(char c) { outb(COM1, (u8)c); }

void puts(const char *s) {
    while (*s) putc(*s++);
}

void put_u64(u64 v) {
    char buf[20];
    int n = 0;
    do {
        buf[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n) putc(buf[--n]);
}

int console_rx_ready(void) { return inb(COM1 + 5) & 0x01; }
u8 console_getc(void) { return inb(COM1); }

void irq_init(u8 irqs_to_unmask) {
    /* Remap the 8259 pair to vectors 0x20-0x2f, cascade on IRQ2. */
    outb(PIC1, 0x11);
    outb(PIC2, 0x11);
    outb(PIC1 + 1, 0x20);
    outb(PIC2 + 1, 0x28);
    outb(PIC1 + 1, 0x04);
    outb(PIC2 + 1, 0x02);
    outb(PIC1 + 1, 0x01);
    outb(PIC2 + 1, 0x01);
    outb(PIC1 + 1, (u8)~irqs_to_unmask);
    outb(PIC2 + 1, 0xff);
    /* PIT channel 0, rate generator, 1 kHz: BOOT->ticks counts milliseconds. */
    u64 divisor = PIT_HZ / 1000;
    outb(PIT_CMD, 0x34);
    outb(PIT_CH0, (u8)(divisor & 0xff));
    outb(PIT_CH0, (u8)(divisor >> 8));
}

void *memset(void *d, int c, u64 n) {
    u8 *p = d;
    while (n--) *p++ = (u8)c;
    return d;
}

void *memcpy(void *d, const void *s, u64 n) {
    u8 *p = d;
    const u8 *q = s;
    while (n--) *p++ = *q++;
    return d;
}

int memcmp(const void *a, const void *b, u64 n) {
    const u8 *p = a, *q = b;
    for (; n; n--, p++, q++)
        if (*p != *q) return *p < *q ? -1 : 1;
    return 0;
}
