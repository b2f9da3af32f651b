// fp32 CPU kernels for the decode-heavy parts of the Llama forward (built at first use by cpu_kernels.py).
//
// Linear weights are packed in panels of PW output columns: P[NP][K][PW] (NP = ceil(N / PW), zero padded),
// so a thread streams each panel once, sequentially, for every row tile of x. Every output element is
// accumulated in the same k order whatever the batch size, so a request's numbers do not depend on its batch.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PW 32 /* panel width: columns per panel */
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

#ifdef __AVX512F__
#define MT_MAX 8 /* rows per micro tile: 2 * MT_MAX accumulators must fit the 32 vector registers */
#else
#define MT_MAX 4
#endif

static inline v16 ld(const float* p) { return *(const v16u*)p; }
static inline void st(float* p, v16 v) { *(v16u*)p = v; }

// y[m, n0:n0+cols] = x[m, :] . panel (+ bias + add) for MT rows starting at x.
#define MICRO(MT)                                                                                     \
    static void micro_##MT(const float* x, int64_t xs, int64_t K, const float* p, float* y, int64_t ys, \
                           int cols, const float* bias, const float* add, int64_t as) {                \
        v16 acc[MT][2];                                                                               \
        for (int m = 0; m < MT; m++) acc[m][0] = acc[m][1] = (v16){0};                                \
        for (int64_t k = 0; k < K; k++) {                                                             \
            v16 w0 = ld(p + k * PW), w1 = ld(p + k * PW + 16);                                        \
            for (int m = 0; m < MT; m++) {                                                            \
                float a = x[m * xs + k];                                                              \
                acc[m][0] += a * w0;                                                                  \
                acc[m][1] += a * w1;                                                                  \
            }                                                                                         \
        }                                                                                             \
        for (int m = 0; m < MT; m++) {                                                                \
            float out[PW];                                                                            \
            st(out, acc[m][0]);                                                                       \
            st(out + 16, acc[m][1]);                                                                  \
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
#if MT_MAX == 8
MICRO(5)
MICRO(6)
MICRO(7)
MICRO(8)
#endif

typedef void (*micro_fn)(const float*, int64_t, int64_t, const float*, float*, int64_t, int, const float*,
                         const float*, int64_t);
static const micro_fn MICROS[] = {0, micro_1, micro_2, micro_3, micro_4,
#if MT_MAX == 8
                                  micro_5, micro_6, micro_7, micro_8
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

// y [M, N] (row stride ys) = x [M, K] (row stride xs) @ W (+ bias [N]) (+ add [M, N], row stride as).
// add may alias y (in-place residual add).
void pd_linear(const float* x, int64_t M, int64_t K, int64_t xs, const float* P, int64_t N, float* y,
               int64_t ys, const float* bias, const float* add, int64_t as) {
    int64_t np = (N + PW - 1) / PW;
#pragma omp parallel for schedule(static)
    for (int64_t pi = 0; pi < np; pi++) {
        int64_t n0 = pi * PW;
        int cols = (int)(N - n0 < PW ? N - n0 : PW);
        const float* p = P + pi * K * PW;
        for (int64_t m0 = 0; m0 < M; m0 += MT_MAX) {
            int mt = (int)(M - m0 < MT_MAX ? M - m0 : MT_MAX);
            MICROS[mt](x + m0 * xs, xs, K, p, y + m0 * ys + n0, ys, cols, bias ? bias + n0 : 0,
                       add ? add + m0 * as + n0 : 0, as);
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

// out [M, I] = silu(gu[:, :I]) * gu[:, I:]   (gu [M, 2I])
void pd_silu_mul(const float* gu, int64_t M, int64_t I, float* out) {
#pragma omp parallel for schedule(static) if (M > 4)
    for (int64_t m = 0; m < M; m++) {
        const float* g = gu + m * 2 * I;
        const float* u = g + I;
        for (int64_t i = 0; i < I; i++) out[m * I + i] = g[i] / (1.0f + expf(-g[i])) * u[i];
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

// One token per sequence: out [B, nH * D] = softmax(q K^T * scale) V over the first lens[b] slots of
// slot_table [B, S]; K and V are read in place from the pools [num_slots, nKV, D] (no gather).
void pd_decode_attention(const float* q, int64_t B, int64_t nH, int64_t nKV, int64_t D, const float* k_pool,
                         const float* v_pool, const int64_t* slot_table, int64_t S, const int64_t* lens,
                         float scale, float* out) {
    int64_t G = nH / nKV;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t bg = 0; bg < B * nKV; bg++) {
        int64_t b = bg / nKV, g = bg % nKV, L = lens[b];
        const int64_t* slots = slot_table + b * S;
        float* sc = (float*)malloc(sizeof(float) * G * (L > 0 ? L : 1));
        for (int64_t j = 0; j < L; j++) {
            const float* kr = k_pool + (slots[j] * nKV + g) * D;
            for (int64_t i = 0; i < G; i++) {
                const float* qr = q + (b * nH + g * G + i) * D;
                float d = 0.f;
                for (int64_t e = 0; e < D; e++) d += qr[e] * kr[e];
                sc[i * L + j] = d * scale;
            }
        }
        for (int64_t i = 0; i < G; i++) {
            float* s = sc + i * L;
            float mx = -INFINITY, sum = 0.f;
            for (int64_t j = 0; j < L; j++) mx = s[j] > mx ? s[j] : mx;
            for (int64_t j = 0; j < L; j++) sum += (s[j] = expf(s[j] - mx));
            float inv = 1.0f / sum;
            for (int64_t j = 0; j < L; j++) s[j] *= inv;
            float* o = out + (b * nH + g * G + i) * D;
            memset(o, 0, D * sizeof(float));
        }
        for (int64_t j = 0; j < L; j++) {
            const float* vr = v_pool + (slots[j] * nKV + g) * D;
            for (int64_t i = 0; i < G; i++) {
                float p = sc[i * L + j];
                float* o = out + (b * nH + g * G + i) * D;
                for (int64_t e = 0; e < D; e++) o[e] += p * vr[e];
            }
        }
        free(sc);
    }
}
