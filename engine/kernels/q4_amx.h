/* q4_matmul.c's wide path (q4_wide.h) with the integer sums on AMX tiles, included where it is built
 * with AMX-INT8 (Sapphire Rapids and later). Used for calls of at least AMX_MIN_ROWS rows: one tile
 * op sums a group of 32 for 16 outputs by up to 16 rows, where vpdpbusd takes 8 ops per row (16 for
 * 8-bit weights). What is left per row is the float work of the group's scales (4 ops per 16 outputs),
 * so a batch or a prefill costs ~1.5x (4-bit) to ~2x (8-bit) less than on vpdpbusd. Few rows stay on
 * the vpdpbusd path (AMX_MIN_ROWS: there the weights' stream dominates and unpacking them into a tile
 * only adds work).
 *
 * Per two blocks b, b + 1 (16 outputs) and group g:
 *   B tile (8 rows x 64 bytes, s8): row r holds, per output o < 16, q[o, 32 g + 4 r + j] - C, j < 4
 *       (C = 8 for 4 bits, 128 for 8): the low nibbles of the packed 32-byte row t give r = 2 t, the
 *       high ones r = 2 t + 1 (the layout the vpdpbusd path reads); 8-bit weights put both planes'
 *       nibbles back into one byte.
 *   A tile (R rows x 32 bytes, s8): row m's int8 activations of group g, straight from `a` (stride K)
 *   C = tdpbssd(A, B): C[m, o] = sum_k a[m, 32 g + k] (q[o, 32 g + k] - C), the exact integer the
 *       vpdpbusd path gets as qa - C asum, then the wide path's float operations in the same order:
 *       the outputs are the vpdpbusd path's bit for bit, whichever path a call takes.
 * Rows in chunks of 16 (a tile's rows); groups in batches of 8 (their sums stored, then the float pass). */
#include <unistd.h>
#include <sys/syscall.h>

/* the fewest rows a call takes to the tiles, for 4- and 8-bit weights (below, the vpdpbusd path was
 * as fast or faster on a 2-core Sapphire Rapids VM: unpacking B costs the same for any rows) */
#define AMX_MIN_ROWS(planes) ((planes) == 1 ? 8 : 4)
#define AMX_TILE_ROWS 16
#define AMX_GROUP_BATCH 8                       /* groups whose C tiles are stored before the float pass */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} __attribute__((packed)) tile_config;

/* Linux lends the tile registers to a process only on request (once per process; the answer cannot
 * change, so it is kept). A kernel or VM that refuses leaves every call on the vpdpbusd path. */
static int amx_permitted(void) {
    static int state = 0;                       /* 0 not asked yet, 1 granted, -1 refused */
    if (state == 0) state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
    return state == 1;
}

/* tiles 0, 1: C (R x 16 int32); 2, 3: A (R x 32 bytes); 4, 5: B (8 x 64 bytes) */
static void configure_tiles(int rows) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    const int tile_rows[6] = {rows, rows, rows, rows, 8, 8}, bytes[6] = {64, 64, 32, 32, 64, 64};
    for (int i = 0; i < 6; i++) { config.rows[i] = tile_rows[i]; config.bytes_per_row[i] = bytes[i]; }
    _tile_loadconfig(&config);
}

/* the B tile of two blocks' group, centred: q - C as int8 (C = 8 for 4 bits, 128 for 8), so the
 * tile op gives A = sum_k (q - C) a itself (w0, w1: the blocks' packed bytes of group g) */
static inline __attribute__((always_inline)) void weight_tile(const int PLANES, const uint8_t *w0,
                                                              const uint8_t *w1, uint8_t *tile) {
    const __m512i low_nibbles = _mm512_set1_epi8(0x0F), high_nibbles = _mm512_set1_epi8((char)0xF0);
    for (int t = 0; t < 4; t++) {
        const __m512i low_plane = load_pair(w0 + 32 * t, w1 + 32 * t);
        __m512i even = _mm512_and_si512(low_plane, low_nibbles);                        /* k = 8 t + j     */
        __m512i odd = _mm512_and_si512(_mm512_srli_epi16(low_plane, 4), low_nibbles);   /* k = 8 t + 4 + j */
        if (PLANES == 2) {
            const __m512i high_plane = load_pair(w0 + 128 + 32 * t, w1 + 128 + 32 * t), top = _mm512_set1_epi8((char)0x80);
            even = _mm512_xor_si512(_mm512_or_si512(even, _mm512_and_si512(_mm512_slli_epi16(high_plane, 4), high_nibbles)), top);
            odd = _mm512_xor_si512(_mm512_or_si512(odd, _mm512_and_si512(high_plane, high_nibbles)), top);
        } else {
            even = _mm512_sub_epi8(even, _mm512_set1_epi8(8));
            odd = _mm512_sub_epi8(odd, _mm512_set1_epi8(8));
        }
        _mm512_store_si512((__m512i *)(tile + 128 * t), even);
        _mm512_store_si512((__m512i *)(tile + 128 * t + 64), odd);
    }
}

/* the float pass over a batch of groups for rows [r0, r0 + NR) of the chunk (NR a constant after
 * inlining: the rows' accumulators stay in registers): block_rows_wide's operations, g in order */
static inline __attribute__((always_inline)) void float_rows(
        const int NR, int r0, int num_groups, int32_t (*sums)[AMX_TILE_ROWS][16], const float *act_scale,
        const float *xsum, int64_t G, int64_t m0, int64_t g0, const __m512 *steps, const __m512 *centres,
        __m512 *acc, __m512 *min_acc) {
    __m512 row_acc[4], row_min_acc[4];
    for (int r = 0; r < NR; r++) { row_acc[r] = acc[r0 + r]; row_min_acc[r] = min_acc[r0 + r]; }
    for (int i = 0; i < num_groups; i++) {
        const int64_t g = g0 + i;
        for (int r = 0; r < NR; r++) {
            const int64_t mg = (m0 + r0 + r) * G + g;
            group_step_wide(_mm512_load_si512((const __m512i *)sums[i][r0 + r]), steps[i], centres[i],
                            act_scale[mg], xsum[mg], &row_acc[r], &row_min_acc[r]);
        }
    }
    for (int r = 0; r < NR; r++) { acc[r0 + r] = row_acc[r]; min_acc[r0 + r] = row_min_acc[r]; }
}

/* rows [m0, m0 + R) (R <= 16) of outputs [8 b, 8 b + 16): per batch of groups the B tiles are
 * unpacked first (so no tile load waits on a store just made), then the tile ops alternate between
 * two sets of tiles (a group's ops need not wait for the previous group's), then the float pass */
static inline __attribute__((always_inline)) void block_rows_amx(
        const int PLANES, const int R, const int8_t *a, const float *act_scale, const float *xsum,
        int64_t K, int64_t G, int64_t m0, const uint8_t *packed_block, const uint16_t *step_block,
        const uint16_t *min_block, const float *bias, float *y, int64_t N, int64_t n0) {
    const int32_t centre = PLANES == 1 ? 8 : 128;
    const int64_t plane_stride = PLANES * (BLOCK * K / 2), scale_stride = BLOCK * G;     /* to block b + 1 */
    uint8_t tiles[AMX_GROUP_BATCH][512] __attribute__((aligned(64)));
    int32_t sums[AMX_GROUP_BATCH][AMX_TILE_ROWS][16] __attribute__((aligned(64)));
    __m512 acc[AMX_TILE_ROWS], min_acc[AMX_TILE_ROWS];
    for (int r = 0; r < R; r++) { acc[r] = _mm512_setzero_ps(); min_acc[r] = _mm512_setzero_ps(); }
    for (int64_t g0 = 0; g0 < G; g0 += AMX_GROUP_BATCH) {
        const int num_groups = G - g0 < AMX_GROUP_BATCH ? (int)(G - g0) : AMX_GROUP_BATCH;
        for (int i = 0; i < num_groups; i++) {
            const uint8_t *w = packed_block + PLANES * 128 * (g0 + i);
            weight_tile(PLANES, w, w + plane_stride, tiles[i]);
        }
        const int8_t *a_group = a + m0 * K + GROUP * g0;
        for (int i = 0; i < num_groups; i += 2) {      /* tiles 0, 2, 4: even groups; 1, 3, 5: odd */
            const int is_pair = i + 1 < num_groups;
            _tile_loadd(2, a_group + GROUP * i, K);
            _tile_loadd(4, tiles[i], 64);
            _tile_zero(0);
            _tile_dpbssd(0, 2, 4);
            if (is_pair) {
                _tile_loadd(3, a_group + GROUP * (i + 1), K);
                _tile_loadd(5, tiles[i + 1], 64);
                _tile_zero(1);
                _tile_dpbssd(1, 3, 5);
            }
            _tile_stored(0, sums[i][0], 64);
            if (is_pair) _tile_stored(1, sums[i + 1][0], 64);
        }
        __m512 steps[AMX_GROUP_BATCH], centres[AMX_GROUP_BATCH];
        for (int i = 0; i < num_groups; i++)
            group_scales_wide(centre, step_block, min_block, g0 + i, scale_stride, &steps[i], &centres[i]);
        int r0 = 0;
        for (; r0 + 4 <= R; r0 += 4)
            float_rows(4, r0, num_groups, sums, act_scale, xsum, G, m0, g0, steps, centres, acc, min_acc);
        for (; r0 < R; r0++)
            float_rows(1, r0, num_groups, sums, act_scale, xsum, G, m0, g0, steps, centres, acc, min_acc);
    }
    store_rows_wide(R, acc, min_acc, bias, y, N, m0, n0);
}

/* every row of two blocks on tiles, in chunks of up to 16 rows; *configured_rows: the rows this
 * thread's tiles are configured for (0: none yet), so the configuration changes only with the chunk */
static inline __attribute__((always_inline)) void block_all_rows_amx(
        const int PLANES, const int8_t *a, const float *act_scale, const float *xsum, int64_t M, int64_t K, int64_t G, const uint8_t *packed_block, const uint16_t *step_block,
        const uint16_t *min_block, const float *bias, float *y, int64_t N, int64_t n0, int *configured_rows) {
    for (int64_t m0 = 0; m0 < M; m0 += AMX_TILE_ROWS) {
        const int R = M - m0 < AMX_TILE_ROWS ? (int)(M - m0) : AMX_TILE_ROWS;
        if (R != *configured_rows) { configure_tiles(R); *configured_rows = R; }
        block_rows_amx(PLANES, R, a, act_scale, xsum, K, G, m0, packed_block, step_block, min_block,
                       bias, y, N, n0);
    }
}
