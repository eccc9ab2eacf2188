/* Entry points, mode switches, GDT, page tables and stacks.
 * Protocols: Linux Documentation/arch/x86/boot.rst ("32-bit boot protocol", "64-bit boot protocol")
 * and Xen include/public/arch-x86/hvm/start_info.h (PVH: 32-bit, paging off, ebx = hvm_start_info).
 * Register contract into enter32: edi = protocol (0 pvh, 1 linux64, 2 linux32), esi = boot structure,
 * ebp = 0 for the BSP, 1 for an AP. */

    .section .text.head, "ax"
    .code32
    .globl linux32_entry
linux32_entry:                          /* load address + 0: esi = boot_params */
    cli
    cld
    movl $2, %edi
    xorl %ebp, %ebp
    jmp enter32
    .org 0x200, 0xf4
    .globl linux64_entry
linux64_entry:                          /* load address + 0x200: long mode, rsi = boot_params */
    jmp linux64_main                    /* e9 rel32: the same bytes in 32- and 64-bit code */

    .section .text32, "ax"
    .code32
    .globl pvh_entry
pvh_entry:
    cli
    cld
    movl %ebx, %esi
    xorl %edi, %edi
    xorl %ebp, %ebp
    jmp enter32

    .globl ap_entry32                   /* from the trampoline: CS = 0x18, DS unset */
ap_entry32:
    xorl %edi, %edi
    movl $1, %ebp
enter32:
    lgdtl %cs:gdt_ptr                   /* CS is flat in every 32-bit entry; DS may not be */
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl %cr4, %eax
    orl $0x20, %eax                     /* CR4.PAE */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx              /* IA32_EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax               /* CR0.PG | CR0.PE */
    movl %eax, %cr0
    ljmpl $0x08, $long64

    .text
    .code64
long64:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    testl %ebp, %ebp
    jnz ap64
    movl %esi, %esi
    movl %edi, %edi
    leaq bsp_stack_top(%rip), %rsp
    jmp bsp64

linux64_main:
    cli
    cld
    leaq bsp_stack_top(%rip), %rsp
    lgdt gdt_ptr(%rip)
    leaq pml4(%rip), %rax
    movq %rax, %cr3
    pushq $0x08
    leaq 1f(%rip), %rax
    pushq %rax
    lretq
1:  movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $1, %edi

bsp64:                                  /* edi = protocol, rsi = boot structure */
    movq %rsi, %r12
    movl %edi, %r13d
    leaq __bss_start(%rip), %rdi        /* the Linux protocol leaves .bss to the kernel */
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    shrq $3, %rcx                       /* 16-byte aligned (link.ld); each rep step is emulated */
    xorl %eax, %eax
    rep stosq
    movl %r13d, %edi
    movq %r12, %rsi
    call probe_main
    jmp halt_forever

ap64:
    movl $1, %eax
    lock xaddl %eax, AP_NEXT(%rip)      /* eax = this AP's ordinal */
    cmpl ${max_aps}, %eax
    jae halt_forever
    leal 1(%eax), %ecx
    imull ${ap_stack}, %ecx
    leaq ap_stacks(%rip), %rsp
    addq %rcx, %rsp
    movl %eax, %edi
    call ap_main

    .globl halt_forever
halt_forever:
    cli
    hlt
    jmp halt_forever

/* AP start-up code, copied below 1 MiB; a SIPI starts it in real mode at CS:IP = vector<<8:0.
 * Symbols ending in _data mark data inside code sections (xtask does not disassemble them). */
    .section .text16, "ax"
    .code16
    .globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_tramp_data - ap_tramp_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $ap_entry32
    .balign 4
ap_tramp_data:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:
    .code64

/* PVH entry note (start_info.h; Xen elfnote.h XEN_ELFNOTE_PHYS32_ENTRY = 18). */
    .section .note.pvh, "a", @note
    .balign 4
    .long 4, 4, 18
    .asciz "Xen"
    .long pvh_entry

    .section .data, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff            /* 0x08: 64-bit code */
    .quad 0x00cf93000000ffff            /* 0x10: flat data */
    .quad 0x00cf9b000000ffff            /* 0x18: flat 32-bit code */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt

/* Identity map of the first 4 GiB with 2 MiB pages, built by the assembler so no guest
 * instruction has to fill it. PDPT slots 4..511 are filled on demand (phys::map). */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl pml4, pdpt
pml4:
    .quad pdpt + 0x3
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x3, pd + 0x1003, pd + 0x2003, pd + 0x3003
    .fill 508, 8, 0
pd:
    .set .Lpage, 0
    .rept 2048
    .quad .Lpage + 0x83                 /* present, writable, 2 MiB */
    .set .Lpage, .Lpage + 0x200000
    .endr

    .section .noinit.stacks, "aw", @nobits
    .balign 4096
bsp_stack:
    .skip {bsp_stack}
bsp_stack_top:
ap_stacks:
    .skip {ap_stack} * {max_aps}
    .text
