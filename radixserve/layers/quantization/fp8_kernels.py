"""Triton kernels for block-scaled FP8 linear layers (DeepSeek-V3's format; fp8_utils.py has the formats).

1. `per_token_group_quant_fp8`: x [M, K] -> e4m3 values and one fp32 scale per (row, 128 columns),
   bit for bit what fp8_utils.quantize_activation_per_token_group computes.
2. `w8a8_block_fp8_matmul`: a tiled GEMM over the fp8 activation and the fp8 weight [N, K]. BLOCK_K is
   the quant group (128), so each K step is one fp8 tl.dot (fp32 result) scaled by x_scale[m, kb] *
   w_scale_inv[n // 128, kb] and added to an fp32 accumulator: the scales never enter the dot, and the
   tensor cores' accumulation runs over 128 products at most before the fp32 add (on Hopper fp8 MMA
   accumulates with fewer bits than fp32; promoting every 128 is what DeepSeek-V3 does too).
   `block_fp8_linear` runs 1 then 2 and is the custom op radixserve::block_fp8_linear. From
   GEMM_CUBLAS_MIN_M rows on (0: never) step 2 is cuBLAS's block-scaled FP8 GEMM instead
   (`fp8_cublas.cublas_block_fp8_matmul`, torch's F.scaled_mm with 1x128 / 128x128 scales), the same sum.
3. `fp8_gemv`, batch 1: reading the weight is the whole cost, so it is a GEMV like layers/gemv.py
   over fp8 rows (half the bytes of bf16). A program owns BLOCK_N rows inside one 128-row scale block,
   so it scales the activation slice by that block row's factors once per step instead of every
   weight. The activation stays in its own dtype (no fp8 round trip): the result is F.linear(x,
   dequant(w)) up to summation order, more accurate than the w8a8 path, whose activation rounding
   adds a relative error up to 2^-4 per element. A request decoding alone therefore gets slightly
   different logits than in a batch; the integrator decides whether that matters.
   `fp8_gemv_silu_mul` is its form for a fused gate/up weight: a program owns rows of both halves and
   writes silu(gate) * up, one launch instead of the GEMV and layers/fused.py's silu_and_mul.

Triton's interpreter (CPU tests, triton 3.9) runs the fp8 loads, stores and tl.dot exactly, but its
fp32 -> fp8 cast does not carry a rounding into the exponent and does not saturate (31.2 becomes 16).
Under the interpreter the kernels therefore round to the e4m3 grid in fp32 first (EXACT_CAST), after
which the cast is exact; on the GPU the native cast (cvt.rn.satfinite) does the same rounding.
Written against Triton 3.6's API. RADIXSERVE_TRITON_FP8=0 turns the kernels off (the torch path).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from radixserve.layers.gemv import _row
from radixserve.layers.quantization.fp8_cublas import cublas_block_fp8_fits, cublas_block_fp8_matmul
from radixserve.layers.quantization.fp8_utils import EPS, FP8_DTYPE, FP8_MAX

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without Triton use fp8_utils.block_fp8_linear_torch
    triton = None

ENABLED = os.environ.get("RADIXSERVE_TRITON_FP8", "1") != "0"
# M rows from which the block GEMM is cuBLAS's (F.scaled_mm, 1x128 x 128x128 scales) rather than the
# Triton kernel, where cuBLAS takes the weight; 0 keeps Triton everywhere. scripts/gpu_fp8_gemm_bench.py
# times both (docs/fp8.md).
GEMM_CUBLAS_MIN_M = 128  # H100 2026-12-07: cuBLAS 1.2-1.5x the Triton GEMM at M = 128, 2.1-2.3x from 1024
# GEMM tiles by M bucket: (largest M, config), sized for Hopper's shared memory (a 128 x 128 fp8 tile
# of each operand is 16 KiB a stage). The two larger buckets are the fastest tiles of an H100 sweep at
# M = 128 / 1024 / 4096 (scripts/gpu_fp8_gemm_bench.py --sweep, 2026-12-07); the smaller are untuned.
GEMM_CONFIGS: tuple[tuple[int, dict[str, int]], ...] = (
    (16, dict(BLOCK_M=16, BLOCK_N=64, GROUP_M=1, num_warps=4, num_stages=4)),
    (64, dict(BLOCK_M=32, BLOCK_N=64, GROUP_M=4, num_warps=4, num_stages=4)),
    (256, dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=4)),
    (1 << 62, dict(BLOCK_M=64, BLOCK_N=128, GROUP_M=8, num_warps=4, num_stages=3)),
)
# GEMV: weight elements (bytes) a program reads per step, the widest step along K, warps; the word
# kernel keeps a step's partial sums in registers (BLOCK_N x BLOCK_K / threads of them), the byte
# kernel does not. The word tile has the least total of the word tiles in an H100 sweep (docs/fp8.md);
# PREFETCH is untimed.
GEMV_TILE_ELEMENTS = 8192
GEMV_MAX_BLOCK_K = 1024
GEMV_WARPS = 4
GEMV_PREFETCH = False
# >= 2: the word kernel's full steps in a software-pipelined loop (Triton copies GEMV_STAGES - 1 steps
# ahead into shared memory with cp.async, so loads stay in flight without holding registers); 0 or 1:
# the loop above, loads in registers. Untimed as yet (docs/fp8.md), so off.
GEMV_STAGES = 0
GEMV_WORDS = True  # the word kernel wherever the rows are whole words; False keeps the byte kernel (A/B)
# gate/up and SiLU-and-mul in one word kernel at batch 1 (one launch a layer fewer); off by default: on an
# H100 (2026-12-07) its gate/up took 54.4 us a layer against 49.1 + 1.5 us for the word GEMV then
# silu_and_mul (45.2 + 1.5 with the byte kernel), the step 2% slower (docs/fp8.md). RADIXSERVE_FP8_GEMV_SILU=1
# turns it on
GEMV_SILU = os.environ.get("RADIXSERVE_FP8_GEMV_SILU", "0") == "1"
GEMV_BYTES_TILE_ELEMENTS = 8192
GEMV_BYTES_MAX_BLOCK_K = 2048
GEMV_BYTES_WARPS = 4
# columns a quantiser program covers (several groups of one row)
_QUANT_ELEMENTS = 1024

if triton is not None:
    _MAX = tl.constexpr(FP8_MAX)
    _EPS = tl.constexpr(EPS)
    _INV_MAX = tl.constexpr(1.0 / FP8_MAX)
    _E4M3_IN_FP32 = tl.constexpr(-0x78100000)  # 0x87F00000 as int32: bit 31 and bits 20..26
    _X_UNSCALE = tl.constexpr(2.0**96)
    _OUT_UNSCALE = tl.constexpr(2.0**24)

    @triton.jit
    def _round_to_e4m3(v):
        """v (fp32, |v| <= 448) rounded to the nearest e4m3 value, ties to even, still in fp32."""
        bits = v.to(tl.int32, bitcast=True)
        # e4m3 keeps 3 mantissa bits; below 2^-6 it is subnormal with a fixed step of 2^-9
        exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
        step = ((exp + 124) << 23).to(tl.float32, bitcast=True)  # 2^(exp - 3)
        mag = tl.abs(v) / step  # exact: a power of two; below 16
        mag = ((mag + 12582912.0) - 12582912.0) * step  # + 1.5 * 2^23 rounds to an integer, ties to even
        return tl.where(bits < 0, -mag, mag)  # the sign bit, so -0.0 stays -0.0

    @triton.jit
    def _to_fp8(v, EXACT_CAST: tl.constexpr):
        v = tl.minimum(tl.maximum(v, -_MAX), _MAX)
        if EXACT_CAST:
            v = _round_to_e4m3(v)
        return v.to(tl.float8e4nv)

    @triton.jit
    def _group_quant_kernel(x_ptr, q_ptr, s_ptr, k, num_groups, x_stride, q_stride, s_stride,
                            GROUP: tl.constexpr, GROUPS: tl.constexpr, EXACT_CAST: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        groups = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        mask = cols < k  # zeros past K leave the amax alone
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
        # the reference's ops exactly: a multiply by fp32(1/448), then an IEEE division (div_rn: "/"
        # may be approximate on the GPU)
        scale = tl.maximum(tl.max(tl.abs(x), axis=1), _EPS) * _INV_MAX
        q = _to_fp8(tl.math.div_rn(x, scale[:, None]), EXACT_CAST)
        tl.store(q_ptr + row * q_stride + cols, q, mask=mask)
        tl.store(s_ptr + row * s_stride + groups, scale, mask=groups < num_groups)

    @triton.jit
    def _tile_of(pid, num_m, num_n, GROUP_M: tl.constexpr):
        """(row block, column block) of program pid: GROUP_M row blocks walk the column blocks
        together, so a weight tile one of them reads is still in L2 for the next."""
        per_group = GROUP_M * num_n
        first_m = (pid // per_group) * GROUP_M
        size = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % per_group) % size, (pid % per_group) // size

    @triton.jit
    def _block_fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, m, n, k, a_stride, as_stride,
                               b_stride, bs_stride, c_stride, group_n, HAS_BIAS: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
        pid_m, pid_n = _tile_of(tl.program_id(0), tl.cdiv(m, BLOCK_M), tl.cdiv(n, BLOCK_N), GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # rows and columns past the end are clamped, not masked: loads need no mask, the store drops them
        a_rows = tl.minimum(rows, m - 1).to(tl.int64)
        b_cols = tl.minimum(cols, n - 1).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_rows[:, None] * a_stride + ks[None, :]
        b_ptrs = b_ptr + b_cols[None, :] * b_stride + ks[:, None]  # [BLOCK_K, BLOCK_N], K contiguous
        as_ptrs = as_ptr + a_rows * as_stride
        bs_ptrs = bs_ptr + (b_cols // group_n) * bs_stride
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for kb in range(0, tl.cdiv(k, BLOCK_K)):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:  # zeros past K add nothing
                k_valid = ks < k - kb * BLOCK_K
                a = tl.load(a_ptrs, mask=k_valid[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_valid[:, None], other=0.0)
            a_s = tl.load(as_ptrs + kb)
            b_s = tl.load(bs_ptrs + kb)
            acc += tl.dot(a, b) * (a_s[:, None] * b_s[None, :])
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if HAS_BIAS:
            acc += tl.load(bias_ptr + b_cols).to(tl.float32)[None, :]
        tl.store(c_ptr + rows[:, None].to(tl.int64) * c_stride + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=(rows[:, None] < m) & (cols[None, :] < n))

    @triton.jit
    def _gemv_word_step(x_ptr, s_row, w_rows, cols, words, k0, k, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr):
        """The activation slice, its block factors and the weight words of the step at column k0: unmasked
        for a full step, masked for the tail, nothing read past the end (see layers/gemv.py)."""
        cols = k0 + cols
        words = k0 // 4 + words
        if k0 + BLOCK_K <= k:
            x = tl.load(x_ptr + cols)
            s = tl.load(s_row + cols // GROUP_K)
            q = tl.load(w_rows + words)
        else:
            x = tl.load(x_ptr + cols, mask=cols < k, other=0.0)
            s = tl.load(s_row + cols // GROUP_K, mask=cols < k, other=0.0)
            q = tl.load(w_rows + words, mask=words < k // 4, other=0)
        return x, s, q

    @triton.jit
    def _gemv_weight_step(s_row, w_rows, cols, words, k0, k, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr):
        """_gemv_word_step without the activation: a second row group's factors and words. (Not called by
        _gemv_word_step: that split changes the timed word kernel's sm_90 schedule, checked with ptxas.)"""
        cols = k0 + cols
        words = k0 // 4 + words
        if k0 + BLOCK_K <= k:
            s = tl.load(s_row + cols // GROUP_K)
            q = tl.load(w_rows + words)
        else:
            s = tl.load(s_row + cols // GROUP_K, mask=cols < k, other=0.0)
            q = tl.load(w_rows + words, mask=words < k // 4, other=0)
        return s, q

    @triton.jit
    def _gemv_word_rows(w_ptr, ws_ptr, n, w_stride, ws_stride, GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr):
        """A word-kernel program's output rows, its weight rows (past the end clamped, not masked) and its
        row of block factors (BLOCK_N divides GROUP_N: all of its rows share one)."""
        start = tl.program_id(0) * BLOCK_N
        rows = start + tl.arange(0, BLOCK_N)
        w_rows = w_ptr + tl.minimum(rows, n - 1)[:, None].to(tl.int64) * w_stride
        return rows, w_rows, ws_ptr + (start // GROUP_N) * ws_stride

    @triton.jit
    def _decode_e4m3_words(q, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """[BLOCK_N, BLOCK_K / 4] int32 words of four e4m3 bytes -> [BLOCK_N, BLOCK_K] fp32, each the
        byte's value times 2^-120 (see _fp8_gemv_kernel)."""
        # byte j moved to the top (<< 24 - 8j), then an arithmetic >> 4 leaves its sign at bit 31 and
        # its eeee.mmm at 20..26; the mask clears the sign copies at 27..30 and the bytes below
        w0 = (((q << 24) >> 4) & _E4M3_IN_FP32).to(tl.float32, bitcast=True)
        w1 = (((q << 16) >> 4) & _E4M3_IN_FP32).to(tl.float32, bitcast=True)
        w2 = (((q << 8) >> 4) & _E4M3_IN_FP32).to(tl.float32, bitcast=True)
        w3 = ((q >> 4) & _E4M3_IN_FP32).to(tl.float32, bitcast=True)
        # join appends the new axis last: [.., i, j] holds w(2i + j) when the outer join takes (w0, w2), (w1, w3)
        return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [BLOCK_N, BLOCK_K])

    @triton.jit
    def _fp8_gemv_kernel(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, n, k, w_stride, ws_stride,
                         GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
        """w_ptr is the fp8 weight read as int32 words of four columns (k % 4 == 0, w_stride in words).
        Each e4m3 byte s.eeee.mmm becomes an fp32 by integer ops alone: the sign to bit 31 and eeee.mmm
        to bits 20..26 gives the value times 2^-120, subnormals included (fp32's exponent bias exceeds
        e4m3's by 120). Triton's own fp8 -> fp32 cast runs two conversion instructions per weight plus
        byte shuffles (the byte kernel's loop: ~9.6 instructions a byte on sm_90, docs/fp8.md); these are
        ~3 integer ops and one FMA."""
        BLOCK_W: tl.constexpr = BLOCK_K // 4
        rows, w_rows, s_row = _gemv_word_rows(w_ptr, ws_ptr, n, w_stride, ws_stride, GROUP_N, BLOCK_N)
        # per-column partial sums, reduced once after the loop: one FMA a weight and no per-step
        # reduction across the warps
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_K)[None, :]
        words = tl.arange(0, BLOCK_W)[None, :]
        x, s, q = _gemv_word_step(x_ptr, s_row, w_rows, cols, words, 0, k, GROUP_K, BLOCK_K)
        for k0 in range(0, k, BLOCK_K):
            if PREFETCH:  # the next step's loads in flight while this one is decoded
                x_next, s_next, q_next = _gemv_word_step(x_ptr, s_row, w_rows, cols, words, k0 + BLOCK_K, k,
                                                         GROUP_K, BLOCK_K)
            w = _decode_e4m3_words(q, BLOCK_N, BLOCK_K)
            # the block factor and 2^96 of the 2^120 on the activation (BLOCK_K multiplies, not
            # BLOCK_N x); the other 2^24 after the loop keeps both inside fp32's range
            acc += w * (x.to(tl.float32) * (s * _X_UNSCALE))
            if PREFETCH:
                x, s, q = x_next, s_next, q_next
            else:
                x, s, q = _gemv_word_step(x_ptr, s_row, w_rows, cols, words, k0 + BLOCK_K, k, GROUP_K, BLOCK_K)
        out = tl.sum(acc, axis=1) * _OUT_UNSCALE
        row_mask = rows < n
        if HAS_BIAS:
            out += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _fp8_gemv_pipelined_kernel(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, n, k, w_stride, ws_stride,
                                   GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                                   SCALE_ROW: tl.constexpr):
        """_fp8_gemv_kernel with its full steps in a loop free of branches and masks, which Triton's
        pipeliner turns into asynchronous copies STAGES - 1 steps ahead (cp.async into shared memory on
        sm_80+), then the masked tail once. SCALE_ROW (GROUP_K a power of two dividing BLOCK_K): a step
        reads its BLOCK_K / GROUP_K block factors as one short vector and spreads them over the columns
        by a reshape, instead of gathering a factor per column: the copies are then 16-byte ones (sm_90,
        Triton 3.6, 8 x 1024 with 8 warps: 92 registers, 20 KB of shared memory at 3 stages)."""
        BLOCK_W: tl.constexpr = BLOCK_K // 4
        rows, w_rows, s_row = _gemv_word_rows(w_ptr, ws_ptr, n, w_stride, ws_stride, GROUP_N, BLOCK_N)
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_K)[None, :]
        words = tl.arange(0, BLOCK_W)[None, :]
        k_full = k - k % BLOCK_K
        for k0 in tl.range(0, k_full, BLOCK_K, num_stages=STAGES):
            x = tl.load(x_ptr + k0 + cols).to(tl.float32)
            if SCALE_ROW:
                groups: tl.constexpr = BLOCK_K // GROUP_K
                s = tl.load(s_row + k0 // GROUP_K + tl.arange(0, groups)) * _X_UNSCALE
                xs = tl.reshape(tl.reshape(x, [groups, GROUP_K]) * s[:, None], [1, BLOCK_K])
            else:
                xs = x * (tl.load(s_row + (k0 + cols) // GROUP_K) * _X_UNSCALE)
            q = tl.load(w_rows + k0 // 4 + words)
            acc += _decode_e4m3_words(q, BLOCK_N, BLOCK_K) * xs
        if k_full < k:  # the masked tail, once
            x, s, q = _gemv_word_step(x_ptr, s_row, w_rows, cols, words, k_full, k, GROUP_K, BLOCK_K)
            acc += _decode_e4m3_words(q, BLOCK_N, BLOCK_K) * (x.to(tl.float32) * (s * _X_UNSCALE))
        out = tl.sum(acc, axis=1) * _OUT_UNSCALE
        row_mask = rows < n
        if HAS_BIAS:
            out += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, out.to(out_ptr.dtype.element_ty), mask=row_mask)

    @triton.jit
    def _fp8_gemv_silu_mul_kernel(x_ptr, w_ptr, ws_ptr, out_ptr, n_out, k, w_stride, ws_stride,
                                  GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr):
        """out[i] = silu(gate[i]) * up[i] for a fused gate/up fp8 weight (gate rows [0, n_out), up rows
        [n_out, 2 n_out)) read as int32 words: the word kernel over BLOCK_N gate rows and the matching
        up rows, with the activation as its epilogue. n_out % GROUP_N == 0, so the up rows of a program
        share one row of block factors as its gate rows do."""
        BLOCK_W: tl.constexpr = BLOCK_K // 4
        start = tl.program_id(0) * BLOCK_N
        rows = start + tl.arange(0, BLOCK_N)
        gate_rows = w_ptr + tl.minimum(rows, n_out - 1)[:, None].to(tl.int64) * w_stride
        up_rows = gate_rows + n_out.to(tl.int64) * w_stride
        gate_s_row = ws_ptr + (start // GROUP_N) * ws_stride
        up_s_row = gate_s_row + (n_out // GROUP_N) * ws_stride
        gate_acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        up_acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        cols = tl.arange(0, BLOCK_K)[None, :]
        words = tl.arange(0, BLOCK_W)[None, :]
        for k0 in range(0, k, BLOCK_K):
            x, s_gate, q_gate = _gemv_word_step(x_ptr, gate_s_row, gate_rows, cols, words, k0, k, GROUP_K, BLOCK_K)
            s_up, q_up = _gemv_weight_step(up_s_row, up_rows, cols, words, k0, k, GROUP_K, BLOCK_K)
            x = x.to(tl.float32)
            gate_acc += _decode_e4m3_words(q_gate, BLOCK_N, BLOCK_K) * (x * (s_gate * _X_UNSCALE))
            up_acc += _decode_e4m3_words(q_up, BLOCK_N, BLOCK_K) * (x * (s_up * _X_UNSCALE))
        dtype = out_ptr.dtype.element_ty
        # rounded where the unfused path rounds: each projection output, silu(gate), the product
        gate = (tl.sum(gate_acc, axis=1) * _OUT_UNSCALE).to(dtype).to(tl.float32)
        up = (tl.sum(up_acc, axis=1) * _OUT_UNSCALE).to(dtype).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        tl.store(out_ptr + rows, (act * up).to(dtype), mask=rows < n_out)

    @triton.jit
    def _fp8_gemv_bytes_kernel(x_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, n, k, w_stride, ws_stride,
                               GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The GEMV over fp8 bytes with Triton's cast, for weights whose rows are not whole int32 words."""
        start = tl.program_id(0) * BLOCK_N
        rows = start + tl.arange(0, BLOCK_N)
        w_rows = w_ptr + tl.minimum(rows, n - 1)[:, None].to(tl.int64) * w_stride
        # BLOCK_N divides GROUP_N: all of a program's rows share one row of block factors
        s_row = ws_ptr + (start // GROUP_N) * ws_stride
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        # full steps unmasked, the tail masked, in one loop body (as in layers/gemv.py: every load of
        # a step is issued before the first multiply)
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            if k0 + BLOCK_K <= k:
                x = tl.load(x_ptr + cols)
                s = tl.load(s_row + cols // GROUP_K)
                w = tl.load(w_rows + cols[None, :])
            else:
                col_mask = cols < k
                x = tl.load(x_ptr + cols, mask=col_mask, other=0.0)
                s = tl.load(s_row + cols // GROUP_K, mask=col_mask, other=0.0)
                w = tl.load(w_rows + cols[None, :], mask=col_mask[None, :], other=0.0)
            xs = x.to(tl.float32) * s  # the block factor on the activation: BLOCK_K multiplies, not BLOCK_N x
            acc += tl.sum(w.to(tl.float32) * xs[None, :], axis=1)
        row_mask = rows < n
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def per_token_group_quant_fp8(x: Tensor, group: int = 128) -> tuple[Tensor, Tensor]:
    """x [M, K] (any float dtype, last dim contiguous or not) -> (x_fp8 [M, K], scales [M, ceil(K/group)]
    fp32), equal to fp8_utils.quantize_activation_per_token_group. `group` is a power of two."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    num_groups = _cdiv(k, group)
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty((m, num_groups), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scales
    groups = min(triton.next_power_of_2(num_groups), max(1, _QUANT_ELEMENTS // group))
    _group_quant_kernel[(m, triton.cdiv(num_groups, groups))](
        x, q, scales, k, num_groups, x.stride(0), q.stride(0), scales.stride(0),
        GROUP=group, GROUPS=groups, EXACT_CAST=_interpreting(),
    )
    return q, scales


def gemm_config(m: int) -> dict[str, int]:
    """The tile for M rows: the first bucket that holds M."""
    return next(cfg for top, cfg in GEMM_CONFIGS if m <= top)


def w8a8_block_fp8_matmul(x_fp8: Tensor, x_scales: Tensor, w_fp8: Tensor, w_scale_inv: Tensor,
                          block: tuple[int, int] = (128, 128), out_dtype: torch.dtype = torch.bfloat16,
                          bias: Tensor | None = None, config: dict[str, int] | None = None) -> Tensor:
    """x_fp8 [M, K] with x_scales [M, ceil(K/bk)], w_fp8 [N, K] with w_scale_inv [ceil(N/bn), ceil(K/bk)]
    -> [M, N] in out_dtype: sum over K blocks of dot(x, w.T) * x_scale * w_scale_inv (+ bias), fp32
    accumulation. `config` overrides the M-bucket tile (the bench's sweeps)."""
    m, k = x_fp8.shape
    n = w_fp8.shape[0]
    bn, bk = block
    assert w_fp8.shape[1] == k and x_fp8.dtype == w_fp8.dtype == FP8_DTYPE, (x_fp8.shape, w_fp8.shape)
    assert x_scales.shape == (m, _cdiv(k, bk)) and w_scale_inv.shape == (_cdiv(n, bn), _cdiv(k, bk)), (
        x_scales.shape, w_scale_inv.shape, block)
    assert x_fp8.stride(1) == 1 and w_fp8.stride(1) == 1 and bk >= 16, (x_fp8.stride(), w_fp8.stride(), block)
    out = torch.empty((m, n), dtype=out_dtype, device=x_fp8.device)
    if m == 0:
        return out
    cfg = config or gemm_config(m)
    bm, bn_tile = cfg["BLOCK_M"], cfg["BLOCK_N"]
    # the kernel steps along a row of each scale tensor with stride 1 (no-ops when already so)
    x_scales, w_scale_inv = x_scales.float().contiguous(), w_scale_inv.float().contiguous()
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn_tile),)
    _block_fp8_gemm_kernel[grid](
        x_fp8, x_scales, w_fp8, w_scale_inv, bias if bias is not None else out, out, m, n, k,
        x_fp8.stride(0), x_scales.stride(0), w_fp8.stride(0), w_scale_inv.stride(0), out.stride(0), bn,
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn_tile, BLOCK_K=bk, GROUP_M=cfg["GROUP_M"],
        EVEN_K=k % bk == 0, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def _launch_linear(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: tuple[int, int],
                   bias: Tensor | None, config: dict[str, int] | None = None) -> Tensor:
    n, k = w_fp8.shape
    x2 = x.reshape(-1, k)
    x_fp8, x_scales = per_token_group_quant_fp8(x2, block[1])
    if config is None and 0 < GEMM_CUBLAS_MIN_M <= x2.shape[0] and cublas_block_fp8_fits(w_fp8, block):
        out = cublas_block_fp8_matmul(x_fp8, x_scales, w_fp8, w_scale_inv, x.dtype, bias)
    else:
        out = w8a8_block_fp8_matmul(x_fp8, x_scales, w_fp8, w_scale_inv, block, x.dtype, bias, config)
    return out.reshape(*x.shape[:-1], n)


def block_fp8_linear(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: tuple[int, int] = (128, 128),
                     bias: Tensor | None = None) -> Tensor:
    """F.linear of x [..., K] by the block-quantised weight -> [..., N] in x's dtype: x quantised per
    token group (Triton), then the block GEMM. Two launches, no host sync, shapes from x alone."""
    if torch.compiler.is_compiling():  # one opaque node in the traced graph
        return _block_fp8_linear_op(x, w_fp8, w_scale_inv, list(block), bias)
    return _launch_linear(x, w_fp8, w_scale_inv, tuple(block), bias)


def gemv_tile(k: int, block_n: int, words: bool = True) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of the word kernel (or, words=False, the byte kernel): a fixed number of
    weights a step, at most a maximum width along K, BLOCK_N dividing the scale block."""
    elements, widest = (GEMV_TILE_ELEMENTS, GEMV_MAX_BLOCK_K) if words else (
        GEMV_BYTES_TILE_ELEMENTS, GEMV_BYTES_MAX_BLOCK_K)
    block_k = min(widest, max(16, triton.next_power_of_2(k)))
    rows = max(1, elements // block_k)
    while block_n % rows:
        rows //= 2
    return rows, block_k


def gemv_reads_words(w_fp8: Tensor) -> bool:
    """True where the weight's rows are whole int32 words (K and the row stride multiples of 4, the
    start 4-byte aligned): the word kernel reads it; else the byte kernel. torch.compile traces no
    data_ptr(), so a traced call takes the start as aligned (a layer's weight is a parameter of its own)
    and the launch, inside the custom op, checks it again."""
    aligned = torch.compiler.is_compiling() or w_fp8.data_ptr() % 4 == 0
    return w_fp8.shape[1] % 4 == 0 and w_fp8.stride(0) % 4 == 0 and aligned


def _launch_gemv(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: tuple[int, int], bias: Tensor | None,
                 tile: tuple[int, int] | None = None, num_warps: int | None = None,
                 words: bool | None = None, prefetch: bool = GEMV_PREFETCH, stages: int = GEMV_STAGES) -> Tensor:
    """`tile` (BLOCK_N, BLOCK_K), num_warps, words (the kernel), prefetch (the word kernel's loads one
    step ahead) and stages (>= 2: its pipelined loop) override the defaults (the bench's sweeps)."""
    n, k = w_fp8.shape
    bn, bk = block
    assert x.numel() == k and w_fp8.stride(1) == 1 and w_fp8.dtype == FP8_DTYPE, (x.shape, w_fp8.shape)
    assert w_scale_inv.shape == (_cdiv(n, bn), _cdiv(k, bk)), (w_scale_inv.shape, block)
    if words is None:
        words = GEMV_WORDS and gemv_reads_words(w_fp8)
    block_rows, block_k = tile or gemv_tile(k, bn, words)
    assert bn % block_rows == 0, (block_rows, block)
    w_scale_inv = w_scale_inv.float().contiguous()
    out = x.new_empty((*x.shape[:-1], n))
    if words and stages >= 2:
        kernel, weight, w_stride = _fp8_gemv_pipelined_kernel, w_fp8.view(torch.int32), w_fp8.stride(0) // 4
        extra = dict(STAGES=stages, SCALE_ROW=bk & (bk - 1) == 0 and block_k % bk == 0)
    elif words:
        kernel, weight, w_stride = _fp8_gemv_kernel, w_fp8.view(torch.int32), w_fp8.stride(0) // 4
        extra = dict(PREFETCH=prefetch)
    else:
        kernel, weight, w_stride, extra = _fp8_gemv_bytes_kernel, w_fp8, w_fp8.stride(0), {}
    kernel[(triton.cdiv(n, block_rows),)](
        _row(x, k), weight, w_scale_inv, bias if bias is not None else out, out, n, k, w_stride,
        w_scale_inv.stride(0), GROUP_N=bn, GROUP_K=bk, HAS_BIAS=bias is not None, BLOCK_N=block_rows,
        BLOCK_K=block_k, num_warps=num_warps or (GEMV_WARPS if words else GEMV_BYTES_WARPS), **extra,
    )
    return out


def fp8_gemv(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: tuple[int, int] = (128, 128),
             bias: Tensor | None = None) -> Tensor:
    """x [..., K] holding one row (kept in its dtype) times the block-quantised weight -> [..., N] in
    x's dtype: F.linear(x, dequant(w)) with fp32 accumulation."""
    if torch.compiler.is_compiling():
        return _fp8_gemv_op(x, w_fp8, w_scale_inv, list(block), bias)
    return _launch_gemv(x, w_fp8, w_scale_inv, tuple(block), bias)


def gemv_silu_mul_fits(w_fp8: Tensor, block: tuple[int, int]) -> bool:
    """True where fp8_gemv_silu_mul can take the fused gate/up weight [2I, K]: rows of whole words and
    I a multiple of the scale block, so the up half starts on a block row."""
    return GEMV_SILU and w_fp8.shape[0] % (2 * block[0]) == 0 and gemv_reads_words(w_fp8)


def _launch_gemv_silu_mul(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: tuple[int, int]) -> Tensor:
    two_i, k = w_fp8.shape
    bn, bk = block
    assert x.numel() == k and w_fp8.stride(1) == 1 and w_fp8.dtype == FP8_DTYPE, (x.shape, w_fp8.shape)
    assert two_i % (2 * bn) == 0 and gemv_reads_words(w_fp8), (w_fp8.shape, w_fp8.stride(), block)
    assert w_scale_inv.shape == (two_i // bn, _cdiv(k, bk)), (w_scale_inv.shape, block)
    n_out = two_i // 2
    rows, block_k = gemv_tile(k, bn)
    block_rows = max(1, rows // 2)  # gate and up rows together: the word kernel's weights a step
    w_scale_inv = w_scale_inv.float().contiguous()
    out = x.new_empty((*x.shape[:-1], n_out))
    _fp8_gemv_silu_mul_kernel[(triton.cdiv(n_out, block_rows),)](
        _row(x, k), w_fp8.view(torch.int32), w_scale_inv, out, n_out, k, w_fp8.stride(0) // 4, w_scale_inv.stride(0),
        GROUP_N=bn, GROUP_K=bk, BLOCK_N=block_rows, BLOCK_K=block_k, num_warps=GEMV_WARPS,
    )
    return out


def fp8_gemv_silu_mul(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: tuple[int, int] = (128, 128)) -> Tensor:
    """silu(gate) * up for one row x [..., K] and a fused gate/up FP8 weight [2I, K] (gate rows first)
    -> [..., I] in x's dtype: fp8_gemv and SiLU-and-mul in one kernel, rounded as the two would round.
    Only where gemv_silu_mul_fits."""
    if torch.compiler.is_compiling():
        return _fp8_gemv_silu_mul_op(x, w_fp8, w_scale_inv, list(block))
    return _launch_gemv_silu_mul(x, w_fp8, w_scale_inv, tuple(block))


# The launches as custom ops for torch.compile (Dynamo cannot trace a Triton launch written this way);
# eager calls skip the op's dispatch, as in layers/gemv.py.
@torch.library.custom_op("radixserve::block_fp8_linear", mutates_args=())
def _block_fp8_linear_op(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: list[int],
                         bias: Tensor | None) -> Tensor:
    return _launch_linear(x, w_fp8, w_scale_inv, (block[0], block[1]), bias)


@_block_fp8_linear_op.register_fake
def _block_fp8_linear_fake(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: list[int],
                           bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_fp8.shape[0]))


@torch.library.custom_op("radixserve::fp8_gemv", mutates_args=())
def _fp8_gemv_op(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: list[int], bias: Tensor | None) -> Tensor:
    return _launch_gemv(x, w_fp8, w_scale_inv, (block[0], block[1]), bias)


@_fp8_gemv_op.register_fake
def _fp8_gemv_fake(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: list[int], bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_fp8.shape[0]))


@torch.library.custom_op("radixserve::fp8_gemv_silu_mul", mutates_args=())
def _fp8_gemv_silu_mul_op(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: list[int]) -> Tensor:
    return _launch_gemv_silu_mul(x, w_fp8, w_scale_inv, (block[0], block[1]))


@_fp8_gemv_silu_mul_op.register_fake
def _fp8_gemv_silu_mul_fake(x: Tensor, w_fp8: Tensor, w_scale_inv: Tensor, block: list[int]) -> Tensor:
    return x.new_empty((*x.shape[:-1], w_fp8.shape[0] // 2))


_FP8_CAPABLE: dict[int, bool] = {}


def takes_fp8_kernels(x: Tensor) -> bool:
    """True where the Triton FP8 kernels run: x on a CUDA GPU with fp8 tensor cores (sm_89+: Ada,
    Hopper), Triton importable, RADIXSERVE_TRITON_FP8 not "0". Else use block_fp8_linear_torch."""
    if not (ENABLED and triton is not None and x.is_cuda):
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _FP8_CAPABLE:
        _FP8_CAPABLE[index] = torch.cuda.get_device_capability(index) >= (8, 9)
    return _FP8_CAPABLE[index]
