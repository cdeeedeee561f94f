// SPDX-License-Identifier: BSD-2-Clause
// ioctl(TIOCSTI) pushes input into a terminal: on the container's console
// that is the user's shell.  On a pty of our own, also with bits above 32
// set in the request (the kernel ignores them), and TIOCLINUX.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

static int verdict(const char *what, long rc) {
    if (rc == 0) { printf("%s: got through\n", what); return 1; }
    printf("%s: %s\n", what, strerror(errno));
    return errno == EPERM ? 0 : 1;
}

int main(void) {
    int master = posix_openpt(O_RDWR | O_NOCTTY);
    if (master < 0 || grantpt(master) < 0 || unlockpt(master) < 0) { perror("pty"); return 2; }
    int slave = open(ptsname(master), O_RDWR | O_NOCTTY);
    if (slave < 0) { perror("open pty slave"); return 2; }
    char c = 'x', sub = 0;
    int worst = 0, v;
    v = verdict("ioctl(TIOCSTI)", syscall(SYS_ioctl, slave, (unsigned long)TIOCSTI, &c));
    worst = v > worst ? v : worst;
    v = verdict("ioctl(TIOCSTI | 1 << 32)",
                syscall(SYS_ioctl, slave, (unsigned long)TIOCSTI | (1UL << 32), &c));
    worst = v > worst ? v : worst;
    v = verdict("ioctl(TIOCLINUX)", syscall(SYS_ioctl, slave, (unsigned long)TIOCLINUX, &sub));
    worst = v > worst ? v : worst;
    // And ordinary terminal ioctls still work.
    int n;
    if (ioctl(slave, FIONREAD, &n) < 0) { perror("ioctl(FIONREAD)"); return 2; }
    return worst;
}
