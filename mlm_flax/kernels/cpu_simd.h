// AVX-512 helpers shared by the CPU kernels (`onednn_attention.cc`, `cpu_glu.cc`): tail masks, exp, erfc and
// rounding to bf16 (nearest even, as XLA's convert).
#ifndef MLM_FLAX_CPU_SIMD_H_
#define MLM_FLAX_CPU_SIMD_H_

#include <immintrin.h>

#include <cstdint>

namespace mlm_flax {

__attribute__((target("avx512f"))) inline __mmask16 Tail(int64_t n, int64_t j) {
  return n - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - j)) - 1);
}

// exp(x) for x <= 0 (softmax): x = n ln2 + r, Cephes' degree-6 polynomial for exp(r), 2^n by scalef; 0 below
// -87.3 (where the exact value is a denormal; masked scores sit at the lowest f32).
__attribute__((target("avx512f"))) inline __m512 Exp(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.33f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.33f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

// 16 lanes of x to bf16 (round to nearest even: XLA's convert) at y, under mask m.
__attribute__((target("avx512f,avx512bf16,avx512vl,avx512bw"))) inline void StoreBf16(uint16_t* y, __mmask16 m,
                                                                                        __m512 x) {
  _mm256_mask_storeu_epi16(y, m, (__m256i)_mm512_cvtneps_pbh(x));
}

// `n` values f32 -> bf16.
__attribute__((target("avx512f,avx512bf16,avx512vl,avx512bw"))) inline void ToBf16(const float* x, uint16_t* y,
                                                                                     int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = Tail(n, j);
    StoreBf16(y + j, m, _mm512_maskz_loadu_ps(m, x + j));
  }
}

// Horner's rule: c[0] x^(n-1) + ... + c[n-1].
template <int n>
__attribute__((target("avx512f"))) inline __m512 Poly(__m512 x, const float (&c)[n]) {
  __m512 p = _mm512_set1_ps(c[0]);
  for (int i = 1; i < n; ++i) p = _mm512_fmadd_ps(p, x, _mm512_set1_ps(c[i]));
  return p;
}

// erfc(z) as XLA computes it (CHLO's expansion of Cephes' erfcf): 1 - z T(z^2) for |z| < 1, else
// exp(-z^2) / |z| P(1 / z^2) (P's coefficients for |z| < 2, R's beyond), reflected (2 - that) for z < 0. Exact
// in the tail where 1 + erf(-z) cancels: gelu's 0.5 x erfc(-x / sqrt 2) for very negative x.
__attribute__((target("avx512f"))) inline __m512 Erfc(__m512 z) {
  static constexpr float kT[] = {7.853861353153693e-5f, -8.010193625184903e-4f, 5.188327685732524e-3f,
                                 -2.685381193529856e-2f, 1.128358514861418e-1f, -3.761262582423300e-1f,
                                 1.128379165726710e+0f};
  static constexpr float kP[] = {2.326819970068386e-2f, -1.387039388740657e-1f, 3.687424674597105e-1f,
                                 -5.824733027278666e-1f, 6.210004621745983e-1f, -4.944515323274145e-1f,
                                 3.404879937665872e-1f, -2.741127028184656e-1f, 5.638259427386472e-1f};
  static constexpr float kR[] = {-1.047766399936249e+1f, 1.297719955372516e+1f, -7.495518717768503e+0f,
                                 2.921019019210786e+0f, -1.015265279202700e+0f, 4.218463358204948e-1f,
                                 -2.820767439740514e-1f, 5.641895067754075e-1f};
  const __m512 one = _mm512_set1_ps(1.0f), az = _mm512_abs_ps(z), z2 = _mm512_mul_ps(z, z);
  const __m512 near = _mm512_fnmadd_ps(z, Poly(z2, kT), one);  // 1 - z T(z^2)
  const __m512 q = _mm512_div_ps(one, az), y = _mm512_div_ps(one, z2);
  const __mmask16 below2 = _mm512_cmp_ps_mask(az, _mm512_set1_ps(2.0f), _CMP_LT_OQ);
  const __m512 p = _mm512_mask_blend_ps(below2, Poly(y, kR), Poly(y, kP));
  __m512 far = _mm512_mul_ps(_mm512_mul_ps(Exp(_mm512_sub_ps(_mm512_setzero_ps(), z2)), q), p);
  far = _mm512_mask_sub_ps(far, _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_set1_ps(2.0f), far);
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(az, one, _CMP_LT_OQ), far, near);
}

}  // namespace mlm_flax

#endif  // MLM_FLAX_CPU_SIMD_H_
