/*
 * hostsim: processes that make a benchmark host look busy, and die with their parent.
 *
 *   hostsim idle N [PREFIX]   fork N children that block in pause(); child i names itself
 *                             PREFIX<i> (comm, default "idle-"), so that per-process tools
 *                             see N distinct names
 *   hostsim spin N            fork N children that spin on the CPU (load for benchmarks)
 *
 * Prints "READY" once every child has named itself, then waits for end of file on stdin,
 * SIGKILLs its children and exits. Every
 * child has PR_SET_PDEATHSIG(SIGKILL): if hostsim dies (even by SIGKILL), they die too.
 * The benchmark sets the same on hostsim itself, so nothing outlives the benchmark.
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void child(int spin, const char *prefix, int i, pid_t parent, int ready) {
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
        _exit(0);
    char name[16];
    snprintf(name, sizeof name, "%s%d", prefix, i);
    prctl(PR_SET_NAME, name);
    if (write(ready, "", 1) != 1)
        _exit(1);
    close(ready);
    if (spin) {
        volatile unsigned long n = 0;
        for (;;)
            n++;
    }
    for (;;)
        pause();
}

int main(int argc, char **argv) {
    if (argc < 3 || (strcmp(argv[1], "idle") && strcmp(argv[1], "spin"))) {
        fprintf(stderr, "usage: %s idle|spin N [PREFIX]\n", argv[0]);
        return 2;
    }
    int spin = strcmp(argv[1], "spin") == 0;
    long n = strtol(argv[2], NULL, 10);
    const char *prefix = argc > 3 ? argv[3] : (spin ? "spin-" : "idle-");
    if (n < 0 || n > 100000) {
        fprintf(stderr, "hostsim: N must be 0..100000\n");
        return 2;
    }
    pid_t self = getpid();
    int ready[2];
    if (pipe(ready) != 0)
        return 1;
    char buf[256];
    pid_t *pids = calloc((size_t)n + 1, sizeof *pids);
    if (pids == NULL)
        return 1;
    for (long i = 0; i < n; i++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("hostsim: fork");
            for (long j = 0; j < i; j++)
                kill(pids[j], SIGKILL);
            return 1;
        }
        if (pid == 0)
            child(spin, prefix, (int)i, self, ready[1]);
        pids[i] = pid;
    }
    close(ready[1]);
    for (long got = 0; got < n;) {
        ssize_t r = read(ready[0], buf, sizeof buf);
        if (r <= 0) {
            fprintf(stderr, "hostsim: a child died before it was ready\n");
            return 1;
        }
        got += r;
    }
    close(ready[0]);
    printf("READY\n");
    fflush(stdout);
    while (read(0, buf, sizeof buf) > 0)
        ;
    for (long i = 0; i < n; i++)
        kill(pids[i], SIGKILL);
    while (wait(NULL) > 0)
        ;
    return 0;
}
