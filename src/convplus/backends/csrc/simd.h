// The SIMD layer of the CPU kernels: vector-aligned buffers, a vector type of whole 32-byte registers (GCC vector
// extensions), unaligned loads and stores, horizontal sums and e^x for a vector.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace convplus::detail {
// The kernel's headers keep their code in an anonymous namespace: each .cpp file gets its own copy, and with
// internal linkage GCC inlines these hot helpers into the passes as it does a .cpp file's own static functions
// (external linkage changes its inlining decisions and so the generated code).
namespace {

// Rows are laid out in whole 32-byte vectors (8 floats), not 64: rows of 7, 14, 28 and 56 columns then waste at most
// one lane in eight. The products over a row run on the widest vectors the CPU has (64 bytes with AVX-512) over
// the whole number of them that the row holds, and on 32-byte vectors over the rest (register_tiles.h).
constexpr int64_t kVectorBytes = 32;
#if defined(__AVX512F__)
constexpr int64_t kWideVectorBytes = 64;
// Every lane of a vector of 8 and of 16 lanes. The AVX-512 operations below take the zero-masked forms of their
// intrinsics with these: the same instructions as the unmasked forms, whose "undefined" pass-through operand GCC 12
// reports as maybe uninitialized at every use (two thousand lines of warnings in a build).
constexpr __mmask8 kAllLanes8 = 0xFF;
constexpr __mmask16 kAllLanes16 = 0xFFFF;
#else
constexpr int64_t kWideVectorBytes = kVectorBytes;
#endif

// Allocates on vector boundaries.
template <typename T>
struct VectorAligned {
  using value_type = T;
  VectorAligned() = default;
  template <typename U>
  VectorAligned(const VectorAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kVectorBytes))); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(kVectorBytes)); }
  template <typename U>
  bool operator==(const VectorAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const VectorAligned<U>&) const { return false; }
};

template <typename T>
using Buffer = std::vector<T, VectorAligned<T>>;

// A vector of `bytes` bytes of T: the row layout's 32 bytes unless said otherwise.
template <typename T, int64_t bytes = kVectorBytes>
struct Simd {
  typedef T vec __attribute__((vector_size(bytes)));
  static constexpr int64_t width = bytes / sizeof(T);
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

// The first n <= width entries at p, zeros in the other lanes (nothing past p + n is read).
template <typename V, typename T>
inline V load_first(const T* p, int64_t n) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  if (n >= L) return load<V>(p);
#if defined(__AVX512F__) && defined(__AVX512VL__)
  if constexpr (sizeof(T) == 4 && sizeof(V) == 32) return (V)_mm256_maskz_loadu_ps((__mmask8)((1u << n) - 1), p);
  if constexpr (sizeof(T) == 4 && sizeof(V) == 64) return (V)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
#endif
  V v{};
  for (int64_t i = 0; i < n; ++i) v[i] = p[i];
  return v;
}

#if defined(__AVX512F__) && defined(__AVX512VL__)
// Shifting lanes across vectors, for float vectors of 8 or 16 lanes (AVX-512's lane rotates; none without them).
constexpr bool kHasLaneShifts = true;

// The last n < width entries of the vector at p in its last n lanes, zeros in the others (nothing before p + width
// - n is read).
template <typename V>
inline V load_last(const float* p, int64_t n) {
  constexpr int64_t L = sizeof(V) / sizeof(float);
  if constexpr (L == 8) return (V)_mm256_maskz_loadu_ps((__mmask8)(0xffu << (L - n)), p);
  if constexpr (L == 16) return (V)_mm512_maskz_loadu_ps((__mmask16)(0xffffu << (L - n)), p);
}

// The width floats from lane k of `at` on, -width < k < width: lanes of `below` (the vector before `at`) for
// k < 0, of `above` (the vector after it) for k > 0.
template <int k, typename V>
inline V lanes_from(V below, V at, V above) {
  constexpr int L = sizeof(V) / sizeof(float);
  static_assert(-L < k && k < L);
  if constexpr (k == 0) return at;
  if constexpr (L == 8) {  // the zero-masked forms with every lane selected: see kAllLanes8
    if constexpr (k < 0) return (V)_mm256_maskz_alignr_epi32(kAllLanes8, (__m256i)at, (__m256i)below, L + k);
    if constexpr (k > 0) return (V)_mm256_maskz_alignr_epi32(kAllLanes8, (__m256i)above, (__m256i)at, k);
  }
  if constexpr (L == 16) {
    if constexpr (k < 0) return (V)_mm512_maskz_alignr_epi32(kAllLanes16, (__m512i)at, (__m512i)below, L + k);
    if constexpr (k > 0) return (V)_mm512_maskz_alignr_epi32(kAllLanes16, (__m512i)above, (__m512i)at, k);
  }
}
#else
constexpr bool kHasLaneShifts = false;
#endif

template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// The square root of each lane (correctly rounded, as std::sqrt).
template <typename V, typename T>
inline V sqrt_vec(V v) {
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32 && sizeof(T) == 4) return (V)_mm256_sqrt_ps((__m256)v);
  if constexpr (sizeof(V) == 32 && sizeof(T) == 8) return (V)_mm256_sqrt_pd((__m256d)v);
#endif
#if defined(__AVX512F__)  // the zero-masked forms with every lane selected: see kAllLanes8
  if constexpr (sizeof(V) == 64 && sizeof(T) == 4) return (V)_mm512_maskz_sqrt_ps(kAllLanes16, (__m512)v);
  if constexpr (sizeof(V) == 64 && sizeof(T) == 8) return (V)_mm512_maskz_sqrt_pd(kAllLanes8, (__m512d)v);
#endif
  for (int64_t j = 0; j < static_cast<int64_t>(sizeof(V) / sizeof(T)); ++j) v[j] = std::sqrt(v[j]);
  return v;
}

template <typename V, typename T>
inline T horizontal_sum(const V& v) {
  T s = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(sizeof(V) / sizeof(T)); ++j) s += v[j];
  return s;
}

// The lanes of v summed onto a narrower vector N: the sum of v's consecutive parts of N's size (v itself when
// they are the same size).
template <typename N, typename V>
inline N fold(const V& v) {
  if constexpr (sizeof(N) == sizeof(V)) return v;
  N sum{};
  for (size_t i = 0; i < sizeof(V) / sizeof(N); ++i) sum += load<N>(reinterpret_cast<const char*>(&v) + i * sizeof(N));
  return sum;
}

// e^x for a vector: x = n ln2 + r with |r| <= ln2 / 2, e^r by its Taylor polynomial (degree 7 for float,
// 12 for double: below one ulp of error from the truncation), times 2^n. Exactly 0 for x = -inf (masked scores)
// and below the smallest normal result; NaN stays NaN.
template <typename T>
struct ExpConstants {
  static constexpr int degree = sizeof(T) == 4 ? 7 : 12;
  static constexpr T lo = sizeof(T) == 4 ? T(-87.0) : T(-708.0), hi = sizeof(T) == 4 ? T(88.0) : T(709.0);
  static constexpr T log2e = T(1.4426950408889634), ln2_hi = T(0.693145751953125),
                     ln2_lo = T(1.42860682030941723212e-6);
  // 1 / i! for i = 0 .. degree
  static constexpr std::array<T, degree + 1> taylor() {
    std::array<T, degree + 1> c{};
    c[0] = T(1);
    for (int i = 1; i <= degree; ++i) c[i] = c[i - 1] / i;
    return c;
  }
};

#if defined(__AVX512F__) && defined(__AVX512VL__)
// The AVX-512 instructions of exp_avx512, for 8 and 16 floats.
inline __m256 round_nearest(__m256 x) { return _mm256_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m512 round_nearest(__m512 x) {
  return _mm512_maskz_roundscale_ps(kAllLanes16, x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m256 fused_multiply_add(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m512 fused_multiply_add(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline __m256 scale_by_power_of_two(__m256 x, __m256 n) { return _mm256_scalef_ps(x, n); }
inline __m512 scale_by_power_of_two(__m512 x, __m512 n) { return _mm512_maskz_scalef_ps(kAllLanes16, x, n); }
inline __m256 zero_where_below(__m256 x, __m256 lo, __m256 y) {
  return _mm256_maskz_mov_ps(_mm256_cmp_ps_mask(x, lo, _CMP_NLT_UQ), y);
}
inline __m512 zero_where_below(__m512 x, __m512 lo, __m512 y) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), y);
}

// The same with AVX-512's rounding and 2^n scaling instructions, for a vector M of 8 or 16 floats. in_range: every
// lane is known to lie in [lo, hi] or be NaN, so the clamp and the zeroing below lo, which would change nothing, are
// left out.
template <bool in_range, typename M>
inline M exp_avx512(M x) {
  using E = ExpConstants<float>;
  constexpr std::array<float, E::degree + 1> c = E::taylor();
  const auto splat = [](float value) { return M{} + value; };
  const M lo = splat(E::lo);
  M xc = x;
  if constexpr (!in_range) xc = x < lo ? lo : (x > E::hi ? splat(E::hi) : x);  // NaN: kept
  const M n = round_nearest(xc * E::log2e);
  const M r = fused_multiply_add(n, splat(-E::ln2_lo), fused_multiply_add(n, splat(-E::ln2_hi), xc));
  M poly = splat(c[E::degree]);
  for (int i = E::degree - 1; i >= 0; --i) poly = fused_multiply_add(poly, r, splat(c[i]));
  if constexpr (in_range) return scale_by_power_of_two(poly, n);
  return zero_where_below(x, lo, scale_by_power_of_two(poly, n));
}
#endif

// in_range: every lane of x lies in [ExpConstants<T>::lo, hi] or is NaN (a promise that lets a fast path skip
// the clamping; the result is the same).
template <typename V, typename T, bool in_range = false>
inline V exp_vec(V x) {
#if defined(__AVX512F__) && defined(__AVX512VL__)
  if constexpr (sizeof(T) == 4 && sizeof(V) == sizeof(__m256)) return (V)exp_avx512<in_range>((__m256)x);
  if constexpr (sizeof(T) == 4 && sizeof(V) == sizeof(__m512)) return (V)exp_avx512<in_range>((__m512)x);
#endif
  using E = ExpConstants<T>;
  using I = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef I ivec __attribute__((vector_size(sizeof(V))));
  constexpr int mantissa = sizeof(T) == 4 ? 23 : 52;
  constexpr I bias = sizeof(T) == 4 ? 127 : 1023;
  constexpr std::array<T, E::degree + 1> c = E::taylor();
  const V xc = x < E::lo ? V{} + E::lo : (x > E::hi ? V{} + E::hi : x);
  const V y = xc * E::log2e;
  const ivec n = __builtin_convertvector(y < T(0) ? y - T(0.5) : y + T(0.5), ivec);
  const V nf = __builtin_convertvector(n, V);
  const V r = (xc - nf * E::ln2_hi) - nf * E::ln2_lo;
  V poly = V{} + c[E::degree];
  for (int i = E::degree - 1; i >= 0; --i) poly = poly * r + c[i];
  const V scale = (V)((n + bias) << mantissa);
  return x < E::lo ? V{} : poly * scale;
}

}  // namespace
}  // namespace convplus::detail
