/* glibc's save-area sizes computed again from CPUID, independently of glibc and of criu-xstate's
 * reading of a checkpoint (tests/test_glibc.py compares the two). Follows sysdeps/x86/cpu-features.c
 * (update_active) and sysdeps/x86/sysdep.h of each version:
 *   2.36: STATE_SAVE_OFFSET 64, STATE_SAVE_MASK SSE|AVX|BNDREGS|K|ZMM_H|ZMM (0xee);
 *         xsave_state_size = ALIGN_UP(compacted(mask) + 64, 64) with XSAVEC, else ALIGN_UP(ebx + 64, 64)
 *   2.41: TLSDESC_CALL_REGISTER_SAVE_AREA 88 (64 + 24), FULL_STATE_SAVE_MASK 0xee|APX|TILECFG|TILEDATA;
 *         tlsdesc = ALIGN_UP(compacted(full) + 88, 64), xsave_state_size = tlsdesc minus the AMX span,
 *         both ALIGN_UP(ebx + 88, 64) without XSAVEC
 * prints "2.36 SIZE" and "2.41 XSAVE_STATE_SIZE TLSDESC_SIZE". */
#include <cpuid.h>
#include <stdio.h>

#define ALIGN64(x) (((x) + 63u) & ~63u)

static unsigned offsets[32], sizes[32];

/* The compacted offsets as glibc's loop computes them: component 2 at 576, each next one after the
 * previous, 64-aligned where CPUID 0xD.i ECX bit 1 says so; components outside mask have size 0. */
static unsigned compacted(unsigned mask)
{
	unsigned a, b, c, d;
	offsets[0] = 0, offsets[1] = 160, offsets[2] = 576;
	sizes[0] = 160, sizes[1] = 256;
	for (int i = 2; i < 32; i++) {
		if (mask & (1u << i)) {
			__cpuid_count(0xd, i, a, b, c, d);
			sizes[i] = a;
		} else {
			c = 0;
			sizes[i] = 0;
		}
		if (i > 2) {
			offsets[i] = offsets[i - 1] + sizes[i - 1];
			if (c & 2)
				offsets[i] = ALIGN64(offsets[i]);
		}
	}
	return offsets[31] + sizes[31];
}

int main(void)
{
	unsigned a, b, c, d, ebx;
	__cpuid_count(0xd, 0, a, ebx, c, d);
	__cpuid_count(0xd, 1, a, b, c, d);
	int xsavec = (a >> 1) & 1;
	if (xsavec) {
		printf("2.36 %u\n", ALIGN64(compacted(0xee) + 64));
		unsigned full = ALIGN64(compacted(0xee | (1u << 19) | (3u << 17)) + 88);
		printf("2.41 %u %u\n", full - (offsets[19] - offsets[17]), full);
	} else {
		printf("2.36 %u\n", ALIGN64(ebx + 64));
		printf("2.41 %u %u\n", ALIGN64(ebx + 88), ALIGN64(ebx + 88));
	}
	return 0;
}
