/* probe.mode=irq (src/irq.rs): the IDT's entry stubs and the only place interrupts are on.
 * Every stub is 16 bytes long, at irq_stubs + 16 * vector, so Rust can build the IDT from the
 * one symbol. Vectors 0-31 are exceptions (Intel SDM vol. 3, 6.15): the stub hands its vector
 * and the frame to irq_exception, which reports and ends the VM. Vectors 32-255 only count,
 * `lock incq` of IRQ_COUNTS[vector] and `iretq`: no register is touched (the interrupt gate
 * saved RFLAGS, iretq restores it), no SSE, and no EOI, because when the local APIC gets one
 * is what the probe checks. */
    .text
    .code64
    .balign 16
    .globl irq_stubs
irq_stubs:
    .set .Lvec, 0
    .rept 32
    .balign 16
    movl $.Lvec, %edi
    movq %rsp, %rsi
    jmp irq_exception_entry
    .set .Lvec, .Lvec + 1
    .endr
    .rept 224
    .balign 16
    lock incq IRQ_COUNTS + 8 * .Lvec(%rip)
    iretq
    .set .Lvec, .Lvec + 1
    .endr

irq_exception_entry:                    /* edi = vector, rsi = the exception frame */
    andq $-16, %rsp
    call irq_exception
    jmp halt_forever

/* u64 irq_wait(const u64 *counter, u64 until, u64 ticks): interrupts on until *counter >= until
 * or `ticks` TSC ticks have passed, then off again; returns *counter. It is asm, and a leaf, so
 * that an interrupt frame pushed below rsp can never land in a Rust function's red zone (the
 * probe is built for the SysV target, which has one; SDM vol. 3, 6.14.2: no stack switch at
 * CPL 0). The sti shadow holds interrupts off for one more instruction (SDM, STI). */
    .globl irq_wait
irq_wait:
    movq %rdx, %r8
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    movq %rdx, %r9
    sti
1:  cmpq %rsi, (%rdi)
    jae 2f
    pause
    rdtsc
    shlq $32, %rdx
    orq %rax, %rdx
    subq %r9, %rdx
    cmpq %r8, %rdx
    jb 1b
2:  cli
    movq (%rdi), %rax
    ret
