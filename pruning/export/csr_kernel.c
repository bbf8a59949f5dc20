/* The CPU kernels of exported CSR layers, written for the shapes of inference: y = x W^T + b for a CSR weight W
 * (rows x cols, float32 values, int32 indices) and a dense x (n x cols, any strides), the product of a sparse linear
 * layer, and a direct sparse convolution (at the end of the file).
 *
 * Why by hand: torch's CSR x dense product on the CPU (MKL) streams the whole (cols x n) operand once per row of W;
 * at a serving batch that operand outgrows the cache and the product runs at a tenth of the dense GEMM's multiply
 * rate (see docs/performance.md). Here the batch is cut into tiles of BT = 8 * V columns: a tile's slice of x^T
 * (cols x BT floats) stays in cache while every row of W runs over it, and each row keeps its BT sums in V vector
 * registers, U independent sets of them (one per U consecutive non-zeros) so the multiply-adds do not wait on one
 * another. V and U are chosen per layer at export by timing (csr.py). A tile of x is transposed into a buffer first,
 * and the tile's outputs transposed back into y's rows (8 x 8 blocks in registers), so y has nn.Linear's layout.
 *
 * GCC / Clang vector extensions only: the compiler maps an 8-float vector onto AVX, two SSE or two NEON registers.
 * Threads (OpenMP) split the tiles; with one tile (batch up to BT) the product runs on one thread.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }   /* a >= 0, b > 0 */

typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));   /* unaligned loads and stores */

#define ROW_TILE(V, U)                                                                                            \
    static void row_tile_##V##_##U(const int32_t *col, const float *val, int64_t begin, int64_t end,             \
                                   const float *t, int64_t t_stride, float bias, float *z) {                    \
        v8 acc[U][V];                                                                                             \
        for (int u = 0; u < U; ++u)                                                                               \
            for (int v = 0; v < V; ++v) acc[u][v] = (v8){0, 0, 0, 0, 0, 0, 0, 0};                                 \
        int64_t jj = begin;                                                                                       \
        for (; jj + U <= end; jj += U)                                                                            \
            for (int u = 0; u < U; ++u) {                                                                         \
                const float a = val[jj + u];                                                                      \
                const float *x = t + (int64_t)col[jj + u] * t_stride;                                             \
                for (int v = 0; v < V; ++v) acc[u][v] += a * *(const v8u *)(x + 8 * v);                           \
            }                                                                                                     \
        for (; jj < end; ++jj) {                                                                                  \
            const float a = val[jj];                                                                              \
            const float *x = t + (int64_t)col[jj] * t_stride;                                                     \
            for (int v = 0; v < V; ++v) acc[0][v] += a * *(const v8u *)(x + 8 * v);                               \
        }                                                                                                         \
        for (int v = 0; v < V; ++v) {                                                                             \
            v8 s = acc[0][v] + bias;                                                                              \
            for (int u = 1; u < U; ++u) s += acc[u][v];                                                           \
            *(v8u *)(z + 8 * v) = s;                                                                              \
        }                                                                                                         \
    }

ROW_TILE(1, 4)
ROW_TILE(2, 2)
ROW_TILE(2, 4)
ROW_TILE(4, 2)

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define HAVE_SHUFFLE 1
/* buffer[(c0 + j) * bt + k0 + i] = x[(k0 + i) * xs_row + c0 + j] for i, j < 8: an 8 x 8 block transposed in registers
 * (three rounds of two-vector shuffles) instead of 64 scalar moves. */
static inline void transpose_8x8(const float *x, int64_t xs_row, float *out, int64_t out_stride) {
    v8 r[8], t[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = *(const v8u *)(x + i * xs_row);
    for (int i = 0; i < 8; i += 2) {
        t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int i = 0; i < 8; i += 4)
        for (int h = 0; h < 2; ++h) {
            u[i + 2 * h] = __builtin_shufflevector(t[i + h], t[i + h + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            u[i + 2 * h + 1] = __builtin_shufflevector(t[i + h], t[i + h + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    /* u[0..3]: rows 0-3 of columns (0,4), (1,5), (2,6), (3,7); u[4..7]: the same for rows 4-7 */
    for (int j = 0; j < 4; ++j) {
        *(v8u *)(out + j * out_stride) = __builtin_shufflevector(u[j], u[j + 4], 0, 1, 2, 3, 8, 9, 10, 11);
        *(v8u *)(out + (j + 4) * out_stride) = __builtin_shufflevector(u[j], u[j + 4], 4, 5, 6, 7, 12, 13, 14, 15);
    }
}
#else
#define HAVE_SHUFFLE 0
#endif

/* buffer (cols x bt) = the tile's rows start .. start + width of x, transposed, zero past width. */
static void fill_tile(const float *x, int64_t xs_row, int64_t xs_col, int64_t cols, int64_t start, int64_t width,
                      int64_t bt, float *buffer) {
    const float *xs = x + start * xs_row;
    int64_t c0 = 0;
    if (xs_row == 1 && width == bt) {      /* x^T contiguous along the batch (a transposed view): copy */
        for (int64_t c = 0; c < cols; ++c) memcpy(buffer + c * bt, xs + c * xs_col, sizeof(float) * (size_t)bt);
        return;
    }
#if HAVE_SHUFFLE
    if (xs_col == 1 && width == bt)
        for (; c0 + 8 <= cols; c0 += 8)
            for (int64_t k0 = 0; k0 < bt; k0 += 8)
                transpose_8x8(xs + k0 * xs_row + c0, xs_row, buffer + c0 * bt + k0, bt);
#endif
    for (int64_t c = c0; c < cols; ++c) {
        float *b = buffer + c * bt;
        const float *xc = xs + c * xs_col;
        int64_t k = 0;
        for (; k < width; ++k) b[k] = xc[k * xs_row];
        for (; k < bt; ++k) b[k] = 0.0f;
    }
}

typedef void (*row_fn)(const int32_t *, const float *, int64_t, int64_t, const float *, int64_t, float, float *);

/* The variants, by number: 0 = (V 1, U 4), 1 = (2, 2), 2 = (2, 4), 3 = (4, 2). */
static const row_fn ROW_FNS[] = {row_tile_1_4, row_tile_2_2, row_tile_2_4, row_tile_4_2};
static const int ROW_V[] = {1, 2, 2, 4};

int sparsetrain_csr_variants(void) { return (int)(sizeof(ROW_V) / sizeof(ROW_V[0])); }

/* A CSR weight (rows x cols) and its bias (NULL: none), set up once per layer by the caller. */
typedef struct {
    int64_t rows, cols;
    const int32_t *crow, *col;
    const float *val, *bias;
} sparsetrain_csr;

/* z (rows x bt) holds a tile's outputs, one row of W per row; y[(start + k) * rows + r] = z[r * bt + k], k < width. */
static void store_tile(const float *z, int64_t rows, int64_t bt, int64_t width, float *y) {
    int64_t r0 = 0;
#if HAVE_SHUFFLE
    if (width == bt)
        for (; r0 + 8 <= rows; r0 += 8)
            for (int64_t k0 = 0; k0 < bt; k0 += 8) transpose_8x8(z + r0 * bt + k0, bt, y + k0 * rows + r0, rows);
#endif
    for (int64_t k = 0; k < width; ++k)
        for (int64_t r = (width == bt ? r0 : 0); r < rows; ++r) y[k * rows + r] = z[r * bt + k];
}

/* y (n x rows, contiguous: the layout of nn.Linear's output) = x W^T + bias, x(i, c) = x[i * xs_row + c * xs_col].
 * Returns 0, or -1 when a tile buffer could not be allocated or the variant does not exist (y is then incomplete). */
int sparsetrain_csr_linear(const sparsetrain_csr *w, int64_t n, const float *x, int64_t xs_row, int64_t xs_col,
                           float *y, int variant, int threads) {
    if (variant < 0 || variant >= sparsetrain_csr_variants()) return -1;
    const int64_t rows = w->rows, cols = w->cols;
    const int32_t *crow = w->crow, *col = w->col;
    const float *val = w->val, *bias = w->bias;
    const row_fn row = ROW_FNS[variant];
    const int64_t bt = 8 * (int64_t)ROW_V[variant];
    const int64_t tiles = ceil_div(n, bt);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && tiles > 1)
    {
        float *buffer = (float *)malloc(sizeof(float) * (size_t)((cols + rows) * bt));
        float *z = buffer ? buffer + cols * bt : NULL;
        if (!buffer) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t tile = 0; tile < tiles; ++tile) {
            if (!buffer) continue;
            const int64_t start = tile * bt, width = n - start < bt ? n - start : bt;
            fill_tile(x, xs_row, xs_col, cols, start, width, bt, buffer);
            for (int64_t r = 0; r < rows; ++r)
                row(col, val, crow[r], crow[r + 1], buffer, bt, bias ? bias[r] : 0.0f, z + r * bt);
            store_tile(z, rows, bt, width, y + start * rows);
        }
        free(buffer);
    }
    return failed ? -1 : 0;
}

/* A direct sparse convolution (groups 1, zero padding): y (batch x rows x out_h x out_w, contiguous) = W * x + bias
 * for x (batch x channels x height x width, contiguous) and W the CSR of the (rows x channels * kh * kw) weight.
 * Each kept weight (c, i, j) of output channel o adds its multiple of input plane c, shifted by (i, j), to the output
 * plane (b, o), which stays in cache while that channel's weights run over it: no unfold, and the output comes out
 * in the layout the next layer reads.
 *
 * Per image, each input plane is first copied, zero-padded, into sh x sw phase planes of hq x wq: phase (ri, rj)
 * holds the padded pixels (y * sh + ri, x * sw + rj). A tap at padded offset (i dh, j dw) = (qi sh + ri, qj sw + rj)
 * then reads phase (ri, rj) shifted by (qi, qj) with stride 1, and on the flattened phase plane a shift is one
 * offset: each kept weight is one multiply-add over out_h * wq contiguous floats (the wq - out_w extra columns of
 * each output row are computed and dropped). With stride 1 there is one phase, the padded plane itself. Threads split
 * the images. Returns 0, or -1 when a buffer could not be allocated. */
int sparsetrain_csr_conv2d(const sparsetrain_csr *w, int64_t batch, int64_t channels, int64_t height, int64_t width,
                           const float *x, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                           int64_t dh, int64_t dw, int64_t out_h, int64_t out_w, float *y, int threads) {
    const int64_t rows = w->rows, taps = kh * kw;
    const int64_t hq = ceil_div(height + 2 * ph, sh), wq = ceil_div(width + 2 * pw, sw);
    const int64_t plane = (hq + 1) * wq;                  /* + one row: the dropped columns of the last row read on */
    const int64_t phases = sh * sw;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1 && batch > 1)
    {
        float *planes = (float *)malloc(sizeof(float) * (size_t)(channels * phases * plane + out_h * wq));
        float *acc = planes ? planes + channels * phases * plane : NULL;
        if (!planes) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < batch; ++b) {
            if (!planes) continue;
            memset(planes, 0, sizeof(float) * (size_t)(channels * phases * plane));
            for (int64_t c = 0; c < channels; ++c) {
                const float *src = x + (b * channels + c) * height * width;
                for (int64_t r = 0; r < height; ++r) {          /* input row r is padded row r + ph */
                    const int64_t yp = r + ph, ri = yp % sh, yq = yp / sh;
                    if (sw == 1) {
                        memcpy(planes + (c * phases + ri) * plane + yq * wq + pw, src + r * width,
                               sizeof(float) * (size_t)width);
                        continue;
                    }
                    int64_t q = 0;
#if HAVE_SHUFFLE
                    if (sw == 2)                         /* 16 pixels split into their two phases in registers */
                        for (; q + 16 <= width; q += 16) {
                            const v8 lo = *(const v8u *)(src + r * width + q);
                            const v8 hi = *(const v8u *)(src + r * width + q + 8);
                            for (int64_t half = 0; half < 2; ++half) {
                                const int64_t xp = q + pw + half;
                                float *dst = planes + (c * phases + ri * sw + xp % 2) * plane + yq * wq + xp / 2;
                                *(v8u *)dst = half ? __builtin_shufflevector(lo, hi, 1, 3, 5, 7, 9, 11, 13, 15)
                                                   : __builtin_shufflevector(lo, hi, 0, 2, 4, 6, 8, 10, 12, 14);
                            }
                        }
#endif
                    for (; q < width; ++q) {
                        const int64_t xp = q + pw;
                        planes[(c * phases + ri * sw + xp % sw) * plane + yq * wq + xp / sw] = src[r * width + q];
                    }
                }
            }
            for (int64_t o = 0; o < rows; ++o) {
                const float start = w->bias ? w->bias[o] : 0.0f;
                const int64_t n = out_h * wq;
                for (int64_t q = 0; q < n; ++q) acc[q] = start;
                for (int64_t jj = w->crow[o]; jj < w->crow[o + 1]; ++jj) {
                    const int64_t k = w->col[jj], c = k / taps, i = (k % taps) / kw, j = k % kw;
                    const int64_t oi = i * dh, oj = j * dw;
                    const float a = w->val[jj];
                    const float *in = planes + (c * phases + (oi % sh) * sw + oj % sw) * plane + (oi / sh) * wq
                                      + oj / sw;
                    for (int64_t q = 0; q < n; ++q) acc[q] += a * in[q];
                }
                float *out = y + (b * rows + o) * out_h * out_w;
                for (int64_t r = 0; r < out_h; ++r)
                    memcpy(out + r * out_w, acc + r * wq, sizeof(float) * (size_t)out_w);
            }
        }
        free(planes);
    }
    return failed ? -1 : 0;
}
