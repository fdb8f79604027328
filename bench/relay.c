/* The floor of the benchmark: a trivial byte relay that parses nothing.
 *
 * One thread, level-triggered epoll. Each client connection gets its own upstream
 * connection, made when the client connects; bytes read from one side are written to the
 * other. Per request it does what any proxy must: wake up, read the request, write it
 * upstream, wake up, read the response, write it to the client. What attache, HAProxy or
 * nginx spend beyond this is their own; what this spends is the kernel's and the
 * scheduler's. Written by hand because it must be nothing more than that (socat, say,
 * forks a process per connection and copies through pipes).
 *
 * usage: relay CONFIG   where CONFIG holds one line "LISTEN_IP:PORT UPSTREAM_IP:PORT"
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

struct side {
    int fd;
    struct side *peer;
};

static int parse(const char *s, struct sockaddr_in *a) {
    char host[64];
    int port;
    if (sscanf(s, "%63[^:]:%d", host, &port) != 2) return -1;
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons((unsigned short)port);
    return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -1;
}

static int write_all(int fd, const char *p, ssize_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, (size_t)n, MSG_NOSIGNAL);
        if (w > 0) {
            p += w;
            n -= w;
        } else if (w < 0 && errno == EAGAIN) {
            struct pollfd pf = {.fd = fd, .events = POLLOUT};
            poll(&pf, 1, -1);
        } else if (w < 0 && errno == EINTR) {
            continue;
        } else {
            return -1;
        }
    }
    return 0;
}

/* Pairs closed during one epoll batch; freed after it, since a later event of the same
 * batch may still point at them. */
static struct side *closed[512];
static int nclosed;

static void close_pair(int ep, struct side *s) {
    struct side *p = s->peer;
    epoll_ctl(ep, EPOLL_CTL_DEL, s->fd, NULL);
    epoll_ctl(ep, EPOLL_CTL_DEL, p->fd, NULL);
    close(s->fd);
    close(p->fd);
    s->fd = p->fd = -1;
    closed[nclosed++] = s < p ? s : p; /* both sides live in one allocation */
}

int main(int argc, char **argv) {
    char lbuf[80], ubuf[80];
    struct sockaddr_in la, ua;
    FILE *f = argc == 2 ? fopen(argv[1], "r") : NULL;
    if (!f || fscanf(f, "%79s %79s", lbuf, ubuf) != 2 || parse(lbuf, &la) || parse(ubuf, &ua)) {
        fprintf(stderr, "usage: relay CONFIG (one line: LISTEN_IP:PORT UPSTREAM_IP:PORT)\n");
        return 2;
    }
    fclose(f);
    int one = 1;
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(lfd, (struct sockaddr *)&la, sizeof la) || listen(lfd, 4096)) {
        perror("relay: bind/listen");
        return 1;
    }
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    static char buf[65536];
    struct epoll_event evs[256];
    for (;;) {
        int n = epoll_wait(ep, evs, 256, -1);
        for (int i = 0; i < n; i++) {
            struct side *s = evs[i].data.ptr;
            if (s && s->fd < 0) continue;
            if (!s) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    int u = socket(AF_INET, SOCK_STREAM, 0);
                    if (connect(u, (struct sockaddr *)&ua, sizeof ua)) {
                        close(u);
                        close(c);
                        continue;
                    }
                    fcntl(u, F_SETFL, O_NONBLOCK);
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    struct side *pair = calloc(2, sizeof *pair);
                    pair[0] = (struct side){.fd = c, .peer = &pair[1]};
                    pair[1] = (struct side){.fd = u, .peer = &pair[0]};
                    struct epoll_event e0 = {.events = EPOLLIN, .data.ptr = &pair[0]};
                    struct epoll_event e1 = {.events = EPOLLIN, .data.ptr = &pair[1]};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &e0);
                    epoll_ctl(ep, EPOLL_CTL_ADD, u, &e1);
                }
                continue;
            }
            ssize_t r = recv(s->fd, buf, sizeof buf, 0);
            if (r > 0) {
                if (write_all(s->peer->fd, buf, r)) close_pair(ep, s);
            } else if (r == 0 || (errno != EAGAIN && errno != EINTR)) {
                close_pair(ep, s);
            }
        }
        while (nclosed > 0) free(closed[--nclosed]);
    }
}
