// fp32 CPU kernels for the decode-heavy parts of the Llama forward (built at first use by cpu_kernels.py).
//
// One source, built once per ISA path with -DPD_ISA=...: 3 (AVX-512: 16-lane vectors, 32 vector registers),
// 2 (AVX2 + FMA: 8 lanes, 16 registers) and 1 (portable: 4 lanes, which the compiler maps to whatever the target
// has: SSE2 on x86, NEON on aarch64). The code is plain C with GCC/Clang vector types; only the lane count and
// the register tile change per path, so every path computes the same algorithm in the same order.
//
// Linear weights are packed in panels of PW = 2 vectors of output columns: P[NP][K][PW] (NP = ceil(N / PW),
// zero padded), so a thread streams each panel once, sequentially, for every row tile of x. Every output
// element is accumulated in the same k order whatever the batch size, so a request's numbers do not depend
// on its batch.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef PD_ISA
#define PD_ISA 1
#endif
#if PD_ISA == 3
#define VL 16 /* lanes per vector */
#define MT_MAX 8 /* rows per micro tile: 2 * MT_MAX accumulators + 2 weight vectors fit 32 registers */
#elif PD_ISA == 2
#define VL 8
#define MT_MAX 6 /* 12 accumulators + 2 weight vectors + 1 broadcast = 15 of the 16 ymm registers */
#else
#define VL 4
#define MT_MAX 4 /* 8 accumulators: fits SSE2's 16 registers (no FMA: products need temporaries) and NEON's 32 */
#endif
#define PW (2 * VL) /* panel width: columns per panel */

typedef float vf __attribute__((vector_size(VL * 4)));
typedef float vfu __attribute__((vector_size(VL * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));

int pd_isa(void) { return PD_ISA; }
int pd_panel_width(void) { return PW; }

static inline vf ld(const float* p) { return *(const vfu*)p; }
static inline void st(float* p, vf v) { *(vfu*)p = v; }
static inline vf splat(float a) { return a - (vf){0}; }

// y[m, n0:n0+cols] = x[m, :] . panel (+ bias + add) for MT rows starting at x.
#define MICRO(MT)                                                                                     \
    static void micro_##MT(const float* x, int64_t xs, int64_t K, const float* p, float* y, int64_t ys, \
                           int cols, const float* bias, const float* add, int64_t as) {                \
        vf acc[MT][2];                                                                                \
        for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = (vf){0};                                 \
        for (int64_t k = 0; k < K; k++) {                                                             \
            vf w0 = ld(p + k * PW), w1 = ld(p + k * PW + VL);                                         \
            for (int m = 0; m < MT; m++) {                                                            \
                vf a = splat(x[m * xs + k]);                                                          \
                acc[m][0] += a * w0;                                                                  \
                acc[m][1] += a * w1;                                                                  \
            }                                                                                         \
        }                                                                                             \
        for (int m = 0; m < MT; m++) {                                                                \
            float out[PW];                                                                            \
            st(out, acc[m][0]);                                                                       \
            st(out + VL, acc[m][1]);                                                                  \
            for (int j = 0; j < cols; j++) {                                                          \
                float v = out[j];                                                                     \
                if (bias) v += bias[j];                                                               \
                if (add) v += add[m * as + j];                                                        \
                y[m * ys + j] = v;                                                                    \
            }                                                                                         \
        }                                                                                             \
    }
MICRO(1)
MICRO(2)
MICRO(3)
MICRO(4)
#if MT_MAX >= 6
MICRO(5)
MICRO(6)
#endif
#if MT_MAX == 8
MICRO(7)
MICRO(8)
#endif

typedef void (*micro_fn)(const float*, int64_t, int64_t, const float*, float*, int64_t, int, const float*,
                         const float*, int64_t);
static const micro_fn MICROS[] = {0, micro_1, micro_2, micro_3, micro_4,
#if MT_MAX >= 6
                                  micro_5, micro_6,
#endif
#if MT_MAX == 8
                                  micro_7, micro_8
#endif
};

// Pack w_t [K, N] (row-major, row stride ws) into panels P [NP, K, PW].
void pd_pack(const float* w_t, int64_t K, int64_t N, int64_t ws, float* P) {
    int64_t np = (N + PW - 1) / PW;
#pragma omp parallel for schedule(static)
    for (int64_t pi = 0; pi < np; pi++) {
        int64_t n0 = pi * PW, cols = N - n0 < PW ? N - n0 : PW;
        for (int64_t k = 0; k < K; k++) {
            float* dst = P + (pi * K + k) * PW;
            memset(dst, 0, PW * sizeof(float));
            memcpy(dst, w_t + k * ws + n0, cols * sizeof(float));
        }
    }
}

#define L2_X_BYTES (512 * 1024) /* rows of x per block: they stay in this core's L2 for every panel */

// y [M, N] (row stride ys) = x [M, K] (row stride xs) @ W (+ bias [N]) (+ add [M, N], row stride as).
// add may alias y (in-place residual add). Large M runs in row blocks that fit L2, so a long prefill does
// not stream x from L3/DRAM once per panel (which would also slow a decode server sharing the memory bus).
void pd_linear(const float* x, int64_t M, int64_t K, int64_t xs, const float* P, int64_t N, float* y,
               int64_t ys, const float* bias, const float* add, int64_t as) {
    int64_t np = (N + PW - 1) / PW;
    int64_t mc = L2_X_BYTES / (K * (int64_t)sizeof(float)) / MT_MAX * MT_MAX;
    if (mc < MT_MAX) mc = MT_MAX;
#pragma omp parallel
    for (int64_t b0 = 0; b0 < M; b0 += mc) {
        int64_t b1 = b0 + mc < M ? b0 + mc : M;
#pragma omp for schedule(guided) /* guided: a thread the OS delays does not hold back half the panels */
        for (int64_t pi = 0; pi < np; pi++) {
            int64_t n0 = pi * PW;
            int cols = (int)(N - n0 < PW ? N - n0 : PW);
            const float* p = P + pi * K * PW;
            for (int64_t m0 = b0; m0 < b1; m0 += MT_MAX) {
                int mt = (int)(b1 - m0 < MT_MAX ? b1 - m0 : MT_MAX);
                MICROS[mt](x + m0 * xs, xs, K, p, y + m0 * ys + n0, ys, cols, bias ? bias + n0 : 0,
                           add ? add + m0 * as + n0 : 0, as);
            }
        }
    }
}

// y [M, H] = x * rsqrt(mean(x^2) + eps) * w, as transformers' LlamaRMSNorm computes it in fp32.
void pd_rmsnorm(const float* x, int64_t M, int64_t H, int64_t xs, const float* w, float eps, float* y) {
#pragma omp parallel for schedule(static) if (M > 4)
    for (int64_t m = 0; m < M; m++) {
        const float* r = x + m * xs;
        float ss = 0.f;
        for (int64_t i = 0; i < H; i++) ss += r[i] * r[i];
        float inv = 1.0f / sqrtf(ss / (float)H + eps);
        for (int64_t i = 0; i < H; i++) y[m * H + i] = w[i] * (r[i] * inv);
    }
}

static inline void rope_row(const float* src, const float* cos, const float* sin, int64_t D, float* dst) {
    int64_t h = D / 2;
    for (int64_t i = 0; i < h; i++) {
        dst[i] = src[i] * cos[i] - src[i + h] * sin[i];
        dst[i + h] = src[i + h] * cos[i + h] + src[i] * sin[i + h];
    }
}

// qkv [T, (nH + 2 nKV) * D]: rotary-embed q into q_out [T, nH, D]; rotated k and plain v into the pools
// ([num_slots, nKV, D]) at out_slots [T]. cos/sin: [max_pos, D] tables indexed by positions [T].
void pd_rope_store(const float* qkv, int64_t T, const int64_t* positions, const float* cos, const float* sin,
                   int64_t nH, int64_t nKV, int64_t D, const int64_t* out_slots, float* k_pool, float* v_pool,
                   float* q_out) {
    int64_t row = (nH + 2 * nKV) * D;
#pragma omp parallel for schedule(static) if (T > 4)
    for (int64_t t = 0; t < T; t++) {
        const float* r = qkv + t * row;
        const float *c = cos + positions[t] * D, *s = sin + positions[t] * D;
        for (int64_t h = 0; h < nH; h++) rope_row(r + h * D, c, s, D, q_out + (t * nH + h) * D);
        float* kd = k_pool + out_slots[t] * nKV * D;
        for (int64_t h = 0; h < nKV; h++) rope_row(r + (nH + h) * D, c, s, D, kd + h * D);
        memcpy(v_pool + out_slots[t] * nKV * D, r + (nH + nKV) * D, nKV * D * sizeof(float));
    }
}

// Sum of the VL lanes by halving (a fixed order).
static inline float hsum(vf a) {
#if VL == 16
    a += __builtin_shuffle(a, (vi){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    a += __builtin_shuffle(a, (vi){4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
    a += __builtin_shuffle(a, (vi){2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1});
    a += __builtin_shuffle(a, (vi){1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0});
#elif VL == 8
    a += __builtin_shuffle(a, (vi){4, 5, 6, 7, 0, 1, 2, 3});
    a += __builtin_shuffle(a, (vi){2, 3, 0, 1, 2, 3, 0, 1});
    a += __builtin_shuffle(a, (vi){1, 0, 1, 0, 1, 0, 1, 0});
#else
    a += __builtin_shuffle(a, (vi){2, 3, 0, 1});
    a += __builtin_shuffle(a, (vi){1, 0, 1, 0});
#endif
    return a[0];
}

// q . k over D elements, VL lanes at a time (a fixed order: the same for every batch).
static inline float dot(const float* q, const float* k, int64_t D) {
    vf acc = {0};
    int64_t e = 0;
    for (; e + VL <= D; e += VL) acc += ld(q + e) * ld(k + e);
    float d = hsum(acc);
    for (; e < D; e++) d += q[e] * k[e];
    return d;
}

// exp(x) for x <= 0, VL lanes: 2^n * p(r) with r = x - n ln2 (Cody-Waite) and a degree-6 polynomial
// (within 2 ulp of expf); exp of x < -87 flushes to 0.
static inline vf exp_neg(vf x) {
    const vi under = x < -87.0f;  // lanes that flush to 0 (all ones where true)
    x = (vf)(((vi)x & ~under) | ((vi)splat(-87.0f) & under));
    vf n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;  // round to nearest
    vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = 1.0f / 720 + r * 0;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    vf y = p * (vf)bits;
    return (vf)((vi)y & ~under);
}

// s[j] = exp(s[j] - mx) for j < n; returns their sum (lanes summed in a fixed order).
static inline float exp_sum(float* s, int64_t n, float mx) {
    vf acc = {0};
    int64_t j = 0;
    for (; j + VL <= n; j += VL) {
        vf e = exp_neg(ld(s + j) - mx);
        st(s + j, e);
        acc += e;
    }
    float sum = hsum(acc);
    for (; j < n; j++) sum += (s[j] = expf(s[j] - mx));
    return sum;
}

// out [M, I] = silu(gu[:, :I]) * gu[:, I:]   (gu [M, 2I]); silu(g) = g * sigmoid(g), with e = exp(-|g|):
// sigmoid(g) = 1 / (1 + e) for g >= 0 and e / (1 + e) for g < 0 (never exp of a positive number).
void pd_silu_mul(const float* gu, int64_t M, int64_t I, float* out) {
#pragma omp parallel for schedule(static) if (M > 4)
    for (int64_t m = 0; m < M; m++) {
        const float* g = gu + m * 2 * I;
        const float* u = g + I;
        float* o = out + m * I;
        int64_t i = 0;
        for (; i + VL <= I; i += VL) {
            vf gv = ld(g + i);
            vi neg = gv < 0.0f;
            vf e = exp_neg((vf)((vi)gv | (vi)splat(-0.0f)));  // exp(-|g|)
            vf num = (vf)(((vi)e & neg) | ((vi)splat(1.0f) & ~neg));
            st(o + i, gv * num / (1.0f + e) * ld(u + i));
        }
        for (; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

#define ATT_CHUNK 256 /* context tokens per task; partial softmaxes are merged after (flash-decoding) */
#define ATT_MAX_HEADS 64 /* cpu_kernels.py sends larger head counts to the torch path */

#define ATT_PREFETCH 4 /* KV rows fetched ahead: rows come through the slot table, runs need not be adjacent */

static inline void prefetch_row(const float* r, int64_t len) {
    for (int64_t i = 0; i < len; i += 16) __builtin_prefetch(r + i, 0, 3);
}

// One task: heads of sequence b over context tokens [j0, j1). Writes per head: max score, sum of
// exp(score - max), and the unnormalised output sum [D], reading each K/V row once for all heads.
static void attend_chunk(const float* q, int64_t nH, int64_t nKV, int64_t D, const float* k_pool,
                         const float* v_pool, const int64_t* slots, int64_t j0, int64_t j1, float scale,
                         float* part /* [nH, D + 2] */) {
    int64_t G = nH / nKV, n = j1 - j0, row = nKV * D;
    float sc[ATT_MAX_HEADS * ATT_CHUNK];
    for (int64_t j = 0; j < n; j++) {
        const float* kr = k_pool + slots[j0 + j] * row;
        if (j + ATT_PREFETCH < n) prefetch_row(k_pool + slots[j0 + j + ATT_PREFETCH] * row, row);
        for (int64_t h = 0; h < nH; h++) sc[h * n + j] = dot(q + h * D, kr + (h / G) * D, D) * scale;
    }
    for (int64_t h = 0; h < nH; h++) {
        float* s = sc + h * n;
        float mx = -INFINITY, sum = 0.f;
        for (int64_t j = 0; j < n; j++) mx = s[j] > mx ? s[j] : mx;
        sum = exp_sum(s, n, mx);
        float* p = part + h * (D + 2);
        p[0] = mx;
        p[1] = sum;
        memset(p + 2, 0, D * sizeof(float));
    }
    for (int64_t j = 0; j < n; j++) {
        const float* vr = v_pool + slots[j0 + j] * row;
        if (j + ATT_PREFETCH < n) prefetch_row(v_pool + slots[j0 + j + ATT_PREFETCH] * row, row);
        for (int64_t h = 0; h < nH; h++) {
            float w = sc[h * n + j], *restrict o = part + h * (D + 2) + 2;
            const float* restrict v = vr + (h / G) * D;
            for (int64_t e = 0; e < D; e++) o[e] += w * v[e];
        }
    }
}

// One token per sequence: out [B, nH * D] = softmax(q K^T * scale) V over the first lens[b] slots of
// slot_table [B, S]; K and V are read in place from the pools [num_slots, nKV, D] (no gather). Tasks are
// (sequence, chunk of ATT_CHUNK tokens); chunking depends on the length only, never on the batch.
void pd_decode_attention(const float* q, int64_t B, int64_t nH, int64_t nKV, int64_t D, const float* k_pool,
                         const float* v_pool, const int64_t* slot_table, int64_t S, const int64_t* lens,
                         float scale, float* out) {
    int64_t* first = (int64_t*)malloc(sizeof(int64_t) * (B + 1));  // first task of each sequence
    first[0] = 0;
    for (int64_t b = 0; b < B; b++) first[b + 1] = first[b] + (lens[b] + ATT_CHUNK - 1) / ATT_CHUNK;
    int64_t num_tasks = first[B], part_len = nH * (D + 2);
    float* parts = (float*)malloc(sizeof(float) * (num_tasks > 0 ? num_tasks : 1) * part_len);
#pragma omp parallel
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < num_tasks; t++) {
            int64_t b = 0;
            while (first[b + 1] <= t) b++;
            int64_t j0 = (t - first[b]) * ATT_CHUNK, j1 = j0 + ATT_CHUNK < lens[b] ? j0 + ATT_CHUNK : lens[b];
            attend_chunk(q + b * nH * D, nH, nKV, D, k_pool, v_pool, slot_table + b * S, j0, j1, scale,
                         parts + t * part_len);
        }
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * nH; bh++) {
            int64_t b = bh / nH, h = bh % nH;
            float* o = out + bh * D;
            float mx = -INFINITY, sum = 0.f;
            for (int64_t t = first[b]; t < first[b + 1]; t++) mx = parts[t * part_len + h * (D + 2)] > mx ?
                                                                   parts[t * part_len + h * (D + 2)] : mx;
            memset(o, 0, D * sizeof(float));
            for (int64_t t = first[b]; t < first[b + 1]; t++) {
                const float* p = parts + t * part_len + h * (D + 2);
                float w = expf(p[0] - mx);
                sum += p[1] * w;
                for (int64_t e = 0; e < D; e++) o[e] += w * p[2 + e];
            }
            float inv = 1.0f / sum;
            for (int64_t e = 0; e < D; e++) o[e] *= inv;
        }
    }
    free(parts);
    free(first);
}

// One transformer layer's weights and KV pools for pd_decode_layers (the PdLayer ctypes struct mirrors it).
typedef struct {
    const float *in_norm, *qkv, *qkv_bias, *o, *post_norm, *gate_up, *down; /* qkv_bias may be 0 */
    float *k_pool, *v_pool;                                                /* [num_slots, nKV, D] */
} pd_layer;

// Every layer of a decode step whose B rows are all decode tokens, in one call (the unfused path makes ~9
// calls per layer from Python). Each op is the function the unfused path calls, with the same arguments in
// the same order, so the numbers are identical. x [B, H] is the residual stream, updated in place; work holds
// B * (H + (nH + 2 nKV) D + 2 nH D + 3 I) floats.
void pd_decode_layers(const pd_layer* layers, int64_t num_layers, float* x, int64_t B, int64_t H, int64_t nH,
                      int64_t nKV, int64_t D, int64_t I, float eps, const int64_t* positions, const float* cos,
                      const float* sin, const int64_t* out_slots, const int64_t* slot_table, int64_t S,
                      const int64_t* lens, float scale, float* work) {
    int64_t qkv_n = (nH + 2 * nKV) * D, q_n = nH * D;
    float *h = work, *qkv = h + B * H, *q = qkv + B * qkv_n, *att = q + B * q_n, *gu = att + B * q_n;
    float* act = gu + B * 2 * I;
    for (int64_t l = 0; l < num_layers; l++) {
        const pd_layer* L = layers + l;
        pd_rmsnorm(x, B, H, H, L->in_norm, eps, h);
        pd_linear(h, B, H, H, L->qkv, qkv_n, qkv, qkv_n, L->qkv_bias, 0, 0);
        pd_rope_store(qkv, B, positions, cos, sin, nH, nKV, D, out_slots, L->k_pool, L->v_pool, q);
        pd_decode_attention(q, B, nH, nKV, D, L->k_pool, L->v_pool, slot_table, S, lens, scale, att);
        pd_linear(att, B, q_n, q_n, L->o, H, x, H, 0, x, H);
        pd_rmsnorm(x, B, H, H, L->post_norm, eps, h);
        pd_linear(h, B, H, H, L->gate_up, 2 * I, gu, 2 * I, 0, 0, 0);
        pd_silu_mul(gu, B, I, act);
        pd_linear(act, B, I, I, L->down, H, x, H, 0, x, H);
    }
}
