// SPDX-License-Identifier: BSD-2-Clause
// bpf(BPF_PROG_LOAD): the smallest socket filter ("return 0").
#include <errno.h>
#include <linux/bpf.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void) {
    struct bpf_insn insns[] = {
        { .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0 },
        { .code = BPF_JMP | BPF_EXIT },
    };
    union bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.prog_type = BPF_PROG_TYPE_SOCKET_FILTER;
    attr.insn_cnt = 2;
    attr.insns = (unsigned long)insns;
    attr.license = (unsigned long)"GPL";
    long fd = syscall(SYS_bpf, BPF_PROG_LOAD, &attr, sizeof attr);
    if (fd >= 0) { printf("bpf(BPF_PROG_LOAD): loaded, fd %ld\n", fd); return 1; }
    printf("bpf(BPF_PROG_LOAD): %s\n", strerror(errno));
    return errno == EPERM || errno == ENOSYS ? 0 : 2;
}
