/* Real-mode part of the bzImage (boot.rst, "The real-mode kernel header"). A 16-bit loader
 * (QEMU's and SeaBIOS's Linux boot) jumps to offset 0x200 with CS = seg + 0x20 and DS = seg.
 * This code builds a zero page at seg:0x1000 (header copy + E820 map from INT 15h), enters
 * protected mode and jumps to the 32-bit entry with esi = that zero page, as the 32-bit
 * boot protocol asks. Sizes (setup_sects, syssize, init_size) are filled in by xtask. */
    .section .setup, "", @progbits
    .code16
.Lsetup:
    .org 0x1f1
    .byte 0                             /* 0x1f1 setup_sects */
    .word 0                             /* 0x1f2 root_flags */
    .long 0                             /* 0x1f4 syssize */
    .word 0                             /* 0x1f8 ram_size */
    .word 0xffff                        /* 0x1fa vid_mode */
    .word 0                             /* 0x1fc root_dev */
    .word 0xaa55                        /* 0x1fe boot_flag */
    .byte 0xeb, .Lcode - .Lsetup - 0x202 /* 0x200 jump */
    .ascii "HdrS"                       /* 0x202 header */
    .word 0x020f                        /* 0x206 version */
    .long 0                             /* 0x208 realmode_swtch */
    .word 0                             /* 0x20c start_sys_seg */
    .word 0                             /* 0x20e kernel_version */
    .byte 0                             /* 0x210 type_of_loader */
    .byte 0x01                          /* 0x211 loadflags: LOADED_HIGH */
    .word 0                             /* 0x212 setup_move_size */
    .long 0x100000                      /* 0x214 code32_start */
    .long 0                             /* 0x218 ramdisk_image */
    .long 0                             /* 0x21c ramdisk_size */
    .long 0                             /* 0x220 bootsect_kludge */
    .word 0                             /* 0x224 heap_end_ptr */
    .byte 0                             /* 0x226 ext_loader_ver */
    .byte 0                             /* 0x227 ext_loader_type */
    .long 0                             /* 0x228 cmd_line_ptr */
    .long 0x7fffffff                    /* 0x22c initrd_addr_max */
    .long 0x200000                      /* 0x230 kernel_alignment */
    .byte 0                             /* 0x234 relocatable_kernel */
    .byte 12                            /* 0x235 min_alignment */
    .word 0x0001                        /* 0x236 xloadflags: XLF_KERNEL_64 */
    .long 4095                          /* 0x238 cmdline_size */
    .long 0                             /* 0x23c hardware_subarch */
    .quad 0                             /* 0x240 hardware_subarch_data */
    .long 0                             /* 0x248 payload_offset */
    .long 0                             /* 0x24c payload_length */
    .quad 0                             /* 0x250 setup_data */
    .quad 0x100000                      /* 0x258 pref_address */
    .long 0                             /* 0x260 init_size */
    .long 0                             /* 0x264 handover_offset */
    .long 0                             /* 0x268 kernel_info_offset */
    .org 0x280
.Lcode:
    cli
    cld
    movw %cs, %ax
    subw $0x20, %ax
    movw %ax, %ds
    movw %ax, %es
    movw $0x1000, %di                   /* zero page at seg:0x1000 */
    movw $0x800, %cx
    xorw %ax, %ax
    rep stosw
    movw $0x1f1, %si                    /* copy the setup header (0x1f1..0x26c) */
    movw $0x11f1, %di
    movw $0x26c - 0x1f1, %cx
    rep movsb
    xorl %ebx, %ebx
    movw $0x12d0, %di                   /* e820_table (zero-page.rst) */
1:  movl $0xe820, %eax
    movl $0x534d4150, %edx              /* "SMAP" */
    movl $20, %ecx
    int $0x15
    jc 2f
    cmpl $0x534d4150, %eax
    jne 2f
    incb 0x11e8                         /* e820_entries */
    addw $20, %di
    cmpb $128, 0x11e8
    jae 2f
    testl %ebx, %ebx
    jnz 1b
2:  xorl %esi, %esi
    movw %ds, %si
    shll $4, %esi
    leal (setup_gdt_data - .Lsetup)(%esi), %eax
    movl %eax, .Lgdtp + 2 - .Lsetup
    lgdtl .Lgdtp - .Lsetup
    addl $0x1000, %esi
    movl %cr0, %eax
    orb $1, %al
    movl %eax, %cr0
    ljmpl $0x10, $0x100000              /* __BOOT_CS; the entry loads its own GDT */
    .balign 8
setup_gdt_data:
    .quad 0, 0
    .quad 0x00cf9b000000ffff            /* 0x10: flat 32-bit code */
    .quad 0x00cf93000000ffff            /* 0x18: flat data */
.Lgdtp:
    .word 31
    .long 0
    .balign 512, 0
    .code64
    .text
