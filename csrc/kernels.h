/* llmwire._native: hot loops over raw buffers.
 *
 * Every function here has a NumPy twin in llmwire/quant/reference.py that
 * defines its exact output; tests check that the two agree bit for bit. The
 * functions take no locks and touch no Python objects, so the module calls
 * them with the GIL released.
 */
#ifndef LLMWIRE_KERNELS_H
#define LLMWIRE_KERNELS_H

#include <stddef.h>
#include <stdint.h>

enum lw_dtype { LW_FLOAT32 = 0, LW_FLOAT16 = 1, LW_BFLOAT16 = 2 };

#define LW_MAX_BLOCK 4096

/* A block format's decision tables (built by llmwire/quant/_kernels.py).
 *   thresholds   ascending float32 midpoints between levels; 256 entries for
 *                8-bit (last one +inf), 15 for 4-bit (padded with +inf)
 *   rank_to_code level rank -> stored code
 *   buckets      8-bit only: 65536 entries, for the top 16 bits of a scaled
 *                value s, the number of thresholds below every value of that
 *                bucket (at most one threshold lies inside a bucket)
 */
typedef struct {
    int bits; /* 8 or 4 */
    const float *thresholds;
    const uint8_t *rank_to_code;
    const uint8_t *buckets;
    int identity; /* rank_to_code[r] == r for every r */
} lw_code_tables;

int lw_dtype_size(int dtype);

/* Convert n elements between float32, float16 and bfloat16. nontemporal:
 * write the output past the caches (for large outputs not read soon). */
void lw_cast(const void *src, int src_dtype, void *dst, int dst_dtype, size_t n,
             int nontemporal);

/* Quantize n elements in blocks; writes codes (packed for 4-bit) and one
 * absmax per block. Returns the number of non-finite inputs. */
int64_t lw_quantize(const void *src, int src_dtype, size_t n, size_t block,
                    const lw_code_tables *tables, uint8_t *codes, float *absmax);

/* Restore n elements from codes and absmax; code_values has 2**bits entries.
 * nontemporal: write float32 output past the caches (see lw_cast). */
void lw_dequantize(const uint8_t *codes, const float *absmax, size_t n, size_t block,
                   int bits, const float *code_values, void *dst, int dst_dtype,
                   int nontemporal);

/* AVX2 + F16C paths (kernels_x86.c); each returns how many elements it did,
 * the caller finishes the tail. Only called when lw_cpu_has_avx2(). */
int lw_cpu_has_avx2(void);
size_t lw_narrow_avx2(const float *src, uint16_t *dst, size_t n, int dtype, int nontemporal);
size_t lw_widen_avx2(const uint16_t *src, float *dst, size_t n, int dtype, int nontemporal);
size_t lw_codes4_avx2(const float *v, size_t len, float inv, const float *thresholds,
                      const uint8_t *rank_to_code, uint8_t *codes);
size_t lw_ranks8_avx2(const float *v, size_t len, float inv, const float *thresholds,
                      const uint8_t *buckets, uint8_t *ranks);
size_t lw_dequant4_f32_avx2(const uint8_t *codes, size_t len, const float *table, float *out,
                            int nontemporal);
size_t lw_dequant8_f32_avx2(const uint8_t *codes, size_t len, const float *table, float *out,
                            int nontemporal);
void lw_store_fence(void); /* after non-temporal stores */

#endif
