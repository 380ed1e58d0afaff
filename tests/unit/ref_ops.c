/* ref_ops.c - the scalar oracle: the maths in plain loops, in double where it helps. */
#include "ref_ops.h"
#include "../../base/f16.h"
#include "../../engine/gguf.h"

#include <math.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

void ref_row(const eng_tensor_t *w, uint32_t r, float *dst) {
    const uint8_t *src = (const uint8_t *)w->data + (size_t)r * w->row_bytes;
    for (uint32_t i = 0; i < w->cols; i++) {
        uint16_t h;
        switch (w->type) {
        case GGML_F32:
            memcpy(&dst[i], src + 4 * i, 4);
            break;
        case GGML_F16:
            memcpy(&h, src + 2 * i, 2);
            dst[i] = eng_f16_to_f32(h);
            break;
        case GGML_BF16:
            memcpy(&h, src + 2 * i, 2);
            dst[i] = eng_bf16_to_f32(h);
            break;
        case GGML_Q8_0: {
            const uint8_t *b = src + (i / 32) * 34;
            memcpy(&h, b, 2);
            dst[i] = eng_f16_to_f32(h) * (float)(int8_t)b[2 + i % 32];
            break;
        }
        }
    }
}

/* What a quantized matmul multiplies its Q8_0 weights with: the input rounded to 8-bit codes
 * per 32 values, d = max|x| / 127 in f16, codes round-to-even of x * 127 / max|x|. */
static void ref_q8_activations(const float *x, float *out, uint32_t n) {
    for (uint32_t b = 0; b < n / 32; b++) {
        float amax = 0;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(x[b * 32 + i]));
        float d = eng_f16_to_f32(eng_f32_to_f16(amax / 127.0f));
        for (int i = 0; i < 32; i++)
            out[b * 32 + i] = amax == 0 ? 0 : d * nearbyintf(x[b * 32 + i] * (127.0f / amax));
    }
}

static void matmul(const eng_tensor_t *w, const float *x, float *y, uint32_t T, bool q8_inputs) {
    float *row = malloc(sizeof(float) * w->cols), *xq = malloc(sizeof(float) * w->cols);
    for (uint32_t r = 0; r < w->rows; r++) {
        ref_row(w, r, row);
        for (uint32_t t = 0; t < T; t++) {
            const float *xt = x + (size_t)t * w->cols;
            if (q8_inputs && w->type == GGML_Q8_0) {
                ref_q8_activations(xt, xq, w->cols);
                xt = xq;
            }
            double s = 0;
            for (uint32_t i = 0; i < w->cols; i++) s += (double)row[i] * xt[i];
            y[(size_t)t * w->rows + r] = (float)s;
        }
    }
    free(row);
    free(xq);
}

void ref_matmul(const eng_tensor_t *w, const float *x, float *y, uint32_t T) {
    matmul(w, x, y, T, true);
}

void ref_matmul_float(const eng_tensor_t *w, const float *x, float *y, uint32_t T) {
    matmul(w, x, y, T, false);
}

void ref_rmsnorm(const float *x, const float *w, float *out, uint32_t T, uint32_t n, float eps) {
    for (uint32_t t = 0; t < T; t++) {
        double ss = 0;
        for (uint32_t i = 0; i < n; i++) ss += (double)x[t * n + i] * x[t * n + i];
        double scale = 1.0 / sqrt(ss / n + eps);
        for (uint32_t i = 0; i < n; i++) out[t * n + i] = (float)(x[t * n + i] * scale * w[i]);
    }
}

void ref_rope(float *x, const uint32_t *pos, uint32_t T, uint32_t n_heads, uint32_t hd,
              const eng_rope_t *r) {
    uint32_t half = r->n_rot / 2;
    for (uint32_t t = 0; t < T; t++)
        for (uint32_t h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)t * n_heads + h) * hd;
            for (uint32_t i = 0; i < half; i++) {
                double theta = pos[t] * pow(r->base, -2.0 * i / r->n_rot);
                if (r->freq_factors) theta /= r->freq_factors[i];
                theta *= r->freq_scale;
                uint32_t ia = r->neox ? i : 2 * i, ib = r->neox ? i + half : 2 * i + 1;
                double a = v[ia], b = v[ib];
                v[ia] = (float)(a * cos(theta) - b * sin(theta));
                v[ib] = (float)(a * sin(theta) + b * cos(theta));
            }
        }
}

void ref_attention(const eng_attn_shape_t *sh, const float *q, const float *k, const float *v,
                   uint32_t pos, float *out) {
    uint32_t hd = sh->head_dim, kvd = sh->n_head_kv * hd, group = sh->n_head / sh->n_head_kv;
    double *s = malloc(sizeof(double) * (pos + 1));
    uint32_t lo = sh->window && pos + 1 > sh->window ? pos + 1 - sh->window : 0;
    for (uint32_t h = 0; h < sh->n_head; h++) {
        uint32_t kvh = h / group;
        double mx = -INFINITY, sum = 0;
        for (uint32_t p = 0; p < lo; p++) s[p] = -INFINITY; /* outside the window */
        for (uint32_t p = lo; p <= pos; p++) {
            double d = 0;
            for (uint32_t i = 0; i < hd; i++)
                d += (double)q[h * hd + i] * k[p * kvd + kvh * hd + i];
            s[p] = d * sh->scale;
            if (s[p] > mx) mx = s[p];
        }
        for (uint32_t p = 0; p <= pos; p++) sum += s[p] = exp(s[p] - mx);
        for (uint32_t i = 0; i < hd; i++) {
            double o = 0;
            for (uint32_t p = 0; p <= pos; p++) o += s[p] / sum * v[p * kvd + kvh * hd + i];
            out[h * hd + i] = (float)o;
        }
    }
    free(s);
}

void ref_swiglu(float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) g[i] = (float)(g[i] / (1.0 + exp(-(double)g[i])) * u[i]);
}

void ref_geglu(float *g, const float *u, size_t n) {
    for (size_t i = 0; i < n; i++) {
        double x = g[i], y;
        if (x <= -10)
            y = 0;
        else if (x >= 10)
            y = x;
        else {
            /* the F16 table's argument, and GELU in float as ggml evaluates it: near x = -3
             * 1 + tanh cancels, so a double evaluation rounds to another F16 value */
            float h = eng_f16_to_f32(eng_f32_to_f16((float)x));
            float e = 0.5f * h * (1.0f + tanhf(0.7978845608f * h * (1.0f + 0.044715f * h * h)));
            y = eng_f16_to_f32(eng_f32_to_f16(e));
        }
        g[i] = (float)(y * u[i]);
    }
}

void ref_attention_subset(const eng_attn_shape_t *sh, uint32_t h, const float *q, const float *k,
                          const float *v, const uint32_t *pos, uint32_t n, uint32_t n_sinks,
                          float *out, double *entropy_bits, double *sink_mass, double *probs) {
    uint32_t hd = sh->head_dim, kvd = sh->n_head_kv * hd, kvh = h / (sh->n_head / sh->n_head_kv);
    double *s = malloc(sizeof(double) * n), mx = -INFINITY, z = 0;
    for (uint32_t i = 0; i < n; i++) {
        double d = 0;
        for (uint32_t x = 0; x < hd; x++)
            d += (double)q[x] * k[(size_t)pos[i] * kvd + kvh * hd + x];
        s[i] = d * sh->scale;
        mx = s[i] > mx ? s[i] : mx;
    }
    for (uint32_t i = 0; i < n; i++) z += s[i] = exp(s[i] - mx);
    *entropy_bits = 0;
    *sink_mass = 0;
    for (uint32_t x = 0; x < hd; x++) out[x] = 0;
    for (uint32_t i = 0; i < n; i++) {
        double p = s[i] / z;
        if (probs) probs[i] = p;
        if (p > 0) *entropy_bits -= p * log2(p);
        if (pos[i] < n_sinks) *sink_mass += p;
        for (uint32_t x = 0; x < hd; x++)
            out[x] += (float)(p * v[(size_t)pos[i] * kvd + kvh * hd + x]);
    }
    free(s);
}
