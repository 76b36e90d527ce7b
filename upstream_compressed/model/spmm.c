/* y = x W^T + bias for a CSR weight W, in float32 with AVX2 + FMA, on the caller's OpenMP threads.

   Built and loaded by native_spmm.py (see there for why a kernel of our own). The input is first
   transposed into blocks of FRAMES frames (block x inputs x FRAMES), so that a block's frames of one
   input are contiguous and a block is one contiguous slab (at 4000 frames, a plain inputs x frames
   transpose put the rows a tile reads 16 KB apart, and fc1's product ran at 8 GMAC/s against 14). The
   work is then split into tiles of FRAMES frames x `rows` output rows, run in parallel. A tile
   keeps 64 frames of one output row in 8 vector registers while it runs over the row's non-zeros
   (8 loads and 8 fused multiply-adds each), and goes through the inputs in panels of
   PANEL_INPUTS inputs (native_spmm.py): the panel's 64 frames (128 KiB) stay in L2 while every row of the
   tile takes the non-zeros it has there. W comes sorted by (panel, row, column) for that. The tile is transposed
   back into y. */
#include <immintrin.h>
#include <stdint.h>

#define FRAMES 64
#define MAX_ROWS 128
#define PREFETCH_AHEAD 16 /* non-zeros: the input row needed then is fetched into L1 now */

/* dst[k * dst_stride + j] = src[j * src_stride + k] for an 8 x 8 block; source rows j >= rows read as 0. */
static inline void transpose8(const float* src, int64_t src_stride, int64_t rows, float* dst, int64_t dst_stride) {
  __m256 r[8];
  for (int j = 0; j < 8; ++j) r[j] = j < rows ? _mm256_loadu_ps(src + j * src_stride) : _mm256_setzero_ps();
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(dst + 0 * dst_stride, _mm256_permute2f128_ps(s0, s4, 0x20));
  _mm256_storeu_ps(dst + 1 * dst_stride, _mm256_permute2f128_ps(s1, s5, 0x20));
  _mm256_storeu_ps(dst + 2 * dst_stride, _mm256_permute2f128_ps(s2, s6, 0x20));
  _mm256_storeu_ps(dst + 3 * dst_stride, _mm256_permute2f128_ps(s3, s7, 0x20));
  _mm256_storeu_ps(dst + 4 * dst_stride, _mm256_permute2f128_ps(s0, s4, 0x31));
  _mm256_storeu_ps(dst + 5 * dst_stride, _mm256_permute2f128_ps(s1, s5, 0x31));
  _mm256_storeu_ps(dst + 6 * dst_stride, _mm256_permute2f128_ps(s2, s6, 0x31));
  _mm256_storeu_ps(dst + 7 * dst_stride, _mm256_permute2f128_ps(s3, s7, 0x31));
}

/* out[0..64) += the row's non-zeros times 64 contiguous frames of xt (row stride FRAMES). */
static inline void row64(const int32_t* cols, const float* vals, int32_t n, const float* xt,
                         float* out) {
  __m256 a0 = _mm256_loadu_ps(out), a1 = _mm256_loadu_ps(out + 8), a2 = _mm256_loadu_ps(out + 16),
         a3 = _mm256_loadu_ps(out + 24), a4 = _mm256_loadu_ps(out + 32), a5 = _mm256_loadu_ps(out + 40),
         a6 = _mm256_loadu_ps(out + 48), a7 = _mm256_loadu_ps(out + 56);
  for (int32_t j = 0; j < n; ++j) {
    const __m256 w = _mm256_set1_ps(vals[j]);
    const float* p = xt + (int64_t)cols[j] * FRAMES;
    if (j + PREFETCH_AHEAD < n) {
      const char* q = (const char*)(xt + (int64_t)cols[j + PREFETCH_AHEAD] * FRAMES);
      _mm_prefetch(q, _MM_HINT_T0);
      _mm_prefetch(q + 128, _MM_HINT_T0);
    }
    a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p), a0);
    a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 8), a1);
    a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 16), a2);
    a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 24), a3);
    a4 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 32), a4);
    a5 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 40), a5);
    a6 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 48), a6);
    a7 = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 56), a7);
  }
  _mm256_storeu_ps(out, a0); _mm256_storeu_ps(out + 8, a1); _mm256_storeu_ps(out + 16, a2);
  _mm256_storeu_ps(out + 24, a3); _mm256_storeu_ps(out + 32, a4); _mm256_storeu_ps(out + 40, a5);
  _mm256_storeu_ps(out + 48, a6); _mm256_storeu_ps(out + 56, a7);
}

/* out[0..8) += the row's non-zeros times 8 contiguous frames of xt (row stride FRAMES; a short last block). */
static inline void row8(const int32_t* cols, const float* vals, int32_t n, const float* xt,
                        float* out) {
  __m256 a = _mm256_loadu_ps(out);
  for (int32_t j = 0; j < n; ++j)
    a = _mm256_fmadd_ps(_mm256_set1_ps(vals[j]), _mm256_loadu_ps(xt + (int64_t)cols[j] * FRAMES), a);
  _mm256_storeu_ps(out, a);
}

/* y (frames x out, row-major) = x (frames x in, row-major) W^T + bias (NULL: none). W: CSR over
   (panel, row) pairs, int32 indices: the non-zeros of row o among inputs [p * panel_inputs,
   (p + 1) * panel_inputs) are [crow[p * out + o], crow[p * out + o + 1]). xt: scratch of
   ceil(frames / FRAMES) * in * FRAMES floats. */
void upstream_compressed_spmm(const float* x, int64_t frames, int64_t in, const int32_t* crow, const int32_t* cols,
                              const float* vals, const float* bias, int64_t out, int64_t panels, float* xt, float* y,
                              int threads) {
  const int64_t tp = (frames + 7) / 8 * 8, frame_tiles = (tp + FRAMES - 1) / FRAMES;
  /* Tall tiles reuse each panel most; shorter ones when there would be fewer than 4 per thread. */
  int64_t rows = MAX_ROWS;
  while (rows > 8 && frame_tiles * ((out + rows - 1) / rows) < 4 * (int64_t)threads) rows /= 2;
  const int64_t row_tiles = (out + rows - 1) / rows;
  const int64_t in8 = in / 8 * 8;
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tp; t += 8) {
      const int64_t rows = frames - t < 8 ? frames - t : 8;
      float* block = xt + t / FRAMES * in * FRAMES + t % FRAMES;
      for (int64_t i = 0; i < in8; i += 8) transpose8(x + t * in + i, in, rows, block + i * FRAMES, FRAMES);
      for (int64_t i = in8; i < in; ++i)
        for (int64_t k = 0; k < 8; ++k) block[i * FRAMES + k] = k < rows ? x[(t + k) * in + i] : 0.f;
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t tile = 0; tile < frame_tiles * row_tiles; ++tile) {
      const int64_t t0 = tile / row_tiles * FRAMES, o0 = tile % row_tiles * rows;
      const int64_t width = t0 + FRAMES < tp ? FRAMES : tp - t0, o1 = o0 + rows < out ? o0 + rows : out;
      const float* block = xt + t0 * in;  /* t0 / FRAMES * in * FRAMES */
      float buf[MAX_ROWS][FRAMES];
      for (int64_t o = o0; o < o1; ++o) {
        const float b = bias ? bias[o] : 0.f;
        for (int64_t t = 0; t < width; ++t) buf[o - o0][t] = b;
      }
      for (int64_t p = 0; p < panels; ++p)
        for (int64_t o = o0; o < o1; ++o) {
          const int32_t start = crow[p * out + o], n = crow[p * out + o + 1] - start;
          if (n == 0) continue;
          if (width == FRAMES) row64(cols + start, vals + start, n, block, buf[o - o0]);
          else
            for (int64_t t = 0; t < width; t += 8) row8(cols + start, vals + start, n, block + t, buf[o - o0] + t);
        }
      const int64_t valid = t0 + width <= frames ? width : frames - t0;
      const int64_t valid8 = valid / 8 * 8, o8 = o0 + (o1 - o0) / 8 * 8;
      for (int64_t o = o0; o < o8; o += 8)
        for (int64_t t = 0; t < valid8; t += 8) transpose8(buf[o - o0] + t, FRAMES, 8, y + (t0 + t) * out + o, out);
      for (int64_t t = 0; t < valid; ++t) /* what the 8 x 8 blocks left: the last frames, the last rows */
        for (int64_t o = t < valid8 ? o8 : o0; o < o1; ++o) y[(t0 + t) * out + o] = buf[o - o0][t];
    }
  }
}
