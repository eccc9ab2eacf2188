/* The fault modes: each routine ends the VM with a fatal vCPU exit so a VMM's handling of one can
 * be tested. Neither returns; if the fault somehow does not happen, the CPU halts. */
    .text
    .code64

/* probe.mode=fault-emulation: the one instruction the build check (xtask/src/probe.rs) allows
 * here and nowhere else. Ring-0 `int3` is not emulated by KVM's instruction emulator on a PVM
 * host (it is what stock Linux dies on in int3_selftest()), so KVM_RUN returns
 * KVM_EXIT_INTERNAL_ERROR (KVM_INTERNAL_ERROR_EMULATION) instead of delivering a #BP. */
    .globl fault_emulation_insn
fault_emulation_insn:
    int3
    jmp halt_forever

/* probe.mode=fault-triple: an IDT with limit 0 makes every exception unroutable. A divide by
 * zero then raises #DE, which cannot be delivered (#GP), nor can that (#DF): the CPU shuts down
 * and KVM_RUN returns KVM_EXIT_SHUTDOWN. */
    .globl fault_triple
fault_triple:
    cli
    lidt fault_triple_idt(%rip)
    xorl %ecx, %ecx
    movl $1, %eax
    xorl %edx, %edx
    divl %ecx
    jmp halt_forever

    .section .rodata, "a"
    .balign 8
fault_triple_idt:                       /* limit 0, base 0 */
    .word 0
    .quad 0
    .text
