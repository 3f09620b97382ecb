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
 * sparseft_tile_sddmm_f32 does the same for an index made of whole t x t tiles: each tile
 * is a small dense product g[:, tile rows]^T x[:, tile cols], accumulated over the tokens in
 * registers straight from the token-major operands (no transposes; every loaded float is
 * used t times).
 *
 * Parallel regions use OpenMP; loaded into a process where torch's libgomp.so.1 is already
 * loaded, they run on torch's own thread pool. Built without OpenMP, it runs on one thread. */
#include <stdint.h>
#include <string.h>
#if defined(__AVX__) && defined(__FMA__)
#include <immintrin.h> /* AVX-512 too, where the compiler targets it (the tile kernel's 16 x 16 blocks) */
#define SPARSEFT_AVX 1 /* hand-written 8 x 8 transposes and dot products; else portable C */
#endif

#ifdef _OPENMP
#include <omp.h>
#else /* built without OpenMP (a compiler without it): one thread */
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

#define BLOCK 64
#if defined(SPARSEFT_AVX) && BLOCK != 64
#error "dot_block is written for blocks of 64 tokens"
#endif

int sparseft_native_abi(void) { return 2; }

int64_t sparseft_block_tokens(void) { return BLOCK; }

/* dst[f * BLOCK + k] = src[k0 + k][f0 + f] for an 8 x 8 tile. */
static inline void transpose8x8(const float *s, int64_t ld, float *d) {
#ifdef SPARSEFT_AVX
  __m256 r0 = _mm256_loadu_ps(s), r1 = _mm256_loadu_ps(s + ld), r2 = _mm256_loadu_ps(s + 2 * ld),
         r3 = _mm256_loadu_ps(s + 3 * ld), r4 = _mm256_loadu_ps(s + 4 * ld), r5 = _mm256_loadu_ps(s + 5 * ld),
         r6 = _mm256_loadu_ps(s + 6 * ld), r7 = _mm256_loadu_ps(s + 7 * ld);
  __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
         t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
  __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
         u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
         u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
         u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  _mm256_storeu_ps(d, _mm256_permute2f128_ps(u0, u4, 0x20));
  _mm256_storeu_ps(d + BLOCK, _mm256_permute2f128_ps(u1, u5, 0x20));
  _mm256_storeu_ps(d + 2 * BLOCK, _mm256_permute2f128_ps(u2, u6, 0x20));
  _mm256_storeu_ps(d + 3 * BLOCK, _mm256_permute2f128_ps(u3, u7, 0x20));
  _mm256_storeu_ps(d + 4 * BLOCK, _mm256_permute2f128_ps(u0, u4, 0x31));
  _mm256_storeu_ps(d + 5 * BLOCK, _mm256_permute2f128_ps(u1, u5, 0x31));
  _mm256_storeu_ps(d + 6 * BLOCK, _mm256_permute2f128_ps(u2, u6, 0x31));
  _mm256_storeu_ps(d + 7 * BLOCK, _mm256_permute2f128_ps(u3, u7, 0x31));
#else
  float tile[8][8];
  for (int a = 0; a < 8; a++)
    for (int b = 0; b < 8; b++) tile[a][b] = s[a * ld + b];
  for (int b = 0; b < 8; b++)
    for (int a = 0; a < 8; a++) d[b * BLOCK + a] = tile[a][b];
#endif
}

/* dst[f * BLOCK + k] = src[k * ld + f] for k < n, f < features, by 8 x 8 tiles. Eight token
 * rows at a time, each read front to back: the hardware prefetchers follow eight sequential
 * streams, where walking the features first jumps a row stride (often pages) per read
 * (0.75-0.8x the block transposes' time at MiniLM's shapes). */
static void transpose_block(const float *src, int64_t ld, int64_t n, int64_t features, float *dst) {
  int64_t k0 = 0, full = features / 8 * 8;
  for (; k0 + 8 <= n; k0 += 8) {
    const float *rows = src + k0 * ld;
    for (int64_t f0 = 0; f0 < full; f0 += 8) transpose8x8(rows + f0, ld, dst + f0 * BLOCK + k0);
    for (int64_t f = full; f < features; f++)
      for (int a = 0; a < 8; a++) dst[f * BLOCK + k0 + a] = rows[a * ld + f];
  }
  for (; k0 < n; k0++)
    for (int64_t f = 0; f < features; f++) dst[f * BLOCK + k0] = src[k0 * ld + f];
}

#if defined(SPARSEFT_AVX) && defined(__AVX512F__)
/* The 16 partial sums of a BLOCK-long dot product, g held in registers, folded to 8. */
static inline __m256 dot_block(const __m512 g[4], const float *x) {
  __m512 a = _mm512_mul_ps(g[0], _mm512_loadu_ps(x)), b = _mm512_mul_ps(g[1], _mm512_loadu_ps(x + 16));
  a = _mm512_fmadd_ps(g[2], _mm512_loadu_ps(x + 32), a);
  b = _mm512_fmadd_ps(g[3], _mm512_loadu_ps(x + 48), b);
  a = _mm512_add_ps(a, b);
  return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
#define G_REGS 4
#define G_VEC __m512
#define G_LOAD(p) _mm512_loadu_ps(p)
#define G_WIDTH 16
#elif defined(SPARSEFT_AVX)
/* The 8 partial sums of a BLOCK-long dot product, g held in registers. */
static inline __m256 dot_block(const __m256 g[8], const float *x) {
  __m256 a = _mm256_mul_ps(g[0], _mm256_loadu_ps(x)), b = _mm256_mul_ps(g[1], _mm256_loadu_ps(x + 8));
  a = _mm256_fmadd_ps(g[2], _mm256_loadu_ps(x + 16), a);
  b = _mm256_fmadd_ps(g[3], _mm256_loadu_ps(x + 24), b);
  a = _mm256_fmadd_ps(g[4], _mm256_loadu_ps(x + 32), a);
  b = _mm256_fmadd_ps(g[5], _mm256_loadu_ps(x + 40), b);
  a = _mm256_fmadd_ps(g[6], _mm256_loadu_ps(x + 48), a);
  b = _mm256_fmadd_ps(g[7], _mm256_loadu_ps(x + 56), b);
  return _mm256_add_ps(a, b);
}
#define G_REGS 8
#define G_VEC __m256
#define G_LOAD(p) _mm256_loadu_ps(p)
#define G_WIDTH 8
#endif

#ifdef SPARSEFT_AVX
/* out[e] += <g row, x col[e]> for one row's entries; four at a time share one horizontal sum. */
static void row_dots(const float *gr, const float *x_block, const int32_t *col, int32_t e, int32_t end, float *out) {
  G_VEC g[G_REGS];
  for (int i = 0; i < G_REGS; i++) g[i] = G_LOAD(gr + G_WIDTH * i);
  for (; e + 4 <= end; e += 4) {
    __m256 v0 = dot_block(g, x_block + (int64_t)col[e] * BLOCK), v1 = dot_block(g, x_block + (int64_t)col[e + 1] * BLOCK),
           v2 = dot_block(g, x_block + (int64_t)col[e + 2] * BLOCK), v3 = dot_block(g, x_block + (int64_t)col[e + 3] * BLOCK);
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));
    __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(out + e, _mm_add_ps(_mm_loadu_ps(out + e), sums));
  }
  for (; e < end; e++) {
    __m256 v = dot_block(g, x_block + (int64_t)col[e] * BLOCK);
    __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    q = _mm_hadd_ps(q, q);
    q = _mm_hadd_ps(q, q);
    out[e] += _mm_cvtss_f32(q);
  }
}
#else
static void row_dots(const float *gr, const float *x_block, const int32_t *col, int32_t e, int32_t end, float *out) {
  for (; e < end; e++) {
    const float *xc = x_block + (int64_t)col[e] * BLOCK;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int k = 0; k < BLOCK; k++) s += gr[k] * xc[k];
    out[e] += s;
  }
}
#endif

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
    for (int64_t r = 0; r < rows; r++)
      if (crow[r] < crow[r + 1]) row_dots(g_block + r * BLOCK, x_block, col, crow[r], crow[r + 1], out);
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

/* out[4 x 16] += g[:, 0..4)^T x[:, 0..16) over the tokens, accumulated in registers (where
 * AVX-512 is not available: see tile_block16). */
#if defined(SPARSEFT_AVX) && !defined(__AVX512F__)
static void tile_panel(int64_t tokens, const float *g, int64_t ldg, const float *x, int64_t ldx,
                       float *out, int64_t ldo) {
  __m256 a0 = _mm256_loadu_ps(out), a1 = _mm256_loadu_ps(out + 8), a2 = _mm256_loadu_ps(out + ldo),
         a3 = _mm256_loadu_ps(out + ldo + 8), a4 = _mm256_loadu_ps(out + 2 * ldo), a5 = _mm256_loadu_ps(out + 2 * ldo + 8),
         a6 = _mm256_loadu_ps(out + 3 * ldo), a7 = _mm256_loadu_ps(out + 3 * ldo + 8);
  for (int64_t s = 0; s < tokens; s++) {
    const float *gr = g + s * ldg, *xr = x + s * ldx;
    __m256 x0 = _mm256_loadu_ps(xr), x1 = _mm256_loadu_ps(xr + 8);
    __m256 g0 = _mm256_broadcast_ss(gr), g1 = _mm256_broadcast_ss(gr + 1);
    a0 = _mm256_fmadd_ps(g0, x0, a0); a1 = _mm256_fmadd_ps(g0, x1, a1);
    a2 = _mm256_fmadd_ps(g1, x0, a2); a3 = _mm256_fmadd_ps(g1, x1, a3);
    __m256 g2 = _mm256_broadcast_ss(gr + 2), g3 = _mm256_broadcast_ss(gr + 3);
    a4 = _mm256_fmadd_ps(g2, x0, a4); a5 = _mm256_fmadd_ps(g2, x1, a5);
    a6 = _mm256_fmadd_ps(g3, x0, a6); a7 = _mm256_fmadd_ps(g3, x1, a7);
  }
  _mm256_storeu_ps(out, a0); _mm256_storeu_ps(out + 8, a1);
  _mm256_storeu_ps(out + ldo, a2); _mm256_storeu_ps(out + ldo + 8, a3);
  _mm256_storeu_ps(out + 2 * ldo, a4); _mm256_storeu_ps(out + 2 * ldo + 8, a5);
  _mm256_storeu_ps(out + 3 * ldo, a6); _mm256_storeu_ps(out + 3 * ldo + 8, a7);
}
#elif !defined(__AVX512F__)
static void tile_panel(int64_t tokens, const float *g, int64_t ldg, const float *x, int64_t ldx,
                       float *out, int64_t ldo) {
  float acc[4][16];
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < 16; c++) acc[r][c] = out[r * ldo + c];
  for (int64_t s = 0; s < tokens; s++) {
    const float *gr = g + s * ldg, *xr = x + s * ldx;
    for (int r = 0; r < 4; r++)
      for (int c = 0; c < 16; c++) acc[r][c] += gr[r] * xr[c];
  }
  for (int r = 0; r < 4; r++)
    for (int c = 0; c < 16; c++) out[r * ldo + c] = acc[r][c];
}
#endif

/* Tokens per pass over the tiles (see sparseft_tile_sddmm_f32): a chunk's rows of g and x
 * (here at most 128 x (rows + cols) floats) stay in L2 while every tile reads its part. */
#ifndef TILE_TOKENS
#define TILE_TOKENS 128
#endif

#ifdef __AVX512F__
#ifndef TILE_PREFETCH
#define TILE_PREFETCH 16
#endif
/* out[16 x 16] (row stride ldo) += g[:, 0..16)^T x[:, 0..16) over the tokens: the whole block
 * in 16 registers, one 16-wide load of x and 16 broadcast FMAs per token (every loaded float
 * used 16 times). A 16 x 16 tile is one such block, a 32 x 32 tile four. */
static void tile_block16(int64_t tokens, const float *g, int64_t ldg, const float *x, int64_t ldx,
                         float *out, int64_t ldo) {
  __m512 a0 = _mm512_loadu_ps(out), a1 = _mm512_loadu_ps(out + ldo), a2 = _mm512_loadu_ps(out + 2 * ldo),
         a3 = _mm512_loadu_ps(out + 3 * ldo), a4 = _mm512_loadu_ps(out + 4 * ldo), a5 = _mm512_loadu_ps(out + 5 * ldo),
         a6 = _mm512_loadu_ps(out + 6 * ldo), a7 = _mm512_loadu_ps(out + 7 * ldo), a8 = _mm512_loadu_ps(out + 8 * ldo),
         a9 = _mm512_loadu_ps(out + 9 * ldo), a10 = _mm512_loadu_ps(out + 10 * ldo),
         a11 = _mm512_loadu_ps(out + 11 * ldo), a12 = _mm512_loadu_ps(out + 12 * ldo),
         a13 = _mm512_loadu_ps(out + 13 * ldo), a14 = _mm512_loadu_ps(out + 14 * ldo),
         a15 = _mm512_loadu_ps(out + 15 * ldo);
  for (int64_t s = 0; s < tokens; s++) {
    const float *gr = g + s * ldg;
    __m512 xv = _mm512_loadu_ps(x + s * ldx);
    /* Token rows lie a row stride apart, often more than a page: the hardware prefetchers
     * do not follow that, so ask for the rows TILE_PREFETCH tokens ahead. */
    _mm_prefetch((const char *)(gr + TILE_PREFETCH * ldg), _MM_HINT_T0);
    _mm_prefetch((const char *)(x + (s + TILE_PREFETCH) * ldx), _MM_HINT_T0);
    a0 = _mm512_fmadd_ps(_mm512_set1_ps(gr[0]), xv, a0);
    a1 = _mm512_fmadd_ps(_mm512_set1_ps(gr[1]), xv, a1);
    a2 = _mm512_fmadd_ps(_mm512_set1_ps(gr[2]), xv, a2);
    a3 = _mm512_fmadd_ps(_mm512_set1_ps(gr[3]), xv, a3);
    a4 = _mm512_fmadd_ps(_mm512_set1_ps(gr[4]), xv, a4);
    a5 = _mm512_fmadd_ps(_mm512_set1_ps(gr[5]), xv, a5);
    a6 = _mm512_fmadd_ps(_mm512_set1_ps(gr[6]), xv, a6);
    a7 = _mm512_fmadd_ps(_mm512_set1_ps(gr[7]), xv, a7);
    a8 = _mm512_fmadd_ps(_mm512_set1_ps(gr[8]), xv, a8);
    a9 = _mm512_fmadd_ps(_mm512_set1_ps(gr[9]), xv, a9);
    a10 = _mm512_fmadd_ps(_mm512_set1_ps(gr[10]), xv, a10);
    a11 = _mm512_fmadd_ps(_mm512_set1_ps(gr[11]), xv, a11);
    a12 = _mm512_fmadd_ps(_mm512_set1_ps(gr[12]), xv, a12);
    a13 = _mm512_fmadd_ps(_mm512_set1_ps(gr[13]), xv, a13);
    a14 = _mm512_fmadd_ps(_mm512_set1_ps(gr[14]), xv, a14);
    a15 = _mm512_fmadd_ps(_mm512_set1_ps(gr[15]), xv, a15);
  }
  _mm512_storeu_ps(out, a0); _mm512_storeu_ps(out + ldo, a1);
  _mm512_storeu_ps(out + 2 * ldo, a2); _mm512_storeu_ps(out + 3 * ldo, a3);
  _mm512_storeu_ps(out + 4 * ldo, a4); _mm512_storeu_ps(out + 5 * ldo, a5);
  _mm512_storeu_ps(out + 6 * ldo, a6); _mm512_storeu_ps(out + 7 * ldo, a7);
  _mm512_storeu_ps(out + 8 * ldo, a8); _mm512_storeu_ps(out + 9 * ldo, a9);
  _mm512_storeu_ps(out + 10 * ldo, a10); _mm512_storeu_ps(out + 11 * ldo, a11);
  _mm512_storeu_ps(out + 12 * ldo, a12); _mm512_storeu_ps(out + 13 * ldo, a13);
  _mm512_storeu_ps(out + 14 * ldo, a14); _mm512_storeu_ps(out + 15 * ldo, a15);
}
#endif

/* out[b, i, j] = sum_s g[s, t*trow[b] + i] * x[s, t*tcol[b] + j] for tiles b < ntiles, t = 16 or 32.
 * Each thread takes a contiguous range of tiles and walks the tokens in chunks of TILE_TOKENS,
 * every tile of its range per chunk: tiles that share a row or column block then re-read
 * that chunk's rows from cache, so g and x come from memory about once, not once per tile
 * (the operands of a layer's backward have long left the cache). */
void sparseft_tile_sddmm_f32(int64_t tokens, const float *g, int64_t ldg, const float *x, int64_t ldx,
                             int64_t ntiles, const int64_t *trow, const int64_t *tcol, int64_t t, float *out,
                             int threads) {
  if (threads < 1) threads = 1;
#pragma omp parallel num_threads(threads)
  {
    int i = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t b0 = ntiles * i / nt, b1 = ntiles * (i + 1) / nt;
    memset(out + b0 * t * t, 0, sizeof(float) * (b1 - b0) * t * t);
    for (int64_t s0 = 0; s0 < tokens; s0 += TILE_TOKENS) {
      int64_t n = tokens - s0 < TILE_TOKENS ? tokens - s0 : TILE_TOKENS;
      for (int64_t b = b0; b < b1; b++) {
        float *o = out + b * t * t;
        const float *gb = g + s0 * ldg + trow[b] * t, *xb = x + s0 * ldx + tcol[b] * t;
#ifdef __AVX512F__
        for (int64_t r = 0; r < t; r += 16)
          for (int64_t c = 0; c < t; c += 16) tile_block16(n, gb + r, ldg, xb + c, ldx, o + r * t + c, t);
#else
        for (int64_t r = 0; r < t; r += 4)
          for (int64_t c = 0; c < t; c += 16) tile_panel(n, gb + r, ldg, xb + c, ldx, o + r * t + c, t);
#endif
      }
    }
  }
}
