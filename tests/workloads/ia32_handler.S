/*
 * A 32-bit (compat) process parked inside a SIGUSR1 handler with known values in ymm0..7, so a
 * checkpoint holds a live rt_sigframe_ia32 (FSAVE header + XSAVE image). No libc: raw int $0x80.
 *
 *   ia32_handler DIR     chdir(DIR); in the handler: frame.bin (the frame address, u32), ready;
 *                        after SIGUSR2 and sigreturn: result ("OK" or "CORRUPT"), done.
 * Build: gcc -m32 -nostdlib -static -o ia32_handler ia32_handler.S
 */
	.text
	.globl _start
_start:
	mov	8(%esp), %ebx		/* argv[1] */
	test	%ebx, %ebx
	jz	fail
	mov	$12, %eax		/* chdir */
	int	$0x80
	test	%eax, %eax
	jnz	fail
	mov	$66, %eax		/* setsid */
	int	$0x80

	mov	$174, %eax		/* rt_sigaction(SIGUSR1, &act_usr1, NULL, 8) */
	mov	$10, %ebx
	mov	$act_usr1, %ecx
	xor	%edx, %edx
	mov	$8, %esi
	int	$0x80
	test	%eax, %eax
	jnz	fail
	mov	$174, %eax		/* rt_sigaction(SIGUSR2, &act_usr2, NULL, 8) */
	mov	$12, %ebx
	mov	$act_usr2, %ecx
	xor	%edx, %edx
	mov	$8, %esi
	int	$0x80

	vmovdqu	want+0, %ymm0
	vmovdqu	want+32, %ymm1
	vmovdqu	want+64, %ymm2
	vmovdqu	want+96, %ymm3
	vmovdqu	want+128, %ymm4
	vmovdqu	want+160, %ymm5
	vmovdqu	want+192, %ymm6
	vmovdqu	want+224, %ymm7
	mov	$20, %eax		/* getpid */
	int	$0x80
	mov	%eax, %ebx
	mov	$37, %eax		/* kill(pid, SIGUSR1): the handler runs on the way back */
	mov	$10, %ecx
	int	$0x80
	vmovdqu	%ymm0, got+0
	vmovdqu	%ymm1, got+32
	vmovdqu	%ymm2, got+64
	vmovdqu	%ymm3, got+96
	vmovdqu	%ymm4, got+128
	vmovdqu	%ymm5, got+160
	vmovdqu	%ymm6, got+192
	vmovdqu	%ymm7, got+224

	mov	$want, %esi
	mov	$got, %edi
	mov	$256, %ecx
	cld
	repe cmpsb
	jne	corrupt
	mov	$msg_ok, %ecx
	mov	$3, %edx
	jmp	report
corrupt:
	mov	$msg_bad, %ecx
	mov	$8, %edx
report:
	mov	$name_result, %ebx
	call	write_file
	mov	$name_done, %ebx
	mov	$msg_ok, %ecx
	xor	%edx, %edx
	call	write_file
	mov	$1, %eax
	xor	%ebx, %ebx
	int	$0x80
fail:
	mov	$1, %eax
	mov	$3, %ebx
	int	$0x80

/* write_file(ebx = name, ecx = buf, edx = len): creat + write + close */
write_file:
	push	%ecx
	push	%edx
	mov	$5, %eax		/* open(name, O_WRONLY|O_CREAT|O_TRUNC, 0644) */
	mov	$0x241, %ecx
	mov	$0644, %edx
	int	$0x80
	mov	%eax, %ebx
	pop	%edx
	pop	%ecx
	mov	$4, %eax
	int	$0x80
	mov	$6, %eax
	int	$0x80
	ret

on_usr1:				/* (%esp) = pretcode: the frame starts here */
	mov	%esp, frame_addr
	push	%ebx
	mov	$name_frame, %ebx
	mov	$frame_addr, %ecx
	mov	$4, %edx
	call	write_file
	mov	$name_ready, %ebx
	mov	$msg_ok, %ecx
	mov	$3, %edx
	call	write_file
	vpcmpeqd %ymm0, %ymm0, %ymm0	/* the thread's current state now differs from the frame's */
	vmovdqa	%ymm0, %ymm1
	vmovdqa	%ymm0, %ymm2
	vmovdqa	%ymm0, %ymm3
1:	cmpl	$0, released
	jne	2f
	mov	$162, %eax		/* nanosleep(&ts, NULL) */
	mov	$ts, %ebx
	xor	%ecx, %ecx
	int	$0x80
	jmp	1b
2:	pop	%ebx
	ret

on_usr2:
	movl	$1, released
	ret

restorer:
	mov	$173, %eax		/* rt_sigreturn */
	int	$0x80

	.data
	.align	4
act_usr1: .long on_usr1, 0x04000004, restorer, 0, 0	/* SA_SIGINFO | SA_RESTORER */
act_usr2: .long on_usr2, 0x04000004, restorer, 0, 0	/* rt frame too: one rt_sigreturn restorer */
ts:	.long 0, 20000000
released: .long 0
frame_addr: .long 0
name_frame: .asciz "frame.bin"
name_ready: .asciz "ready"
name_result: .asciz "result"
name_done: .asciz "done"
msg_ok:	.ascii "OK\n"
msg_bad: .ascii "CORRUPT\n"
	.align	32
want:
	.set	i, 0
	.rept	256
	.byte	(i * 37 + 11) & 0xff
	.set	i, i + 1
	.endr
got:	.fill	256, 1, 0
