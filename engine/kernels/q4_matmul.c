/* y[M, N] = x[M, K] @ W^T (+ bias) for 4-bit weights in groups of 32 along K, on AVX2 + FMA + F16C.
 *
 * Why a kernel of our own: at one token a matmul is a stream over the weights, so its time is
 * bytes / memory bandwidth. fbgemm's int8 reads 8 bits per weight; aten's int4 CPU kernel
 * (_weight_int4pack_mm_for_cpu) reads 4.5 but is compute-bound on AVX2 (3-4x fbgemm's time). This
 * one reads 5 bits per weight and keeps the arithmetic under the stream on a 2-core AVX2 part.
 *
 * Weight layout, per output row n, groups of 32 along K (G = K / 32 groups, G even), q in [0, 15]:
 *   W[n, 32 g + i] = scales[n, g] * q[n, 32 g + i] + mins[n, g]        scales, mins: fp16 [N, G]
 *   packed[n]: 32 bytes per pair of groups = 16 little-endian 16-bit lanes; lane l of the pair
 *   starting at weight k0 = 64 p holds q[k0 + l] | q[k0 + 16 + l] << 4 | q[k0 + 32 + l] << 8 | q[k0 + 48 + l] << 12,
 *   so (lane >> 4 i) & 15 over the 16 lanes is q[k0 + 16 i .. k0 + 16 i + 15], in order.
 *
 * Activations: each row x[m] becomes 16-bit integers on its own scale (15 bits, finer than bf16's
 * 8-bit mantissa and than the int8 layer's two 7-bit digits):
 *   x[m, k] ~ s[m] * a[m, k],   s[m] = max_k |x[m, k]| / 32767,   a = round(x / s) in [-32767, 32767]
 * Per row m and output n, over groups g in order:
 *   y[m, n] = s[m] * sum_g scales[n, g] * A[m, n, g]          A = sum_i q[n, 32 g + i] a[m, 32 g + i]
 *           + sum_g mins[n, g] * xsum[m, g] + bias[n]        xsum = sum_i x[m, 32 g + i] (exact fp32)
 * A is exact in int32 (|A| <= 32 * 15 * 32767 < 2^24, so also exact as fp32): two vpmaddwd of 16
 * q's (zero-extended to int16) by 16 a's give 8 int32 lanes, converted and fma'd by the group's
 * step into 8 fp32 lanes. Row independence: the operations that give y[m, n] are the same, in the
 * same order, whatever M is and whichever rows share a chunk, so a k-token pass gives bit for bit
 * the rows of k one-token passes. Threads split N.
 */
#include <immintrin.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#define GROUP 32
#define MAX_CHUNK 4

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* acc[r] += steps[j] * A[m0 + r, n, g + j] for the pair of groups g, g + 1 (their 32 packed bytes)
 * and rows m0 .. m0 + R - 1. Four shifts and masks of the 16-bit lanes give 16 q's each, in order. */
static inline __attribute__((always_inline)) void q4_group_pair(
        const int R, __m256 *acc, const int16_t *a, int64_t K, int64_t m0, int64_t g,
        const uint8_t *packed_row, const __m256 step0, const __m256 step1) {
    const __m256i nibble = _mm256_set1_epi16(0x000F);
    const __m256i lanes = _mm256_loadu_si256((const __m256i *)(packed_row + 16 * g));
    const __m256i q0 = _mm256_and_si256(lanes, nibble);                          /* group g:     q[0..15]  */
    const __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(lanes, 4), nibble);   /*              q[16..31] */
    const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(lanes, 8), nibble);   /* group g + 1: q[0..15]  */
    const __m256i q3 = _mm256_srli_epi16(lanes, 12);                             /*              q[16..31] */
    for (int r = 0; r < R; r++) {
        const int16_t *ag = a + (m0 + r) * K + GROUP * g;
        const __m256i sums0 = _mm256_add_epi32(_mm256_madd_epi16(q0, _mm256_loadu_si256((const __m256i *)ag)),
                                               _mm256_madd_epi16(q1, _mm256_loadu_si256((const __m256i *)(ag + 16))));
        const __m256i sums1 = _mm256_add_epi32(_mm256_madd_epi16(q2, _mm256_loadu_si256((const __m256i *)(ag + 32))),
                                               _mm256_madd_epi16(q3, _mm256_loadu_si256((const __m256i *)(ag + 48))));
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums0), step0, acc[r]);
        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums1), step1, acc[r]);
    }
}

/* rows [m0, m0 + R) of y[:, n]; R a compile-time constant after inlining. Groups go 8 at a time
 * (one fp16 -> fp32 conversion of 8 steps, one fma of 8 minimums by 8 group sums), the last G % 8
 * a pair at a time (G is even). */
static inline __attribute__((always_inline)) void q4_rows(
        const int R, const int16_t *a, const float *row_scale, const float *xsum, int64_t K, int64_t G,
        int64_t m0, const uint8_t *packed_row, const uint16_t *scale_row, const uint16_t *min_row,
        float bias, float *y, int64_t N, int64_t n) {
    __m256 acc[MAX_CHUNK], min_acc[MAX_CHUNK];
    float min_tail[MAX_CHUNK];
    float steps[8] __attribute__((aligned(32)));
    for (int r = 0; r < R; r++) { acc[r] = _mm256_setzero_ps(); min_acc[r] = _mm256_setzero_ps(); min_tail[r] = 0.0f; }
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
        _mm256_store_ps(steps, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scale_row + g))));
        const __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(min_row + g)));
        for (int r = 0; r < R; r++)
            min_acc[r] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(xsum + (m0 + r) * G + g), min_acc[r]);
        for (int j = 0; j < 8; j += 2)
            q4_group_pair(R, acc, a, K, m0, g + j, packed_row, _mm256_broadcast_ss(steps + j),
                          _mm256_broadcast_ss(steps + j + 1));
    }
    for (; g < G; g += 2) {
        q4_group_pair(R, acc, a, K, m0, g, packed_row, _mm256_set1_ps(_cvtsh_ss(scale_row[g])),
                      _mm256_set1_ps(_cvtsh_ss(scale_row[g + 1])));
        for (int j = 0; j < 2; j++)
            for (int r = 0; r < R; r++)
                min_tail[r] = __builtin_fmaf(_cvtsh_ss(min_row[g + j]), xsum[(m0 + r) * G + g + j], min_tail[r]);
    }
    for (int r = 0; r < R; r++)
        y[(m0 + r) * N + n] = (row_scale[m0 + r] * hsum8(acc[r]) + (hsum8(min_acc[r]) + min_tail[r])) + bias;
}

/* Row m's 16-bit activations, its scale and its group sums. */
static void quantize_row(const float *x, int64_t K, int16_t *a, float *row_scale, float *xsum) {
    float max_abs = 0.0f;
    for (int64_t k = 0; k < K; k++) max_abs = fmaxf(max_abs, fabsf(x[k]));
    const float scale = max_abs > 0.0f ? max_abs / 32767.0f : 1.0f;
    for (int64_t k = 0; k < K; k++) a[k] = (int16_t)lrintf(x[k] / scale);
    for (int64_t g = 0; g < K / GROUP; g++) {
        float s = 0.0f;
        for (int j = 0; j < GROUP; j++) s += x[GROUP * g + j];
        xsum[g] = s;
    }
    *row_scale = scale;
}

/* bias may be NULL. Returns 0, -1 on bad sizes, -2 when out of memory. */
int q4_matmul(const float *x, int64_t M, int64_t K, const uint8_t *packed, const uint16_t *scales,
              const uint16_t *mins, const float *bias, float *y, int64_t N) {
    if (K % (2 * GROUP) || M < 0 || N < 0) return -1;
    const int64_t G = K / GROUP;
    int16_t *a = malloc(sizeof(int16_t) * M * K + 32);
    float *row_scale = malloc(sizeof(float) * (M + M * G + 1));
    if (!a || !row_scale) { free(a); free(row_scale); return -2; }
    float *xsum = row_scale + M;
    #pragma omp parallel
    {
        #pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, a + m * K, row_scale + m, xsum + m * G);
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *packed_row = packed + n * (K / 2);
            const uint16_t *scale_row = scales + n * G, *min_row = mins + n * G;
            const float b = bias ? bias[n] : 0.0f;
            int64_t m0 = 0;
            for (; m0 + 4 <= M; m0 += 4) q4_rows(4, a, row_scale, xsum, K, G, m0, packed_row, scale_row, min_row, b, y, N, n);
            switch (M - m0) {
                case 3: q4_rows(3, a, row_scale, xsum, K, G, m0, packed_row, scale_row, min_row, b, y, N, n); break;
                case 2: q4_rows(2, a, row_scale, xsum, K, G, m0, packed_row, scale_row, min_row, b, y, N, n); break;
                case 1: q4_rows(1, a, row_scale, xsum, K, G, m0, packed_row, scale_row, min_row, b, y, N, n); break;
                default: break;
            }
        }
    }
    free(a);
    free(row_scale);
    return 0;
}
