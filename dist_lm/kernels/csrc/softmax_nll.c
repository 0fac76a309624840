/* The softmax loss on CPU (kernels/softmax_nll_cpu.py calls it): per-row negative
   log-likelihood and log-sum-exp forward, the logits' gradient backward. */
#include <stdint.h>
#include <math.h>

#include "exp_gate.h"

/* The softmax loss over rows r0..r1-1 of logits x [N, V]: lse[i] = log sum_j exp(x_ij) and
   nll[i] = lse[i] - x[i, t_i] (forward, one read of each row: max, then the sum of exp in a
   second pass that finds the row in cache); g_x = (exp(x - lse) - [j = t_i]) g_i (backward,
   one read and one write). */
void softmax_nll_fwd(const float *x, const int64_t *t, float *lse, float *nll, int64_t V,
                     int64_t r0, int64_t r1)
{
    for (int64_t i = r0; i < r1; i++) {
        const float *restrict row = x + i * V;
        /* 16 partial maxima and sums, so that gcc vectorises both reductions (a single
           accumulator would pin the order of the float operations) */
        float mx[16], acc[16];
        for (int l = 0; l < 16; l++) mx[l] = row[0];
        int64_t j = 0;
        for (; j + 16 <= V; j += 16)
            for (int l = 0; l < 16; l++) mx[l] = row[j + l] > mx[l] ? row[j + l] : mx[l];
        float m = row[0];
        for (int l = 0; l < 16; l++) m = mx[l] > m ? mx[l] : m;
        for (; j < V; j++) m = row[j] > m ? row[j] : m;
        for (int l = 0; l < 16; l++) acc[l] = 0.0f;
        for (j = 0; j + 16 <= V; j += 16)
            for (int l = 0; l < 16; l++) acc[l] += exp_gate(row[j + l] - m);
        float sum = 0.0f;
        for (; j < V; j++) sum += exp_gate(row[j] - m);
        for (int l = 0; l < 16; l++) sum += acc[l];
        lse[i] = m + logf(sum);
        nll[i] = lse[i] - row[t[i]];
    }
}

void softmax_nll_bwd(const float *x, const int64_t *t, const float *lse, const float *g,
                     float *gx, int64_t V, int64_t r0, int64_t r1)
{
    for (int64_t i = r0; i < r1; i++) {
        const float *restrict row = x + i * V;
        float *restrict out = gx + i * V;
        const float l = lse[i], gi = g[i];
        for (int64_t j = 0; j < V; j++) out[j] = exp_gate(row[j] - l) * gi;
        out[t[i]] -= gi;
    }
}
