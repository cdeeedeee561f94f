// SPDX-License-Identifier: BSD-2-Clause
// The same attacks through the 32-bit ABI: `int $0x80` from this 64-bit
// program enters the ia32 system call table, which a filter for x86_64 alone
// would never see.  x86-64 only (the test skips elsewhere).
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char byte = 'x';  // a static, non-PIE binary: below 4 GiB, as ia32 wants

static int int80(int nr, int a, int b, int c) {
    long ret;
    __asm__ volatile("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return (int)ret;
}

static int expect(const char *what, int rc, int want) {
    if (rc != -want) {
        printf("ia32 %s: %s, wanted %s\n", what, rc >= 0 ? "succeeded" : strerror(-rc),
               want ? strerror(want) : "success");
        return 1;
    }
    printf("ia32 %s: %s\n", what, want ? strerror(want) : "ok");
    return 0;
}

int main(void) {
#ifndef __x86_64__
    printf("not x86-64\n");
    return 2;
#else
    int master = posix_openpt(O_RDWR | O_NOCTTY);
    if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0) { perror("pty"); return 2; }
    int slave = open(ptsname(master), O_RDWR | O_NOCTTY);
    if (slave < 0) { perror("open pty slave"); return 2; }
    int pid = int80(20, 0, 0, 0);  // getpid: the ia32 allow-list lets ordinary calls in
    if (pid <= 0) { printf("ia32 getpid: %d: no ia32 emulation?\n", pid); return 2; }
    int bad = 0;
    bad |= expect("userfaultfd", int80(374, O_CLOEXEC, 0, 0), EPERM);
    bad |= expect("keyctl(GET_KEYRING_ID)", int80(288, 0, -4, 0), EPERM);
    bad |= expect("ioctl(TIOCSTI)", int80(54, slave, 0x5412, (int)(long)&byte), EPERM);
    bad |= expect("socket(NETLINK_AUDIT)", int80(359, 16, 3, 9), EAFNOSUPPORT);
    bad |= expect("cachestat(451)", int80(451, -1, 0, 0), ENOSYS);
    return bad;
#endif
}
