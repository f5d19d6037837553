// Smallest useful KVM client: proves /dev/kvm runs a guest. Creates a VM
// with one page of memory, runs four real-mode instructions
// (mov al,2; add al,3; out 0x10,al; hlt) and checks that the vCPU exits
// with an OUT of 5 to port 0x10 and then a HLT. Prints "kvm-smoke: ok".
// Built statically by scripts/nested/lib.sh for the nested L1 guest.
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define GUEST_BASE 0x1000

static int fail(const char *what)
{
    fprintf(stderr, "kvm-smoke: %s: %s\n", what, strerror(errno));
    return 1;
}

int main(void)
{
    static const uint8_t code[] = {
        0xb0, 0x02,       // mov al, 2
        0x04, 0x03,       // add al, 3
        0xe6, 0x10,       // out 0x10, al
        0xf4,             // hlt
    };
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        return fail("open /dev/kvm");
    int version = ioctl(kvm, KVM_GET_API_VERSION, 0);
    if (version != KVM_API_VERSION) {
        fprintf(stderr, "kvm-smoke: API version %d, want %d\n", version, KVM_API_VERSION);
        return 1;
    }
    int vm = ioctl(kvm, KVM_CREATE_VM, 0UL);
    if (vm < 0)
        return fail("KVM_CREATE_VM");

    uint8_t *mem = mmap(NULL, 0x1000, PROT_READ | PROT_WRITE,
                        MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return fail("mmap guest memory");
    memcpy(mem, code, sizeof(code));
    struct kvm_userspace_memory_region region = {
        .slot = 0,
        .guest_phys_addr = GUEST_BASE,
        .memory_size = 0x1000,
        .userspace_addr = (uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        return fail("KVM_SET_USER_MEMORY_REGION");

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0UL);
    if (vcpu < 0)
        return fail("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < (int)sizeof(struct kvm_run))
        return fail("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        return fail("mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        return fail("KVM_GET_SREGS");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        return fail("KVM_SET_SREGS");
    struct kvm_regs regs = { .rip = GUEST_BASE, .rflags = 0x2 };
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        return fail("KVM_SET_REGS");

    if (ioctl(vcpu, KVM_RUN, 0) < 0)
        return fail("KVM_RUN (first)");
    if (run->exit_reason != KVM_EXIT_IO || run->io.direction != KVM_EXIT_IO_OUT ||
        run->io.port != 0x10 || run->io.size != 1) {
        fprintf(stderr, "kvm-smoke: first exit: reason %u (want KVM_EXIT_IO out to 0x10)\n",
                run->exit_reason);
        return 1;
    }
    uint8_t value = *((uint8_t *)run + run->io.data_offset);
    if (value != 5) {
        fprintf(stderr, "kvm-smoke: guest wrote %u to port 0x10, want 5\n", value);
        return 1;
    }
    if (ioctl(vcpu, KVM_RUN, 0) < 0)
        return fail("KVM_RUN (second)");
    if (run->exit_reason != KVM_EXIT_HLT) {
        fprintf(stderr, "kvm-smoke: second exit: reason %u, want KVM_EXIT_HLT\n",
                run->exit_reason);
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("kvm-smoke: ok (out 0x10 = 5, then hlt) in %ld us\n",
           (long)((t1.tv_sec - t0.tv_sec) * 1000000 + (t1.tv_nsec - t0.tv_nsec) / 1000));
    return 0;
}
