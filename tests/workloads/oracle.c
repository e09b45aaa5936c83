/*
 * The full-state oracle of the cross-CPU matrix (tests/matrix.py): a process that is checkpointed
 * while it holds known values in every register an XSAVE signal frame carries, and checks them all
 * itself after the restore, at every rt_sigreturn and in the threads CRIU restored outside handlers.
 *
 *   oracle DIR SEED MODE
 *
 * MODE: single     the main thread sits in its SIGUSR1 handler
 *       threads    three threads, each in its own SIGUSR1 handler with its own values
 *       nested     in the SIGUSR1 handler a second signal (SIGRTMIN) arrives with other values
 *       altstack   the handler runs on a sigaltstack (SA_ONSTACK)
 *       stale      the handler returns at once (its frame stays below SP); main then holds values
 *       pkeys      like single with a non-default PKRU (pkey_alloc + write-disable); 77 without pkeys
 *       nohandler  no handler runs: main holds values in its registers across a wait
 * Every mode also runs an "idle" thread that is in no handler: it holds values in its registers
 * across a wait, and at the end compares its current PKRU with what it should be.
 *
 * What is held and checked, as far as the CPU has it when the process starts: vector registers
 * (XMM0-15 without AVX; YMM0-15 both halves with AVX; ZMM0-31 and opmask k0-7 with AVX-512), MXCSR,
 * the x87 control word and st(0) (80 bits), and PKRU (RDPKRU) where the CPU running the check has
 * protection keys. The expected PKRU is the value the thread had when it was checkpointed, or the
 * kernel's default 0x55555554 when the source CPU had no protection keys (a fresh task on the
 * destination gets that; 0 would open every key).
 *
 * Output in DIR, JSON lines appended to "result":
 *   {"event": "start", ...}                      the source CPU as the process saw it
 *   {"tid": T, "level": L, "kind": "frame|current|idle", "ok": true|false, "lost": [...], ...}
 *       frame:   the registers an rt_sigreturn gave back to handler level L (the frame's content)
 *       current: what a handler held in its own registers (the thread state CRIU restored)
 *       idle:    the same for a thread in no handler, plus its current PKRU
 *   {"event": "signal", "signo": N, "tid": T}     a fatal signal (SIGSEGV, SIGILL, ...) arrived
 * plus truth-<tid>-<level>.json (the frame as the handler saw it), "ready" and "done".
 * Exit code 77: the machine lacks what the mode needs.
 */
#define _GNU_SOURCE
#include <cpuid.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <ucontext.h>
#include <unistd.h>

#define INIT_PKRU 0x55555554u
#define NTHREADS 3

struct state {
	uint8_t v[32][64]; /* vector register n at v[n]: XMM bytes 0-15, YMM 0-31, ZMM 0-63 */
	uint16_t k[8];
	uint32_t mxcsr;
	uint16_t fcw;
	uint8_t st0[10];
} __attribute__((aligned(64)));

static struct state dflt = {.mxcsr = 0x1f80, .fcw = 0x037f};

/* ---- register transfer: load everything, one syscall, store everything ---- */
#define PRE "ldmxcsr %c[omx](%[in])\n\tfldcw %c[ofcw](%[in])\n\tfldt %c[ost](%[in])\n\t"
#define POST                                                                                           \
	"fstpt %c[ost](%[out])\n\tfnstcw %c[ofcw](%[out])\n\tstmxcsr %c[omx](%[out])\n\t"           \
	"ldmxcsr %c[omx](%[dflt])\n\tfldcw %c[ofcw](%[dflt])\n\t"
#define L16(op, r)                                                                                     \
	op " 0(%[in]), %%" r "0\n\t" op " 64(%[in]), %%" r "1\n\t" op " 128(%[in]), %%" r "2\n\t"      \
	op " 192(%[in]), %%" r "3\n\t" op " 256(%[in]), %%" r "4\n\t" op " 320(%[in]), %%" r "5\n\t"  \
	op " 384(%[in]), %%" r "6\n\t" op " 448(%[in]), %%" r "7\n\t" op " 512(%[in]), %%" r "8\n\t"  \
	op " 576(%[in]), %%" r "9\n\t" op " 640(%[in]), %%" r "10\n\t" op " 704(%[in]), %%" r "11\n\t" \
	op " 768(%[in]), %%" r "12\n\t" op " 832(%[in]), %%" r "13\n\t" op " 896(%[in]), %%" r "14\n\t" \
	op " 960(%[in]), %%" r "15\n\t"
#define S16(op, r)                                                                                     \
	op " %%" r "0, 0(%[out])\n\t" op " %%" r "1, 64(%[out])\n\t" op " %%" r "2, 128(%[out])\n\t"   \
	op " %%" r "3, 192(%[out])\n\t" op " %%" r "4, 256(%[out])\n\t" op " %%" r "5, 320(%[out])\n\t" \
	op " %%" r "6, 384(%[out])\n\t" op " %%" r "7, 448(%[out])\n\t" op " %%" r "8, 512(%[out])\n\t" \
	op " %%" r "9, 576(%[out])\n\t" op " %%" r "10, 640(%[out])\n\t" op " %%" r "11, 704(%[out])\n\t" \
	op " %%" r "12, 768(%[out])\n\t" op " %%" r "13, 832(%[out])\n\t" op " %%" r "14, 896(%[out])\n\t" \
	op " %%" r "15, 960(%[out])\n\t"
#define L16HI                                                                                          \
	"vmovdqu64 1024(%[in]), %%zmm16\n\t" "vmovdqu64 1088(%[in]), %%zmm17\n\t"                      \
	"vmovdqu64 1152(%[in]), %%zmm18\n\t" "vmovdqu64 1216(%[in]), %%zmm19\n\t"                      \
	"vmovdqu64 1280(%[in]), %%zmm20\n\t" "vmovdqu64 1344(%[in]), %%zmm21\n\t"                      \
	"vmovdqu64 1408(%[in]), %%zmm22\n\t" "vmovdqu64 1472(%[in]), %%zmm23\n\t"                      \
	"vmovdqu64 1536(%[in]), %%zmm24\n\t" "vmovdqu64 1600(%[in]), %%zmm25\n\t"                      \
	"vmovdqu64 1664(%[in]), %%zmm26\n\t" "vmovdqu64 1728(%[in]), %%zmm27\n\t"                      \
	"vmovdqu64 1792(%[in]), %%zmm28\n\t" "vmovdqu64 1856(%[in]), %%zmm29\n\t"                      \
	"vmovdqu64 1920(%[in]), %%zmm30\n\t" "vmovdqu64 1984(%[in]), %%zmm31\n\t"
#define S16HI                                                                                          \
	"vmovdqu64 %%zmm16, 1024(%[out])\n\t" "vmovdqu64 %%zmm17, 1088(%[out])\n\t"                    \
	"vmovdqu64 %%zmm18, 1152(%[out])\n\t" "vmovdqu64 %%zmm19, 1216(%[out])\n\t"                    \
	"vmovdqu64 %%zmm20, 1280(%[out])\n\t" "vmovdqu64 %%zmm21, 1344(%[out])\n\t"                    \
	"vmovdqu64 %%zmm22, 1408(%[out])\n\t" "vmovdqu64 %%zmm23, 1472(%[out])\n\t"                    \
	"vmovdqu64 %%zmm24, 1536(%[out])\n\t" "vmovdqu64 %%zmm25, 1600(%[out])\n\t"                    \
	"vmovdqu64 %%zmm26, 1664(%[out])\n\t" "vmovdqu64 %%zmm27, 1728(%[out])\n\t"                    \
	"vmovdqu64 %%zmm28, 1792(%[out])\n\t" "vmovdqu64 %%zmm29, 1856(%[out])\n\t"                    \
	"vmovdqu64 %%zmm30, 1920(%[out])\n\t" "vmovdqu64 %%zmm31, 1984(%[out])\n\t"
#define LK                                                                                             \
	"kmovw %c[ok]+0(%[in]), %%k0\n\t" "kmovw %c[ok]+2(%[in]), %%k1\n\t"                            \
	"kmovw %c[ok]+4(%[in]), %%k2\n\t" "kmovw %c[ok]+6(%[in]), %%k3\n\t"                            \
	"kmovw %c[ok]+8(%[in]), %%k4\n\t" "kmovw %c[ok]+10(%[in]), %%k5\n\t"                           \
	"kmovw %c[ok]+12(%[in]), %%k6\n\t" "kmovw %c[ok]+14(%[in]), %%k7\n\t"
#define SK                                                                                             \
	"kmovw %%k0, %c[ok]+0(%[out])\n\t" "kmovw %%k1, %c[ok]+2(%[out])\n\t"                          \
	"kmovw %%k2, %c[ok]+4(%[out])\n\t" "kmovw %%k3, %c[ok]+6(%[out])\n\t"                          \
	"kmovw %%k4, %c[ok]+8(%[out])\n\t" "kmovw %%k5, %c[ok]+10(%[out])\n\t"                         \
	"kmovw %%k6, %c[ok]+12(%[out])\n\t" "kmovw %%k7, %c[ok]+14(%[out])\n\t"
#define XMM_CLOBBERS                                                                                   \
	"xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11",  \
	"xmm12", "xmm13", "xmm14", "xmm15"
#define XFER(NAME, LOADS, STORES)                                                                      \
	static void NAME(struct state *in, struct state *out, long nr, long a1, long a2, long a3)      \
	{                                                                                              \
		__asm__ volatile(PRE LOADS "syscall\n\t" STORES POST                                   \
				 : "+a"(nr)                                                            \
				 : [in] "r"(in), [out] "r"(out), [dflt] "r"(&dflt), "D"(a1), "S"(a2),  \
				   "d"(a3), [omx] "i"(offsetof(struct state, mxcsr)),                  \
				   [ofcw] "i"(offsetof(struct state, fcw)),                            \
				   [ost] "i"(offsetof(struct state, st0)),                             \
				   [ok] "i"(offsetof(struct state, k))                                 \
				 : "rcx", "r11", "memory", XMM_CLOBBERS);                              \
	}
XFER(xfer_128, L16("movdqu", "xmm"), S16("movdqu", "xmm"))
XFER(xfer_256, L16("vmovdqu", "ymm"), S16("vmovdqu", "ymm") "vzeroupper\n\t")
XFER(xfer_512, L16("vmovdqu64", "zmm") L16HI LK, S16("vmovdqu64", "zmm") S16HI SK "vzeroupper\n\t")

static int width; /* 128, 256 or 512: what this process holds, decided once at start */
static int pku_at_start;
static const char *dir, *mode;
static unsigned long seed;
static volatile sig_atomic_t released;
static int entered, expected;
static __thread int depth;
static __thread volatile uint32_t pkru_want; /* per level: what the frame must give back */
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;

static long gettid_(void) { return syscall(SYS_gettid); }

static void xfer(struct state *in, struct state *out, long nr, long a1, long a2, long a3)
{
	if (width == 512)
		xfer_512(in, out, nr, a1, a2, a3);
	else if (width == 256)
		xfer_256(in, out, nr, a1, a2, a3);
	else
		xfer_128(in, out, nr, a1, a2, a3);
}

static uint64_t xgetbv0(void)
{
	uint32_t a, d;
	__asm__ volatile("xgetbv" : "=a"(a), "=d"(d) : "c"(0));
	return ((uint64_t)d << 32) | a;
}

static int has_osxsave(void)
{
	unsigned a, b, c, d;
	__cpuid(1, a, b, c, d);
	return (c >> 27) & 1;
}

static int has_pku(void) /* CPUID of the CPU running now: CR4.PKE set by the kernel */
{
	unsigned a, b, c, d;
	if (__get_cpuid_max(0, NULL) < 7)
		return 0;
	__cpuid_count(7, 0, a, b, c, d);
	return (c >> 4) & 1;
}

static uint32_t rdpkru(void)
{
	uint32_t a, d;
	__asm__ volatile("rdpkru" : "=a"(a), "=d"(d) : "c"(0));
	return a;
}

static void wrpkru(uint32_t v) { __asm__ volatile("wrpkru" : : "a"(v), "c"(0), "d"(0)); }

static int detect_width(void)
{
	unsigned a, b, c, d;
	if (!has_osxsave())
		return 128;
	uint64_t xcr0 = xgetbv0();
	__cpuid(1, a, b, c, d);
	int avx = ((c >> 28) & 1) && (xcr0 & 6) == 6;
	__cpuid_count(7, 0, a, b, c, d);
	int avx512 = avx && ((b >> 16) & 1) && (xcr0 & 0xe6) == 0xe6;
	return avx512 ? 512 : avx ? 256 : 128;
}

static void fill(struct state *s, unsigned long k)
{
	for (int r = 0; r < 32; r++)
		for (int b = 0; b < 64; b++)
			s->v[r][b] = (uint8_t)(k * 131u + r * 37u + b * 7u + (b >> 4) * 91u + 1u);
	for (int i = 0; i < 8; i++)
		s->k[i] = (uint16_t)(k * 2654435761u + i * 40503u + 1u);
	/* every exception masked, DAZ and FZ set, a rounding mode that depends on k: not the default */
	s->mxcsr = 0x1f80 | 0x40 | 0x8000 | (uint32_t)((k % 3 + 1) << 13);
	/* every exception masked, 53-bit precision, a rounding mode that depends on k */
	s->fcw = (uint16_t)(0x027f | ((k % 3 + 1) << 10));
	uint64_t mant = 0x8000000000000000ull | (k * 0x9e3779b97f4a7c15ull >> 1);
	uint16_t exp = (uint16_t)(0x3fff + (k % 64));
	memcpy(s->st0, &mant, 8);
	memcpy(s->st0 + 8, &exp, 2);
}

/* ---- output ---- */
static void append(const char *name, const char *text)
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

static void emit(const char *line)
{
	pthread_mutex_lock(&out_lock);
	append("result", line);
	pthread_mutex_unlock(&out_lock);
}

static int add(char *buf, int n, int cap, const char *fmt, const char *name, int idx, int *count)
{
	if (n < cap - 48)
		n += snprintf(buf + n, cap - n, "%s\"%s%d%s\"", (*count)++ ? ", " : "", name, idx, fmt);
	return n;
}

/* Compare what was held with what came back; `pkru_check` says whether PKRU is part of it. */
static void report(int level, const char *kind, const struct state *want, const struct state *got,
		   int pkru_check, uint32_t pkru_expect)
{
	char line[4096];
	int n = 0, lost = 0;
	char lostbuf[3000];
	int ln = 0;
	int regs = width == 512 ? 32 : 16;
	for (int r = 0; r < regs; r++) {
		if (r >= 16) {
			if (memcmp(want->v[r], got->v[r], 64))
				ln = add(lostbuf, ln, sizeof lostbuf, "", "zmm", r, &lost);
			continue;
		}
		if (memcmp(want->v[r], got->v[r], 16))
			ln = add(lostbuf, ln, sizeof lostbuf, "", "xmm", r, &lost);
		if (width >= 256 && memcmp(want->v[r] + 16, got->v[r] + 16, 16))
			ln = add(lostbuf, ln, sizeof lostbuf, ".hi", "ymm", r, &lost);
		if (width == 512 && memcmp(want->v[r] + 32, got->v[r] + 32, 32))
			ln = add(lostbuf, ln, sizeof lostbuf, ".hi", "zmm", r, &lost);
	}
	if (width == 512)
		for (int i = 0; i < 8; i++)
			if (want->k[i] != got->k[i])
				ln = add(lostbuf, ln, sizeof lostbuf, "", "k", i, &lost);
	const char *extra[] = {want->mxcsr != got->mxcsr ? "mxcsr" : NULL, want->fcw != got->fcw ? "fcw" : NULL,
			       memcmp(want->st0, got->st0, 10) ? "st0" : NULL};
	for (unsigned i = 0; i < 3; i++)
		if (extra[i] && ln < (int)sizeof lostbuf - 48)
			ln += snprintf(lostbuf + ln, sizeof lostbuf - ln, "%s\"%s\"", lost++ ? ", " : "", extra[i]);
	uint32_t pkru = 0;
	int pkru_now = pkru_check && has_pku();
	if (pkru_now) {
		pkru = rdpkru();
		if (pkru != pkru_expect && ln < (int)sizeof lostbuf - 48)
			ln += snprintf(lostbuf + ln, sizeof lostbuf - ln, "%s\"pkru\"", lost++ ? ", " : "");
	}
	lostbuf[ln] = 0;
	n += snprintf(line + n, sizeof line - n,
		      "{\"tid\": %ld, \"level\": %d, \"kind\": \"%s\", \"ok\": %s, \"lost\": [%s], \"width\": %d, "
		      "\"mxcsr\": \"0x%x\", \"mxcsr_want\": \"0x%x\", \"fcw\": \"0x%x\", \"fcw_want\": \"0x%x\"",
		      gettid_(), level, kind, lost ? "false" : "true", lostbuf, width, got->mxcsr, want->mxcsr,
		      got->fcw, want->fcw);
	if (pkru_now)
		n += snprintf(line + n, sizeof line - n, ", \"pkru\": \"0x%08x\", \"pkru_want\": \"0x%08x\"", pkru,
			      pkru_expect);
	else
		n += snprintf(line + n, sizeof line - n, ", \"pkru\": null");
	snprintf(line + n, sizeof line - n, "}\n");
	emit(line);
}

/* A fatal signal: one line written without glibc's CPU-dispatched string functions (they may use
 * instructions this CPU lacks), then the default action. */
static void fatal_handler(int sig)
{
	char line[96] = "{\"event\": \"signal\", \"signo\": ";
	char num[24];
	int n = (int)strlen(line), k = 0;
	long vals[2] = {sig, gettid_()};
	for (int j = 0; j < 2; j++) {
		long v = vals[j];
		k = 0;
		do
			num[k++] = (char)('0' + v % 10);
		while ((v /= 10) && k < 20);
		while (k)
			line[n++] = num[--k];
		const char *sep = j == 0 ? ", \"tid\": " : "}\n";
		while (*sep)
			line[n++] = *sep++;
	}
	char path[4096];
	int p = 0;
	for (const char *s = dir; *s && p < 4000; s++)
		path[p++] = *s;
	for (const char *s = "/result"; *s; s++)
		path[p++] = *s;
	path[p] = 0;
	int fd = (int)syscall(SYS_open, path, O_WRONLY | O_CREAT | O_APPEND, 0644);
	if (fd >= 0) {
		syscall(SYS_write, fd, line, n);
		syscall(SYS_close, fd);
	}
	signal(sig, SIG_DFL);
	raise(sig);
}

/* ---- the scenario ---- */
static void mark_entered(void)
{
	if (__atomic_add_fetch(&entered, 1, __ATOMIC_SEQ_CST) == expected)
		append("ready", "ready\n");
}

static uint32_t pkru_now_or_init(void) { return pku_at_start ? rdpkru() : INIT_PKRU; }

/* Hold values across waits until released; report what the last round gave back. */
static void hold(unsigned long k, int level, const char *kind, int pkru_check, uint32_t pkru_expect)
{
	struct state in, out;
	fill(&in, k);
	mark_entered();
	do {
		struct timespec ts = {0, 20 * 1000 * 1000};
		memset(&out, 0, sizeof out);
		xfer(&in, &out, SYS_nanosleep, (long)&ts, 0, 0);
	} while (!released);
	report(level, kind, &in, &out, pkru_check, pkru_expect);
}

/* Load values, signal this thread, store: only signal delivery and rt_sigreturn lie in between. */
static void signal_level(unsigned long k, int level, int sig)
{
	struct state in, out;
	fill(&in, k);
	memset(&out, 0, sizeof out);
	uint32_t saved = pkru_want;
	pkru_want = pkru_now_or_init();
	uint32_t expect = pkru_want;
	xfer(&in, &out, SYS_tgkill, getpid(), gettid_(), sig);
	pkru_want = saved;
	report(level, "frame", &in, &out, 1, expect);
}

static void handler(int sig, siginfo_t *si, void *ucp)
{
	(void)si;
	ucontext_t *uc = ucp;
	long tid = gettid_();
	uint8_t *fp = (uint8_t *)uc->uc_mcontext.fpregs;
	uint32_t magic1 = 0, ext = 0, xsize = 0;
	uint64_t xfeat = 0, xbv = 0;
	if (fp) {
		memcpy(&magic1, fp + 464, 4);
		memcpy(&ext, fp + 468, 4);
		memcpy(&xfeat, fp + 472, 8);
		memcpy(&xsize, fp + 480, 4);
		/* an FXSAVE-only frame (CPU without XSAVE: magic1, xstate_size 512, no magic2) ends at +512:
		 * at the top of a sigaltstack the bytes after it are not mapped */
		if (magic1 == 0x46505853u && xsize >= 576)
			memcpy(&xbv, fp + 512, 8);
	}
	int level = depth++;
	char name[64], text[1024];
	snprintf(name, sizeof name, "truth-%ld-%d.json", tid, level);
	snprintf(text, sizeof text,
		 "{\"pid\": %d, \"tid\": %ld, \"depth\": %d, \"signo\": %d, \"frame\": %lu, \"fpstate\": %lu, "
		 "\"magic1\": %u, \"extended_size\": %u, \"xfeatures\": %lu, \"xstate_size\": %u, "
		 "\"xstate_bv\": %lu, \"pkru\": %u, \"width\": %d, \"mode\": \"%s\", \"seed\": %lu}\n",
		 getpid(), tid, level, sig, (unsigned long)uc - 8, (unsigned long)fp, magic1, ext,
		 (unsigned long)xfeat, xsize, (unsigned long)xbv, pkru_want, width, mode, seed);
	append(name, text);
	if (!strcmp(mode, "stale")) {
		depth--;
		return;
	}
	if (!strcmp(mode, "nested") && level == 0) {
		signal_level(seed + 1000 + (unsigned long)tid, 1, SIGRTMIN);
		depth--;
		return;
	}
	/* the innermost level: hold other values in the thread's own registers until released */
	hold(seed + 5000 + (unsigned long)tid, level, "current", 0, 0);
	depth--;
}

static void release_handler(int sig)
{
	(void)sig;
	released = 1;
}

static void *handler_thread(void *arg)
{
	signal_level((unsigned long)arg, 0, SIGUSR1);
	return NULL;
}

static void *idle_thread(void *arg)
{
	hold((unsigned long)arg, 0, "idle", 1, pkru_now_or_init());
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc < 4) {
		fprintf(stderr, "usage: %s DIR SEED MODE\n", argv[0]);
		return 2;
	}
	dir = argv[1];
	seed = strtoul(argv[2], NULL, 0);
	mode = argv[3];
	width = detect_width();
	pku_at_start = has_pku();

	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = fatal_handler;
	sa.sa_flags = SA_RESETHAND | SA_NODEFER;
	for (int s = 1; s < 32; s++)
		if (s == SIGSEGV || s == SIGILL || s == SIGBUS || s == SIGFPE || s == SIGABRT)
			sigaction(s, &sa, NULL);

	memset(&sa, 0, sizeof sa);
	sa.sa_handler = release_handler;
	sigaction(SIGUSR2, &sa, NULL);

	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = handler;
	sa.sa_flags = SA_SIGINFO;
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
		if (!pku_at_start)
			return 77;
		int key = (int)syscall(SYS_pkey_alloc, 0, 0);
		if (key < 0)
			return 77;
		wrpkru(rdpkru() | 2u << (2 * key)); /* PKEY_DISABLE_WRITE for the new key */
	}

	char start[512];
	snprintf(start, sizeof start,
		 "{\"event\": \"start\", \"pid\": %d, \"mode\": \"%s\", \"width\": %d, \"pku\": %s, "
		 "\"xcr0\": \"0x%lx\", \"pkru\": \"0x%08x\"}\n",
		 getpid(), mode, width, pku_at_start ? "true" : "false",
		 has_osxsave() ? (unsigned long)xgetbv0() : 0ul, pkru_now_or_init());
	emit(start);

	int threads = !strcmp(mode, "threads");
	expected = 1 + (threads ? NTHREADS : 1); /* the idle thread + every holder */
	pthread_t idle, th[NTHREADS];
	pthread_create(&idle, NULL, idle_thread, (void *)(seed + 9000));
	if (threads) {
		for (int i = 0; i < NTHREADS; i++)
			pthread_create(&th[i], NULL, handler_thread, (void *)(seed + 17 * (i + 1)));
		for (int i = 0; i < NTHREADS; i++)
			pthread_join(th[i], NULL);
	} else if (!strcmp(mode, "nohandler")) {
		hold(seed, 0, "idle", 1, pkru_now_or_init());
	} else {
		signal_level(seed, 0, SIGUSR1);
		if (!strcmp(mode, "stale"))
			hold(seed + 3000, 0, "idle", 1, pkru_now_or_init());
	}
	pthread_join(idle, NULL);
	append("done", "done\n");
	return 0;
}
