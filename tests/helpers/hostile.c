/* A tenant's program, for the hostile-input tests; built static so it runs in an image that
 * holds nothing else.
 *   hostile listen ADDR PORT [ARGS...]   renames itself (comm) to terminal escape sequences,
 *                                        listens on ADDR:PORT and waits; ARGS are only there
 *                                        to be read from /proc/PID/cmdline
 *   hostile dial ADDR PORT [ARGS...]     connects once to ADDR:PORT and exits 0 whatever the
 *                                        outcome (installed as /usr/bin/docker-proxy, it is a
 *                                        process that calls itself the proxy)
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <unistd.h>

static int sockaddr_of(const char *addr, const char *port, struct sockaddr_in *sa) {
    memset(sa, 0, sizeof *sa);
    sa->sin_family = AF_INET;
    sa->sin_port = htons((unsigned short)atoi(port));
    return inet_pton(AF_INET, addr, &sa->sin_addr) == 1 ? 0 : -1;
}

int main(int argc, char **argv) {
    struct sockaddr_in sa;
    if (argc < 4 || sockaddr_of(argv[2], argv[3], &sa) != 0) {
        fprintf(stderr, "usage: hostile listen|dial ADDR PORT [ARGS...]\n");
        return 2;
    }
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return 1;
    if (strcmp(argv[1], "dial") == 0) {
        connect(fd, (struct sockaddr *)&sa, sizeof sa);
        return 0;
    }
    /* OSC (set the window title), BEL, CSI (clear the screen): 14 bytes, comm holds 15. */
    prctl(PR_SET_NAME, "\033]0;PWNED\007\033[2J", 0, 0, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 16) != 0) {
        perror("hostile: listen");
        return 1;
    }
    printf("listening\n");
    fflush(stdout);
    for (;;) pause();
}
