/*
 * Entry point of every built-in guest. The VMM enters here in 64-bit mode
 * with paging on (identity map), interrupts off and RSP at the stack top.
 * This file builds the IDT (exceptions -> report and reset, vector 0x20 the
 * 1 kHz PIT tick, 0x24 COM1), then calls guest_main().
 */
    .set BOOT_TICKS, 0x6000 + 96
    .set STACK_TOP, 0x80000

    .section .text.start, "ax"
    .code64
    .globl _start
_start:
    cli
    mov $STACK_TOP, %rsp
    lea idt_table(%rip), %rdi
    xor %ecx, %ecx
1:  lea exception_handler(%rip), %rax
    cmp $32, %ecx
    jb 2f
    lea irq_handler(%rip), %rax
    cmp $0x20, %ecx
    jne 2f
    lea timer_handler(%rip), %rax
2:  mov %ax, (%rdi)            /* offset 15:0 */
    movw $0x08, 2(%rdi)        /* code selector */
    movw $0x8e00, 4(%rdi)      /* present, DPL 0, 64-bit interrupt gate */
    shr $16, %rax
    mov %ax, 6(%rdi)           /* offset 31:16 */
    shr $16, %rax
    mov %eax, 8(%rdi)          /* offset 63:32 */
    movl $0, 12(%rdi)
    add $16, %rdi
    inc %ecx
    cmp $256, %ecx
    jb 1b
    lidt idt_descriptor(%rip)
    call guest_main
    jmp guest_reset

    .text
timer_handler:
    incq BOOT_TICKS
    push %rax
    mov $0x20, %al
    out %al, $0x20             /* EOI */
    pop %rax
    iretq

/* Any other PIC interrupt (COM1 data ready): acknowledge; the main loop polls. */
irq_handler:
    push %rax
    mov $0x20, %al
    out %al, $0xa0
    out %al, $0x20
    pop %rax
    iretq

/* A CPU exception is a guest bug: say so on the console and reset the VM. */
exception_handler:
    lea exception_message(%rip), %rsi
    mov $0x3f8, %dx
3:  movb (%rsi), %al
    test %al, %al
    jz guest_reset
    out %al, %dx
    inc %rsi
    jmp 3b

    .globl guest_reset
guest_reset:
    mov $0xfe, %al
    out %al, $0x64             /* i8042: pulse CPU reset; the VMM ends the VM */
4:  hlt
    jmp 4b

    .section .rodata
exception_message:
    .asciz "GUEST EXCEPTION\n"
    .align 16
idt_descriptor:
    .word 256 * 16 - 1
    .quad idt_table

    .bss
    .align 16
idt_table:
    .space 256 * 16

    .section .note.GNU-stack, "", @progbits
