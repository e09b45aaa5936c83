/*
 * A process that sits inside a signal handler with known values in all 16 YMM registers held across
 * the signal, so that a checkpoint taken now carries a live rt_sigframe whose XSAVE image holds them.
 * After the handler returns (on SIGUSR2), each level checks its own registers and reports OK/CORRUPT.
 *
 *   ymm_handler DIR SEED MODE [NTHREADS]
 *
 * MODE: siginfo    one SA_SIGINFO handler (SIGUSR1)
 *       plain      the same without SA_SIGINFO
 *       threads    NTHREADS threads, each inside its own SIGUSR1 handler with its own values
 *       nested     inside the SIGUSR1 handler a second signal (SIGRTMIN) is raised with other values
 *       altstack   the handler runs on a sigaltstack (SA_ONSTACK)
 *       stale      the handler returns at once: its frame is left below SP; the process then waits
 *       nohandler  no handler runs: the process just waits with its values loaded and checked later
 *       pkeys      like siginfo with a non-default PKRU (pkey_alloc); exits 77 without protection keys
 *
 * Files in DIR: truth-<tid>-<depth>.json (what the handler saw: frame, fpstate, sw bytes),
 * ready (all handlers entered), result (one line per level: "<tid> <depth> OK|CORRUPT ..."), done.
 * Exit code 77: the machine lacks what the mode needs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

typedef uint8_t ymmset[16][32];

/* ymm0..15 <-> 512 bytes at %[in] / %[out] (asm operands of the blocks that use them) */
#define YMM_LD(n, off) "vmovdqu " #off "(%[in]), %%ymm" #n "\n\t"
#define YMM_ST(n, off) "vmovdqu %%ymm" #n ", " #off "(%[out])\n\t"
#define YMM_LOAD_ALL                                                                                   \
	YMM_LD(0, 0) YMM_LD(1, 32) YMM_LD(2, 64) YMM_LD(3, 96) YMM_LD(4, 128) YMM_LD(5, 160)          \
	YMM_LD(6, 192) YMM_LD(7, 224) YMM_LD(8, 256) YMM_LD(9, 288) YMM_LD(10, 320) YMM_LD(11, 352)  \
	YMM_LD(12, 384) YMM_LD(13, 416) YMM_LD(14, 448) YMM_LD(15, 480)
#define YMM_STORE_ALL                                                                                  \
	YMM_ST(0, 0) YMM_ST(1, 32) YMM_ST(2, 64) YMM_ST(3, 96) YMM_ST(4, 128) YMM_ST(5, 160)          \
	YMM_ST(6, 192) YMM_ST(7, 224) YMM_ST(8, 256) YMM_ST(9, 288) YMM_ST(10, 320) YMM_ST(11, 352)  \
	YMM_ST(12, 384) YMM_ST(13, 416) YMM_ST(14, 448) YMM_ST(15, 480)
#define YMM_CLOBBERS                                                                                   \
	"xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",  \
	"xmm12", "xmm13", "xmm14", "xmm15"

static const char *dir;
static const char *mode;
static unsigned long seed;
static int nthreads = 1;
#define MAX_THREADS 512 /* a checkpoint of many threads (model.COMPILED_CORES_FROM) */
static volatile sig_atomic_t released;
static volatile int entered;
static int expected = 1;
static __thread int depth;
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static long gettid_(void) { return syscall(SYS_gettid); }

static void fill(ymmset v, unsigned long s)
{
	for (int r = 0; r < 16; r++)
		for (int b = 0; b < 32; b++)
			v[r][b] = (uint8_t)(s * 131u + r * 37u + b * 7u + (b >> 4) * 91u + 1u);
}

/* Load ymm0-15, send `sig` to this thread with a raw tgkill, store ymm0-15: nothing in between can
 * touch the registers but the kernel's signal delivery and the handler's sigreturn. */
static void load_signal_store(ymmset in, ymmset out, long sig)
{
	long pid = getpid(), tid = gettid_();
	__asm__ volatile(
		YMM_LOAD_ALL
		"mov $234, %%eax\n\t" /* tgkill(pid, tid, sig) */
		"syscall\n\t"
		YMM_STORE_ALL
		:
		: [in] "r"(in), [out] "r"(out), "D"(pid), "S"(tid), "d"(sig)
		: "rax", "rcx", "r11", "memory", YMM_CLOBBERS);
}

/* Hold values in the registers across a wait (no handler): load, wait on raw nanosleep, store. */
static void load_wait_store(ymmset in, ymmset out)
{
	while (!released) {
		struct timespec ts = {0, 20 * 1000 * 1000};
		__asm__ volatile(
			YMM_LOAD_ALL
			"mov $35, %%eax\n\t" /* nanosleep(&ts, NULL) */
			"syscall\n\t"
			YMM_STORE_ALL
			:
			: [in] "r"(in), [out] "r"(out), "D"(&ts), "S"(0L)
			: "rax", "rcx", "r11", "memory", YMM_CLOBBERS);
		if (!released)
			memcpy(out, in, sizeof(ymmset)); /* values checked after the last round only */
	}
}

static void write_file(const char *name, const char *text)
{
	char path[4096];
	snprintf(path, sizeof path, "%s/%s", dir, name);
	int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
	if (fd < 0)
		_exit(3);
	if (write(fd, text, strlen(text)) < 0)
		_exit(3);
	close(fd);
}

static void report(long tid, int level, ymmset want, ymmset got)
{
	char line[512];
	int n = snprintf(line, sizeof line, "%ld %d ", tid, level);
	int bad = 0;
	for (int r = 0; r < 16; r++) {
		int lo = memcmp(want[r], got[r], 16) != 0, hi = memcmp(want[r] + 16, got[r] + 16, 16) != 0;
		if ((lo || hi) && n < (int)sizeof line - 40)
			n += snprintf(line + n, sizeof line - n, "%symm%d:%s%s", bad++ ? "," : "CORRUPT ", r,
				      lo ? "lo" : "", hi ? "hi" : "");
	}
	if (!bad)
		snprintf(line + n, sizeof line - n, "OK");
	strncat(line, "\n", sizeof line - strlen(line) - 1);
	pthread_mutex_lock(&out_lock);
	write_file("result", line);
	pthread_mutex_unlock(&out_lock);
}

static void wait_release(void)
{
	while (!released) {
		struct timespec ts = {0, 20 * 1000 * 1000};
		nanosleep(&ts, NULL);
	}
}

static void clobber_ymm(void)
{
	__asm__ volatile("vpcmpeqd %%ymm0, %%ymm0, %%ymm0\n\t"
			 "vmovdqa %%ymm0, %%ymm1\n\t" "vmovdqa %%ymm0, %%ymm2\n\t" "vmovdqa %%ymm0, %%ymm3\n\t"
			 "vmovdqa %%ymm0, %%ymm4\n\t" "vmovdqa %%ymm0, %%ymm5\n\t" "vmovdqa %%ymm0, %%ymm6\n\t"
			 "vmovdqa %%ymm0, %%ymm7\n\t" "vmovdqa %%ymm0, %%ymm8\n\t" "vmovdqa %%ymm0, %%ymm9\n\t"
			 "vmovdqa %%ymm0, %%ymm10\n\t" "vmovdqa %%ymm0, %%ymm11\n\t" "vmovdqa %%ymm0, %%ymm12\n\t"
			 "vmovdqa %%ymm0, %%ymm13\n\t" "vmovdqa %%ymm0, %%ymm14\n\t" "vmovdqa %%ymm0, %%ymm15\n\t"
			 ::: YMM_CLOBBERS);
}

static void mark_entered(void)
{
	if (__atomic_add_fetch(&entered, 1, __ATOMIC_SEQ_CST) == expected)
		write_file("ready", "ready\n");
}

static void handler(int sig, siginfo_t *si, void *ucp)
{
	ucontext_t *uc = ucp;
	long tid = gettid_();
	uintptr_t frame = (uintptr_t)uc - 8;
	uint8_t *fp = (uint8_t *)uc->uc_mcontext.fpregs;
	uint32_t magic1 = 0, ext = 0, xsize = 0;
	uint64_t xfeat = 0, xbv = 0;
	if (fp) {
		memcpy(&magic1, fp + 464, 4);
		memcpy(&ext, fp + 468, 4);
		memcpy(&xfeat, fp + 472, 8);
		memcpy(&xsize, fp + 480, 4);
		memcpy(&xbv, fp + 512, 8);
	}
	stack_t ss;
	sigaltstack(NULL, &ss);
	char name[64], text[1024];
	int level = depth++;
	snprintf(name, sizeof name, "truth-%ld-%d.json", tid, level);
	snprintf(text, sizeof text,
		 "{\"pid\": %d, \"tid\": %ld, \"depth\": %d, \"signo\": %d, \"siginfo\": %s, \"frame\": %lu, "
		 "\"fpstate\": %lu, \"interrupted_sp\": %lu, \"interrupted_ip\": %lu, \"magic1\": %u, "
		 "\"extended_size\": %u, \"xfeatures\": %lu, \"xstate_size\": %u, \"xstate_bv\": %lu, "
		 "\"on_altstack\": %s, \"altstack_sp\": %lu, \"altstack_size\": %lu, \"mode\": \"%s\", "
		 "\"seed\": %lu}\n",
		 getpid(), tid, level, sig, strcmp(mode, "plain") ? "true" : "false", (unsigned long)frame,
		 (unsigned long)fp, (unsigned long)uc->uc_mcontext.gregs[REG_RSP],
		 (unsigned long)uc->uc_mcontext.gregs[REG_RIP], magic1, ext, (unsigned long)xfeat, xsize,
		 (unsigned long)xbv, (ss.ss_flags & SS_ONSTACK) ? "true" : "false", (unsigned long)ss.ss_sp,
		 (unsigned long)ss.ss_size, mode, seed);
	write_file(name, text);
	(void)si;
	if (!strcmp(mode, "stale")) {
		mark_entered();
		depth--;
		return;
	}
	if (!strcmp(mode, "nested") && level == 0) {
		ymmset in, out;
		fill(in, seed + 1000);
		load_signal_store(in, out, SIGRTMIN);
		report(tid, 1, in, out);
		depth--;
		return;
	}
	clobber_ymm(); /* the thread's current state now differs from the frame's */
	mark_entered();
	wait_release();
	depth--;
}

static void release_handler(int sig) { (void)sig; released = 1; }

static void *thread_main(void *arg)
{
	unsigned long s = (unsigned long)arg;
	ymmset in, out;
	fill(in, s);
	load_signal_store(in, out, SIGUSR1);
	report(gettid_(), 0, in, out);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s DIR SEED MODE [NTHREADS]\n", argv[0]);
		return 2;
	}
	dir = argv[1];
	seed = strtoul(argv[2], NULL, 0);
	mode = argv[3];
	if (argc > 4)
		nthreads = atoi(argv[4]);
	if (!__builtin_cpu_supports("avx"))
		return 77;

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = release_handler;
	sigaction(SIGUSR2, &sa, NULL);

	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = handler;
	sa.sa_flags = strcmp(mode, "plain") ? SA_SIGINFO : 0;
	if (!strcmp(mode, "plain"))
		sa.sa_handler = (void (*)(int))handler;
	if (!strcmp(mode, "altstack")) {
		stack_t ss;
		ss.ss_size = 64 * 1024;
		ss.ss_sp = mmap(NULL, ss.ss_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		ss.ss_flags = 0;
		if (ss.ss_sp == MAP_FAILED || sigaltstack(&ss, NULL))
			return 3;
		sa.sa_flags |= SA_ONSTACK;
	}
	sigaction(SIGUSR1, &sa, NULL);
	sigaction(SIGRTMIN, &sa, NULL);

	if (!strcmp(mode, "pkeys")) {
		int key = syscall(SYS_pkey_alloc, 0, 0);
		if (key < 0)
			return 77;
		/* PKEY_DISABLE_WRITE for the new key: PKRU leaves its default */
		unsigned int pkru;
		__asm__ volatile("xor %%ecx, %%ecx; rdpkru" : "=a"(pkru) : : "rcx", "rdx");
		pkru |= 2u << (2 * key);
		__asm__ volatile("xor %%ecx, %%ecx; xor %%edx, %%edx; wrpkru" : : "a"(pkru) : "rcx", "rdx");
	}

	/* nested: both levels write truth; the inner one marks ready when it waits */
	if (!strcmp(mode, "threads"))
		expected = nthreads;

	ymmset in, out;
	fill(in, seed);
	if (!strcmp(mode, "threads")) {
		static pthread_t th[MAX_THREADS];
		if (nthreads < 1 || nthreads > MAX_THREADS)
			return 2;
		for (int i = 0; i < nthreads; i++)
			pthread_create(&th[i], NULL, thread_main, (void *)(seed + 17 * (i + 1)));
		for (int i = 0; i < nthreads; i++)
			pthread_join(th[i], NULL);
	} else if (!strcmp(mode, "nohandler")) {
		write_file("ready", "ready\n");
		load_wait_store(in, out);
		report(gettid_(), 0, in, out);
	} else {
		load_signal_store(in, out, SIGUSR1);
		if (!strcmp(mode, "stale"))
			wait_release(); /* the frame is stale now; report after the restore */
		report(gettid_(), 0, in, out);
	}
	write_file("done", "done\n");
	return 0;
}
