// SPDX-License-Identifier: BSD-2-Clause
// The session keyring must not be the caller's: print its id and description.
// Exit 0 when it is a new one (or keyctl is denied), 1 when it is ARGV[1]'s.
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define KEYCTL_GET_KEYRING_ID 0
#define KEYCTL_DESCRIBE 6
#define KEY_SPEC_SESSION_KEYRING -3

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: keyring HOST-KEYRING-NAME\n");
        return 2;
    }
    long id = syscall(SYS_keyctl, KEYCTL_GET_KEYRING_ID, KEY_SPEC_SESSION_KEYRING, 0);
    if (id < 0 && (errno == EPERM || errno == ENOSYS || errno == EACCES)) {
        printf("keyctl blocked: %s\n", strerror(errno));
        return 0;
    }
    if (id < 0) {
        printf("keyctl: %s\n", strerror(errno));
        return 2;
    }
    char desc[512] = "";
    if (syscall(SYS_keyctl, KEYCTL_DESCRIBE, id, desc, sizeof desc - 1) < 0) {
        printf("describe %ld: %s\n", id, strerror(errno));
        return 2;
    }
    printf("session keyring %ld: %s\n", id, desc);
    // desc is "type;uid;gid;perm;name"
    const char *name = strrchr(desc, ';');
    return name != NULL && strcmp(name + 1, argv[1]) == 0;
}
