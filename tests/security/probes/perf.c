// SPDX-License-Identifier: BSD-2-Clause
// perf_event_open(pid=-1, cpu=0): every task on CPU 0, system-wide.
#include <errno.h>
#include <linux/perf_event.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void) {
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.type = PERF_TYPE_SOFTWARE;
    attr.config = PERF_COUNT_SW_CPU_CLOCK;
    long fd = syscall(SYS_perf_event_open, &attr, -1, 0, -1, 0);
    if (fd >= 0) { printf("perf_event_open(pid=-1, cpu=0): opened, fd %ld\n", fd); return 1; }
    printf("perf_event_open(pid=-1, cpu=0): %s\n", strerror(errno));
    // EACCES: perf_event_paranoid said no; the call itself reached the kernel.
    return errno == EPERM || errno == ENOSYS ? 0 : 1;
}
