/*
 * A profiled vector program: ITIMER_PROF fires at the tick rate (every 200 us asked) and its SIGPROF
 * handler does vector work of its own for ~2 ms, so a checkpoint at a random moment often lands in it.
 * The main loop keeps 4 YMM registers live across long asm blocks (where the signal can interrupt
 * it) and checks every result; corruption of the state restored from a signal frame shows up as a
 * wrong sum.
 *
 *   prof_vector DIR      writes DIR/ready, then on SIGUSR2 writes DIR/result ("OK n" or "CORRUPT ...")
 *                        and DIR/done, and exits.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static const char *dir;
static volatile sig_atomic_t stop;
static volatile uint64_t handler_runs;

static void put(const char *name, const char *text)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (fd < 0 || write(fd, text, strlen(text)) < 0)
		_exit(3);
	close(fd);
}

static void on_prof(int sig, siginfo_t *si, void *uc)
{
	(void)sig; (void)si; (void)uc;
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	do { /* clobber every YMM register repeatedly for ~2 ms */
		__asm__ volatile("vpcmpeqd %%ymm0, %%ymm0, %%ymm0\n\t"
				 "vpaddd %%ymm0, %%ymm0, %%ymm1\n\t" "vpaddd %%ymm1, %%ymm1, %%ymm2\n\t"
				 "vpaddd %%ymm2, %%ymm2, %%ymm3\n\t" "vpxor %%ymm3, %%ymm1, %%ymm4\n\t"
				 ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4");
		clock_gettime(CLOCK_MONOTONIC, &t);
	} while ((t.tv_sec - t0.tv_sec) * 1000000000L + (t.tv_nsec - t0.tv_nsec) < 2000000);
	handler_runs++;
}

static void on_usr2(int sig) { (void)sig; stop = 1; }

int main(int argc, char **argv)
{
	if (argc < 2)
		return 2;
	dir = argv[1];
	if (!__builtin_cpu_supports("avx2"))
		return 77;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_prof;
	sa.sa_flags = SA_SIGINFO | SA_RESTART;
	sigaction(SIGPROF, &sa, NULL);
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr2;
	sigaction(SIGUSR2, &sa, NULL);
	struct itimerval it = {{0, 200}, {0, 200}};
	setitimer(ITIMER_PROF, &it, NULL);
	put("ready", "ready\n");

	uint32_t a[8], b[8], out[8];
	uint64_t rounds = 0, bad = 0;
	for (int i = 0; i < 8; i++) {
		a[i] = 0x1000u * (i + 1);
		b[i] = 3u + i;
	}
	const uint32_t steps = 200000;
	while (!stop) {
		/* out = a + steps * b, computed with ymm registers live through the whole loop */
		__asm__ volatile("vmovdqu %[a], %%ymm8\n\t"
				 "vmovdqu %[b], %%ymm9\n\t"
				 "mov %[n], %%ecx\n"
				 "1:\n\t"
				 "vpaddd %%ymm9, %%ymm8, %%ymm8\n\t"
				 "dec %%ecx\n\t"
				 "jnz 1b\n\t"
				 "vmovdqu %%ymm8, %[o]\n\t"
				 : [o] "=m"(out)
				 : [a] "m"(a), [b] "m"(b), [n] "r"(steps)
				 : "rcx", "xmm8", "xmm9", "memory", "cc");
		for (int i = 0; i < 8; i++)
			if (out[i] != a[i] + steps * b[i])
				bad++;
		rounds++;
	}
	char text[256];
	if (bad)
		snprintf(text, sizeof text, "CORRUPT %lu of %lu rounds wrong (%lu handler runs)\n",
			 (unsigned long)bad, (unsigned long)rounds, (unsigned long)handler_runs);
	else
		snprintf(text, sizeof text, "OK %lu rounds, %lu handler runs\n", (unsigned long)rounds,
			 (unsigned long)handler_runs);
	put("result", text);
	put("done", "done\n");
	return 0;
}
