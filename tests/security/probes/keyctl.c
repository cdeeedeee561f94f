// SPDX-License-Identifier: BSD-2-Clause
// The kernel keyring is not namespaced: read the user and session keyrings,
// add a key, ask for one.  Each must fail with EPERM or ENOSYS.
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define KEYCTL_GET_KEYRING_ID 0
#define KEYCTL_READ 11
#define KEY_SPEC_SESSION_KEYRING -3
#define KEY_SPEC_USER_KEYRING -4

static int verdict(const char *what, long rc) {
    if (rc >= 0) { printf("%s: got through (%ld)\n", what, rc); return 1; }
    printf("%s: %s\n", what, strerror(errno));
    return errno == EPERM || errno == ENOSYS ? 0 : 1;  // ENOKEY, EACCES: it got there
}

int main(void) {
    char buf[4096];
    int worst = 0, v;
    long rings[] = { KEY_SPEC_USER_KEYRING, KEY_SPEC_SESSION_KEYRING };
    for (int i = 0; i < 2; i++) {
        v = verdict("keyctl(GET_KEYRING_ID)", syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, rings[i], 0));
        worst = v > worst ? v : worst;
        v = verdict("keyctl(READ)", syscall(SYS_keyctl, KEYCTL_READ, rings[i], buf, sizeof buf));
        worst = v > worst ? v : worst;
    }
    v = verdict("add_key", syscall(SYS_add_key, "user", "escape-probe", "x", 1,
                                   KEY_SPEC_SESSION_KEYRING));
    worst = v > worst ? v : worst;
    v = verdict("request_key", syscall(SYS_request_key, "user", "escape-probe", NULL, 0));
    worst = v > worst ? v : worst;
    return worst;
}
