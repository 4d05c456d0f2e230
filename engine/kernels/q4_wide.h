/* q4_matmul.c's block_rows for two blocks at once (outputs 8 b .. 8 b + 15) in 512-bit registers,
 * included by q4_matmul.c where it is built with AVX-512 BW + VNNI. Lanes 0-7 are block b's, 8-15
 * block b + 1's; each 256-bit half does exactly what block_rows does for its block (the same int32
 * sums, then the same float operations in the same order), so the outputs are the 256-bit code's bit
 * for bit, and two blocks cost one 512-bit vpdpbusd per 4 products of 16 outputs instead of two. */

/* both blocks' 256-bit halves of one 32-byte row t of a plane, side by side */
static inline __attribute__((always_inline)) __m512i load_pair(const uint8_t *w0, const uint8_t *w1) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)w0)),
                              _mm256_loadu_si256((const __m256i *)w1), 1);
}

/* sums[r] = int32 sums of one 4-bit plane by rows m0 .. m0 + R - 1, group g, of 16 outputs
 * (w0: block b's plane, w1: block b + 1's) */
static inline __attribute__((always_inline)) void plane_sums_wide(
        const int R, __m512i *sums, const uint8_t *w0, const uint8_t *w1, const int8_t *a, int64_t K,
        int64_t m0, int64_t g) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (int t = 0; t < 4; t++) {
        const __m512i bytes = load_pair(w0 + 32 * t, w1 + 32 * t);
        const __m512i low = _mm512_and_si512(bytes, nibble);                        /* k = 8 t + j     */
        const __m512i high = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble); /* k = 8 t + 4 + j */
        for (int r = 0; r < R; r++) {
            int32_t a_low, a_high;
            const int8_t *ak = a + (m0 + r) * K + GROUP * g + 8 * t;
            memcpy(&a_low, ak, 4);
            memcpy(&a_high, ak + 4, 4);
            const __m512i sum = t == 0 ? _mm512_setzero_si512() : sums[r];
            sums[r] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(sum, low, _mm512_set1_epi32(a_low)),
                                          high, _mm512_set1_epi32(a_high));
        }
    }
}

/* 16 fp16 values: block b's 8 for group g, then block b + 1's (block_stride apart) */
static inline __attribute__((always_inline)) __m512 load_pair_ph(const uint16_t *p, int64_t block_stride) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)),
                                                   _mm_loadu_si128((const __m128i *)(p + block_stride)), 1));
}

/* group g's steps and centres (min + C step) of the 16 outputs */
static inline __attribute__((always_inline)) void group_scales_wide(
        const int32_t centre, const uint16_t *step_block, const uint16_t *min_block, int64_t g,
        int64_t scale_stride, __m512 *steps, __m512 *centres) {
    *steps = load_pair_ph(step_block + BLOCK * g, scale_stride);
    *centres = _mm512_fmadd_ps(*steps, _mm512_set1_ps((float)centre), load_pair_ph(min_block + BLOCK * g, scale_stride));
}

/* one group's float step for one row (A: the group's exact integer sums, s: its activation scale,
 * x_sum: its sum of x); the AMX path (q4_amx.h) takes the same step, so the two agree bit for bit */
static inline __attribute__((always_inline)) void group_step_wide(
        __m512i A, __m512 steps, __m512 centres, float s, float x_sum, __m512 *acc, __m512 *min_acc) {
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(A), _mm512_mul_ps(steps, _mm512_set1_ps(s)), *acc);
    *min_acc = _mm512_fmadd_ps(centres, _mm512_set1_ps(x_sum), *min_acc);
}

/* y[m0 + r, n0 .. n0 + 15] = acc + min_acc + bias for rows r < R */
static inline __attribute__((always_inline)) void store_rows_wide(
        const int R, const __m512 *acc, const __m512 *min_acc, const float *bias, float *y, int64_t N,
        int64_t m0, int64_t n0) {
    const __m512 b = bias ? _mm512_loadu_ps(bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < R; r++)
        _mm512_storeu_ps(y + (m0 + r) * N + n0, _mm512_add_ps(_mm512_add_ps(acc[r], min_acc[r]), b));
}

static inline __attribute__((always_inline)) void block_rows_wide(
        const int R, const int PLANES, const int8_t *a, const int32_t *asum, const float *act_scale,
        const float *xsum, int64_t K, int64_t G, int64_t m0, const uint8_t *packed_block,
        const uint16_t *step_block, const uint16_t *min_block, const float *bias, float *y, int64_t N, int64_t n0) {
    const int32_t centre = PLANES == 1 ? 8 : 128;
    const int64_t plane_stride = PLANES * (BLOCK * K / 2), scale_stride = BLOCK * G;     /* to block b + 1 */
    __m512 acc[MAX_CHUNK], min_acc[MAX_CHUNK];
    for (int r = 0; r < R; r++) { acc[r] = _mm512_setzero_ps(); min_acc[r] = _mm512_setzero_ps(); }
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *w = packed_block + PLANES * 128 * g;
        __m512i low_sums[MAX_CHUNK], high_sums[MAX_CHUNK];
        plane_sums_wide(R, low_sums, w, w + plane_stride, a, K, m0, g);
        if (PLANES == 2) plane_sums_wide(R, high_sums, w + 128, w + plane_stride + 128, a, K, m0, g);
        __m512 steps, centres;
        group_scales_wide(centre, step_block, min_block, g, scale_stride, &steps, &centres);
        for (int r = 0; r < R; r++) {
            const int64_t mg = (m0 + r) * G + g;
            __m512i qa = low_sums[r];
            if (PLANES == 2) qa = _mm512_add_epi32(qa, _mm512_slli_epi32(high_sums[r], 4));
            group_step_wide(_mm512_sub_epi32(qa, _mm512_set1_epi32(centre * asum[mg])), steps, centres,
                            act_scale[mg], xsum[mg], &acc[r], &min_acc[r]);
        }
    }
    store_rows_wide(R, acc, min_acc, bias, y, N, m0, n0);
}
