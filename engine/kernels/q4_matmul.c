/* y[M, N] = x[M, K] @ W^T (+ bias) for 4-bit or 8-bit weights in groups of 32 along K, on AVX2 + FMA + F16C
 * (and VNNI where the CPU has it).
 *
 * Why a kernel of our own: at one token a matmul is a stream over the weights, so its time is
 * bytes / memory bandwidth. fbgemm's int8 reads 8 bits per weight; aten's int4 CPU kernel
 * (_weight_int4pack_mm_for_cpu) reads 4.5 but is compute-bound on AVX2 (3-4x fbgemm's time). This
 * one reads 5 bits per weight and spends ~2 vector ops per 16 weights, so on a 2-core AVX2 part the
 * arithmetic stays close to the stream.
 *
 * Weights, groups of 32 along K (G = K / 32), q in [0, 15], output rows in blocks of 8 (N % 8 == 0):
 *   W[n, 32 g + k] = steps[n, g] * q[n, 32 g + k] + mins[n, g]
 *   packed[b][g][t][o][j], t < 4, o < 8, j < 4 (128 bytes per block and group) holds output n = 8 b + o:
 *       q[n, 32 g + 8 t + j] | q[n, 32 g + 8 t + 4 + j] << 4
 *   so a 32-byte load t gives, by its low and high nibbles, 4 consecutive q's of each of 8 outputs
 *   in each 32-bit lane, for k = 8 t .. 8 t + 3 and 8 t + 4 .. 8 t + 7.
 *   steps, mins: fp16 [N / 8][G][8], the block's 8 outputs side by side.
 * 8-bit weights (num_planes = 2) are two such 4-bit planes, q = 16 q_high + q_low in [0, 255] on a
 * group's 256 levels (the `int4-mixed` layers that lie on no 4-bit grid: a GGUF's Q6_K tensors):
 *   packed[b][g][plane][t][o][j], plane 0 the low nibbles of q, plane 1 the high ones (256 bytes).
 *
 * Activations: each group of 32 of each row x[m] becomes int8 on the group's own scale (as
 * llama.cpp's Q8 activations, on groups of 32 rather than 256):
 *   x[m, 32 g + k] ~ s[m, g] * a[m, 32 g + k],   s = max_k |x| / 127,   a = round(x / s) in [-127, 127]
 * The levels are centred (q - C, C = 8 for 4 bits, 128 for 8), so the activations' rounding meets
 * weights of mean ~0 rather than the group's offset; per row m and output n, over groups g in order:
 *   y[m, n] = sum_g (steps[n, g] * s[m, g]) * A[m, n, g] + sum_g centres[n, g] * xsum[m, g] + bias[n]
 *   A = sum_k (q[n, 32 g + k] - C) a[m, 32 g + k] = (16 sum_k q_high a +) sum_k q_low a - C sum_k a
 *   centres = mins + C steps (fp32),   xsum[m, g] = sum_k x[m, 32 g + k] (exact fp32 sum)
 * A is exact: vpmaddubsw (u8 q times s8 a, pairs summed) gives int16 lanes of at most 2 * 15 * 127,
 * the 8 loads of a plane and group add 8 of them (<= 30480 < 2^15), one vpmaddwd by ones sums each
 * output's two halves into int32 (|A| < 2^24 for 8 bits too), and C times the group's integer sum
 * of a is taken off: 8 outputs' A in one register, converted and fma'd by 8 steps at once; no
 * horizontal sums, and the result is stored as 8 contiguous outputs.
 * Row independence: the operations that give y[m, n] are the same, in the same order, whatever M is
 * and whichever rows share a chunk, so a k-token pass gives bit for bit the rows of k one-token
 * passes. Threads split the blocks of 8 outputs.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>

#define GROUP 32
#define BLOCK 8
#define MAX_CHUNK 4

/* With VNNI (built with -mavx512vnni -mavx512vl, or -mavxvnni; engine/quant_q4.py picks by the CPU's
 * flags) one vpdpbusd multiplies u8 q by s8 a and adds each output's 4 products straight into its
 * int32 lane: the same exact integers as AVX2's vpmaddubsw + vpaddw + vpmaddwd, in fewer ops, so the
 * outputs are bit for bit those of the AVX2 build. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define HAS_VNNI 1
#define DPBUSD(acc, u8, s8) _mm256_dpbusd_epi32(acc, u8, s8)
#elif defined(__AVXVNNI__)
#define HAS_VNNI 1
#define DPBUSD(acc, u8, s8) _mm256_dpbusd_avx_epi32(acc, u8, s8)
#else
#define HAS_VNNI 0
#endif
/* With AVX-512 (BW + VNNI) two blocks run side by side in 512-bit registers (q4_wide.h): each half
 * does the 256-bit code's integer and float operations on its own 8 outputs, so again the same bits. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define HAS_WIDE 1
#else
#define HAS_WIDE 0
#endif
/* With AMX-INT8 as well, calls of several rows sum on tiles (q4_amx.h): the same integers again. */
#if HAS_WIDE && defined(__AMX_INT8__) && defined(__AMX_TILE__)
#define HAS_AMX 1
#else
#define HAS_AMX 0
#endif

/* sums[r] = one 4-bit plane (128 bytes) by rows m0 .. m0 + R - 1, group g: per output, int16 pair
 * sums (AVX2; int32 after sum_pairs) or its int32 sum (VNNI). */
static inline __attribute__((always_inline)) void plane_sums(
        const int R, __m256i *sums, const uint8_t *w, const int8_t *a, int64_t K, int64_t m0, int64_t g) {
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    for (int t = 0; t < 4; t++) {
        const __m256i bytes = _mm256_loadu_si256((const __m256i *)(w + 32 * t));
        const __m256i low = _mm256_and_si256(bytes, nibble);                        /* k = 8 t + j     */
        const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble); /* k = 8 t + 4 + j */
        for (int r = 0; r < R; r++) {
            int32_t a_low, a_high;
            const int8_t *ak = a + (m0 + r) * K + GROUP * g + 8 * t;
            memcpy(&a_low, ak, 4);
            memcpy(&a_high, ak + 4, 4);
#if HAS_VNNI
            const __m256i sum = t == 0 ? _mm256_setzero_si256() : sums[r];
            sums[r] = DPBUSD(DPBUSD(sum, low, _mm256_set1_epi32(a_low)), high, _mm256_set1_epi32(a_high));
#else
            const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, _mm256_set1_epi32(a_low)),
                                                   _mm256_maddubs_epi16(high, _mm256_set1_epi32(a_high)));
            sums[r] = t == 0 ? pairs : _mm256_add_epi16(sums[r], pairs);
#endif
        }
    }
}

/* plane_sums' result as int32 per output: AVX2 adds each output's two int16 halves, VNNI has them. */
static inline __attribute__((always_inline)) __m256i sum_pairs(__m256i sums, __m256i ones) {
#if HAS_VNNI
    (void)ones;
    return sums;
#else
    return _mm256_madd_epi16(sums, ones);
#endif
}

/* rows [m0, m0 + R) of outputs [8 b, 8 b + 8); R and PLANES compile-time constants after inlining. */
static inline __attribute__((always_inline)) void block_rows(
        const int R, const int PLANES, const int8_t *a, const int32_t *asum, const float *act_scale,
        const float *xsum, int64_t K, int64_t G, int64_t m0, const uint8_t *packed_block,
        const uint16_t *step_block, const uint16_t *min_block, const float *bias, float *y, int64_t N, int64_t n0) {
    const __m256i ones = _mm256_set1_epi16(1);
    const int32_t centre = PLANES == 1 ? 8 : 128;
    __m256 acc[MAX_CHUNK], min_acc[MAX_CHUNK];
    for (int r = 0; r < R; r++) { acc[r] = _mm256_setzero_ps(); min_acc[r] = _mm256_setzero_ps(); }
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *w = packed_block + PLANES * 128 * g;
        __m256i low_sums[MAX_CHUNK], high_sums[MAX_CHUNK];
        plane_sums(R, low_sums, w, a, K, m0, g);
        if (PLANES == 2) plane_sums(R, high_sums, w + 128, a, K, m0, g);
        const __m256 steps = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(step_block + BLOCK * g)));
        const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(min_block + BLOCK * g)));
        const __m256 centres = _mm256_fmadd_ps(steps, _mm256_set1_ps((float)centre), mins);
        for (int r = 0; r < R; r++) {
            __m256i qa = sum_pairs(low_sums[r], ones);
            if (PLANES == 2) qa = _mm256_add_epi32(qa, _mm256_slli_epi32(sum_pairs(high_sums[r], ones), 4));
            const __m256 A = _mm256_cvtepi32_ps(_mm256_sub_epi32(qa, _mm256_set1_epi32(centre * asum[(m0 + r) * G + g])));
            const __m256 scale = _mm256_mul_ps(steps, _mm256_set1_ps(act_scale[(m0 + r) * G + g]));
            acc[r] = _mm256_fmadd_ps(A, scale, acc[r]);
            min_acc[r] = _mm256_fmadd_ps(centres, _mm256_set1_ps(xsum[(m0 + r) * G + g]), min_acc[r]);
        }
    }
    const __m256 b = bias ? _mm256_loadu_ps(bias + n0) : _mm256_setzero_ps();
    for (int r = 0; r < R; r++)
        _mm256_storeu_ps(y + (m0 + r) * N + n0, _mm256_add_ps(_mm256_add_ps(acc[r], min_acc[r]), b));
}

#if HAS_WIDE
#include "q4_wide.h"
#endif
#if HAS_AMX
#include "q4_amx.h"
#endif
#if HAS_WIDE
#define ROWS(R) do { if (WIDE) block_rows_wide(R, PLANES, a, asum, act_scale, xsum, K, G, m0, packed_block, \
                     step_block, min_block, bias, y, N, n0); \
                 else block_rows(R, PLANES, a, asum, act_scale, xsum, K, G, m0, packed_block, step_block, \
                                 min_block, bias, y, N, n0); } while (0)
#else
#define ROWS(R) block_rows(R, PLANES, a, asum, act_scale, xsum, K, G, m0, packed_block, step_block, min_block, \
                           bias, y, N, n0)
#endif

/* every row chunk of one block (WIDE: of blocks b and b + 1), PLANES and WIDE constants */
static inline __attribute__((always_inline)) void block_all_rows(
        const int PLANES, const int WIDE, const int8_t *a, const int32_t *asum, const float *act_scale,
        const float *xsum, int64_t M, int64_t K, int64_t G, const uint8_t *packed_block,
        const uint16_t *step_block, const uint16_t *min_block, const float *bias, float *y, int64_t N, int64_t n0) {
    (void)WIDE;
    int64_t m0 = 0;
    if (PLANES == 1)                   /* chunks of 4 rows; of 2 for 8 bits (twice the sums held) */
        for (; m0 + 4 <= M; m0 += 4) ROWS(4);
    else
        for (; m0 + 2 <= M; m0 += 2) ROWS(2);
    switch (M - m0) {
        case 3: ROWS(3); break;
        case 2: ROWS(2); break;
        case 1: ROWS(1); break;
        default: break;
    }
}

/* e^x in 8 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial, 2^n
 * put in the exponent; ~1 ulp), x clamped to [-87.3, 88.3] so 2^n stays a normal float. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);              /* ln2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_n));
}

/* The kernel's input x'[k] for k in group g of one row: a prologue in place of tensor ops before the
 * matmul (each its own pass over the row in torch):
 *   none     x' = x                                     (row of K)
 *   norm     x' = norm_weight * (x * inverse_rms)       (row of K: the Llama-family RMSNorm)
 *   gated    x' = silu(x[k]) * x[K + k]                 (row of 2 K: gate | up, an MLP's silu(gate) * up) */
static inline void prologue_group(const float *x, int64_t K, int64_t g, const float *norm_weight,
                                  float inverse_rms, int is_gated, float *xg) {
    const float *xk = x + GROUP * g;
    if (is_gated) {
        for (int k = 0; k < GROUP; k += 8) {
            const __m256 gate = _mm256_loadu_ps(xk + k), up = _mm256_loadu_ps(xk + K + k);
            const __m256 denominator = _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate)));
            _mm256_storeu_ps(xg + k, _mm256_mul_ps(_mm256_div_ps(gate, denominator), up));
        }
    } else if (norm_weight) {
        for (int k = 0; k < GROUP; k++) xg[k] = norm_weight[GROUP * g + k] * (xk[k] * inverse_rms);
    } else {
        memcpy(xg, xk, sizeof(float) * GROUP);
    }
}

/* Row m's int8 activations (of its prologue's x'); per group one scale, the integer sum of a and the
 * exact sum of x'. The norm's mean(x^2) is summed in double, in order: rows stay independent of M
 * and of threads. */
static void quantize_row(const float *x, int64_t K, const float *norm_weight, float norm_eps, int is_gated,
                         int8_t *a, int32_t *asum, float *act_scale, float *xsum) {
    float inverse_rms = 1.0f;
    if (norm_weight) {
        double squares = 0.0;
        for (int64_t k = 0; k < K; k++) squares += (double)x[k] * x[k];
        inverse_rms = (float)(1.0 / sqrt(squares / (double)K + (double)norm_eps));
    }
    for (int64_t g = 0; g < K / GROUP; g++) {
        float xg[GROUP];
        prologue_group(x, K, g, norm_weight, inverse_rms, is_gated, xg);
        float max_abs = 0.0f, sum = 0.0f;
        for (int k = 0; k < GROUP; k++) { max_abs = fmaxf(max_abs, fabsf(xg[k])); sum += xg[k]; }
        const float inverse = max_abs > 0.0f ? 127.0f / max_abs : 0.0f;
        int32_t integer_sum = 0;
        for (int k = 0; k < GROUP; k++) {
            a[GROUP * g + k] = (int8_t)fmaxf(-127.0f, fminf(127.0f, rintf(xg[k] * inverse)));
            integer_sum += a[GROUP * g + k];
        }
        asum[g] = integer_sum;
        act_scale[g] = max_abs / 127.0f;
        xsum[g] = sum;
    }
}

/* num_planes: 1 (4-bit weights) or 2 (8-bit). bias and norm_weight (K floats: an RMSNorm before the
 * matmul) may be NULL; is_gated: x is [M, 2 K] (gate | up) and the input silu(gate) * up (not with a
 * norm). Returns 0, -1 on bad sizes, -2 when out of memory. */
int q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *packed, const uint16_t *steps,
              const uint16_t *mins, const float *bias, float *y, int64_t N, int num_planes,
              const float *norm_weight, float norm_eps, int is_gated) {
    if (K % GROUP || N % BLOCK || M < 0 || N < 0 || (num_planes != 1 && num_planes != 2)) return -1;
    if (is_gated && norm_weight) return -1;
    const int64_t row_stride = is_gated ? 2 * K : K;
    const int64_t G = K / GROUP;
    int8_t *a = malloc(M * K + 1);
    int32_t *asum = malloc(sizeof(int32_t) * (M * G + 1));
    float *act_scale = malloc(sizeof(float) * (2 * M * G + 1));
    if (!a || !asum || !act_scale) { free(a); free(asum); free(act_scale); return -2; }
    float *xsum = act_scale + M * G;
#if HAS_AMX
    const int is_amx = M >= AMX_MIN_ROWS(num_planes) && amx_permitted();
#endif
    #pragma omp parallel
    {
#if HAS_AMX
        int configured_rows = 0;             /* this thread's tile configuration (q4_amx.h) */
#endif
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            quantize_row(x + m * row_stride, K, norm_weight, norm_eps, is_gated, a + m * K, asum + m * G, act_scale + m * G, xsum + m * G);
        const int64_t num_blocks = N / BLOCK, blocks_per_unit = HAS_WIDE ? 2 : 1;
        #pragma omp for schedule(static)
        for (int64_t unit = 0; unit < (num_blocks + blocks_per_unit - 1) / blocks_per_unit; unit++) {
            const int64_t block = unit * blocks_per_unit;
            const int is_wide = block + 1 < num_blocks && HAS_WIDE;   /* an odd last block runs alone */
            const uint8_t *packed_block = packed + block * num_planes * (BLOCK * K / 2);
            const uint16_t *step_block = steps + block * BLOCK * G, *min_block = mins + block * BLOCK * G;
#if HAS_AMX
            if (is_wide && is_amx) {
                if (num_planes == 1)
                    block_all_rows_amx(1, a, act_scale, xsum, M, K, G, packed_block, step_block, min_block, bias, y, N, BLOCK * block, &configured_rows);
                else
                    block_all_rows_amx(2, a, act_scale, xsum, M, K, G, packed_block, step_block, min_block, bias, y, N, BLOCK * block, &configured_rows);
            } else
#endif
            if (num_planes == 1 && is_wide)
                block_all_rows(1, 1, a, asum, act_scale, xsum, M, K, G, packed_block, step_block, min_block, bias, y, N, BLOCK * block);
            else if (num_planes == 1)
                block_all_rows(1, 0, a, asum, act_scale, xsum, M, K, G, packed_block, step_block, min_block, bias, y, N, BLOCK * block);
            else if (is_wide)
                block_all_rows(2, 1, a, asum, act_scale, xsum, M, K, G, packed_block, step_block, min_block, bias, y, N, BLOCK * block);
            else
                block_all_rows(2, 0, a, asum, act_scale, xsum, M, K, G, packed_block, step_block, min_block, bias, y, N, BLOCK * block);
        }
#if HAS_AMX
        if (configured_rows) _tile_release();         /* this thread's tiles back to the initial state */
#endif
    }
    free(a);
    free(asum);
    free(act_scale);
    return 0;
}
