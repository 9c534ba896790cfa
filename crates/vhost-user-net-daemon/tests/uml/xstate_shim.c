/*
 * LD_PRELOAD shim for User-Mode Linux on hosts with large XSAVE areas
 * (AVX-512, AMX).
 *
 * UML saves and restores its processes' FPU state with
 * ptrace(PTRACE_{GET,SET}REGSET, NT_X86_XSTATE) through a fixed-size buffer.
 * The host kernel only accepts a SETREGSET whose length is exactly its own
 * XSAVE size, so on such hosts every UML process dies with "ptrace set fp regs
 * failed, errno = 14". This shim bounces both calls through a buffer of the
 * host's size: GET copies back what fits in UML's buffer, SET pads UML's buffer
 * and marks the components it does not hold as "initial" in XSTATE_BV.
 *
 * Test infrastructure only; the harness compiles it with `cc -shared`.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <dlfcn.h>
#include <elf.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#define BOUNCE_MAX (64 * 1024)

typedef long (*ptrace_fn)(int, pid_t, void *, void *);

static _Thread_local unsigned char bounce[BOUNCE_MAX] __attribute__((aligned(64)));

/* Mask of the XSAVE components that lie entirely within the first `len`
 * bytes of a standard-format buffer. */
static uint64_t components_within(size_t len)
{
    uint64_t mask = 0x3; /* x87 and SSE live in the legacy area */
    for (unsigned i = 2; i < 63; i++) {
        unsigned eax, ebx, ecx, edx;
        __cpuid_count(0xd, i, eax, ebx, ecx, edx);
        if (eax == 0)
            continue;
        if ((size_t)ebx + eax <= len)
            mask |= 1ull << i;
    }
    return mask;
}

long ptrace(enum __ptrace_request request, ...)
{
    static ptrace_fn real;
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if (!real)
        real = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");

    if ((request == PTRACE_GETREGSET || request == PTRACE_SETREGSET) &&
        (uintptr_t)addr == NT_X86_XSTATE && data) {
        struct iovec *uiov = data;
        struct iovec iov = { bounce, BOUNCE_MAX };
        /* Learn the host's size (and, for GET, the state). */
        long r = real(PTRACE_GETREGSET, pid, addr, &iov);
        if (r < 0)
            return r;
        size_t host = iov.iov_len, ulen = uiov->iov_len;
        if (request == PTRACE_GETREGSET) {
            size_t n = ulen < host ? ulen : host;
            memcpy(uiov->iov_base, bounce, n);
            if (n >= 520) {
                uint64_t bv;
                memcpy(&bv, (unsigned char *)uiov->iov_base + 512, 8);
                bv &= components_within(n);
                memcpy((unsigned char *)uiov->iov_base + 512, &bv, 8);
            }
            uiov->iov_len = n;
            return 0;
        }
        size_t n = ulen < host ? ulen : host;
        memcpy(bounce, uiov->iov_base, n);
        if (n >= 520) {
            uint64_t bv;
            memcpy(&bv, bounce + 512, 8);
            bv &= components_within(n);
            memcpy(bounce + 512, &bv, 8);
            memset(bounce + 520, 0, 8); /* XCOMP_BV: standard format */
        }
        iov.iov_base = bounce;
        iov.iov_len = host;
        return real(PTRACE_SETREGSET, pid, addr, &iov);
    }
    return real(request, pid, addr, data);
}
