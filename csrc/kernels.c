/* Kernels of llmwire._native. The spec is llmwire/quant/reference.py.
 *
 * Loops are written branch-free (selects, integer max on float bits) so that
 * GCC vectorises them; each entry point is compiled twice, for AVX2 and for
 * the baseline ISA, and the loader picks one at run time. The build uses
 * -ffp-contract=off: one float32 rounding per operation, as in NumPy.
 */
#include "kernels.h"

#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(LW_NO_CLONES)
#define LW_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define LW_CLONES
#endif

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_to_f16(float f)
{
    uint32_t x = f2u(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t mag = x & 0x7fffffffu;
    uint32_t rebiased = mag - 0x38000000u;
    uint32_t normal = (rebiased + 0x0fffu + ((rebiased >> 13) & 1u)) >> 13;
    /* below 2**-14 the result is a multiple of 2**-24, which is the ulp of
     * 0.5f: adding 0.5f rounds to nearest even exactly as wanted */
    uint32_t subnormal = f2u(u2f(mag) + 0.5f) - 0x3f000000u;
    uint32_t nan = 0x7e00u | ((mag >> 13) & 0x3ffu);
    uint32_t r = mag > 0x7f800000u ? nan
               : mag >= 0x477ff000u ? 0x7c00u
               : mag >= 0x38800000u ? normal
               : subnormal;
    return (uint16_t)(r | sign);
}

static inline float f16_to_f32(uint16_t h)
{
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t exponent = ((uint32_t)h >> 10) & 0x1fu;
    uint32_t mantissa = (uint32_t)h & 0x3ffu;
    uint32_t normal = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    /* inf keeps its bits; NaN keeps its payload and is made quiet */
    uint32_t special = sign | 0x7f800000u | (mantissa << 13) | (mantissa ? 0x400000u : 0u);
    uint32_t subnormal = f2u((float)mantissa * 0x1p-24f) | sign;
    return u2f(exponent == 31u ? special : exponent == 0u ? subnormal : normal);
}

static inline uint16_t f32_to_bf16(float f)
{
    uint32_t x = f2u(f);
    uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    uint32_t nan = (x >> 16) | 0x40u;
    return (uint16_t)(((x & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

static inline float bf16_to_f32(uint16_t b) { return u2f((uint32_t)b << 16); }

int lw_dtype_size(int dtype)
{
    switch (dtype) {
    case LW_FLOAT32: return 4;
    case LW_FLOAT16: return 2;
    case LW_BFLOAT16: return 2;
    default: return 0;
    }
}

/* ---- casts -------------------------------------------------------------- */

static void widen(const void *restrict src, int dtype, float *restrict out, size_t n, int nt)
{
    if (dtype == LW_FLOAT32) {
        memcpy(out, src, n * sizeof(float));
        return;
    }
    const uint16_t *s = (const uint16_t *)src;
    size_t i = lw_cpu_has_avx2() ? lw_widen_avx2(s, out, n, dtype, nt) : 0;
    if (dtype == LW_FLOAT16)
        for (; i < n; i++) out[i] = f16_to_f32(s[i]);
    else
        for (; i < n; i++) out[i] = bf16_to_f32(s[i]);
}

static void narrow(const float *restrict src, uint16_t *restrict out, int dtype, size_t n,
                   int nt)
{
    size_t i = lw_cpu_has_avx2() ? lw_narrow_avx2(src, out, n, dtype, nt) : 0;
    if (dtype == LW_FLOAT16)
        for (; i < n; i++) out[i] = f32_to_f16(src[i]);
    else
        for (; i < n; i++) out[i] = f32_to_bf16(src[i]);
}

LW_CLONES
void lw_cast(const void *src, int src_dtype, void *dst, int dst_dtype, size_t n,
             int nontemporal)
{
    if (src_dtype == dst_dtype) {
        memcpy(dst, src, n * (size_t)lw_dtype_size(src_dtype));
        return;
    }
    if (src_dtype == LW_FLOAT32) {
        narrow((const float *)src, (uint16_t *)dst, dst_dtype, n, nontemporal);
        return;
    }
    if (dst_dtype == LW_FLOAT32) {
        widen(src, src_dtype, (float *)dst, n, nontemporal);
        return;
    }
    /* float16 <-> bfloat16 goes through float32, a block at a time */
    float tmp[LW_MAX_BLOCK];
    for (size_t off = 0; off < n; off += LW_MAX_BLOCK) {
        size_t len = n - off < LW_MAX_BLOCK ? n - off : LW_MAX_BLOCK;
        widen((const uint16_t *)src + off, src_dtype, tmp, len, 0);
        narrow(tmp, (uint16_t *)dst + off, dst_dtype, len, nontemporal);
    }
}

/* ---- block quantization ------------------------------------------------- */

/* Largest finite magnitude, compared as integers (same order as floats for
 * non-negative values); counts NaN/inf into *nonfinite. */
static inline float block_absmax(const float *restrict v, size_t len, int64_t *nonfinite)
{
    int32_t best = 0;
    int32_t bad = 0;
    for (size_t i = 0; i < len; i++) {
        int32_t a = (int32_t)(f2u(v[i]) & 0x7fffffffu);
        int32_t is_bad = a >= 0x7f800000;
        bad += is_bad;
        a &= is_bad - 1; /* a mask, not a select: GCC vectorises this form */
        best = best > a ? best : a;
    }
    *nonfinite += bad;
    return u2f((uint32_t)best);
}

static inline float scale_clamp(float x, float inv)
{
    float s = x * inv;
    s = s != s ? 0.0f : s;
    s = s < -1.0f ? -1.0f : s;
    return s > 1.0f ? 1.0f : s;
}

static void quantize4(const float *restrict v, size_t len, float inv,
                      const lw_code_tables *t, uint8_t *restrict out)
{
    /* code = rank_to_code[#{thr < s}], computed as a sum of per-threshold
     * steps so that the whole loop is compares and adds */
    float thr[15];
    int32_t step[15];
    int32_t first = t->rank_to_code[0];
    for (int k = 0; k < 15; k++) {
        thr[k] = t->thresholds[k];
        step[k] = (int32_t)t->rank_to_code[k + 1] - (int32_t)t->rank_to_code[k];
    }
    uint8_t codes[LW_MAX_BLOCK];
    size_t i = lw_cpu_has_avx2()
        ? lw_codes4_avx2(v, len, inv, t->thresholds, t->rank_to_code, codes) : 0;
    for (; i < len; i++) {
        float s = scale_clamp(v[i], inv);
        int32_t c = first;
        for (int k = 0; k < 15; k++) c += s > thr[k] ? step[k] : 0;
        codes[i] = (uint8_t)(c & 15);
    }
    size_t pairs = len / 2;
    for (size_t j = 0; j < pairs; j++)
        out[j] = (uint8_t)((codes[2 * j] << 4) | codes[2 * j + 1]);
    if (len & 1)
        out[pairs] = (uint8_t)(codes[len - 1] << 4);
}

static void quantize8(const float *restrict v, size_t len, float inv,
                      const lw_code_tables *t, uint8_t *restrict out)
{
    const float *thr = t->thresholds;
    const uint8_t *buckets = t->buckets;
    const uint8_t *r2c = t->rank_to_code;
    /* the vector path writes ranks; they are codes when rank_to_code is the
     * identity (true of the dynamic map), else mapped below */
    size_t done = lw_cpu_has_avx2() ? lw_ranks8_avx2(v, len, inv, thr, buckets, out) : 0;
    if (done && !t->identity)
        for (size_t i = 0; i < done; i++) out[i] = r2c[out[i]];
    for (size_t i = done; i < len; i++) {
        float s = scale_clamp(v[i], inv);
        uint32_t base = buckets[f2u(s) >> 16];
        out[i] = r2c[base + (uint32_t)(s > thr[base])];
    }
}

LW_CLONES
int64_t lw_quantize(const void *src, int src_dtype, size_t n, size_t block,
                    const lw_code_tables *tables, uint8_t *codes, float *absmax)
{
    float tmp[LW_MAX_BLOCK];
    int64_t nonfinite = 0;
    size_t nblocks = (n + block - 1) / block;
    for (size_t b = 0; b < nblocks; b++) {
        size_t off = b * block;
        size_t len = n - off < block ? n - off : block;
        const float *v;
        if (src_dtype == LW_FLOAT32) {
            v = (const float *)src + off;
        } else {
            widen((const uint16_t *)src + off, src_dtype, tmp, len, 0);
            v = tmp;
        }
        float am = block_absmax(v, len, &nonfinite);
        absmax[b] = am;
        if (am > 0.0f && am < 0x1p-126f) {
            /* subnormal absmax: 1/am would overflow; scale the block by 2**32
             * (exact for such small values) and use the scaled absmax */
            for (size_t i = 0; i < len; i++) tmp[i] = v[i] * 0x1p32f;
            v = tmp;
            am *= 0x1p32f;
        }
        float inv = am > 0.0f ? 1.0f / am : 0.0f;
        if (tables->bits == 4)
            quantize4(v, len, inv, tables, codes + off / 2);
        else
            quantize8(v, len, inv, tables, codes + off);
    }
    return nonfinite;
}

/* ---- block dequantization ----------------------------------------------- */

/* Each block first scales its 16 or 256 code values (and narrows them once to
 * the target dtype); elements are then table look-ups. The result is the same
 * as scaling element by element, since both do the same float32 product. */
#define LOOKUP_TAIL(T, table, from)                                               \
    do {                                                                          \
        T *o = (T *)dst + off;                                                    \
        if (bits == 4) {                                                          \
            const uint8_t *c = codes + off / 2;                                   \
            for (size_t j = (from) / 2; j < len / 2; j++) {                       \
                o[2 * j] = table[c[j] >> 4];                                      \
                o[2 * j + 1] = table[c[j] & 15];                                  \
            }                                                                     \
            if (len & 1) o[len - 1] = table[c[len / 2] >> 4];                     \
        } else {                                                                  \
            const uint8_t *c = codes + off;                                       \
            for (size_t i = (from); i < len; i++) o[i] = table[c[i]];             \
        }                                                                         \
    } while (0)

LW_CLONES
void lw_dequantize(const uint8_t *codes, const float *absmax, size_t n, size_t block,
                   int bits, const float *code_values, void *dst, int dst_dtype,
                   int nontemporal)
{
    float scaled[256];
    uint16_t narrowed[256];
    size_t ncodes = (size_t)1 << bits;
    size_t nblocks = (n + block - 1) / block;
    int avx2 = lw_cpu_has_avx2();
    /* blocks start at multiples of 32 elements, so one aligned base suffices */
    int nt = nontemporal && avx2 && ((uintptr_t)dst & 15u) == 0;
    for (size_t b = 0; b < nblocks; b++) {
        size_t off = b * block;
        size_t len = n - off < block ? n - off : block;
        float am = absmax[b];
        for (size_t k = 0; k < ncodes; k++) scaled[k] = code_values[k] * am;
        if (dst_dtype == LW_FLOAT32) {
            float *o = (float *)dst + off;
            size_t done = 0;
            if (avx2)
                done = bits == 4 ? lw_dequant4_f32_avx2(codes + off / 2, len, scaled, o, nt)
                                 : lw_dequant8_f32_avx2(codes + off, len, scaled, o, nt);
            LOOKUP_TAIL(float, scaled, done);
        } else {
            narrow(scaled, narrowed, dst_dtype, ncodes, 0);
            LOOKUP_TAIL(uint16_t, narrowed, 0);
        }
    }
    if (nt)
        lw_store_fence();
}
