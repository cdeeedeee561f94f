// SPDX-License-Identifier: BSD-2-Clause
// userfaultfd(2): stalls page faults at will, the classic way to win kernel races.
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(void) {
    long fd = syscall(SYS_userfaultfd, O_CLOEXEC);
    if (fd >= 0) { printf("userfaultfd: fd %ld\n", fd); return 1; }
    printf("userfaultfd: %s\n", strerror(errno));
    return errno == EPERM || errno == ENOSYS ? 0 : 2;
}
