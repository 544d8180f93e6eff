/* AVX2 + F16C versions of the hottest loops, picked at run time when the CPU
 * has both (kernels.c falls back to portable C otherwise). Each function
 * computes exactly what its portable twin computes; tests hold both to the
 * NumPy reference.
 *
 * Why intrinsics here and not elsewhere: GCC does not turn the 16-entry code
 * look-ups into vpermps, nor the float16 conversions into vcvtps2ph, by
 * itself; those two are most of the cost of 4-bit (de)quantization and casts.
 */
#include "kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#define LW_AVX2 __attribute__((target("avx2,f16c")))

int lw_cpu_has_avx2(void)
{
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    return cached;
}

/* Non-temporal stores skip the caches: for large outputs that nobody reads
 * soon (a whole converted tensor) they save the read-for-ownership of every
 * output line; measured 17 -> 22-26 GB/s for float32 -> float16 here. They
 * need 16-byte aligned destinations; otherwise plain stores are used. */
static inline int aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

LW_AVX2 static inline __m128i narrow8(__m256 x, int dtype)
{
    if (dtype == LW_FLOAT16)
        return _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    /* bfloat16: round to nearest even on the bits; NaN -> quiet, truncated */
    __m256i bits = _mm256_castps_si256(x);
    __m256i high = _mm256_srli_epi32(bits, 16);
    __m256i lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), lsb), 16);
    __m256i nan = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
    __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(bits, _mm256_set1_epi32(0x7fffffff)),
                                        _mm256_set1_epi32(0x7f800000));
    __m256i r = _mm256_blendv_epi8(rounded, nan, is_nan);
    /* 8 x uint32 (each < 65536) -> 8 x uint16 in order */
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

LW_AVX2 static inline __m256 widen8(const uint16_t *src, int dtype)
{
    __m128i h = _mm_loadu_si128((const __m128i *)src);
    if (dtype == LW_FLOAT16)
        return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

LW_AVX2 size_t lw_narrow_avx2(const float *src, uint16_t *dst, size_t n, int dtype,
                              int nontemporal)
{
    size_t i = 0;
    if (nontemporal && aligned16(dst)) {
        for (; i + 8 <= n; i += 8)
            _mm_stream_si128((__m128i *)(dst + i), narrow8(_mm256_loadu_ps(src + i), dtype));
        _mm_sfence();
    } else {
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i *)(dst + i), narrow8(_mm256_loadu_ps(src + i), dtype));
    }
    return i;
}

LW_AVX2 size_t lw_widen_avx2(const uint16_t *src, float *dst, size_t n, int dtype,
                             int nontemporal)
{
    size_t i = 0;
    if (nontemporal && aligned16(dst)) {
        for (; i + 8 <= n; i += 8) {
            __m256 x = widen8(src + i, dtype);
            _mm_stream_ps(dst + i, _mm256_castps256_ps128(x));
            _mm_stream_ps(dst + i + 4, _mm256_extractf128_ps(x, 1));
        }
        _mm_sfence();
    } else {
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, widen8(src + i, dtype));
    }
    return i;
}

/* table[idx] for idx in 0..15, the table held in two 8-lane registers */
LW_AVX2 static inline __m256 lookup16_ps(__m256 lo, __m256 hi, __m256i idx)
{
    __m256 mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7)));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx),
                            _mm256_permutevar8x32_ps(hi, idx), mask);
}

LW_AVX2 static inline __m256i lookup16_epi32(__m256i lo, __m256i hi, __m256i idx)
{
    __m256i mask = _mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7));
    return _mm256_blendv_epi8(_mm256_permutevar8x32_epi32(lo, idx),
                              _mm256_permutevar8x32_epi32(hi, idx), mask);
}

/* s = x * inv; NaN -> 0; clamp to [-1, 1] (scale_clamp in kernels.c) */
LW_AVX2 static inline __m256 scale_clamp8(const float *x, __m256 vinv)
{
    __m256 s = _mm256_mul_ps(_mm256_loadu_ps(x), vinv);
    s = _mm256_blendv_ps(s, _mm256_setzero_ps(), _mm256_cmp_ps(s, s, _CMP_UNORD_Q));
    return _mm256_min_ps(_mm256_max_ps(s, _mm256_set1_ps(-1.0f)), _mm256_set1_ps(1.0f));
}

/* 8 int32 codes of 0..255 in each of four registers -> 32 bytes in order */
LW_AVX2 static inline void store_bytes32(__m256i r0, __m256i r1, __m256i r2, __m256i r3,
                                         uint8_t *out)
{
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i a = _mm256_packus_epi32(r0, r1);
    __m256i b = _mm256_packus_epi32(r2, r3);
    __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(a, b), order);
    _mm256_storeu_si256((__m256i *)out, bytes);
}

/* 4-bit codes of v[0..len) (len a multiple of 32) into codes[] (one per byte).
 * rank = #{thresholds < s} by a branch-free binary search over the 16 padded
 * thresholds, then code = rank_to_code[rank]. */
LW_AVX2 size_t lw_codes4_avx2(const float *v, size_t len, float inv, const float *thresholds,
                              const uint8_t *rank_to_code, uint8_t *codes)
{
    float thr[16];
    int32_t r2c[16];
    int identity = 1;
    for (int k = 0; k < 15; k++) thr[k] = thresholds[k];
    thr[15] = __builtin_inff();
    for (int k = 0; k < 16; k++) {
        r2c[k] = rank_to_code[k];
        identity &= r2c[k] == k;
    }
    const __m256 t_lo = _mm256_loadu_ps(thr), t_hi = _mm256_loadu_ps(thr + 8);
    const __m256i c_lo = _mm256_loadu_si256((const __m256i *)r2c);
    const __m256i c_hi = _mm256_loadu_si256((const __m256i *)(r2c + 8));
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256 t7 = _mm256_set1_ps(thr[7]);
    size_t i = 0;
    for (; i + 32 <= len; i += 32) {
        __m256i ranks[4];
        for (int q = 0; q < 4; q++) {
            __m256 s = scale_clamp8(v + i + 8 * q, vinv);
            __m256i r = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(s, t7, _CMP_GT_OQ)),
                                         _mm256_set1_epi32(8));
            for (int step = 4; step >= 1; step >>= 1) {
                __m256i idx = _mm256_add_epi32(r, _mm256_set1_epi32(step - 1));
                __m256 t = lookup16_ps(t_lo, t_hi, idx);
                __m256i gt = _mm256_castps_si256(_mm256_cmp_ps(s, t, _CMP_GT_OQ));
                r = _mm256_add_epi32(r, _mm256_and_si256(gt, _mm256_set1_epi32(step)));
            }
            ranks[q] = identity ? r : lookup16_epi32(c_lo, c_hi, r);
        }
        store_bytes32(ranks[0], ranks[1], ranks[2], ranks[3], codes + i);
    }
    return i;
}

/* 8-bit ranks of v[0..len) (a multiple of 32 is done): the bucket search of
 * kernels.c with two gathers per 8 values. Scaled values lie in [-1, 1], so
 * a bucket index is at most 0xbf80 and the 4-byte gather from the byte table
 * stays inside its 65536 entries. */
LW_AVX2 size_t lw_ranks8_avx2(const float *v, size_t len, float inv, const float *thresholds,
                              const uint8_t *buckets, uint8_t *ranks)
{
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i low_byte = _mm256_set1_epi32(0xff);
    size_t i = 0;
    for (; i + 32 <= len; i += 32) {
        __m256i r[4];
        for (int q = 0; q < 4; q++) {
            __m256 s = scale_clamp8(v + i + 8 * q, vinv);
            __m256i bucket = _mm256_srli_epi32(_mm256_castps_si256(s), 16);
            __m256i base = _mm256_and_si256(
                _mm256_i32gather_epi32((const int *)buckets, bucket, 1), low_byte);
            __m256 t = _mm256_i32gather_ps(thresholds, base, 4);
            __m256i above = _mm256_castps_si256(_mm256_cmp_ps(s, t, _CMP_GT_OQ));
            r[q] = _mm256_sub_epi32(base, above); /* above is -1 where s > t */
        }
        store_bytes32(r[0], r[1], r[2], r[3], ranks + i);
    }
    return i;
}

LW_AVX2 static inline void store8_ps(float *out, __m256 v, int nontemporal)
{
    if (nontemporal) {
        _mm_stream_ps(out, _mm256_castps256_ps128(v));
        _mm_stream_ps(out + 4, _mm256_extractf128_ps(v, 1));
    } else {
        _mm256_storeu_ps(out, v);
    }
}

/* Dequantize packed 4-bit codes into float32: 8 bytes in, 16 floats out;
 * table = the block's 16 scaled code values. Returns the number of elements
 * written (a multiple of 16). nontemporal needs out 16-byte aligned. */
LW_AVX2 size_t lw_dequant4_f32_avx2(const uint8_t *codes, size_t len, const float *table,
                                    float *out, int nontemporal)
{
    const __m256 lo = _mm256_loadu_ps(table), hi = _mm256_loadu_ps(table + 8);
    const __m256i low_nibble = _mm256_set1_epi32(15);
    size_t i = 0;
    for (; i + 16 <= len; i += 16) {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + i / 2)));
        __m256i h = _mm256_srli_epi32(b, 4);
        __m256i l = _mm256_and_si256(b, low_nibble);
        __m256i u0 = _mm256_unpacklo_epi32(h, l);
        __m256i u1 = _mm256_unpackhi_epi32(h, l);
        store8_ps(out + i, lookup16_ps(lo, hi, _mm256_permute2x128_si256(u0, u1, 0x20)),
                  nontemporal);
        store8_ps(out + i + 8, lookup16_ps(lo, hi, _mm256_permute2x128_si256(u0, u1, 0x31)),
                  nontemporal);
    }
    return i;
}

/* Dequantize 8-bit codes into float32 with one gather per 8 values from the
 * block's 256 scaled code values. Returns the count done (multiple of 8). */
LW_AVX2 size_t lw_dequant8_f32_avx2(const uint8_t *codes, size_t len, const float *table,
                                    float *out, int nontemporal)
{
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + i)));
        store8_ps(out + i, _mm256_i32gather_ps(table, idx, 4), nontemporal);
    }
    return i;
}

LW_AVX2 void lw_store_fence(void) { _mm_sfence(); }

#else

int lw_cpu_has_avx2(void) { return 0; }
size_t lw_narrow_avx2(const float *src, uint16_t *dst, size_t n, int dtype, int nontemporal)
{ return 0; }
size_t lw_widen_avx2(const uint16_t *src, float *dst, size_t n, int dtype, int nontemporal)
{ return 0; }
size_t lw_codes4_avx2(const float *v, size_t len, float inv, const float *thresholds,
                      const uint8_t *rank_to_code, uint8_t *codes) { return 0; }
size_t lw_dequant4_f32_avx2(const uint8_t *codes, size_t len, const float *table, float *out,
                            int nontemporal) { return 0; }
size_t lw_dequant8_f32_avx2(const uint8_t *codes, size_t len, const float *table, float *out,
                            int nontemporal) { return 0; }
void lw_store_fence(void) {}
size_t lw_ranks8_avx2(const float *v, size_t len, float inv, const float *thresholds,
                      const uint8_t *buckets, uint8_t *ranks) { return 0; }

#endif
