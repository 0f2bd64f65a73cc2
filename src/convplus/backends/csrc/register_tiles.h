// The register-tiled inner loops of the CPU mixing kernel, over x in tiles of whole SIMD vectors: the score dot
// products of a query row with the key rows of the window, the weighted sums over the window, and the softmax
// numerators.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "simd.h"
#include "window_geometry.h"

namespace convplus::detail {
namespace {  // internal linkage, see simd.h

// Calls f(std::integral_constant<int, v>) for the value v in 1 .. Max, so that v can size register arrays.
template <int Max, typename F>
inline void with_constant(int64_t value, F&& f) {
  if constexpr (Max > 1) {
    if (value < Max) return with_constant<Max - 1>(value, f);
  }
  f(std::integral_constant<int, Max>{});
}

// Calls tile(std::integral_constant<int, n>, x, Simd<T, bytes>{}) over x = 0 .. Xr (a whole number of vectors) in
// register tiles of n <= Max vectors: of the widest vectors (kWideVectorBytes) over as many of them as fit, then of
// the row layout's vectors over the rest. The tile takes its vector type from its third argument.
template <typename T, int Max, typename Tile>
__attribute__((always_inline)) inline void over_tiles(int64_t Xr, Tile&& tile) {
  const auto over = [&](auto simd, int64_t begin, int64_t end) {
    constexpr int64_t L = decltype(simd)::width;
    for (int64_t x = begin; x < end; x += Max * L) with_constant<Max>((end - x) / L, [&](auto n) { tile(n, x, simd); });
  };
  using Wide = Simd<T, kWideVectorBytes>;
  int64_t wide = 0;
  if constexpr (Wide::width > Simd<T>::width) {
    wide = Xr / Wide::width * Wide::width;
    over(Wide{}, 0, wide);
  }
  over(Simd<T>{}, wide, Xr);
}

constexpr int kDotTile = 2;     // vectors per tile of the dot products,
constexpr int kDotGroup = 8;    // times up to this many window offsets that share a key row
constexpr int kSumTile = 2;     // vectors per tile of the weighted sums,
constexpr int kSumChannels = 10;  // times up to this many channels (the channels split into blocks of equal size;
                                  // 12, with 24 accumulators, spills registers and runs 1.5x slower)

// Calls f(std::integral_constant<int, i>) for i = 0 .. N - 1, unrolled.
template <int N, typename F>
__attribute__((always_inline)) inline void for_each_index(F&& f) {
  [&]<int... i>(std::integer_sequence<int, i...>) { (f(std::integral_constant<int, i>{}), ...); }(
      std::make_integer_sequence<int, N>{});
}

// For the m offsets of one key row, at the n vectors V of x from 0: out[o][x] = sum_c a[c * stride + x] *
// b[o][c * stride + x]; with sums, also sums[o][c] += the same products, summed over the n vectors and folded onto
// one vector of the row layout (lane-wise: the caller sums the lanes). Each load of a serves all m offsets. With
// consecutive, b[o] = b[0] + o: each channel's b is read once, n vectors and the m - 1 columns after them, and
// shifted in registers (lanes_from) instead of read again for each offset; the same products in the same order.
template <typename T, typename V, int n, int m, bool with_sums, bool consecutive>
inline void dot_tile(const T* a, const T* const* b, int64_t C, int64_t stride, T* const* out,
                     typename Simd<T>::vec* const* sums) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  V acc[m][n] = {};
  for (int64_t c = 0; c < C; ++c) {
    V av[n], bv[consecutive ? n + 1 : 1];
    for (int j = 0; j < n; ++j) av[j] = load<V>(a + c * stride + j * L);
    if constexpr (consecutive) {
      for (int j = 0; j < n; ++j) bv[j] = load<V>(b[0] + c * stride + j * L);
      bv[n] = load_first<V>(b[0] + c * stride + n * L, m - 1);
    }
    for_each_index<m>([&](auto offset) {
      constexpr int o = decltype(offset)::value;
      V part = {};
      for (int j = 0; j < n; ++j) {
        V key;
        if constexpr (consecutive)
          key = lanes_from<o>(bv[j], bv[j], bv[j + 1]);
        else
          key = load<V>(b[o] + c * stride + j * L);
        const V prod = av[j] * key;
        acc[o][j] += prod;
        if constexpr (with_sums) part += prod;
      }
      if constexpr (with_sums) sums[o][c] += fold<typename Simd<T>::vec>(part);
    });
  }
  for (int o = 0; o < m; ++o)
    for (int j = 0; j < n; ++j) store(out[o] + j * L, acc[o][j]);
}

// Dot products over C channels of the query-side row a (C, Xp) with key row b shifted by the offsets ws of the
// window, which all read b: out[w * out_stride + x] = sum_c a[c, x] * b[c, x + o_w] for x = 0 .. Xr and every w in
// ws (a and b point at column lead). With sums ((W, C) vectors): sums[w][c] += the same products, summed over x
// lane-wise.
template <typename T, bool with_sums>
void row_dots(const T* a, const T* b, const std::vector<int64_t>& ws, int64_t C, const Geometry& g, T* out,
              int64_t out_stride, typename Simd<T>::vec* sums) {
  for (size_t first = 0; first < ws.size(); first += kDotGroup) {
    const int64_t count = std::min<int64_t>(kDotGroup, static_cast<int64_t>(ws.size()) - first);
    std::array<const T*, kDotGroup> bs;
    std::array<T*, kDotGroup> outs;
    std::array<typename Simd<T>::vec*, kDotGroup> ss;
    for (int64_t o = 0; o < count; ++o) {
      const int64_t w = ws[first + o];
      bs[o] = b + g.ox[w];
      outs[o] = out + w * out_stride;
      ss[o] = sums ? sums + w * C : nullptr;
    }
    // offsets of consecutive shifts (most of a window's row) take the shifting tile where the CPU shifts lanes
    bool consecutive = kHasLaneShifts && std::is_same_v<T, float>;
    for (int64_t o = 1; o < count; ++o) consecutive = consecutive && bs[o] == bs[0] + o;
    with_constant<kDotGroup>(count, [&](auto m) {
      over_tiles<T, kDotTile>(g.Xr, [&](auto n, int64_t x, auto simd) {
        std::array<const T*, kDotGroup> bx;
        std::array<T*, kDotGroup> outx;
        for (int o = 0; o < decltype(m)::value; ++o) {
          bx[o] = bs[o] + x;
          outx[o] = outs[o] + x;
        }
        const auto tile = [&](auto shifting) {
          dot_tile<T, typename decltype(simd)::vec, decltype(n)::value, decltype(m)::value, with_sums,
                   decltype(shifting)::value>(a + x, bx.data(), C, g.Xp, outx.data(), ss.data());
        };
        if constexpr (kHasLaneShifts && std::is_same_v<T, float>) {
          if (consecutive) return tile(std::true_type{});
        }
        tile(std::false_type{});
      });
    });
  }
}

// The convolution term's taps in a weighted sum over M window offsets: data[m * stride + c] for channel c and
// offset m < M; data null: no convolution term.
template <typename T>
struct TapMatrix {
  const T* data = nullptr;
  int64_t stride = 0;
};

// The weighted sum over the window, for a block of cb channels at the n vectors V of x from 0:
// out[c][x] = sum_{m < M} (scale[x] * weight[m][x] + taps[m * tap_stride + c]) * value[m][c * stride + x] + start[c]
// (start null: 0; taps null: no convolution term; scale null: 1). Each load of a weight serves all cb channels.
template <typename T, typename V, int n, int cb, bool with_taps, bool with_scale>
inline void sum_tile(const T* const* weight, const T* const* value, int64_t offset, int64_t stride, const T* taps,
                     int64_t tap_stride, const T* scale, const T* start, int64_t M, int64_t Xr, T* out) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  V acc[cb][n] = {}, sv[n];
  if constexpr (with_scale)
    for (int j = 0; j < n; ++j) sv[j] = load<V>(scale + j * L);
  for (int64_t m = 0; m < M; ++m) {
    V wv[n];
    for (int j = 0; j < n; ++j) {
      wv[j] = load<V>(weight[m] + j * L);
      if constexpr (with_scale) wv[j] *= sv[j];
      // kept apart from the tap additions below: fused into them, the product would be computed again for every
      // channel, on the FMA units that the sums need (the additions run on the separate adders)
#if defined(__x86_64__)
      if constexpr (with_taps) asm("" : "+v"(wv[j]));  // "v": an x86 vector register
#endif
    }
    // each channel's row one stride past the last, in one register: the cb offsets c * stride, held across the
    // window as loop invariants, outnumber the general registers and went through vector registers (a vmovq before
    // every load)
    const T* vc = value[m] + offset;
    for (int c = 0; c < cb; ++c, vc += stride) {
#if defined(__x86_64__)
      asm("" : "+r"(vc));  // "r": a general register
#endif
      if constexpr (with_taps) {
        const T tap = taps[m * tap_stride + c];
        for (int j = 0; j < n; ++j) acc[c][j] += (wv[j] + tap) * load<V>(vc + j * L);
      } else {
        for (int j = 0; j < n; ++j) acc[c][j] += wv[j] * load<V>(vc + j * L);
      }
    }
  }
  if (start)
    for (int c = 0; c < cb; ++c)
      for (int j = 0; j < n; ++j) acc[c][j] += start[c];
  for (int c = 0; c < cb; ++c)
    for (int j = 0; j < n; ++j) store(out + c * Xr + j * L, acc[c][j]);
}

constexpr int kMaxRunReach = 3;  // run_sum_tile takes runs of up to 2 * 3 + 1 offsets (a window 7 wide)

// sum_tile for offsets that come in runs of 2R + 1 consecutive shifts: run g's offsets m = g (2R + 1) + o read
// value[m] = value[g (2R + 1) + R] + o - R, or + R - o where descending. Each channel's values of a run come from
// the n vectors at x and the R columns on either side of them (n + 2 loads, none split across cache lines where rows
// are vector-aligned), shifted in registers, instead of one unaligned load per offset and vector. The products are
// summed in the order of sum_tile, to the same values.
template <typename T, typename V, int n, int R, bool descending, int cb, bool with_taps, bool with_scale>
inline void run_sum_tile(const T* const* weight, const T* const* value, int64_t offset, int64_t stride, const T* taps,
                         int64_t tap_stride, const T* scale, const T* start, int64_t runs, int64_t Xr, T* out) {
  constexpr int O = 2 * R + 1;
  constexpr int64_t L = sizeof(V) / sizeof(T);
  V acc[cb][n] = {}, sv[n];
  if constexpr (with_scale)
    for (int j = 0; j < n; ++j) sv[j] = load<V>(scale + j * L);
  for (int64_t g = 0; g < runs; ++g) {
    V wv[O][n];
    for (int o = 0; o < O; ++o)
      for (int j = 0; j < n; ++j) {
        wv[o][j] = load<V>(weight[g * O + o] + j * L);
        if constexpr (with_scale) wv[o][j] *= sv[j];
#if defined(__x86_64__)
        if constexpr (with_taps) asm("" : "+v"(wv[o][j]));  // as in sum_tile
#endif
      }
    const T* row = value[g * O + R] + offset;
    const T* run_taps = taps + g * O * tap_stride;
#pragma GCC unroll 16
    for (int c = 0; c < cb; ++c) {
      const T* at = row + c * stride;
      V vec[n + 2];
      vec[0] = load_last<V>(at - L, R);
      for (int j = 0; j < n; ++j) vec[j + 1] = load<V>(at + j * L);
      vec[n + 1] = load_first<V>(at + n * L, R);
      for_each_index<O>([&](auto o) {
        for (int j = 0; j < n; ++j) {
          constexpr int shift = descending ? R - decltype(o)::value : decltype(o)::value - R;
          const V shifted = lanes_from<shift>(vec[j], vec[j + 1], vec[j + 2]);
          if constexpr (with_taps)
            acc[c][j] += (wv[o][j] + run_taps[o * tap_stride + c]) * shifted;
          else
            acc[c][j] += wv[o][j] * shifted;
        }
      });
    }
  }
  if (start)
    for (int c = 0; c < cb; ++c)
      for (int j = 0; j < n; ++j) acc[c][j] += start[c];
  for (int c = 0; c < cb; ++c)
    for (int j = 0; j < n; ++j) store(out + c * Xr + j * L, acc[c][j]);
}

// R where the M offsets of value come in runs of 2R + 1 consecutive shifts (R <= kMaxRunReach, as run_sum_tile
// takes them), -R where they come in runs of descending shifts; 0 where they do not.
template <typename T>
int64_t run_reach(const T* const* value, int64_t M) {
  const int64_t step = M > 1 && value[1] == value[0] - 1 ? -1 : 1;
  int64_t O = 1;
  while (O < M && value[O] == value[O - 1] + step) ++O;
  if (O % 2 == 0 || O < 3 || O > 2 * kMaxRunReach + 1 || M % O) return 0;
  for (int64_t g = 0; g < M; g += O)
    for (int64_t o = 1; o < O; ++o)
      if (value[g + o] != value[g] + step * o) return 0;
  return step * (O - 1) / 2;
}

// out (C, Xr): out[c][x] = sum_{m < M} (scale[x] * weight[m][x] + r[c, m]) * value[m][c * stride + x] + start[c]
// for all C channels and x = 0 .. Xr (start (C,), or null: 0; r: the taps, or none; scale (Xr,), or null: 1), by
// run_sum_tile where the offsets come in runs (run_reach) and the CPU shifts lanes, else by sum_tile.
// shifted: scratch of at least M pointers.
template <typename T>
void window_sum(const T* const* weight, const T* const* value, int64_t stride, TapMatrix<T> taps, const T* scale,
                const T* start, int64_t M, int64_t C, int64_t Xr, T* out, std::vector<const T*>& shifted) {
  constexpr bool runs_possible = kHasLaneShifts && std::is_same_v<T, float>;
  const int64_t reach = runs_possible ? run_reach(value, M) : 0;
  // the runs' reach and direction as template arguments: 2R + (descending) + 1 in 1 .. 2 kMaxRunReach + 2 (1 alone
  // where there are no runs)
  with_constant<runs_possible ? 2 * kMaxRunReach + 2 : 1>(2 * std::abs(reach) + (reach < 0) + 1, [&](auto code) {
    constexpr int R = runs_possible ? (decltype(code)::value - 1) / 2 : 0;
    constexpr bool descending = (decltype(code)::value - 1) % 2;
    over_tiles<T, kSumTile>(Xr, [&](auto n, int64_t x, auto simd) {
      using V = typename decltype(simd)::vec;
      for (int64_t m = 0; m < M; ++m) shifted[m] = weight[m] + x;
      const int64_t blocks = (C + kSumChannels - 1) / kSumChannels, size = (C + blocks - 1) / blocks;
      for (int64_t c0 = 0; c0 < C; c0 += size)
        with_constant<kSumChannels>(std::min<int64_t>(size, C - c0), [&](auto cb) {
          constexpr int tile = decltype(n)::value, block = decltype(cb)::value;
          const T* t = taps.data ? taps.data + c0 : nullptr;
          const T* sx = scale ? scale + x : nullptr;
          const T* s0 = start ? start + c0 : nullptr;
          const int64_t at = c0 * stride + x;
          T* dst = out + c0 * Xr + x;
          const auto sum = [&](auto with_taps, auto with_scale) {
            constexpr bool tapped = decltype(with_taps)::value, scaled = decltype(with_scale)::value;
            if constexpr (R > 0)
              run_sum_tile<T, V, tile, R, descending, block, tapped, scaled>(shifted.data(), value, at, stride, t,
                                                                              taps.stride, sx, s0, M / (2 * R + 1),
                                                                              Xr, dst);
            else
              sum_tile<T, V, tile, block, tapped, scaled>(shifted.data(), value, at, stride, t, taps.stride, sx, s0,
                                                          M, Xr, dst);
          };
          const std::true_type yes;
          const std::false_type no;
          if (t && scale)
            sum(yes, yes);
          else if (t)
            sum(yes, no);
          else if (scale)
            sum(no, yes);
          else
            sum(no, no);
        });
    });
  });
}

// In place on a row of Xr values, a whole number of vectors: row[x] = exp(scale * row[x]), for products of at
// most 64 in magnitude (or NaN), whose exponentials need no clamping.
template <typename T>
void scaled_exp(T* row, T scale, int64_t Xr) {
  static_assert(ExpConstants<T>::lo < T(-64) && ExpConstants<T>::hi > T(64));
  over_tiles<T, 1>(Xr, [&](auto, int64_t x, auto simd) {
    using V = typename decltype(simd)::vec;
    store(row + x, exp_vec<V, T, true>(load<V>(row + x) * scale));
  });
}

// For each column x of the W rows p[w] (Xr values each): scores s become p[w][x] = exp(s[w][x] - max_w s[.][x]),
// in place, or, with exponentiated, p already holds numerators exp(s) (of scores that cannot overflow) and is only
// read; inverse[x] = 1 / sum_w p[w][x] (0 for the columns from X on), so that p * inverse is the softmax over w.
template <typename T>
void softmax_numerators(T* const* p, int64_t W, int64_t X, int64_t Xr, bool exponentiated, T* inverse) {
  over_tiles<T, 4>(Xr, [&](auto tile, int64_t x0, auto simd) {
    using V = typename decltype(simd)::vec;
    constexpr int64_t L = decltype(simd)::width;
    constexpr int n = decltype(tile)::value;
    V top[n] = {}, sum[n] = {};  // top: the scores' maximum, read only where they are not exponentiated
    if (!exponentiated) {
      for (int j = 0; j < n; ++j) top[j] = load<V>(p[0] + x0 + j * L);
      for (int64_t w = 1; w < W; ++w)
        for (int j = 0; j < n; ++j) {
          const V s = load<V>(p[w] + x0 + j * L);
          top[j] = s > top[j] ? s : top[j];
        }
    }
    for (int64_t w = 0; w < W; ++w)
      for (int j = 0; j < n; ++j) {
        V e = load<V>(p[w] + x0 + j * L);
        if (!exponentiated) {
          e = exp_vec<V, T>(e - top[j]);
          store(p[w] + x0 + j * L, e);
        }
        sum[j] += e;
      }
    for (int j = 0; j < n; ++j) {
      V inv = T(1) / sum[j];
      if (x0 + (j + 1) * L > X)  // the vector that reaches past column X
        for (int64_t i = std::max<int64_t>(X - x0 - j * L, 0); i < L; ++i) inv[i] = 0;
      store(inverse + x0 + j * L, inv);
    }
  });
}

}  // namespace
}  // namespace convplus::detail
