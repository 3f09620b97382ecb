/* The values' gradient of a sparse delta on CPU, in fp32 (loaded by sparseft/native.py):
 *
 *   out[e] = sum_t g[t, row(e)] * x[t, col[e]]    for the CSR pattern (crow, col)
 *
 * g (tokens x rows) and x (tokens x cols) are read as they are, token-major. Each thread
 * takes a contiguous range of tokens; a block of BLOCK of them is transposed into the
 * thread's scratch (feature-major, still in cache), and every entry is then one contiguous
 * dot product of BLOCK floats. torch.sparse.sampled_addmm needs both operands transposed
 * in memory first; that round trip through RAM is what this kernel saves.
 *
 * Parallel regions use OpenMP; loaded into a process where torch's libgomp.so.1 is already
 * loaded, they run on torch's own thread pool. */
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 64

int sparseft_native_abi(void) { return 1; }

int64_t sparseft_block_tokens(void) { return BLOCK; }

/* dst[f * BLOCK + k] = src[k * ld + f] for k < n, f < features, by 8 x 8 tiles. */
static void transpose_block(const float *src, int64_t ld, int64_t n, int64_t features, float *dst) {
  int64_t f0 = 0;
  for (; f0 + 8 <= features; f0 += 8) {
    int64_t k0 = 0;
    for (; k0 + 8 <= n; k0 += 8) {
      float tile[8][8];
      for (int a = 0; a < 8; a++)
        for (int b = 0; b < 8; b++) tile[a][b] = src[(k0 + a) * ld + f0 + b];
      for (int b = 0; b < 8; b++)
        for (int a = 0; a < 8; a++) dst[(f0 + b) * BLOCK + k0 + a] = tile[a][b];
    }
    for (; k0 < n; k0++)
      for (int b = 0; b < 8; b++) dst[(f0 + b) * BLOCK + k0] = src[k0 * ld + f0 + b];
  }
  for (; f0 < features; f0++)
    for (int64_t k = 0; k < n; k++) dst[f0 * BLOCK + k] = src[k * ld + f0];
}

static void accumulate_tokens(int64_t t0, int64_t t1, int64_t rows, int64_t cols,
                              const float *g, int64_t ldg, const float *x, int64_t ldx,
                              const int32_t *crow, const int32_t *col, float *out,
                              float *g_block, float *x_block) {
  for (int64_t t = t0; t < t1; t += BLOCK) {
    int64_t n = t1 - t < BLOCK ? t1 - t : BLOCK;
    if (n < BLOCK) { /* a short last block: the padding tokens contribute zeros */
      memset(g_block, 0, sizeof(float) * BLOCK * rows);
      memset(x_block, 0, sizeof(float) * BLOCK * cols);
    }
    transpose_block(g + t * ldg, ldg, n, rows, g_block);
    transpose_block(x + t * ldx, ldx, n, cols, x_block);
    for (int64_t r = 0; r < rows; r++) {
      const float *gr = g_block + r * BLOCK;
      for (int32_t e = crow[r]; e < crow[r + 1]; e++) {
        const float *xc = x_block + (int64_t)col[e] * BLOCK;
        float s = 0.f;
#pragma omp simd reduction(+ : s)
        for (int k = 0; k < BLOCK; k++) s += gr[k] * xc[k];
        out[e] += s;
      }
    }
  }
}

/* partials: (threads - 1) x entries floats; scratch: threads x BLOCK x (rows + cols) floats. */
void sparseft_sddmm_f32(int64_t tokens, int64_t rows, int64_t cols, const float *g, int64_t ldg,
                        const float *x, int64_t ldx, const int32_t *crow, const int32_t *col,
                        int64_t entries, float *out, float *partials, float *scratch, int threads) {
  if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
  {
    int i = omp_get_thread_num(), n = omp_get_num_threads();
    float *mine = i == 0 ? out : partials + (int64_t)(i - 1) * entries;
    float *g_block = scratch + (int64_t)i * BLOCK * (rows + cols);
    memset(mine, 0, sizeof(float) * entries);
    accumulate_tokens(tokens * i / n, tokens * (i + 1) / n, rows, cols, g, ldg, x, ldx, crow, col,
                      mine, g_block, g_block + BLOCK * rows);
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t e = 0; e < entries; e++) {
      float s = out[e];
      for (int k = 1; k < n; k++) s += partials[(int64_t)(k - 1) * entries + e];
      out[e] = s;
    }
  }
}
