// SPDX-License-Identifier: BSD-2-Clause
// TIOCSTI on stdin when stdin is the user's terminal (pipe mode: stdout is not):
// each byte pushed would be read by the user's shell once machinepy exits.
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(void) {
    const char *cmd = "echo PWNED\n";
    if (!isatty(0)) { printf("stdin is no terminal\n"); return 2; }
    for (const char *p = cmd; *p; p++) {
        if (ioctl(0, TIOCSTI, p) == 0) { printf("TIOCSTI on stdin: got through\n"); return 1; }
    }
    printf("TIOCSTI on stdin: %s\n", strerror(errno));
    return 0;
}
