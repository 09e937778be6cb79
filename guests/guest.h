/*
 * Shared definitions for understudy's built-in guests: the boot-info page the
 * VMM fills in, port I/O, the COM1 console, the PIC/PIT timer and idling.
 *
 * Guests run in 64-bit long mode, set up by the VMM (identity-mapped page
 * tables, flat GDT). On the development machines KVM emulates every guest
 * instruction, so this code sticks to plain integer instructions: it is built
 * with -mgeneral-regs-only and never touches SSE/AVX or locked 16-byte ops.
 */
#ifndef UNDERSTUDY_GUEST_H
#define UNDERSTUDY_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long u64;
typedef long i64;

/* Must match vmm/src/loader.rs (BootInfo). */
#define BOOT_INFO_GPA 0x6000UL
#define BOOT_MAGIC 0x544f4f4244545355UL /* "USTDBOOT" */
struct boot_info {
    u64 magic;
    u32 version;
    u32 guest;
    u64 mem_size;
    u64 params[8];
    volatile u64 work_done; /* written by the guest: its progress counter */
    volatile u64 ticks;     /* written by the timer interrupt: milliseconds */
};
#define BOOT ((volatile struct boot_info *)BOOT_INFO_GPA)

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) {
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* Sleep until the next interrupt. Interrupts are enabled only inside this
 * window; "sti; hlt" takes a pending interrupt after hlt starts, so no
 * wake-up is lost between a check and the halt. */
static inline void idle(void) { __asm__ volatile("sti; hlt; cli" ::: "memory"); }

/* Busy loops run with interrupts on: a short "sti; nop; cli" window is not
 * enough under an emulating hypervisor, which injects only at VM entry. */
static inline void enable_interrupts(void) { __asm__ volatile("sti" ::: "memory"); }

#define IRQ_TIMER 0
#define IRQ_COM1 4

void console_init(int rx_interrupts);
void putc(char c);
void puts(const char *s);
void put_u64(u64 v);
int console_rx_ready(void);
u8 console_getc(void);
void irq_init(u8 irqs_to_unmask); /* bit n = unmask IRQ n; PIT at 1 kHz */
void guest_reset(void) __attribute__((noreturn));

void *memset(void *d, int c, u64 n);
void *memcpy(void *d, const void *s, u64 n);
int memcmp(const void *a, const void *b, u64 n);

#endif
