/* The sampler's decode step on a CPU, fp32: everything between its matmuls (kernels/decode_cpu.py's Decoder runs
   torch's matmuls and calls these between them), the fused twin of the model's layers over a PrefixCache.

   decode_layer_attention  one layer's attention from its q|k|v projection: RoPE, the new key and value written to
                           the row's own keys, attention over the row's prompt keys and own keys (model.py's
                           apply_rope, KVCache.write and attention_shared)
   rms_norm, silu_mul      RMSNorm; SwiGLU's silu(gate) * up
   prefill_layer_attention the prefill's: RoPE, the prompt's keys and values written to its prompt slot, causal
                           attention over them, for a flat batch of prompt tokens
   sample_top_p            the top-p draw of the next token (sampler.nucleus and sampler.sample)

   Attention: one token per row b; its G query heads per KV head h attend over the row's prompt keys (prompt slot
   prompt[b], positions 0 .. plen[b] - 1) and its own generated keys (row b, index i = position - plen[b], i <=
   pos[b] - plen[b]), one softmax over both, optionally only the keys less than `window` positions back. Each
   (row, KV head) is one task: its scores for all G queries go to a scratch line, then softmax, then the weighted
   sum of values, with the next task's own keys prefetched meanwhile (they come from DRAM: a 256-row cache is tens
   of MB).

   Why C: in eager PyTorch a decode step of a small model is hundreds of tensor operations of a few microseconds
   each (the attention alone 2 x B x KVH tiny matrix products per layer, batched matmul paying a fixed cost per
   matrix, plus a dozen copies to share the prompt's keys); here each layer is four calls between its matmuls.
   G and D are compile-time constants (-DGROUP=.. -DHEAD_DIM=..; kernels/decode_cpu.py builds one library per
   pair) so that the loops over D unroll and vectorise. Every function works row by row with a fixed order of
   operations (no blocking across rows), so a row's result does not depend on which rows share its batch.

   Shapes (floats, strides in elements): qkv [B, (KVH * G + 2 KVH) * D] and out [B, KVH, G, D] contiguous; prompt
   keys/values of one layer at pk + slot * ps + h * ph + j * D; own keys/values at rk + b * rs + h * rh + i * D. */
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
    const float y = x < -87.0f ? -87.0f : x;
    float n = __builtin_floorf(y * 1.44269504f + 0.5f);
    float r = (y - n * 0.693145752f) - n * 1.42860677e-6f;  /* ln2 in two parts: r exact to a few ulp */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720
              + r * (1.0f / 5040)))))));
    int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n; a select and a memcpy rather than a branch and a union, */
    float two_n;                              /* so that loops over it vectorise (with -fno-trapping-math) */
    memcpy(&two_n, &bits, sizeof two_n);
    return x < -87.0f ? 0.0f : p * two_n;
}

#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) && HEAD_DIM % 16 == 0
#define SIXTEEN_KEYS 1
#endif
#endif

#ifdef SIXTEEN_KEYS
/* Sixteen dot products at once with GCC / clang vector types (16 floats: one AVX-512 register, two AVX2 ones):
   a[t] holds key t's 16 partial sums; sum16 adds each vector's lanes, the sixteen sums in one vector, by a
   transposing tree of 30 two-vector shuffles and 15 adds (instead of 16 separate 16-lane reductions). */
typedef float v16 __attribute__((vector_size(64)));
#define SHUF(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)

static inline v16 load16(const float *p) {
    v16 x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline v16 sum16(const v16 a[16]) {
    v16 c[8], d[4], e[2];
    for (int i = 0; i < 8; i++)  /* c[i]: keys 2i, 2i+1, 8 partial sums each */
        c[i] = SHUF(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
             + SHUF(a[2 * i], a[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++)  /* d[i]: keys 4i .. 4i+3, 4 partial sums each */
        d[i] = SHUF(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
             + SHUF(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++)  /* e[i]: keys 8i .. 8i+7, 2 partial sums each */
        e[i] = SHUF(d[2 * i], d[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
             + SHUF(d[2 * i], d[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return SHUF(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
         + SHUF(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#endif

/* s[g * ld + j] = scale * q_g . k_j for keys j = 0 .. n-1 (k [n, D]): sixteen keys at a time where the vector
   types allow, then four at a time for independent sums, then one. Meanwhile pf[0 .. pf_n) (the next task's keys,
   from DRAM) is prefetched as far as the sixteen-key blocks reach, a block's worth at a time: spread over the work
   rather than issued at once, the prefetches overlap it (1.04-1.12x over a burst at the task's start). */
static void scores(const float *restrict q, const float *restrict k, int n, float scale, float *restrict s, int ld,
                   const float *pf, int64_t pf_n) {
    int j = 0;
#ifdef SIXTEEN_KEYS
    for (; j + 16 <= n; j += 16) {
        for (int64_t x = (int64_t)j * D; x < (int64_t)(j + 16) * D && x < pf_n; x += 16) __builtin_prefetch(pf + x);
        for (int g = 0; g < G; g++) {
            const float *qg = q + g * D;
            v16 a[16];
            for (int t = 0; t < 16; t++) {
                const float *kt = k + (int64_t)(j + t) * D;
                v16 acc = load16(qg) * load16(kt);
                for (int d = 16; d < D; d += 16) acc += load16(qg + d) * load16(kt + d);
                a[t] = acc;
            }
            const v16 r = sum16(a) * scale;
            memcpy(s + g * ld + j, &r, sizeof r);
        }
    }
#endif
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

/* acc[g] += sum_j p[g * ld + j] v_j for values j = 0 .. n-1 (v [n, D]), prefetching pf[0 .. pf_n) alongside */
static void values(const float *restrict p, int ld, const float *restrict v, int n, float *restrict acc,
                   const float *pf, int64_t pf_n) {
    for (int j = 0; j < n; j++) {
        const float *vj = v + (int64_t)j * D;
        for (int64_t x = (int64_t)j * D; x < (int64_t)(j + 1) * D && x < pf_n; x += 16) __builtin_prefetch(pf + x);
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

/* One (row, KV head) task: the G queries qt [G, D] of row b against its prompt keys (slot prompt[b], positions
   0 .. plen[b] - 1) and its own keys (index i = position - plen[b], i <= pos[b] - plen[b]), within the window
   (window <= 0: none) -> out [G, D]. s: a scratch line of G * (Tp + S) floats. pk_next, pv_next: the next task's
   own keys and values, pn floats of each, prefetched while this task runs. */
static void attend_task(const float *restrict qt, const float *pk, const float *pv, int64_t ps, int64_t ph,
                        const float *rk, const float *rv, int64_t rs, int64_t rh, int64_t b, int64_t h,
                        int64_t slot, int64_t plen, int64_t pos, int64_t Tp, int64_t S, int64_t window, float scale,
                        float *restrict s, float *restrict out, const float *pk_next, const float *pv_next, int64_t pn) {
    const int64_t ld = Tp + S;
    /* the keys the row sees: prompt j in [p0, p1), own i in [r0, r1) */
    int64_t p0 = 0, p1 = min64(plen, Tp), r0 = 0, r1 = min64(pos - plen + 1, S);
    if (window > 0) {
        const int64_t first = pos - window + 1;  /* the oldest position still in the window */
        p0 = min64(max64(first, 0), p1);
        r0 = min64(max64(first - plen, 0), r1);
    }
    const int64_t np = p1 - p0, nr = r1 - r0, n = np + nr;
    const float *kp = pk + slot * ps + h * ph + p0 * D, *vp = pv + slot * ps + h * ph + p0 * D;
    const float *kr = rk + b * rs + h * rh + r0 * D, *vr = rv + b * rs + h * rh + r0 * D;
    scores(qt, kp, (int)np, scale, s, (int)ld, pk_next, pn);
    scores(qt, kr, (int)nr, scale, s + np, (int)ld, pk_next + np * D, pn - np * D);
    float inv[G];
    for (int g = 0; g < G; g++) {  /* softmax over the n scores of query g, normalised after the weighted sum */
        float *sg = s + g * ld, top = sg[0], total = 0.0f;
#pragma omp simd reduction(max : top)
        for (int64_t j = 1; j < n; j++) top = sg[j] > top ? sg[j] : top;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < n; j++) {
            sg[j] = exp_nonpositive(sg[j] - top);
            total += sg[j];
        }
        inv[g] = 1.0f / total;
    }
    float acc[G * D];
    memset(acc, 0, sizeof acc);
    values(s, (int)ld, vp, (int)np, acc, pv_next, pn);
    values(s + np, (int)ld, vr, (int)nr, acc, pv_next + np * D, pn - np * D);
    for (int g = 0; g < G; g++)
#pragma omp simd
        for (int d = 0; d < D; d++) out[g * D + d] = acc[g * D + d] * inv[g];
}

/* ---- the rest of a decode step (kernels/decode_cpu.py's Decoder calls these between torch's matmuls) ---- */

/* out[b] = w * x[b] / sqrt(mean(x[b]^2) + eps) for rows b < B of C floats (RMSNorm, fp32) */
void rms_norm(const float *x, const float *w, int64_t B, int64_t C, float eps, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (B * C >= 65536)
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * C;
        float *ob = out + b * C, sq = 0.0f;
#pragma omp simd reduction(+ : sq)
        for (int64_t c = 0; c < C; c++) sq += xb[c] * xb[c];
        const float inv = 1.0f / sqrtf(sq / (float)C + eps);
#pragma omp simd
        for (int64_t c = 0; c < C; c++) ob[c] = w[c] * (xb[c] * inv);
    }
}

/* h [B, 2F], each row gate (F floats) then up (F floats) -> out [B, F] = silu(gate) * up (SwiGLU) */
void silu_mul(const float *h, int64_t B, int64_t F, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (B * F >= 32768)
    for (int64_t b = 0; b < B; b++) {
        const float *gate = h + b * 2 * F, *up = gate + F;
        float *ob = out + b * F;
#pragma omp simd
        for (int64_t f = 0; f < F; f++) {  /* sigmoid(x) = 1 / (1 + e) for x >= 0, e / (1 + e) below; e = e^-|x| */
            const float x = gate[f], e = exp_nonpositive(-fabsf(x));
            ob[f] = x * ((x >= 0.0f ? 1.0f : e) / (1.0f + e)) * up[f];
        }
    }
}

/* x [D] (one head) rotated in place by RoPE at table row c, s [D / 2] (rotate-half pairs i, i + D/2) */
static inline void rope(float *restrict x, const float *restrict c, const float *restrict s) {
    for (int i = 0; i < D / 2; i++) {
        const float x1 = x[i], x2 = x[i + D / 2];
        x[i] = x1 * c[i] - x2 * s[i];
        x[i + D / 2] = x2 * c[i] + x1 * s[i];
    }
}

/* One layer's attention from its fused projection: qkv [B, (KVH * G + 2 KVH) * D] (q heads, k heads, v heads)
   -> out [B, KVH * G * D]. For each row and KV head: RoPE at position pos[b] on the G query heads and the key
   (cos, sin tables [positions, D / 2]), the key and value written to the row's own keys at index pos[b] - plen[b],
   then attend_task. Rows with pos[b] = plen[b] = 0 (idle) write index 0 and attend to their own key. Returns 0, or
   1 if a scratch line could not be allocated. */
int decode_layer_attention(const float *qkv, const float *cos, const float *sin,
                           const float *pk, const float *pv, int64_t ps, int64_t ph,
                           float *rk, float *rv, int64_t rs, int64_t rh,
                           const int64_t *prompt, const int64_t *plen, const int64_t *pos,
                           int64_t B, int64_t KVH, int64_t Tp, int64_t S, int64_t window, float scale, float *out,
                           int threads) {
    int failed = 0;
    const int64_t tasks = B * KVH, width = (KVH * G + 2 * KVH) * D;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *s = malloc(sizeof(float) * G * (Tp + S));
        if (s == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (s == NULL) continue;
            const int64_t b = t / KVH, h = t % KVH, i = pos[b] - plen[b];
            const int64_t t1 = t + 1 < tasks ? t + 1 : t, b1 = t1 / KVH, h1 = t1 % KVH;
            const float *pk_next = rk + b1 * rs + h1 * rh, *pv_next = rv + b1 * rs + h1 * rh;
            const int64_t pn = min64(pos[b1] - plen[b1] + 1, S) * D;
            const float *row = qkv + b * width, *c = cos + pos[b] * (D / 2), *sn = sin + pos[b] * (D / 2);
            float qt[G * D];
            memcpy(qt, row + h * G * D, sizeof qt);
            for (int g = 0; g < G; g++) rope(qt + g * D, c, sn);
            float *k = rk + b * rs + h * rh + i * D;
            memcpy(k, row + (KVH * G + h) * D, sizeof(float) * D);
            rope(k, c, sn);
            memcpy(rv + b * rs + h * rh + i * D, row + (KVH * G + KVH + h) * D, sizeof(float) * D);
            attend_task(qt, pk, pv, ps, ph, rk, rv, rs, rh, b, h, prompt[b], plen[b], pos[b], Tp, S, window, scale,
                        s, out + t * G * D, pk_next, pv_next, pn);
        }
        free(s);
    }
    return failed;
}

/* The prefill's attention, one layer: N prompt tokens in a flat batch (no padding), token n at position pos[n] of
   the prompt in prompt slot slot[n], every token of a prompt in the batch. qkv [N, (KVH * G + 2 KVH) * D] as in
   decode_layer_attention -> out [N, KVH * G * D]. First, for each token and KV head: RoPE on its G query heads
   (in place in qkv) and its key, the key and value written to the prompt slot at position pos[n]; then each
   token's queries attend over its prompt's keys 0 .. pos[n] (causal, within the window): attend_task with the
   prompt's keys as the only keys. model.py's prefill (apply_rope, KVCache.write, causal attention) up to float
   rounding. Returns 0, or 1 if a scratch line could not be allocated. */
int prefill_layer_attention(float *qkv, const float *cos, const float *sin, float *pk, float *pv, int64_t ps,
                            int64_t ph, const int64_t *slot, const int64_t *pos, int64_t N, int64_t KVH, int64_t Tp,
                            int64_t window, float scale, float *out, int threads) {
    int failed = 0;
    const int64_t tasks = N * KVH, width = (KVH * G + 2 * KVH) * D;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            const int64_t n = t / KVH, h = t % KVH;
            float *row = qkv + n * width;
            const float *c = cos + pos[n] * (D / 2), *sn = sin + pos[n] * (D / 2);
            for (int g = 0; g < G; g++) rope(row + (h * G + g) * D, c, sn);
            float *k = pk + slot[n] * ps + h * ph + pos[n] * D;
            memcpy(k, row + (KVH * G + h) * D, sizeof(float) * D);
            rope(k, c, sn);
            memcpy(pv + slot[n] * ps + h * ph + pos[n] * D, row + (KVH * G + KVH + h) * D, sizeof(float) * D);
        }  /* the loop's implicit barrier: every key is written before any query reads it */
        float *s = malloc(sizeof(float) * G * Tp);
        if (s == NULL) failed = 1;
#pragma omp for schedule(static, 4)
        for (int64_t t = 0; t < tasks; t++) {
            if (s == NULL) continue;
            const int64_t n = t / KVH, h = t % KVH;
            attend_task(qkv + n * width + h * G * D, pk, pv, ps, ph, pk, pv, 0, 0, 0, h, slot[n], pos[n] + 1, pos[n],
                        Tp, 0, window, scale, s, out + t * G * D, pk, pv, 0);
        }
        free(s);
    }
    return failed;
}

/* ---- the draw: sampler.nucleus (top-k off) and sampler.sample for one row each ---- */

/* the token id a sort key of sample_top_p holds in its low word */
static inline int64_t key_id(uint64_t key, int64_t V) { return V - 1 - (int64_t)(key & 0xFFFFFFFFu); }

/* key[0 .. n-1] in descending order, given in ascending token order: a stable LSD radix sort on the high word (the
   probability's bits), one byte a pass, a pass skipped where every key has the same byte; stability keeps equal
   probabilities in ascending token order, which is the low word's descending order: the full key's order.
   tmp: scratch for n keys. (The whole draw of a near-flat row of 398 tokens, where nearly all are sorted: 1.9-2.6 us
   a row with this sort, 10-18 us with qsort and a comparator; 256 rows, 2 threads, the 2-core AMD EPYC.) */
static void sort_descending(uint64_t *key, uint64_t *tmp, int64_t n) {
    uint64_t *src = key, *dst = tmp;
    for (int shift = 32; shift < 64; shift += 8) {
        int64_t count[256] = {0};
        for (int64_t i = 0; i < n; i++) count[255 - ((src[i] >> shift) & 0xFF)]++;
        if (n == 0 || count[255 - ((src[0] >> shift) & 0xFF)] == n) continue;
        for (int64_t d = 0, start = 0; d < 256; d++) {
            const int64_t c = count[d];
            count[d] = start;
            start += c;
        }
        for (int64_t i = 0; i < n; i++) dst[count[255 - ((src[i] >> shift) & 0xFF)]++] = src[i];
        uint64_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != key) memcpy(key, src, sizeof *key * (size_t)n);
}

/* logits [B, V] -> token[b]: softmax(logits / temperature), the top-p nucleus (tokens in descending probability,
   the lower id first among equal ones; a token kept iff the fp64 mass before it is < top_p), then the first kept
   token whose cumulative probability over the kept total exceeds u[b]. The nucleus is found among the tokens of
   probability >= t for t = 1/64, 1/1024, ... 0: all tokens above a value are the start of the full order, and the
   fp64 sums run in that order, so the first t whose candidates reach top_p gives the full ranking's kept set. lp
   (or NULL): the raw log-prob logits[token] - logsumexp(logits). Returns 0, or 1 if scratch could not be had. */
int sample_top_p(const float *logits, int64_t B, int64_t V, float temperature, double top_p, const double *u,
                 int64_t *token, float *lp, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed) if (B * V >= 16384)
    {
        float *p = malloc(sizeof(float) * V);
        uint64_t *key = malloc(sizeof(uint64_t) * V), *tmp = malloc(sizeof(uint64_t) * V);
        if (p == NULL || key == NULL || tmp == NULL) failed = 1;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < B; b++) {
            if (failed) continue;
            const float *x = logits + b * V;
            float top = x[0] / temperature, total = 0.0f;
            for (int64_t j = 0; j < V; j++) {
                p[j] = x[j] / temperature;
                top = p[j] > top ? p[j] : top;
            }
#pragma omp simd reduction(+ : total)
            for (int64_t j = 0; j < V; j++) {
                p[j] = exp_nonpositive(p[j] - top);
                total += p[j];
            }
            const float inv = 1.0f / total;
#pragma omp simd
            for (int64_t j = 0; j < V; j++) p[j] *= inv;
            int64_t n = 0, kept = 0;
            double mass = 0.0;  /* of the kept tokens, summed in nucleus order */
            for (float t = 1.0f / 64;; t = t > 1e-9f ? t / 16 : 0.0f) {
                n = 0;
                for (int64_t j = 0; j < V; j++) {
                    if (p[j] >= t) {  /* a float >= 0 orders like its bits; the low word puts lower ids first */
                        uint32_t bits;
                        memcpy(&bits, p + j, sizeof bits);
                        key[n++] = ((uint64_t)bits << 32) | (uint64_t)(V - 1 - j);
                    }
                }
                sort_descending(key, tmp, n);
                mass = 0.0;
                for (kept = 0; kept < n && mass < top_p; kept++) mass += p[key_id(key[kept], V)];
                if (mass >= top_p || t == 0.0f) break;
            }
            int64_t pick = kept - 1;
            double cum = 0.0;
            for (int64_t i = 0; i < kept; i++) {
                cum += p[key_id(key[i], V)];
                if (cum / mass > u[b]) {
                    pick = i;
                    break;
                }
            }
            const int64_t tok = key_id(key[pick], V);
            token[b] = tok;
            if (lp != NULL) {
                float raw_top = x[0], sum = 0.0f;
                for (int64_t j = 1; j < V; j++) raw_top = x[j] > raw_top ? x[j] : raw_top;
#pragma omp simd reduction(+ : sum)
                for (int64_t j = 0; j < V; j++) sum += exp_nonpositive(x[j] - raw_top);
                lp[b] = x[tok] - (raw_top + logf(sum));
            }
        }
        free(p);
        free(key);
        free(tmp);
    }
    return failed;
}
