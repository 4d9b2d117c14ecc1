/*
 * Unpipelined latency of two commands, measured side by side.
 *
 *     latency HOST PORT N USERS COMMAND_A... -- COMMAND_B...
 *
 * One client sends A and B alternately (A B, then B A, ...), each alone on the connection, and
 * times every round trip; it prints "p50_a p99_a p50_b p99_b" in milliseconds. Both commands
 * thus see the same moments of the machine: on a shared host, load from elsewhere comes and goes
 * within a second, and two separate runs (as `redis-benchmark -P 1` gives) compare different
 * moments. `__rand_int__` in an argument becomes a random 12-digit number below USERS, as in
 * redis-benchmark. The first 1,000 requests of each command warm up and are not counted.
 * Built by bench/run.sh with the system C compiler.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define WARMUP 1000
#define MAX_ARGS 64

static char inbuf[1 << 16];
static size_t in_len, in_pos;
static int fd;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static void fill(void) {
    if (in_pos > 0) {
        memmove(inbuf, inbuf + in_pos, in_len - in_pos);
        in_len -= in_pos;
        in_pos = 0;
    }
    if (in_len == sizeof(inbuf)) {
        fprintf(stderr, "reply too large\n");
        exit(1);
    }
    ssize_t n = read(fd, inbuf + in_len, sizeof(inbuf) - in_len);
    if (n <= 0) die("read");
    in_len += (size_t)n;
}

/* The next line (without CRLF), NUL-terminated in place. */
static char *line(void) {
    for (;;) {
        char *start = inbuf + in_pos;
        char *end = memchr(start, '\n', in_len - in_pos);
        if (end && end > start && end[-1] == '\r') {
            end[-1] = 0;
            in_pos = (size_t)(end - inbuf) + 1;
            return start;
        }
        fill();
    }
}

/* Reads one RESP2 reply; an error reply ends the program. */
static void reply(void) {
    char *head = line();
    long n;
    switch (head[0]) {
    case '+':
    case ':':
        return;
    case '-':
        fprintf(stderr, "error reply: %s\n", head + 1);
        exit(1);
    case '$':
        n = atol(head + 1);
        if (n < 0) return;
        while (in_len - in_pos < (size_t)n + 2) fill();
        in_pos += (size_t)n + 2;
        return;
    case '*':
        n = atol(head + 1);
        for (long i = 0; i < n; i++) reply();
        return;
    default:
        fprintf(stderr, "unexpected reply: %s\n", head);
        exit(1);
    }
}

struct command {
    int argc;
    char *argv[MAX_ARGS];
};

static char outbuf[1 << 16];

static size_t encode(const struct command *c, const char *user) {
    size_t at = (size_t)snprintf(outbuf, sizeof(outbuf), "*%d\r\n", c->argc);
    for (int i = 0; i < c->argc; i++) {
        char arg[1024];
        const char *a = c->argv[i];
        const char *hole = strstr(a, "__rand_int__");
        if (hole) {
            snprintf(arg, sizeof(arg), "%.*s%s%s", (int)(hole - a), a, user, hole + 12);
            a = arg;
        }
        at += (size_t)snprintf(outbuf + at, sizeof(outbuf) - at, "$%zu\r\n%s\r\n", strlen(a), a);
        if (at >= sizeof(outbuf)) {
            fprintf(stderr, "request too large\n");
            exit(1);
        }
    }
    return at;
}

static int cmp(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static double pct(uint64_t *v, long n, double q) {
    long i = (long)(q * (double)n + 0.5) - 1;
    if (i < 0) i = 0;
    if (i >= n) i = n - 1;
    return (double)v[i] / 1e6;
}

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: latency HOST PORT N USERS COMMAND_A... -- COMMAND_B...\n");
        return 2;
    }
    const char *host = argv[1];
    int port = atoi(argv[2]);
    long n = atol(argv[3]);
    long users = atol(argv[4]);
    struct command cmds[2] = {{0}, {0}};
    int which = 0;
    for (int i = 5; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0 && which == 0) {
            which = 1;
            continue;
        }
        if (cmds[which].argc == MAX_ARGS) {
            fprintf(stderr, "too many arguments\n");
            return 2;
        }
        cmds[which].argv[cmds[which].argc++] = argv[i];
    }
    if (n <= 0 || users <= 0 || cmds[0].argc == 0 || cmds[1].argc == 0) {
        fprintf(stderr, "usage: latency HOST PORT N USERS COMMAND_A... -- COMMAND_B...\n");
        return 2;
    }
    fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) die("socket");
    struct sockaddr_in addr = {0};
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) die("inet_pton");
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) != 0) die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));

    uint64_t *times[2] = {malloc(sizeof(uint64_t) * (size_t)n), malloc(sizeof(uint64_t) * (size_t)n)};
    if (!times[0] || !times[1]) die("malloc");
    srandom(42);
    for (long i = 0; i < n + WARMUP; i++) {
        int order[2] = {i % 2, 1 - i % 2};
        for (int k = 0; k < 2; k++) {
            int c = order[k];
            char user[32];
            snprintf(user, sizeof(user), "%012ld", random() % users);
            size_t len = encode(&cmds[c], user);
            uint64_t t0 = now_ns();
            for (size_t sent = 0; sent < len;) {
                ssize_t w = write(fd, outbuf + sent, len - sent);
                if (w <= 0) die("write");
                sent += (size_t)w;
            }
            reply();
            uint64_t dt = now_ns() - t0;
            if (i >= WARMUP) times[c][i - WARMUP] = dt;
        }
    }
    for (int c = 0; c < 2; c++) qsort(times[c], (size_t)n, sizeof(uint64_t), cmp);
    printf("%.4f %.4f %.4f %.4f\n", pct(times[0], n, 0.50), pct(times[0], n, 0.99),
           pct(times[1], n, 0.50), pct(times[1], n, 0.99));
    return 0;
}
