// Stack switch of the CPU emulation's fibers (csrc/emu/cuda_emu.h) on x86-64.
//
// ucontext's swapcontext makes a sigprocmask system call on every switch; the
// emulation switches at every barrier and warp shuffle of every emulated thread, so
// that call dominated its run time. This switch saves the callee-saved registers of
// the System V ABI on the current stack, stores the stack pointer, loads the other
// one and returns into it. Other architectures use ucontext (see cuda_emu.h).
#if defined(__x86_64__) && !defined(PK_EMU_USE_UCONTEXT)
// void pk_emu_switch(void** save_sp /* rdi */, void* load_sp /* rsi */)
asm(R"(
    .text
    .globl pk_emu_switch
    .hidden pk_emu_switch
    .type pk_emu_switch, @function
pk_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size pk_emu_switch, .-pk_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
#endif
