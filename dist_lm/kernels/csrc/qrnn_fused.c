/* The fused QRNN step on CPU (kernels/qrnn_fused_cpu.py calls it): gate nonlinearities,
   zoneout mask, recurrence and output gate in one pass over T per lane, forward and backward. */
#include <stdint.h>

#include "exp_gate.h"

/* Rows b0..b1-1 and columns j0..j1-1 of y: [T, B, 3H] pre-activations (z | f | o) -> c, h:
   [T, B, H]. mask: [T, B, H] bytes (0/1) or 0. z = tanh, f = sigmoid * scale * mask,
   o = sigmoid; c_t = c_{t-1} + f (z - c_{t-1}), h_t = o c_t. One loop per mask/no-mask case
   (the macros), so that each is a plain vectorisable loop. */
#define FWD_LANES(KEEP)                                                   \
    _Pragma("GCC ivdep") /* the rows never overlap (restrict on locals is not enough) */ \
    for (int64_t j = j0; j < j1; j++) {                                   \
        float z = tanh_gate(yz[j]);                                       \
        float f = sigmoid_gate(yf[j]) * (KEEP);                           \
        float p = cp[j], cn = p + f * (z - p);                            \
        ct[j] = cn;                                                       \
        ht[j] = sigmoid_gate(yo[j]) * cn;                                 \
    }

void qrnn_fwd(const float *y, const float *c0, const uint8_t *mask, float scale, float *c,
              float *h, int64_t T, int64_t B, int64_t H, int64_t b0, int64_t b1, int64_t j0,
              int64_t j1)
{
    for (int64_t bi = b0; bi < b1; bi++) {
        const float *prev = c0 + bi * H;
        for (int64_t t = 0; t < T; t++) {
            const int64_t row = (t * B + bi) * H;
            const float *restrict yz = y + 3 * row;
            const float *restrict yf = yz + H;
            const float *restrict yo = yz + 2 * H;
            const float *restrict cp = prev;
            float *restrict ct = c + row;
            float *restrict ht = h + row;
            if (mask) {
                const uint8_t *restrict m = mask + row;
                FWD_LANES(scale * (float)m[j])
            } else {
                FWD_LANES(scale)
            }
            prev = ct;
        }
    }
}

/* Backward of qrnn_fwd, the gates recomputed from y: gh = dL/dh [T, B, H]; gc = dL/dc_{T-1}
   [B, H] (the gradient of the carry the forward hands on) or 0; dy [T, B, 3H] receives dL/dy;
   dc0 [B, H] holds the reverse carry (starting at gc) and ends as dL/dc0.
   f = sigmoid(y_f) * keep with keep = scale * mask: df/dy_f = keep sf (1 - sf). */
#define BWD_LANES(KEEP)                                                   \
    _Pragma("GCC ivdep")                                                  \
    for (int64_t j = j0; j < j1; j++) {                                   \
        float z = tanh_gate(yz[j]), sf = sigmoid_gate(yf[j]);             \
        float o = sigmoid_gate(yo[j]), keep = (KEEP), f = sf * keep;      \
        float ghj = g_h[j], g = ghj * o + carry[j], gz = g * f;           \
        d_o[j] = ghj * ct[j] * o * (1.0f - o);                            \
        dz[j] = gz * (1.0f - z * z);                                      \
        df[j] = g * (z - cp[j]) * keep * sf * (1.0f - sf);                \
        carry[j] = g - gz;                                                \
    }

void qrnn_bwd(const float *y, const float *c0, const uint8_t *mask, const float *c,
              const float *gh, const float *gc, float scale, float *dy, float *dc0,
              int64_t T, int64_t B, int64_t H, int64_t b0, int64_t b1, int64_t j0, int64_t j1)
{
    for (int64_t bi = b0; bi < b1; bi++) {
        float *restrict carry = dc0 + bi * H;
        for (int64_t j = j0; j < j1; j++) carry[j] = gc ? gc[bi * H + j] : 0.0f;
        for (int64_t t = T - 1; t >= 0; t--) {
            const int64_t row = (t * B + bi) * H;
            const float *restrict yz = y + 3 * row;
            const float *restrict yf = yz + H;
            const float *restrict yo = yz + 2 * H;
            const float *restrict ct = c + row;
            const float *restrict cp = t > 0 ? c + row - B * H : c0 + bi * H;
            const float *restrict g_h = gh + row;
            const uint8_t *restrict m = mask ? mask + row : 0;
            float *restrict dz = dy + 3 * row;
            float *restrict df = dz + H;
            float *restrict d_o = dz + 2 * H;
            if (m) {
                BWD_LANES(scale * (float)m[j])
            } else {
                BWD_LANES(scale)
            }
        }
    }
}
