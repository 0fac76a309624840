/* Weight drop on Philox4x32-10 bits on CPU (kernels/weight_drop_cpu.py calls it); an AVX2
   path and a plain one that gcc vectorises, drawing the same bits. */
#include <stdint.h>

/* DropConnect's weight drop, fused: out = x * scale where the element's Philox4x32-10 draw is
   below thr, else 0 (kernels/philox.py has the layout and the reference). The same call with
   x = dL/d(out) is the backward: the mask is recomputed from the seed, never stored. Blocks
   blk0..blk1-1 of 4 * WD_K elements of n. */
#define WD_K 64
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

#ifdef __AVX2__
#include <immintrin.h>
/* (hi, lo) words of a * m in each of 8 32-bit lanes: vpmuludq on the even and the odd lanes */
static inline void mul32x8(__m256i a, __m256i m, __m256i *hi, __m256i *lo)
{
    __m256i even = _mm256_mul_epu32(a, m);
    __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}
#endif

static void philox_block(uint64_t seed, int64_t blk, uint32_t r[4][WD_K])
{
    const uint64_t base = (uint64_t)blk * WD_K;
    uint32_t key0[10], key1[10];  /* the key schedule is the same for every counter */
    key0[0] = (uint32_t)seed;
    key1[0] = (uint32_t)(seed >> 32);
    for (int i = 1; i < 10; i++) {
        key0[i] = key0[i - 1] + PHILOX_W0;
        key1[i] = key1[i - 1] + PHILOX_W1;
    }
#ifdef __AVX2__
    const __m256i m0 = _mm256_set1_epi32((int)PHILOX_M0), m1 = _mm256_set1_epi32((int)PHILOX_M1);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int k = 0; k < WD_K; k += 8) {
        uint64_t first = base + (uint64_t)k;  /* 8 counters never straddle 2**32: WD_K | 2**32 */
        __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)first), lane);
        __m256i c1 = _mm256_set1_epi32((int)(uint32_t)(first >> 32));
        __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
        for (int round = 0; round < 10; round++) {
            __m256i hi0, lo0, hi1, lo1;
            mul32x8(c0, m0, &hi0, &lo0);
            mul32x8(c2, m1, &hi1, &lo1);
            c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32((int)key0[round]));
            c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32((int)key1[round]));
            c1 = lo1;
            c3 = lo0;
        }
        _mm256_storeu_si256((__m256i *)(r[0] + k), c0);
        _mm256_storeu_si256((__m256i *)(r[1] + k), c1);
        _mm256_storeu_si256((__m256i *)(r[2] + k), c2);
        _mm256_storeu_si256((__m256i *)(r[3] + k), c3);
    }
#else
    for (int k = 0; k < WD_K; k++) {  /* gcc vectorises this over k */
        uint64_t ctr = base + (uint64_t)k;
        uint32_t c0 = (uint32_t)ctr, c1 = (uint32_t)(ctr >> 32), c2 = 0, c3 = 0;
        for (int round = 0; round < 10; round++) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * c0, p1 = (uint64_t)PHILOX_M1 * c2;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ key0[round];
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ key1[round];
            c1 = (uint32_t)p1;
            c3 = (uint32_t)p0;
            c0 = n0;
            c2 = n2;
        }
        r[0][k] = c0; r[1][k] = c1; r[2][k] = c2; r[3][k] = c3;
    }
#endif
}

void wdrop(const float *x, float *out, int64_t n, uint64_t seed, uint32_t thr, float scale,
           int64_t blk0, int64_t blk1)
{
    uint32_t r[4][WD_K];
    for (int64_t blk = blk0; blk < blk1; blk++) {
        philox_block(seed, blk, r);
        for (int o = 0; o < 4; o++) {
            const int64_t s = (blk * 4 + o) * WD_K;
            const int64_t len = n - s < WD_K ? n - s : WD_K;
            const uint32_t *restrict ro = r[o];
            const float *restrict xs = x + s;
            float *restrict os = out + s;
            for (int64_t k = 0; k < len; k++) os[k] = ro[k] < thr ? xs[k] * scale : 0.0f;
        }
    }
}

/* The draws themselves (for tests against the reference): bits[i] for i in the blocks. */
void philox_fill(uint32_t *bits, int64_t n, uint64_t seed, int64_t blk0, int64_t blk1)
{
    uint32_t r[4][WD_K];
    for (int64_t blk = blk0; blk < blk1; blk++) {
        philox_block(seed, blk, r);
        for (int o = 0; o < 4; o++) {
            const int64_t s = (blk * 4 + o) * WD_K;
            for (int64_t k = 0; k < WD_K && s + k < n; k++) bits[s + k] = r[o][k];
        }
    }
}
