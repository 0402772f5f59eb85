/* Decode attention over the sampler's PrefixCache on a CPU, fp32: the fused twin of model.attention_shared.

   One token per row b; its G query heads per KV head h attend over the row's prompt keys (prompt slot prompt[b],
   positions 0 .. plen[b] - 1) and its own generated keys (row b, index i = position plen[b] + i, i <= pos[b] -
   plen[b]), one softmax over both, optionally only the keys less than `window` positions back. Each (row, KV head)
   is one task: its scores for all G queries go to a scratch line, then softmax, then the weighted sum of values,
   with the next task's own keys prefetched meanwhile (they come from DRAM: a 256-row cache is tens of MB).

   Why C: in eager PyTorch this is 2 x B x KVH tiny matrix products per layer and step (batched matmul pays a fixed
   cost per matrix) plus a dozen copies to share the prompt's keys; here it is one pass over the keys per task.
   G and D are compile-time constants (-DGROUP=.. -DHEAD_DIM=..; kernels/decode_cpu.py builds one library per pair) so that
   the loops over D unroll and vectorise. The result of a row depends only on that row (no blocking across rows),
   so a row's output does not depend on which rows share its batch.

   Shapes (floats, strides in elements): q and out [B, KVH, G, D] contiguous; prompt keys/values of one layer at
   pk + slot * ps + h * ph + j * D; own keys/values at rk + b * rs + h * rh + i * D. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(GROUP) || !defined(HEAD_DIM)
#error "compile with -DGROUP=<query heads per KV head> -DHEAD_DIM=<head dim>"
#endif
enum { G = GROUP, D = HEAD_DIM };

/* e^x for x <= 0 (a score minus the row's maximum): x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor
   polynomial to r^7 (relative error below 2e-7, about one float ulp), 2^n from the exponent bits; 0 below -87. */
static inline float exp_nonpositive(float x) {
    if (x < -87.0f) return 0.0f;
    float n = __builtin_floorf(x * 1.44269504f + 0.5f);
    float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;  /* ln2 in two parts: r exact to a few ulp */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720
              + r * (1.0f / 5040)))))));
    union { float f; int32_t i; } two_n = { .i = ((int32_t)n + 127) << 23 };
    return p * two_n.f;
}

/* s[g * ld + j] = scale * q_g . k_j for keys j = 0 .. n-1 (k [n, D]); four keys at a time for independent sums */
static void scores(const float *restrict q, const float *restrict k, int n, float scale, float *restrict s, int ld) {
    int j = 0;
    for (; j + 4 <= n; j += 4) {
        const float *k0 = k + (int64_t)j * D, *k1 = k0 + D, *k2 = k1 + D, *k3 = k2 + D;
        for (int g = 0; g < G; g++) {
            const float *qg = q + g * D;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
            for (int d = 0; d < D; d++) {
                a0 += qg[d] * k0[d];
                a1 += qg[d] * k1[d];
                a2 += qg[d] * k2[d];
                a3 += qg[d] * k3[d];
            }
            float *sg = s + g * ld + j;
            sg[0] = a0 * scale, sg[1] = a1 * scale, sg[2] = a2 * scale, sg[3] = a3 * scale;
        }
    }
    for (; j < n; j++) {
        const float *kj = k + (int64_t)j * D;
        for (int g = 0; g < G; g++) {
            const float *qg = q + g * D;
            float a = 0.0f;
#pragma omp simd reduction(+ : a)
            for (int d = 0; d < D; d++) a += qg[d] * kj[d];
            s[g * ld + j] = a * scale;
        }
    }
}

/* acc[g] += sum_j p[g * ld + j] v_j for values j = 0 .. n-1 (v [n, D]) */
static void values(const float *restrict p, int ld, const float *restrict v, int n, float *restrict acc) {
    for (int j = 0; j < n; j++) {
        const float *vj = v + (int64_t)j * D;
        for (int g = 0; g < G; g++) {
            float w = p[g * ld + j];
            float *ag = acc + g * D;
#pragma omp simd
            for (int d = 0; d < D; d++) ag[d] += w * vj[d];
        }
    }
}

static inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* One layer, all rows. window <= 0: no window. Returns 0, or 1 if a scratch line could not be allocated. */
int decode_attention(const float *q, const float *pk, const float *pv, int64_t ps, int64_t ph,
                     const float *rk, const float *rv, int64_t rs, int64_t rh,
                     const int64_t *prompt, const int64_t *plen, const int64_t *pos,
                     int64_t B, int64_t KVH, int64_t Tp, int64_t S, int64_t window, float scale, float *out,
                     int threads) {
    int failed = 0;
    const int64_t tasks = B * KVH, ld = Tp + S;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *s = malloc(sizeof(float) * G * ld);  /* this thread's scores, then probabilities */
        if (s == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (s == NULL) continue;
            const int64_t b = t / KVH, h = t % KVH;
            /* the keys the row sees: prompt j in [p0, p1), own i in [r0, r1) */
            int64_t p0 = 0, p1 = min64(plen[b], Tp), r0 = 0, r1 = min64(pos[b] - plen[b] + 1, S);
            if (window > 0) {
                const int64_t first = pos[b] - window + 1;  /* the oldest position still in the window */
                p0 = min64(max64(first, 0), p1);
                r0 = min64(max64(first - plen[b], 0), r1);
            }
            const int64_t np = p1 - p0, nr = r1 - r0, n = np + nr;
            const float *qt = q + t * G * D;
            const float *kp = pk + prompt[b] * ps + h * ph + p0 * D, *vp = pv + prompt[b] * ps + h * ph + p0 * D;
            const float *kr = rk + b * rs + h * rh + r0 * D, *vr = rv + b * rs + h * rh + r0 * D;
            if (t + 1 < tasks) {  /* the next task's own keys and values: start reading them now */
                const int64_t b1 = (t + 1) / KVH, h1 = (t + 1) % KVH;
                const float *k1 = rk + b1 * rs + h1 * rh, *v1 = rv + b1 * rs + h1 * rh;
                for (int64_t x = 0; x < r1 * D; x += 16) {
                    __builtin_prefetch(k1 + x);
                    __builtin_prefetch(v1 + x);
                }
            }
            scores(qt, kp, (int)np, scale, s, (int)ld);
            scores(qt, kr, (int)nr, scale, s + np, (int)ld);
            for (int g = 0; g < G; g++) {  /* softmax over the n scores of query g */
                float *sg = s + g * ld, top = sg[0], total = 0.0f;
                for (int64_t j = 1; j < n; j++) top = sg[j] > top ? sg[j] : top;
#pragma omp simd reduction(+ : total)
                for (int64_t j = 0; j < n; j++) {
                    sg[j] = exp_nonpositive(sg[j] - top);
                    total += sg[j];
                }
                const float inv = 1.0f / total;
#pragma omp simd
                for (int64_t j = 0; j < n; j++) sg[j] *= inv;
            }
            float acc[G * D];
            memset(acc, 0, sizeof acc);
            values(s, (int)ld, vp, (int)np, acc);
            values(s + np, (int)ld, vr, (int)nr, acc);
            memcpy(out + t * G * D, acc, sizeof acc);
        }
        free(s);
    }
    return failed;
}
