// The windowed Conv+ mixing step on CPU, forward and backward, with the attention term and the depthwise
// convolution term fused in one pass over the window:
//
//   z[d, i] = sum_w (g * P[w, i] + r[d, w]) * v[d, i + o_w],   P[., i] = softmax_w(<q[:, i], k[:, i + o_w]>)
//
// (offsets o_w whose key leaves the grid are excluded from the softmax; the convolution term sees zeros there).
// With the 'direct' score the keys and queries are computed in the same pass from the features f instead of read:
// k = unit(f + pos) over each head's channels (as direct_score.cpp computes it), q = tau_h * k.
//
// Layout: q, k (B*K, Dq, T, H, X), v (B*K, D, T, H, X), contiguous, channels first; 1-d and 2-d grids are padded
// to 3 spatial dims with size 1. gain (K,); kernel (K, D, P) flattened, or empty for no convolution term, and
// tap_index (W,): the kernel entry at each window offset (-1: none), giving the taps r (K, D, W);
// offsets (W, 3) int64, row-major over (t, y, x); bias (K, D) or empty, added to z. Head of slice bk is bk % K.
//
// Every inner loop runs over x in register tiles of whole SIMD vectors. The rows a query row needs are copied
// into per-thread buffers with a zero halo of max|o_x| on each side and zero columns up to a whole number of
// vectors, so the tiles never test a bound: out-of-grid keys read zeros (and get -inf scores). Buffers and
// their rows start on a vector boundary (the left halo is widened to a whole vector), so the unshifted operand
// of every product is an aligned load.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <new>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace convplus {
namespace {

constexpr int64_t kVectorBytes = 64;

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

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(kVectorBytes)));
  static constexpr int64_t width = kVectorBytes / sizeof(T);
};

template <typename V, typename T>
inline V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

template <typename V, typename T>
inline T horizontal_sum(const V& v) {
  T s = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(sizeof(V) / sizeof(T)); ++j) s += v[j];
  return s;
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

#if defined(__AVX512F__)
// The same with AVX-512's rounding and 2^n scaling instructions, for 16 floats.
inline __m512 exp_avx512(__m512 x) {
  using E = ExpConstants<float>;
  constexpr std::array<float, E::degree + 1> c = E::taylor();
  const __m512 lo = _mm512_set1_ps(E::lo);
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(E::hi), _mm512_max_ps(lo, x));  // NaN: the second operand
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(E::log2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r =
      _mm512_fnmadd_ps(n, _mm512_set1_ps(E::ln2_lo), _mm512_fnmadd_ps(n, _mm512_set1_ps(E::ln2_hi), xc));
  __m512 poly = _mm512_set1_ps(c[E::degree]);
  for (int i = E::degree - 1; i >= 0; --i) poly = _mm512_fmadd_ps(poly, r, _mm512_set1_ps(c[i]));
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), _mm512_scalef_ps(poly, n));
}
#endif

template <typename V, typename T>
inline V exp_vec(V x) {
#if defined(__AVX512F__)
  if constexpr (sizeof(T) == 4 && sizeof(V) == sizeof(__m512)) return (V)exp_avx512((__m512)x);
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

// Sizes, the window's offsets, and the distinct (t, y) row offsets they use.
struct Geometry {
  int64_t BK, K, Dq, D, T, H, X, N;
  int64_t W, halo, lead, Xr, Xp;  // offsets; max |o_x|; halo, X rounded up to whole vectors; lead + Xr + lead
  std::vector<int64_t> ox, row;  // per offset: x offset, index of its (t, y) row offset
  std::vector<int64_t> rt, ry;   // distinct (t, y) row offsets
  std::vector<std::vector<int64_t>> by_row;  // per distinct row offset: the offsets w that use it
  int64_t span_t, span_y;        // rows from the lowest to the highest row offset, per dim
  int64_t center_row = -1;       // the row offset (0, 0): the query's own row

  Geometry(const torch::Tensor& q, const torch::Tensor& v, const torch::Tensor& offsets, int64_t heads,
           int64_t width)
      : BK(q.size(0)), K(heads), Dq(q.size(1)), D(v.size(1)), T(q.size(2)), H(q.size(3)), X(q.size(4)),
        N(T * H * X), W(offsets.size(0)), halo(0) {
    const auto off = offsets.accessor<int64_t, 2>();
    for (int64_t w = 0; w < W; ++w) {
      halo = std::max(halo, std::abs(off[w][2]));
      ox.push_back(off[w][2]);
      int64_t r = 0;
      while (r < static_cast<int64_t>(rt.size()) && !(rt[r] == off[w][0] && ry[r] == off[w][1])) ++r;
      if (r == static_cast<int64_t>(rt.size())) {
        rt.push_back(off[w][0]);
        ry.push_back(off[w][1]);
        by_row.emplace_back();
      }
      row.push_back(r);
      by_row[r].push_back(w);
    }
    for (int64_t r = 0; r < rows(); ++r)
      if (rt[r] == 0 && ry[r] == 0) center_row = r;
    TORCH_CHECK(center_row >= 0, "the window offsets must include the query's own row");
    span_t = *std::max_element(rt.begin(), rt.end()) - *std::min_element(rt.begin(), rt.end()) + 1;
    span_y = *std::max_element(ry.begin(), ry.end()) - *std::min_element(ry.begin(), ry.end()) + 1;
    lead = (halo + width - 1) / width * width;
    Xr = (X + width - 1) / width * width;
    Xp = lead + Xr + lead;
  }

  int64_t rows() const { return static_cast<int64_t>(rt.size()); }
  bool row_in_grid(int64_t t, int64_t y) const { return t >= 0 && t < T && y >= 0 && y < H; }
};

// Copies row (t, y) of src (BK, C, T, H, X) at slice bk into buf (C, Xp) at column lead; the caller zeroes buf
// once, so the columns outside stay zero.
template <typename T>
void gather_row(const T* src, int64_t C, const Geometry& g, int64_t bk, int64_t t, int64_t y, T* buf) {
  for (int64_t c = 0; c < C; ++c)
    std::memcpy(buf + c * g.Xp + g.lead, src + ((bk * C + c) * g.T + t) * g.H * g.X + y * g.X, g.X * sizeof(T));
}

// In place on the row (t, y) of slice bk that gather_row copied into buf (C, Xp): the 'direct' score's keys
// k = x^ / max(||x^||, 1e-12) over the C channels at every column, x^ = x + pos (pos (K, C, T, H, X), or null),
// in the order of operations of direct_score.cpp. norm: scratch of X values.
template <typename T>
void unit_row(T* buf, const T* pos, int64_t C, const Geometry& g, int64_t bk, int64_t t, int64_t y, T* norm) {
  std::fill(norm, norm + g.X, T(0));
  for (int64_t c = 0; c < C; ++c) {
    T* __restrict__ row = buf + c * g.Xp + g.lead;
    if (pos) {
      const T* __restrict__ pr = pos + ((bk % g.K * C + c) * g.T + t) * g.H * g.X + y * g.X;
      for (int64_t x = 0; x < g.X; ++x) row[x] += pr[x];
    }
    for (int64_t x = 0; x < g.X; ++x) norm[x] += row[x] * row[x];
  }
  for (int64_t x = 0; x < g.X; ++x) norm[x] = T(1) / std::sqrt(std::max(norm[x], T(kMinSquaredNorm)));
  for (int64_t c = 0; c < C; ++c) {
    T* __restrict__ row = buf + c * g.Xp + g.lead;
    for (int64_t x = 0; x < g.X; ++x) row[x] *= norm[x];
  }
}

// The rows around a query (or key) row, copied into padded (C, Xp) buffers and kept while later rows still use
// them: consecutive rows share all but one of their neighbor rows, so each source row is copied about once.
// Direct-mapped on (t mod span_t, y mod span_y): the rows one query needs never share a slot. With ``unit``,
// each row is turned into the 'direct' score's keys as it is copied (unit_row, with pos or null).
template <typename T>
class RowCache {
 public:
  RowCache(const T* src, int64_t C, const Geometry& g, bool unit = false, const T* pos = nullptr)
      : src_(src), pos_(pos), unit_(unit), C_(C), g_(g), data_(g.span_t * g.span_y * C * g.Xp, T(0)),
        norm_(unit ? g.X : 0), tag_(g.span_t * g.span_y, -1), rows_(g.rows()), valid_(g.rows()) {}

  // Points rows()[r] at row (t + sign * rt[r], y + sign * ry[r]) of slice bk for every r with valid()[r].
  void gather(int64_t bk, int64_t t, int64_t y, int64_t sign) {
    for (int64_t r = 0; r < g_.rows(); ++r) {
      const int64_t tt = t + sign * g_.rt[r], yy = y + sign * g_.ry[r];
      valid_[r] = g_.row_in_grid(tt, yy);
      if (!valid_[r]) continue;
      const int64_t slot = tt % g_.span_t * g_.span_y + yy % g_.span_y, id = (bk * g_.T + tt) * g_.H + yy;
      T* buf = data_.data() + slot * C_ * g_.Xp;
      if (tag_[slot] != id) {
        gather_row(src_, C_, g_, bk, tt, yy, buf);
        if (unit_) unit_row(buf, pos_, C_, g_, bk, tt, yy, norm_.data());
        tag_[slot] = id;
      }
      rows_[r] = buf;
    }
  }
  const T* row(int64_t r) const { return rows_[r]; }
  bool valid(int64_t r) const { return valid_[r]; }

 private:
  const T* src_;
  const T* pos_;
  bool unit_;
  int64_t C_;
  const Geometry& g_;
  Buffer<T> data_;
  std::vector<T> norm_;
  std::vector<int64_t> tag_;
  std::vector<const T*> rows_;
  std::vector<char> valid_;
};

// Calls f(std::integral_constant<int, v>) for the value v in 1 .. Max, so that v can size register arrays.
template <int Max, typename F>
inline void with_constant(int64_t value, F&& f) {
  if constexpr (Max > 1) {
    if (value < Max) return with_constant<Max - 1>(value, f);
  }
  f(std::integral_constant<int, Max>{});
}

// Calls tile(std::integral_constant<int, n>, x) over x = 0 .. Xr in register tiles of n <= Max whole vectors.
template <typename T, int Max, typename Tile>
inline void over_tiles(int64_t Xr, Tile&& tile) {
  constexpr int64_t L = Simd<T>::width;
  for (int64_t x = 0; x < Xr; x += Max * L) with_constant<Max>((Xr - x) / L, [&](auto n) { tile(n, x); });
}

constexpr int kDotTile = 2;     // vectors per tile of the dot products,
constexpr int kDotGroup = 8;    // times up to this many window offsets that share a key row
constexpr int kSumTile = 2;     // vectors per tile of the weighted sums,
constexpr int kSumChannels = 8;  // times this many channels

// For the m offsets of one key row, at the n vectors of x from 0: out[o][x] = sum_c a[c * stride + x] *
// b[o][c * stride + x]; with sums, also sums[o][c * sums_stride] += sum_x of the same products. Each load of a
// serves all m offsets.
template <typename T, int n, int m, bool with_sums>
inline void dot_tile(const T* a, const T* const* b, int64_t C, int64_t stride, T* const* out, double* const* sums,
                     int64_t sums_stride) {
  using V = typename Simd<T>::vec;
  constexpr int64_t L = Simd<T>::width;
  V acc[m][n] = {};
  for (int64_t c = 0; c < C; ++c) {
    V av[n];
    for (int j = 0; j < n; ++j) av[j] = load<V>(a + c * stride + j * L);
    for (int o = 0; o < m; ++o) {
      V part = {};
      for (int j = 0; j < n; ++j) {
        const V prod = av[j] * load<V>(b[o] + c * stride + j * L);
        acc[o][j] += prod;
        if constexpr (with_sums) part += prod;
      }
      if constexpr (with_sums) sums[o][c * sums_stride] += horizontal_sum<V, T>(part);
    }
  }
  for (int o = 0; o < m; ++o)
    for (int j = 0; j < n; ++j) store(out[o] + j * L, acc[o][j]);
}

// Dot products over C channels of the query-side row a (C, Xp) with key row b shifted by each offset of the
// window that reads b: out[w][x] = sum_c a[c, x] * b[c, x + o_w] for x = 0 .. Xr and every w with row[w] = r
// (a and b point at column lead). With sums (per w, c at sums + w + c * W): the same products summed over x.
template <typename T, bool with_sums>
void row_dots(const T* a, const T* b, int64_t r, int64_t C, const Geometry& g, T* out, double* sums) {
  const std::vector<int64_t>& ws = g.by_row[r];
  for (size_t first = 0; first < ws.size(); first += kDotGroup) {
    const int64_t count = std::min<int64_t>(kDotGroup, static_cast<int64_t>(ws.size()) - first);
    std::array<const T*, kDotGroup> bs;
    std::array<T*, kDotGroup> outs;
    std::array<double*, kDotGroup> ss;
    for (int64_t o = 0; o < count; ++o) {
      const int64_t w = ws[first + o];
      bs[o] = b + g.ox[w];
      outs[o] = out + w * g.Xr;
      ss[o] = sums ? sums + w : nullptr;
    }
    with_constant<kDotGroup>(count, [&](auto m) {
      over_tiles<T, kDotTile>(g.Xr, [&](auto n, int64_t x) {
        std::array<const T*, kDotGroup> bx;
        std::array<T*, kDotGroup> outx;
        for (int o = 0; o < decltype(m)::value; ++o) {
          bx[o] = bs[o] + x;
          outx[o] = outs[o] + x;
        }
        dot_tile<T, decltype(n)::value, decltype(m)::value, with_sums>(a + x, bx.data(), C, g.Xp, outx.data(),
                                                                      ss.data(), g.W);
      });
    });
  }
}

// The weighted sum over the window, for a block of cb channels at the n vectors of x from 0:
// out[c][x] = sum_{m < M} (weight[m][x] + taps[c * M + m]) * value[m][c * stride + x] (taps null: no
// convolution term). Each load of a weight serves all cb channels.
template <typename T, int n, int cb, bool with_taps>
inline void sum_tile(const T* const* weight, const T* const* value, int64_t offset, int64_t stride, const T* taps,
                     int64_t M, int64_t Xr, T* out) {
  using V = typename Simd<T>::vec;
  constexpr int64_t L = Simd<T>::width;
  V acc[cb][n] = {};
  for (int64_t m = 0; m < M; ++m) {
    V wv[n];
    for (int j = 0; j < n; ++j) wv[j] = load<V>(weight[m] + j * L);
    const T* vm = value[m] + offset;
    for (int c = 0; c < cb; ++c) {
      if constexpr (with_taps) {
        const T tap = taps[c * M + m];
        for (int j = 0; j < n; ++j) acc[c][j] += (wv[j] + tap) * load<V>(vm + c * stride + j * L);
      } else {
        for (int j = 0; j < n; ++j) acc[c][j] += wv[j] * load<V>(vm + c * stride + j * L);
      }
    }
  }
  for (int c = 0; c < cb; ++c)
    for (int j = 0; j < n; ++j) store(out + c * Xr + j * L, acc[c][j]);
}

// out (C, Xr): out[c][x] = sum_{m < M} (weight[m][x] + taps[c * M + m]) * value[m][c * stride + x] for all C
// channels and x = 0 .. Xr (taps (C, M), or null: no convolution term). shifted: scratch of at least M pointers.
template <typename T>
void window_sum(const T* const* weight, const T* const* value, int64_t stride, const T* taps, int64_t M, int64_t C,
                int64_t Xr, T* out, std::vector<const T*>& shifted) {
  over_tiles<T, kSumTile>(Xr, [&](auto n, int64_t x) {
    for (int64_t m = 0; m < M; ++m) shifted[m] = weight[m] + x;
    for (int64_t c0 = 0; c0 < C; c0 += kSumChannels)
      with_constant<kSumChannels>(std::min<int64_t>(kSumChannels, C - c0), [&](auto cb) {
        constexpr int tile = decltype(n)::value, block = decltype(cb)::value;
        T* dst = out + c0 * Xr + x;
        if (taps)
          sum_tile<T, tile, block, true>(shifted.data(), value, c0 * stride + x, stride, taps + c0 * M, M, Xr, dst);
        else
          sum_tile<T, tile, block, false>(shifted.data(), value, c0 * stride + x, stride, nullptr, M, Xr, dst);
      });
  });
}

inline int64_t head(const Geometry& g, int64_t bk) { return bk % g.K; }

// The taps of head h at the M live offsets live[m], as a (D, M) matrix in out; null without a convolution term.
template <typename T>
const T* live_taps(const T* taps, int64_t h, const std::vector<int64_t>& live, int64_t M, const Geometry& g,
                   T* out) {
  if (!taps) return nullptr;
  for (int64_t d = 0; d < g.D; ++d)
    for (int64_t m = 0; m < M; ++m) out[d * M + m] = taps[(h * g.D + d) * g.W + live[m]];
  return out;
}

// Copies the C rows of buf (C, Xr) to row (t, y) of dst (BK, C, T, H, X) at slice bk.
template <typename T>
void scatter_rows(const T* buf, int64_t C, const Geometry& g, int64_t bk, int64_t t, int64_t y, T* dst) {
  for (int64_t c = 0; c < C; ++c)
    std::memcpy(dst + ((bk * C + c) * g.T + t) * g.H * g.X + y * g.X, buf + c * g.Xr, g.X * sizeof(T));
}

// In place, for each column x of p (W, Xr): p[w, x] = exp(p[w, x] - max_w p[., x]), and inverse[x] = 1 / sum_w
// p[w, x] (0 for the columns from X on), so that p * inverse is the softmax over w.
template <typename T>
void softmax_numerators(T* p, int64_t W, int64_t X, int64_t Xr, T* inverse) {
  using V = typename Simd<T>::vec;
  constexpr int64_t L = Simd<T>::width;
  over_tiles<T, 4>(Xr, [&](auto tile, int64_t x0) {
    constexpr int n = decltype(tile)::value;
    V top[n], sum[n] = {};
    for (int j = 0; j < n; ++j) top[j] = load<V>(p + x0 + j * L);
    for (int64_t w = 1; w < W; ++w)
      for (int j = 0; j < n; ++j) {
        const V s = load<V>(p + w * Xr + x0 + j * L);
        top[j] = s > top[j] ? s : top[j];
      }
    for (int64_t w = 0; w < W; ++w)
      for (int j = 0; j < n; ++j) {
        const V e = exp_vec<V, T>(load<V>(p + w * Xr + x0 + j * L) - top[j]);
        store(p + w * Xr + x0 + j * L, e);
        sum[j] += e;
      }
    for (int j = 0; j < n; ++j) {
      V inv = T(1) / sum[j];
      for (int64_t i = 0; i < L; ++i)
        if (x0 + j * L + i >= X) inv[i] = 0;
      store(inverse + x0 + j * L, inv);
    }
  });
}

// Where the scores come from: q and k (BK, Dq, T, H, X), or, with the 'direct' score (features non-null), the
// features f (BK, Dq, T, H, X), pos (K, Dq, T, H, X) or null and temperature (K,).
template <typename T>
struct ScoreInputs {
  const T* q;
  const T* k;
  const T* features;
  const T* pos;
  const T* temperature;
};

template <typename T>
void forward_kernel(const ScoreInputs<T>& score, const T* v, const T* gain, const T* taps, const T* bias,
                    const Geometry& g, T* out, T* probs) {
  const int64_t rows_total = g.BK * g.T * g.H;
  const bool direct = score.features != nullptr;
  at::parallel_for(0, rows_total, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> qb(g.Dq * g.Xp, T(0)), p(g.W * g.Xr), zb(g.D * g.Xr), inverse(g.Xr);
    RowCache<T> kc(direct ? score.features : score.k, g.Dq, g, direct, score.pos), vc(v, g.D, g);
    std::vector<const T*> weight(g.W), value(g.W), shifted(g.W);
    std::vector<T> tap(g.D * g.W);
    std::vector<int64_t> live(g.W);
    const T neg_inf = -std::numeric_limits<T>::infinity();
    for (int64_t index = begin; index < end; ++index) {
      const int64_t bk = index / (g.T * g.H), t = index / g.H % g.T, y = index % g.H, h = head(g, bk);
      kc.gather(bk, t, y, 1);
      vc.gather(bk, t, y, 1);
      if (direct) {  // q = tau * k of the query's own row
        const T* own = kc.row(g.center_row);
        for (int64_t i = 0; i < g.Dq * g.Xp; ++i) qb[i] = score.temperature[h] * own[i];
      } else {
        gather_row(score.q, g.Dq, g, bk, t, y, qb.data());
      }
      // scores, -inf where the key leaves the grid
      for (int64_t r = 0; r < g.rows(); ++r) {
        if (kc.valid(r)) {
          row_dots<T, false>(qb.data() + g.lead, kc.row(r) + g.lead, r, g.Dq, g, p.data(), nullptr);
          continue;
        }
        for (const int64_t w : g.by_row[r]) std::fill(p.data() + w * g.Xr, p.data() + (w + 1) * g.Xr, neg_inf);
      }
      for (int64_t w = 0; w < g.W; ++w) {
        T* pw = p.data() + w * g.Xr;
        for (int64_t x = 0; x < std::min(-g.ox[w], g.X); ++x) pw[x] = neg_inf;
        for (int64_t x = std::max<int64_t>(g.X - g.ox[w], 0); x < g.X; ++x) pw[x] = neg_inf;
      }
      softmax_numerators(p.data(), g.W, g.X, g.Xr, inverse.data());
      // p[w] = P[w] (kept for backward), then g * P[w]
      for (int64_t w = 0; w < g.W; ++w) {
        T* pw = p.data() + w * g.Xr;
        for (int64_t x = 0; x < g.Xr; ++x) pw[x] *= inverse[x];
        if (probs) std::memcpy(probs + (index * g.W + w) * g.Xr, pw, g.Xr * sizeof(T));
        for (int64_t x = 0; x < g.Xr; ++x) pw[x] *= gain[h];
      }
      // z[d] = sum_w (g * P[w] + r[d, w]) * v[d, i + o_w] + b[d] over the offsets whose values lie in the grid
      int64_t M = 0;
      for (int64_t w = 0; w < g.W; ++w)
        if (vc.valid(g.row[w])) {
          weight[M] = p.data() + w * g.Xr;
          value[M] = vc.row(g.row[w]) + g.lead + g.ox[w];
          live[M++] = w;
        }
      window_sum<T>(weight.data(), value.data(), g.Xp, live_taps(taps, h, live, M, g, tap.data()), M, g.D, g.Xr,
                    zb.data(), shifted);
      for (int64_t d = 0; d < g.D; ++d) {
        T* dst = out + ((bk * g.D + d) * g.T + t) * g.H * g.X + y * g.X;
        const T b = bias ? bias[h * g.D + d] : T(0);
        for (int64_t x = 0; x < g.X; ++x) dst[x] = zb[d * g.Xr + x] + b;
      }
    }
  });
}

template <typename T>
void backward_kernel(const T* q, const T* k, const T* v, const T* gain, const T* taps, const T* probs,
                     const T* gout, const Geometry& g, T* gscore, T* gq, T* gk, T* gv, double* ggain,
                     double* gtaps) {
  const int64_t rows_total = g.BK * g.T * g.H;
  std::mutex reduce;
  // pass 1, per query row i: dP[w] = <gout[:, i], v[:, i + o_w]> (and dr[d, w] = sum_i gout[d, i] v[d, i + o_w]),
  // dgain += sum_w P dP, dS = g P (dP - sum_w P dP), dq[:, i] = sum_w dS[w] k[:, i + o_w].
  at::parallel_for(0, rows_total, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> gb(g.D * g.Xp, T(0)), dp(g.W * g.Xr), dot(g.Xr), zb(g.Dq * g.Xr);
    RowCache<T> kc(k, g.Dq, g), vc(v, g.D, g);
    std::vector<const T*> weight(g.W), value(g.W), shifted(g.W);
    std::vector<double> local_gain(g.K, 0.0), local_taps(taps ? g.K * g.D * g.W : 0, 0.0);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t bk = index / (g.T * g.H), t = index / g.H % g.T, y = index % g.H, h = head(g, bk);
      gather_row(gout, g.D, g, bk, t, y, gb.data());
      kc.gather(bk, t, y, 1);
      vc.gather(bk, t, y, 1);
      const T* p = probs + index * g.W * g.Xr;
      T* s = gscore + index * g.W * g.Xr;
      for (int64_t r = 0; r < g.rows(); ++r) {
        if (vc.valid(r)) {
          double* sums = taps ? local_taps.data() + h * g.D * g.W : nullptr;
          if (taps)
            row_dots<T, true>(gb.data() + g.lead, vc.row(r) + g.lead, r, g.D, g, dp.data(), sums);
          else
            row_dots<T, false>(gb.data() + g.lead, vc.row(r) + g.lead, r, g.D, g, dp.data(), nullptr);
          continue;
        }
        for (const int64_t w : g.by_row[r]) std::fill(dp.data() + w * g.Xr, dp.data() + (w + 1) * g.Xr, T(0));
      }
      std::fill(dot.begin(), dot.end(), T(0));
      int64_t M = 0;
      for (int64_t w = 0; w < g.W; ++w) {
        for (int64_t x = 0; x < g.Xr; ++x) dot[x] += p[w * g.Xr + x] * dp[w * g.Xr + x];
        if (!vc.valid(g.row[w])) continue;
        weight[M] = s + w * g.Xr;
        value[M++] = kc.row(g.row[w]) + g.lead + g.ox[w];
      }
      double dgain = 0;
      for (int64_t x = 0; x < g.Xr; ++x) dgain += dot[x];
      local_gain[h] += dgain;
      const T gh = gain[h];
      for (int64_t w = 0; w < g.W; ++w)
        for (int64_t x = 0; x < g.Xr; ++x) s[w * g.Xr + x] = gh * p[w * g.Xr + x] * (dp[w * g.Xr + x] - dot[x]);
      window_sum<T>(weight.data(), value.data(), g.Xp, nullptr, M, g.Dq, g.Xr, zb.data(), shifted);
      scatter_rows(zb.data(), g.Dq, g, bk, t, y, gq);
    }
    std::lock_guard<std::mutex> lock(reduce);
    for (int64_t i = 0; i < g.K; ++i) ggain[i] += local_gain[i];
    for (size_t i = 0; i < local_taps.size(); ++i) gtaps[i] += local_taps[i];
  });
  // pass 2, per key row j, gathering from the query rows i = j - o_w (no write conflicts):
  // dk[:, j] = sum_w dS[i, w] q[:, i], dv[d, j] = sum_w (g P[i, w] + r[d, w]) gout[d, i].
  at::parallel_for(0, rows_total, 1, [&](int64_t begin, int64_t end) {
    RowCache<T> qc(q, g.Dq, g), gc(gout, g.D, g);
    Buffer<T> sb(g.W * g.Xp, T(0)), pb(g.W * g.Xp, T(0)), zb(std::max(g.D, g.Dq) * g.Xr), tap(g.D * g.W);
    std::vector<const T*> sw(g.W), pw(g.W), qb_rows(g.W), gb_rows(g.W), shifted(g.W);
    std::vector<int64_t> live(g.W);
    for (int64_t index = begin; index < end; ++index) {
      const int64_t bk = index / (g.T * g.H), t = index / g.H % g.T, y = index % g.H, h = head(g, bk);
      qc.gather(bk, t, y, -1);
      gc.gather(bk, t, y, -1);
      const T gh = gain[h];
      int64_t M = 0;
      for (int64_t w = 0; w < g.W; ++w) {
        if (!qc.valid(g.row[w])) continue;
        const int64_t query_row = (bk * g.T + t - g.rt[g.row[w]]) * g.H + y - g.ry[g.row[w]];
        const T* srow = gscore + (query_row * g.W + w) * g.Xr;
        const T* prow = probs + (query_row * g.W + w) * g.Xr;
        T* sdst = sb.data() + w * g.Xp + g.lead;
        T* pdst = pb.data() + w * g.Xp + g.lead;
        std::memcpy(sdst, srow, g.X * sizeof(T));
        for (int64_t x = 0; x < g.X; ++x) pdst[x] = gh * prow[x];
        const int64_t shift = g.lead - g.ox[w];
        sw[M] = sb.data() + w * g.Xp + shift;
        pw[M] = pb.data() + w * g.Xp + shift;
        qb_rows[M] = qc.row(g.row[w]) + shift;
        gb_rows[M] = gc.row(g.row[w]) + shift;
        live[M++] = w;
      }
      window_sum<T>(sw.data(), qb_rows.data(), g.Xp, nullptr, M, g.Dq, g.Xr, zb.data(), shifted);
      scatter_rows(zb.data(), g.Dq, g, bk, t, y, gk);
      window_sum<T>(pw.data(), gb_rows.data(), g.Xp, live_taps(taps, h, live, M, g, tap.data()), M, g.D, g.Xr,
                    zb.data(), shifted);
      scatter_rows(zb.data(), g.D, g, bk, t, y, gv);
    }
  });
}

// taps (K, D, W): the kernel's value at each window offset, 0 where tap_index is -1. kernel (K, D, P).
torch::Tensor taps_at_offsets(const torch::Tensor& kernel, const torch::Tensor& tap_index) {
  const int64_t W = tap_index.size(0);
  auto padded = torch::cat({kernel, kernel.new_zeros({kernel.size(0), kernel.size(1), 1})}, 2);
  auto index = torch::where(tap_index < 0, kernel.size(2), tap_index);
  return padded.index_select(2, index).contiguous().view({kernel.size(0), kernel.size(1), W});
}

}  // namespace

namespace {

std::vector<torch::Tensor> forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& features,
                                   const torch::Tensor& pos, const torch::Tensor& temperature, const torch::Tensor& v,
                                   const torch::Tensor& gain, const torch::Tensor& kernel,
                                   const torch::Tensor& tap_index, const torch::Tensor& offsets,
                                   const torch::Tensor& bias, bool save_probs) {
  const torch::Tensor& shape = features.numel() ? features : q;
  const Geometry g(shape, v, offsets, gain.size(0), kVectorBytes / v.element_size());
  auto taps = kernel.numel() ? taps_at_offsets(kernel, tap_index) : kernel;
  auto out = torch::empty_like(v);
  auto probs = torch::empty({save_probs ? g.BK * g.T * g.H : 0, g.W, g.Xr}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "convplus_window_mix_forward", [&] {
    auto data = [](const torch::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    const ScoreInputs<scalar_t> score{data(q), data(k), data(features), data(pos), data(temperature)};
    forward_kernel<scalar_t>(score, v.data_ptr<scalar_t>(), gain.data_ptr<scalar_t>(), data(taps), data(bias), g,
                             out.data_ptr<scalar_t>(), save_probs ? probs.data_ptr<scalar_t>() : nullptr);
  });
  return {out, probs};
}

}  // namespace

std::vector<torch::Tensor> window_mix_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gain,
                                              torch::Tensor kernel, torch::Tensor tap_index, torch::Tensor offsets,
                                              torch::Tensor bias, bool save_probs) {
  const auto none = v.new_empty({0});
  return forward(q, k, none, none, none, v, gain, kernel, tap_index, offsets, bias, save_probs);
}

std::vector<torch::Tensor> direct_window_mix_forward(torch::Tensor features, torch::Tensor pos,
                                                     torch::Tensor temperature, torch::Tensor v, torch::Tensor gain,
                                                     torch::Tensor kernel, torch::Tensor tap_index,
                                                     torch::Tensor offsets, torch::Tensor bias, bool save_probs) {
  const auto none = v.new_empty({0});
  return forward(none, none, features, pos, temperature, v, gain, kernel, tap_index, offsets, bias, save_probs);
}

std::vector<torch::Tensor> window_mix_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gain,
                                               torch::Tensor kernel, torch::Tensor tap_index, torch::Tensor probs,
                                               torch::Tensor gout, torch::Tensor offsets) {
  const Geometry g(q, v, offsets, gain.size(0), kVectorBytes / q.element_size());
  auto taps = kernel.numel() ? taps_at_offsets(kernel, tap_index) : kernel;
  auto gscore = torch::empty_like(probs);
  auto gq = torch::empty_like(q), gk = torch::empty_like(k), gv = torch::empty_like(v);
  auto acc = q.options().dtype(torch::kFloat64);
  auto ggain = torch::zeros({g.K}, acc), gtaps = torch::zeros({taps.numel() ? g.K * g.D * g.W : 0}, acc);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "convplus_window_mix_backward", [&] {
    backward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              gain.data_ptr<scalar_t>(), taps.numel() ? taps.data_ptr<scalar_t>() : nullptr,
                              probs.data_ptr<scalar_t>(), gout.data_ptr<scalar_t>(), g, gscore.data_ptr<scalar_t>(),
                              gq.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>(),
                              ggain.data_ptr<double>(), gtaps.data_ptr<double>());
  });
  auto gkernel = torch::zeros_like(kernel, acc);
  if (kernel.numel()) {  // each tap's gradient back to its kernel entry
    auto index = tap_index.clamp_min(0).view({1, 1, g.W}).expand({g.K, g.D, g.W});
    auto grad = gtaps.view({g.K, g.D, g.W}) * (tap_index >= 0).to(torch::kFloat64);
    gkernel.scatter_add_(2, index, grad);
  }
  return {gq, gk, gv, ggain.to(q.scalar_type()), gkernel.to(q.scalar_type())};
}

}  // namespace convplus
