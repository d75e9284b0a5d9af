/* GroupNorm followed by GELU on a channels-last bf16 or fp32 map, forward and backward, for the head's CPU training;
 * and GroupNorm followed by SiLU, forward only, for the backbone's inference.
 *
 * PyTorch runs the pair as ~14 passes over memory per training step (GroupNorm's statistics and affine, GELU, and
 * their backwards: GELU's, then GroupNorm's); this is 2 passes forward and 2 backward, with the GELU derivative
 * computed in the pass that needs it. Built by textdiff/fused.py with the compiler at hand and loaded with ctypes;
 * OpenMP is the one PyTorch already loaded (same soname), so both share one thread pool.
 *
 * Layout: x is (N, P, C) in memory (P pixels, channels innermost), bf16 (as raw 16-bit words) or fp32, the same type
 * for every map of a call; scale/shift/a/b/k are (N, C) fp32: GroupNorm's affine folded per sample and channel,
 * y = x * scale + shift. Math is fp32; sums accumulate in fp32 over blocks of pixels and in double across blocks and
 * threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_float(uint16_t v) {
    union { uint32_t u; float f; } bits = {(uint32_t)v << 16};
    return bits.f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    union { float f; uint32_t u; } bits = {f};
    uint32_t u = bits.u;
    uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);
    rounded = (u & 0x7fffffffu) > 0x7f800000u ? (u | 0x00400000u) : rounded;
    return (uint16_t)(rounded >> 16);
}

/* Element i of a bf16 or fp32 map; `fp32` is a constant wherever these are inlined, so the test folds away. */
static inline __attribute__((always_inline)) float load(const void *map, int64_t i, int fp32) {
    return fp32 ? ((const float *)map)[i] : bf16_to_float(((const uint16_t *)map)[i]);
}

static inline __attribute__((always_inline)) void store(void *map, int64_t i, float v, int fp32) {
    if (fp32) ((float *)map)[i] = v;
    else ((uint16_t *)map)[i] = float_to_bf16(v);
}

/* erf(x) as x * p(x^2) / q(x^2) on [-4, 4] (|erf| rounds to 1 beyond; error ~1e-7): branch-free, so it vectorises
 * without a vector math library (and without -ffast-math, whose
 * start-up code would change the whole process's floating-point mode). */
static inline float erf_approx(float x) {
    x = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
    float x2 = x * x;
    float p = -2.72614225801306e-10f;
    p = p * x2 + 2.77068142495902e-08f;
    p = p * x2 + -2.10102402082508e-06f;
    p = p * x2 + -5.69250639462346e-05f;
    p = p * x2 + -7.34990630326855e-04f;
    p = p * x2 + -2.95459980854025e-03f;
    p = p * x2 + -1.60960333262415e-02f;
    float q = -1.45660718464996e-05f;
    q = q * x2 + -2.13374055278905e-04f;
    q = q * x2 + -1.68282697438203e-03f;
    q = q * x2 + -7.37332916720468e-03f;
    q = q * x2 + -1.42647390514189e-02f;
    return x * p / q;
}

/* e^x for -18 <= x <= 0 (clamped below: e^-18 is noise beside GELU's other term), as (e^(x/32))^32 with a
 * degree-8 Taylor polynomial (relative error ~1e-6): no float <-> int conversions, which keep GCC from vectorising. */
static inline float exp_nonpositive(float x) {
    x = (x < -18.0f ? -18.0f : x) * (1.0f / 32.0f);
    float p = 1.0f / 40320.0f;
    p = p * x + 1.0f / 5040.0f;
    p = p * x + 1.0f / 720.0f;
    p = p * x + 1.0f / 120.0f;
    p = p * x + 1.0f / 24.0f;
    p = p * x + 1.0f / 6.0f;
    p = p * x + 0.5f;
    p = p * x + 1.0f;
    p = p * x + 1.0f;
    p *= p;
    p *= p;
    p *= p;
    p *= p;
    return p * p;
}

static inline float gelu(float y) { return 0.5f * y * (1.0f + erf_approx(y * 0.70710678118654752f)); }

static inline float gelu_grad(float y) {
    float density = 0.39894228040143268f * exp_nonpositive(-0.5f * y * y); /* the standard normal's */
    return 0.5f * (1.0f + erf_approx(y * 0.70710678118654752f)) + y * density;
}

/* x * sigmoid(x), with e^-|x| from exp_nonpositive at half the argument, squared (exact to ~1e-6 down to -36,
 * where sigmoid is ~2e-16) */
static inline float silu(float y) {
    float half = exp_nonpositive(-0.5f * (y < 0.0f ? -y : y));
    float e = half * half;
    float sigmoid = (y >= 0.0f ? 1.0f : e) / (1.0f + e);
    return y * sigmoid;
}

#define BLOCK 256 /* pixels per work item */
#define INLINE static inline __attribute__((always_inline))

/* Each pass is a loop over blocks of pixels, split between threads, whose body is a per-block function inlined with
 * the map type and the channel count as literal constants: the dispatch sits inside the parallel loop (once per
 * block), because GCC outlines an OpenMP region into a function of its own, where values captured from outside the
 * region are no longer constants (a per-type copy made outside the region measured 0.53 ms for the moments pass at
 * [4, 16, 256, 256] against 0.35 ms for this). The head's maps have 16 (full resolution), 32 or 64 channels. */
#define WIDTHS(CALL, FP32)                                                          \
    switch (C) {                                                                    \
        case 16: CALL(FP32, 16); break;                                             \
        case 32: CALL(FP32, 32); break;                                             \
        case 64: CALL(FP32, 64); break;                                             \
        default: CALL(FP32, C);                                                     \
    }
#define SPECIALISED(CALL) \
    if (fp32) {           \
        WIDTHS(CALL, 1)   \
    } else {              \
        WIDTHS(CALL, 0)   \
    }

/* Sums over the pixels [first, first + count) of a pixel-wise (x, dy) -> (u, v): acc[c] += sum u, acc[C + c] += sum
 * v, in fp32 within the block (s, q: C floats of scratch). The body is a macro so that each use is its own loop,
 * vectorised along channels. */
#define BLOCK_SUMS(BODY)                                                               \
    for (int64_t c = 0; c < C; c++) s[c] = q[c] = 0.0f;                               \
    for (int64_t p = 0; p < count; p++) {                                              \
        int64_t at = first + p * C;                                                    \
        _Pragma("omp simd") for (int64_t c = 0; c < C; c++) { BODY }                  \
    }                                                                                  \
    for (int64_t c = 0; c < C; c++) {                                                  \
        acc[c] += s[c];                                                                \
        acc[C + c] += q[c];                                                            \
    }

/* sums of x and x^2 (GroupNorm's statistics) */
INLINE void moments_block(int fp32, int64_t C, const void *x, int64_t first, int64_t count, float *restrict s,
                          float *restrict q, double *restrict acc) {
    BLOCK_SUMS(float v = load(x, at + c, fp32); s[c] += v; q[c] += v * v;)
}

/* dy = gz * gelu'(y), the gradient at GroupNorm's output (in the map type, as PyTorch's GELU backward gives it), and
 * the sums of dy * x and dy that GroupNorm's backward needs */
INLINE void backward_sums_block(int fp32, int64_t C, const void *x, const void *gz, const float *a, const float *b,
                                void *dy, int64_t first, int64_t count, float *restrict s, float *restrict q,
                                double *restrict acc) {
    BLOCK_SUMS(
        float v = load(x, at + c, fp32);
        float d = load(gz, at + c, fp32) * gelu_grad(v * a[c] + b[c]);
        if (fp32) {
            ((float *)dy)[at + c] = d;
        } else { /* round once; the sums use the value stored */
            uint16_t d16 = float_to_bf16(d);
            ((uint16_t *)dy)[at + c] = d16;
            d = bf16_to_float(d16);
        }
        s[c] += d * v; q[c] += d;)
}

/* z = act(x * a + b), act GELU (the head) or SiLU (the backbone), `silu_act` a constant wherever this is inlined */
INLINE void forward_block(int fp32, int64_t C, int silu_act, const void *x, const float *a, const float *b, void *z,
                          int64_t first, int64_t count) {
    for (int64_t p = 0; p < count; p++) {
        int64_t at = first + p * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++) {
            float y = load(x, at + c, fp32) * a[c] + b[c];
            store(z, at + c, silu_act ? silu(y) : gelu(y), fp32);
        }
    }
}

INLINE void input_grad_block(int fp32, int64_t C, const void *x, const void *dy, const float *a, const float *b,
                             const float *k, void *dx, int64_t first, int64_t count) {
    for (int64_t p = 0; p < count; p++) {
        int64_t at = first + p * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; c++)
            store(dx, at + c, a[c] * load(dy, at + c, fp32) + b[c] * load(x, at + c, fp32) + k[c], fp32);
    }
}

/* BODY for every block of every sample, the blocks split between threads (inside a parallel region); BODY sees n
 * (the sample), first (the block's first element) and count (its pixels). */
#define FOR_EACH_BLOCK(BODY)                                                                        \
    int64_t blocks = (P + BLOCK - 1) / BLOCK;                                                       \
    _Pragma("omp for schedule(static)") for (int64_t t = 0; t < N * blocks; t++) {                  \
        int64_t n = t / blocks, begin = (t % blocks) * BLOCK;                                       \
        int64_t count = P - begin < BLOCK ? P - begin : BLOCK, first = (n * P + begin) * C;         \
        BODY                                                                                        \
    }

/* A pass that sums per sample and channel into out (N, 2, C): per-thread double accumulators, merged at the end.
 * Returns 0, or -1 when a thread's scratch could not be allocated (out is then not valid; no thread skips the
 * work-sharing loop, so the team never deadlocks). */
#define PARALLEL_SUMS(CALL)                                                                    \
    int failed = 0;                                                                            \
    memset(out, 0, sizeof(double) * N * 2 * C);                                                \
    _Pragma("omp parallel num_threads(threads)") {                                            \
        double *sums = calloc(N * 2 * C, sizeof(double));                                      \
        float *s = malloc(sizeof(float) * C), *q = malloc(sizeof(float) * C);                  \
        int ok = sums && s && q;                                                               \
        if (!ok) {                                                                             \
            _Pragma("omp atomic write") failed = 1;                                            \
        }                                                                                      \
        FOR_EACH_BLOCK(if (ok) { double *acc = sums + n * 2 * C; SPECIALISED(CALL) })          \
        if (ok) {                                                                              \
            _Pragma("omp critical") for (int64_t i = 0; i < N * 2 * C; i++) out[i] += sums[i]; \
        }                                                                                      \
        free(sums);                                                                            \
        free(s);                                                                               \
        free(q);                                                                               \
    }                                                                                          \
    return failed ? -1 : 0;

/* The exported entry points. threads: PyTorch's intra-op thread count (a thread of its own would not inherit it);
 * fp32: the maps' type (else bf16). */
int textdiff_gn_moments(int threads, int fp32, const void *x, int64_t N, int64_t P, int64_t C, double *out) {
#define MOMENTS(FP32, WIDTH) moments_block(FP32, WIDTH, x, first, count, s, q, acc)
    PARALLEL_SUMS(MOMENTS)
}

int textdiff_gn_gelu_backward_sums(int threads, int fp32, const void *x, const void *gz, const float *scale,
                                    const float *shift, int64_t N, int64_t P, int64_t C, void *dy, double *out) {
#define BACKWARD_SUMS(FP32, WIDTH) \
    backward_sums_block(FP32, WIDTH, x, gz, scale + n * C, shift + n * C, dy, first, count, s, q, acc)
    PARALLEL_SUMS(BACKWARD_SUMS)
}

void textdiff_gn_gelu_forward(int threads, int fp32, const void *x, const float *scale, const float *shift,
                              int64_t N, int64_t P, int64_t C, void *z) {
#define FORWARD(FP32, WIDTH) forward_block(FP32, WIDTH, 0, x, scale + n * C, shift + n * C, z, first, count)
    _Pragma("omp parallel num_threads(threads)") {
        FOR_EACH_BLOCK(SPECIALISED(FORWARD))
    }
}

void textdiff_gn_input_grad(int threads, int fp32, const void *x, const void *dy, const float *a, const float *b,
                            const float *k, int64_t N, int64_t P, int64_t C, void *dx) {
#define INPUT_GRAD(FP32, WIDTH) input_grad_block(FP32, WIDTH, x, dy, a + n * C, b + n * C, k + n * C, dx, first, count)
    _Pragma("omp parallel num_threads(threads)") {
        FOR_EACH_BLOCK(SPECIALISED(INPUT_GRAD))
    }
}

/* GroupNorm + SiLU, forward only: the backbone's ResNet blocks at inference (textdiff/backbone.py) */
void textdiff_gn_silu_forward(int threads, int fp32, const void *x, const float *scale, const float *shift,
                              int64_t N, int64_t P, int64_t C, void *z) {
#define SILU_FORWARD(FP32, WIDTH) forward_block(FP32, WIDTH, 1, x, scale + n * C, shift + n * C, z, first, count)
    _Pragma("omp parallel num_threads(threads)") {
        FOR_EACH_BLOCK(SPECIALISED(SILU_FORWARD))
    }
}

/* ---- Softmax attention, bf16, head size 32 or 64: the backbone's self-attention at inference ----
 * Each thread takes whole heads: k and v are repacked into the operand layouts of AVX-512 BF16's pairwise dot
 * products, then for 4 query rows at a time: scores against all keys (fp32), the whole row's softmax (exact
 * maximum, e^x as 2^n * 2^f with a degree-7 polynomial, unnormalised probabilities rounded to bf16 as PyTorch's CPU
 * flash kernel rounds its normalised ones), probabilities @ v, divided by the row's sum. Needs AVX512F + BF16 at
 * compile time (-march=native); elsewhere textdiff_attention_supported() says 0 and SDPA runs. */
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>

/* R query rows of one head (q32: the first row's dimension pairs, rows `stride` bf16 values apart; out likewise):
 * scores (R x Sp), then probabilities as bf16 (R x Sp), then out. Sp is S rounded up to 64, the keys' block. */
INLINE void rows(int R, int64_t D, const uint32_t *q32, int64_t stride, const uint32_t *kp, const uint32_t *vp,
                 int64_t S, int64_t Sp, float scale, float *scores, uint16_t *probs, uint16_t *out) {
    /* scores: 4 vectors of 16 keys at a time, R x 4 accumulators */
    for (int64_t kb = 0; kb < Sp; kb += 64) {
        __m512 acc[4][4];
        for (int r = 0; r < R; r++) for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
        for (int64_t d2 = 0; d2 < D / 2; d2++) {
            __m512i kv[4];
            for (int j = 0; j < 4; j++) kv[j] = _mm512_loadu_si512(kp + d2 * Sp + kb + 16 * j);
            for (int r = 0; r < R; r++) {
                __m512i qb = _mm512_set1_epi32((int)q32[r * stride / 2 + d2]);
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)qb, (__m512bh)kv[j]);
            }
        }
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4; j++) _mm512_storeu_ps(scores + r * Sp + kb + 16 * j, acc[r][j]);
    }
    /* unnormalised probabilities e = exp((s - max) * scale) as bf16; out is divided by their sum at the end */
    float sums[4];
    const __m512 log2e_scale = _mm512_set1_ps(scale * 1.44269504088896341f), floor_ = _mm512_set1_ps(-126.0f);
    for (int r = 0; r < R; r++) {
        float *s = scores + r * Sp;
        for (int64_t i = S; i < Sp; i++) s[i] = -INFINITY;
        __m512 mv = _mm512_set1_ps(-INFINITY);
        for (int64_t i = 0; i < Sp; i += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(s + i));
        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mv));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t i = 0; i < Sp; i += 32) {
            __m512 e2[2];
            for (int h = 0; h < 2; h++) {
                __m512 x = _mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + i + 16 * h), m), log2e_scale);
                x = _mm512_max_ps(x, floor_); /* padding's -inf and anything below 2^-126 */
                __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                __m512 f = _mm512_sub_ps(x, n); /* [-0.5, 0.5]: 2^f = e^(f ln 2), Taylor to degree 7 */
                __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.540353039338161e-04f));
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.333355814642844e-03f));
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
                p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
                e2[h] = _mm512_scalef_ps(p, n);
                sum = _mm512_add_ps(sum, e2[h]);
            }
            _mm512_storeu_si512(probs + r * Sp + i, (__m512i)_mm512_cvtne2ps_pbh(e2[1], e2[0]));
        }
        sums[r] = _mm512_reduce_add_ps(sum);
    }
    /* out = probs @ v: D / 16 vectors per row */
    __m512 acc[4][4];
    for (int r = 0; r < R; r++) for (int j = 0; j < D / 16; j++) acc[r][j] = _mm512_setzero_ps();
    const uint32_t *p32 = (const uint32_t *)probs;
    for (int64_t s2 = 0; s2 < Sp / 2; s2++) {
        __m512i vv[4];
        for (int j = 0; j < D / 16; j++) vv[j] = _mm512_loadu_si512(vp + s2 * D + 16 * j);
        for (int r = 0; r < R; r++) {
            __m512i pb = _mm512_set1_epi32((int)p32[r * Sp / 2 + s2]);
            for (int j = 0; j < D / 16; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)pb, (__m512bh)vv[j]);
        }
    }
    for (int r = 0; r < R; r++) {
        __m512 inv = _mm512_set1_ps(1.0f / sums[r]);
        for (int j = 0; j < D / 16; j++)
            _mm256_storeu_si256((__m256i *)(out + r * stride + 16 * j),
                                (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][j], inv)));
    }
}

/* one head: q (L rows), k and v (S rows), out (L rows), each row D values, rows `stride` values apart */
INLINE void head(int64_t D, const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t stride, int64_t L,
                 int64_t S, float scale, uint16_t *out, uint32_t *kp, uint32_t *vp, float *scores, uint16_t *probs) {
    int64_t Sp = (S + 63) / 64 * 64;
    /* k as (D / 2, Sp) pairs of dimensions, v as (Sp / 2, D) pairs of keys: the dot products' operand layouts */
    for (int64_t s = 0; s < Sp; s++)
        for (int64_t d2 = 0; d2 < D / 2; d2++) kp[d2 * Sp + s] = s < S ? ((const uint32_t *)(k + s * stride))[d2] : 0;
    uint16_t *vp16 = (uint16_t *)vp;
    for (int64_t s = 0; s < Sp; s++)
        for (int64_t d = 0; d < D; d++) vp16[((s / 2) * D + d) * 2 + (s & 1)] = s < S ? v[s * stride + d] : 0;
    int64_t r = 0;
    for (; r + 4 <= L; r += 4)
        rows(4, D, (const uint32_t *)(q + r * stride), stride, kp, vp, S, Sp, scale, scores, probs, out + r * stride);
    for (; r < L; r++)
        rows(1, D, (const uint32_t *)(q + r * stride), stride, kp, vp, S, Sp, scale, scores, probs, out + r * stride);
}

int textdiff_attention_supported(void) { return 1; }

/* q (B, L, H, D), k and v (B, S, H, D), out (B, L, H, D): the layout of the projections' outputs, bf16. Returns 0, or
 * -1 if a thread's scratch memory could not be allocated (out is then incomplete). */
int textdiff_attention(int threads, const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t B, int64_t H,
                       int64_t L, int64_t S, int64_t D, float scale, uint16_t *out) {
    int64_t Sp = (S + 63) / 64 * 64, stride = H * D;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        uint32_t *kp = aligned_alloc(64, sizeof(uint32_t) * (D / 2) * Sp);
        uint32_t *vp = aligned_alloc(64, sizeof(uint32_t) * (Sp / 2) * D);
        float *scores = aligned_alloc(64, sizeof(float) * 4 * Sp);
        uint16_t *probs = aligned_alloc(64, sizeof(uint16_t) * 4 * Sp);
        int ready = kp && vp && scores && probs;
        if (!ready) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            if (!ready) continue;
            int64_t b = bh / H, h = bh % H;
            const uint16_t *qh = q + b * L * stride + h * D, *kh = k + b * S * stride + h * D,
                           *vh = v + b * S * stride + h * D;
            uint16_t *oh = out + b * L * stride + h * D;
            if (D == 32) head(32, qh, kh, vh, stride, L, S, scale, oh, kp, vp, scores, probs);
            else head(64, qh, kh, vh, stride, L, S, scale, oh, kp, vp, scores, probs);
        }
        free(kp);
        free(vp);
        free(scores);
        free(probs);
    }
    return failed ? -1 : 0;
}
#else
int textdiff_attention_supported(void) { return 0; }

int textdiff_attention(int threads, const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t B, int64_t H,
                       int64_t L, int64_t S, int64_t D, float scale, uint16_t *out) {
    (void)threads, (void)q, (void)k, (void)v, (void)B, (void)H, (void)L, (void)S, (void)D, (void)scale, (void)out;
    return -1; /* callers check textdiff_attention_supported() first */
}
#endif
