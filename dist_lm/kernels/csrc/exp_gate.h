/* exp, sigmoid and tanh for the CPU kernels' inner loops (qrnn_fused.c, softmax_nll.c):
   within a few ulp of torch's, and vectorisable by gcc. */
#ifndef DIST_LM_EXP_GATE_H
#define DIST_LM_EXP_GATE_H

#include <stdint.h>
#include <string.h>
#include <math.h>

/* exp(x) for the gates, written so that gcc vectorises the loops that call it (libm's expf
   does not vectorise without -ffast-math): x = n ln2 + r, |r| <= ln2/2, e^r by a degree-7
   Taylor polynomial (relative error < 1e-8 before rounding, about 2 ulp in all), times 2^n
   assembled in the exponent bits. x is clamped to [-87, 87]: 2^n stays a normal float. */
static inline float exp_gate(float x)
{
    x = x < -87.0f ? -87.0f : (x > 87.0f ? 87.0f : x);  /* fminf/fmaxf do not vectorise */
    float n = floorf(x * 1.44269504f + 0.5f);
    float r = x - n * 0.693145752f - n * 1.42860677e-6f;  /* ln2 split in two for exactness */
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.66666667e-1f + r * (4.16666667e-2f
              + r * (8.33333333e-3f + r * (1.38888889e-3f + r * 1.98412698e-4f))))));
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid_gate(float x) { return 1.0f / (1.0f + exp_gate(-x)); }
static inline float tanh_gate(float x) { return 2.0f * sigmoid_gate(2.0f * x) - 1.0f; }

#endif
