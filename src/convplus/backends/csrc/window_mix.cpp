// The windowed Conv+ mixing step on CPU, forward and backward, with the attention term and the depthwise
// convolution term fused in one pass over the window:
//
//   z[d, i] = sum_w (g * P[w, i] + r[d, w]) * v[d, i + o_w],   P[., i] = softmax_w(<q[:, i], k[:, i + o_w]>)
//
// (offsets o_w whose key leaves the query's window are excluded from the softmax; the convolution term sees every
// in-grid key, and zeros outside the grid).
// With the 'direct' score the keys and queries are computed in the same pass from the features f instead of read:
// k = unit(f + pos) over each head's channels (as direct_score.cpp computes it), s(i, j) = tau_h <k_i, k_j>. That
// score is symmetric: the forward computes it once for most pairs (i, j) and (j, i) (MirrorCache).
//
// Layout: q, k (B, K, Dq, T, H, X), v (B, K, D, T, H, X), of any strides (channels-first or channels-last: the
// outputs take the layout of the input they match, z and dv that of v, dq and dk those of q and k); 1-d and 2-d
// grids are padded to 3 spatial dims with size 1. gain (K,); kernel (K, D, P) flattened, or empty for no
// convolution term, and tap_index (W,): the kernel entry at each window offset (-1: none), giving the taps r
// (K, W, D);
// offsets (W, 3) int64, row-major over (t, y, x), every offset some query's window uses; bounds (T + H + X, 2)
// int64, each query's own window among them (window_geometry.h, forward only: backward reads the saved
// probabilities, zero outside the window); bias (K, D) or empty, added to z. Head of slice bk is bk % K.
//
// The forward takes the K heads of each row of positions in turn, with a row cache per head, and writes the row
// out once for all of them; a channels-last row entering the window is first read whole into the cache.
// Every inner loop runs over x in register tiles of whole SIMD vectors. The rows a query row needs are copied
// into per-thread buffers with a zero halo of max|o_x| on each side and zero columns up to a whole number of
// vectors, so the tiles never test a bound: out-of-grid keys read zeros (and get -inf scores). Buffers and
// their rows start on a vector boundary (the left halo is widened to a whole vector), so the unshifted operand
// of every product is an aligned load.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <vector>

#include "checks.h"
#include "phase_clock.h"
#include "register_tiles.h"
#include "row_cache.h"
#include "simd.h"
#include "window_geometry.h"

namespace convplus {
namespace {

using namespace detail;

// The taps of head h at the M live offsets live[m] (increasing), as an (M, D) matrix: a view of taps where the
// live offsets are consecutive, else copied into out; none without a convolution term.
template <typename T>
TapMatrix<T> live_taps(const T* taps, int64_t h, const std::vector<int64_t>& live, int64_t M, const Geometry& g,
                       T* out) {
  if (!taps || !M) return {};
  if (live[M - 1] - live[0] == M - 1) return {taps + (h * g.W + live[0]) * g.D, g.D};
  for (int64_t m = 0; m < M; ++m) std::memcpy(out + m * g.D, taps + (h * g.W + live[m]) * g.D, g.D * sizeof(T));
  return {out, g.D};
}

// Where the scores come from: q and k (B, K, Dq, T, H, X), or, with the 'direct' score (features non-null), the
// features f (B, K, Dq, T, H, X), pos (K, Dq, T, H, X) contiguous or null and temperature (K,).
template <typename T>
struct ScoreInputs {
  Rows<const T> q;
  Rows<const T> k;
  Rows<const T> features;
  const T* pos;
  const T* temperature;
};

// The scores that the query rows a thread has computed at their own offsets, kept for the next query rows
// to read back (the 'direct' score is symmetric, s(i, j) = s(j, i)): the last span_y rows, each (W, Xp) with its
// values at column lead (zero around them, so that shifted reads stay finite), and which row each slot holds.
template <typename T>
class MirrorCache {
 public:
  MirrorCache(const Geometry& g, bool enabled)
      : g_(g), data_(enabled ? g.span_y * g.W * g.Xp : 0, T(0)), tag_(enabled ? g.span_y : 0, -1) {}

  // The slot for query row index ((bk * T + t) * H + y), at column lead of its offset 0.
  T* store(int64_t index) {
    tag_[index % g_.span_y] = index;
    return slot(index);
  }
  // Row index's slot as store left it, or null if another row has taken it since (or no row stored it).
  T* find(int64_t index) { return tag_[index % g_.span_y] == index ? slot(index) : nullptr; }

 private:
  T* slot(int64_t index) { return data_.data() + index % g_.span_y * g_.W * g_.Xp + g_.lead; }
  const Geometry& g_;
  Buffer<T> data_;
  std::vector<int64_t> tag_;
};

template <typename T>
void forward_kernel(const ScoreInputs<T>& score, const Rows<const T>& v, const T* gain, const T* taps,
                    const T* bias, const Geometry& g, const WindowBounds& window, const Rows<T>& out, T* probs) {
  const int64_t rows_total = g.BK * g.T * g.H;
  const bool direct = score.features.data != nullptr;
  const RowOrder order(g, at::get_num_threads(), true);
  // the rows of one position row's heads are written out together where its heads' channels are consecutive
  const bool heads_together = out.head == g.D * out.channel;
  at::parallel_for(0, rows_total, 1, [&](int64_t begin, int64_t end) {
    PhaseClock clock;
    Buffer<T> qb(direct ? 0 : g.Dq * g.Xp, T(0)), p(g.W * g.Xr), zb(g.K * g.D * g.Xr), scale(g.Xr);
    // per head: the heads of a row are taken in turn, each head's rows stay cached for its next row
    std::vector<RowCache<T>> kcs, vcs;
    std::vector<MirrorCache<T>> mirrors;
    kcs.reserve(g.K);
    vcs.reserve(g.K);
    mirrors.reserve(g.K);
    for (int64_t h = 0; h < g.K; ++h) {
      kcs.emplace_back(direct ? score.features : score.k, g.Dq, g, direct, score.pos, &clock);
      vcs.emplace_back(v, g.D, g);
      mirrors.emplace_back(g, direct);
    }
    // the position row (image, t, y) being computed, and its heads first .. first + count - 1, computed in zb and
    // not yet written out
    int64_t current = -1, first = 0, count = 0;
    const auto write_out = [&] {
      if (!count) return;
      const int64_t bk = current / (g.T * g.H) * g.K + first, t = current / g.H % g.T, y = current % g.H;
      if (heads_together)
        scatter_rows(zb.data() + first * g.D * g.Xr, count * g.D, g, bk, t, y, out);
      else
        for (int64_t h = 0; h < count; ++h)
          scatter_rows(zb.data() + (first + h) * g.D * g.Xr, g.D, g, bk + h, t, y, out);
      first += count;
      count = 0;
    };
    std::vector<const T*> weight(g.W), value(g.W), shifted(g.W);
    std::vector<T*> numerator(g.W);  // each offset's scores, then numerators: a row of p or of a MirrorCache slot
    Buffer<T> zeros(g.Xr, T(0));  // the row of a masked key row, for the numerators read in place
    std::vector<T> tap(g.D * g.W);
    std::vector<int64_t> live(g.W);
    const T neg_inf = -std::numeric_limits<T>::infinity();
    // the 'direct' score's features are often the values themselves (proj=False): their rows are read once
    const bool shared = direct && g.Dq == g.D && score.features.same_as(v);
    for (int64_t position = begin; position < end; ++position) {
      const int64_t index = order[position];
      const int64_t bk = index / (g.T * g.H), t = index / g.H % g.T, y = index % g.H, h = head(g, bk);
      const int64_t position_row = (bk / g.K * g.T + t) * g.H + y;
      if (position_row != current) {
        write_out();
        current = position_row;
        first = h;
        // the rows entering the window, each read whole into the cache for the heads' gathers
        for (int64_t r = 0; r < g.rows(); ++r)
          if (g.ry[r] == g.ry_max) {
            load_row_into_cache(v, g.D, g, bk, t + g.rt[r], y + g.ry[r]);
            if (!shared)
              load_row_into_cache(direct ? score.features : score.k, g.Dq, g, bk, t + g.rt[r], y + g.ry[r]);
          }
      }
      RowCache<T>&kc = kcs[h], &vc = vcs[h];
      MirrorCache<T>& computed = mirrors[h];
      vc.gather(bk, t, y, 1);
      kc.gather(bk, t, y, 1, shared ? &vc : nullptr);
      if (!direct) gather_row(score.q, g.Dq, g, bk, t, y, qb.data());
      clock.lap(Phase::kForwardRowsIn);
      const T* query = direct ? kc.row(g.center_row) : qb.data();
      // p[w] = <query, k[:, i + o_w]>, times tau for the 'direct' score (s = tau <k_i, k_j>), whose |s| <= |tau|
      // cannot overflow an exponential while |tau| <= 64: then p[w] = exp(s) at once, with no max subtracted.
      const T tau = direct ? score.temperature[h] : T(1);
      const bool bounded = direct && std::abs(tau) <= T(64);
      // With bounded 'direct' scores and a symmetric window the numerators are final as computed: the query's
      // own offsets go straight into its MirrorCache slot (masked there: zero outside its window and from column
      // X on) and the mirrored ones are read in place from earlier queries' slots, not copied into p.
      const bool in_place = bounded && window.symmetric;
      T* kept = direct ? computed.store(index) : nullptr;
      for (int64_t w = 0; w < g.W; ++w) numerator[w] = p.data() + w * g.Xr;
      const auto scores = [&](int64_t r, const std::vector<int64_t>& ws, bool into_slot) {
        T* out = into_slot ? kept : p.data();
        const int64_t stride = into_slot ? g.Xp : g.Xr;
        row_dots<T, false>(query + g.lead, kc.row(r) + g.lead, ws, g.Dq, g, out, stride, nullptr);
        for (const int64_t w : ws) {
          T* row = numerator[w] = out + w * stride;
          if (!direct) continue;
          if (bounded)
            scaled_exp(row, tau, g.Xr);
          else
            for (int64_t x = 0; x < g.Xr; ++x) row[x] *= tau;
          if (!into_slot) continue;
          for (const int64_t x : window.blocked_x[w]) row[x] = T(0);
          std::fill(row + g.X, row + g.Xr, T(0));
        }
      };
      // Each query computes its own offsets, the 'direct' score's at every key row in the grid for the queries
      // that read them back; those read back the mirrored offsets from the query i + o_w where this thread
      // computed it, and compute them where not (the same dot products, in the same order: the same values).
      const auto& own = direct ? g.own_by_row : g.by_row;
      for (int64_t r = 0; r < g.rows(); ++r)
        if (kc.valid(r) && !own[r].empty() && (direct || window.row_in_window(g, t, y, r)))
          scores(r, own[r], in_place);
      if (direct) {
        if (!in_place)
          for (int64_t r = 0; r < g.rows(); ++r)
            if (kc.valid(r))
              for (const int64_t w : own[r]) std::memcpy(kept + w * g.Xp, numerator[w], g.Xr * sizeof(T));
        for (int64_t r = 0; r < g.rows(); ++r) {
          if (g.mirrored_by_row[r].empty() || !kc.valid(r) || !window.row_in_window(g, t, y, r)) continue;
          T* source = computed.find(index + g.rt[r] * g.H + g.ry[r]);
          if (!source) {
            scores(r, g.mirrored_by_row[r], false);
            continue;
          }
          for (const int64_t w : g.mirrored_by_row[r]) {
            T* mirrored = source + g.mirror[w] * g.Xp + g.ox[w];
            if (in_place)
              numerator[w] = mirrored;
            else
              std::memcpy(numerator[w], mirrored, g.Xr * sizeof(T));
          }
        }
      }
      clock.lap(Phase::kForwardScores);
      // masked where the key leaves the query's window (the grid, or a shifted window): whole rows read as the
      // masked value, the blocked columns of the rows in p are set to it
      const T masked = bounded ? T(0) : neg_inf;
      for (int64_t r = 0; r < g.rows(); ++r)
        if (!kc.valid(r) || !window.row_in_window(g, t, y, r))
          for (const int64_t w : g.by_row[r]) {
            if (in_place) {
              numerator[w] = zeros.data();
              continue;
            }
            std::fill(numerator[w], numerator[w] + g.Xr, masked);
          }
      for (int64_t w = 0; w < g.W; ++w)
        if (numerator[w] == p.data() + w * g.Xr)
          for (const int64_t x : window.blocked_x[w]) numerator[w][x] = masked;
      softmax_numerators(numerator.data(), g.W, g.X, g.Xr, bounded, scale.data());  // P[w] = numerator[w] * scale
      if (probs) {  // P[w], kept for backward
        T* dst = probs + index * g.W * g.Xr;
        for (int64_t w = 0; w < g.W; ++w)
          for (int64_t x = 0; x < g.Xr; ++x) dst[w * g.Xr + x] = numerator[w][x] * scale[x];
      }
      const T gh = gain[h];
      for (int64_t x = 0; x < g.Xr; ++x) scale[x] *= gh;
      clock.lap(Phase::kForwardSoftmax);
      // z[d] = sum_w (g inverse p[w] + r[d, w]) * v[d, i + o_w] + b[d] over the offsets whose values lie in the grid
      int64_t M = 0;
      for (int64_t w = 0; w < g.W; ++w)
        if (vc.valid(g.row[w])) {
          weight[M] = numerator[w];
          value[M] = vc.row(g.row[w]) + g.lead + g.ox[w];
          live[M++] = w;
        }
      window_sum<T>(weight.data(), value.data(), g.Xp, live_taps(taps, h, live, M, g, tap.data()), scale.data(),
                    bias ? bias + h * g.D : nullptr, M, g.D, g.Xr, zb.data() + h * g.D * g.Xr, shifted);
      ++count;
      clock.lap(Phase::kForwardMix);
      if (!heads_together || first + count == g.K) write_out();
      clock.lap(Phase::kForwardRowsOut);
    }
    write_out();
    clock.lap(Phase::kForwardRowsOut);
  });
}

constexpr int64_t kSlicesPerThread = 4;  // the fewest (B, K) slices per thread that the backward splits by slice

template <typename T>
void backward_kernel(const Rows<const T>& q, const Rows<const T>& k, const Rows<const T>& v, const T* gain,
                     const T* taps, const T* probs, const Rows<const T>& gout, const Geometry& g,
                     const Rows<T>& gq, const Rows<T>& gk, const Rows<T>& gv, double* ggain, double* gtaps) {
  const int64_t rows_total = g.BK * g.T * g.H;
  std::mutex reduce;
  // dS of the query rows from first on, (rows, W, Xr) at gscore, is written by pass 1 and read by pass 2.
  struct ScoreGrads {
    T* data;
    int64_t first;
    T* row(int64_t index, int64_t w, const Geometry& g) const { return data + ((index - first) * g.W + w) * g.Xr; }
  };
  // pass 1, per query row i: dP[w] = <gout[:, i], v[:, i + o_w]> (and dr[d, w] = sum_i gout[d, i] v[d, i + o_w]),
  // dgain += sum_w P dP, dS = g P (dP - sum_w P dP), dq[:, i] = sum_w dS[w] k[:, i + o_w].
  const auto pass1 = [&](int64_t begin, int64_t end, const RowOrder& order, const ScoreGrads& gscore) {
    Buffer<T> gb(g.D * g.Xp, T(0)), dp(g.W * g.Xr), dot(g.Xr), zb(g.Dq * g.Xr);
    RowCache<T> kc(k, g.Dq, g), vc(v, g.D, g);
    std::vector<const T*> weight(g.W), value(g.W), shifted(g.W);
    std::vector<double> local_gain(g.K, 0.0), local_taps(taps ? g.K * g.D * g.W : 0, 0.0);
    // dr of the current slice per (w, d), summed lane-wise over its rows, then over the lanes into local_taps
    using V = typename Simd<T>::vec;
    std::vector<V, VectorAligned<V>> lane_taps(taps ? g.W * g.D : 0, V{});
    int64_t lane_bk = -1;
    PhaseClock clock;
    const auto flush_taps = [&] {
      if (lane_bk < 0) return;
      double* dst = local_taps.data() + head(g, lane_bk) * g.D * g.W;
      for (int64_t w = 0; w < g.W; ++w)
        for (int64_t d = 0; d < g.D; ++d) {
          dst[d * g.W + w] += horizontal_sum<V, T>(lane_taps[w * g.D + d]);
          lane_taps[w * g.D + d] = V{};
        }
    };
    for (int64_t position = begin; position < end; ++position) {
      const int64_t index = order[position];
      const int64_t bk = index / (g.T * g.H), t = index / g.H % g.T, y = index % g.H, h = head(g, bk);
      if (taps && bk != lane_bk) {
        flush_taps();
        lane_bk = bk;
      }
      gather_row(gout, g.D, g, bk, t, y, gb.data());
      kc.gather(bk, t, y, 1);
      vc.gather(bk, t, y, 1);
      const T* p = probs + index * g.W * g.Xr;
      T* s = gscore.row(index, 0, g);
      clock.lap(Phase::kBackwardRowsIn);
      for (int64_t r = 0; r < g.rows(); ++r) {
        if (vc.valid(r)) {
          if (taps)
            row_dots<T, true>(gb.data() + g.lead, vc.row(r) + g.lead, g.by_row[r], g.D, g, dp.data(), g.Xr,
                              lane_taps.data());
          else
            row_dots<T, false>(gb.data() + g.lead, vc.row(r) + g.lead, g.by_row[r], g.D, g, dp.data(), g.Xr, nullptr);
          continue;
        }
        for (const int64_t w : g.by_row[r]) std::fill(dp.data() + w * g.Xr, dp.data() + (w + 1) * g.Xr, T(0));
      }
      clock.lap(Phase::kBackwardProbabilityGrads);
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
      clock.lap(Phase::kBackwardSoftmax);
      window_sum<T>(weight.data(), value.data(), g.Xp, {}, nullptr, nullptr, M, g.Dq, g.Xr, zb.data(), shifted);
      clock.lap(Phase::kBackwardQueryGrads);
      scatter_rows(zb.data(), g.Dq, g, bk, t, y, gq);
      clock.lap(Phase::kBackwardRowsOut);
    }
    flush_taps();
    clock.lap(Phase::kBackwardProbabilityGrads);
    std::lock_guard<std::mutex> lock(reduce);
    for (int64_t i = 0; i < g.K; ++i) ggain[i] += local_gain[i];
    for (size_t i = 0; i < local_taps.size(); ++i) gtaps[i] += local_taps[i];
  };
  // pass 2, per key row j, gathering from the query rows i = j - o_w (no write conflicts):
  // dk[:, j] = sum_w dS[i, w] q[:, i], dv[d, j] = sum_w (g P[i, w] + r[d, w]) gout[d, i].
  const auto pass2 = [&](int64_t begin, int64_t end, const RowOrder& order, const ScoreGrads& gscore) {
    RowCache<T> qc(q, g.Dq, g), gc(gout, g.D, g);
    Buffer<T> sb(g.W * g.Xp, T(0)), pb(g.W * g.Xp, T(0)), zb(std::max(g.D, g.Dq) * g.Xr), tap(g.D * g.W);
    std::vector<const T*> sw(g.W), pw(g.W), qb_rows(g.W), gb_rows(g.W), shifted(g.W);
    std::vector<int64_t> live(g.W);
    PhaseClock clock;
    for (int64_t position = begin; position < end; ++position) {
      const int64_t index = order[position];
      const int64_t bk = index / (g.T * g.H), t = index / g.H % g.T, y = index % g.H, h = head(g, bk);
      qc.gather(bk, t, y, -1);
      gc.gather(bk, t, y, -1);
      const T gh = gain[h];
      int64_t M = 0;
      for (int64_t w = 0; w < g.W; ++w) {
        if (!qc.valid(g.row[w])) continue;
        const int64_t query_row = (bk * g.T + t - g.rt[g.row[w]]) * g.H + y - g.ry[g.row[w]];
        const T* srow = gscore.row(query_row, w, g);
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
      clock.lap(Phase::kBackwardRowsIn);
      window_sum<T>(sw.data(), qb_rows.data(), g.Xp, {}, nullptr, nullptr, M, g.Dq, g.Xr, zb.data(), shifted);
      clock.lap(Phase::kBackwardKeyGrads);
      scatter_rows(zb.data(), g.Dq, g, bk, t, y, gk);
      clock.lap(Phase::kBackwardRowsOut);
      window_sum<T>(pw.data(), gb_rows.data(), g.Xp, live_taps(taps, h, live, M, g, tap.data()), nullptr, nullptr, M,
                    g.D, g.Xr, zb.data(), shifted);
      clock.lap(Phase::kBackwardValueGrads);
      scatter_rows(zb.data(), g.D, g, bk, t, y, gv);
      clock.lap(Phase::kBackwardRowsOut);
    }
  };
  // Both passes slice by slice where there are enough slices for the threads, dS in a buffer of one slice per
  // thread: pass 2 then reads the slice's dS and P while they are still in cache. Otherwise each pass over all
  // rows, split between the threads in RowOrder, dS of all rows in one buffer.
  const int64_t slice_rows = g.T * g.H;
  if (g.BK >= kSlicesPerThread * at::get_num_threads()) {
    const RowOrder in_turn(g, 1, false);
    at::parallel_for(0, g.BK, 1, [&](int64_t first, int64_t last) {
      Buffer<T> slice(slice_rows * g.W * g.Xr);
      for (int64_t bk = first; bk < last; ++bk) {
        const ScoreGrads gscore{slice.data(), bk * slice_rows};
        pass1(bk * slice_rows, (bk + 1) * slice_rows, in_turn, gscore);
        pass2(bk * slice_rows, (bk + 1) * slice_rows, in_turn, gscore);
      }
    });
    return;
  }
  Buffer<T> all(rows_total * g.W * g.Xr);
  const ScoreGrads gscore{all.data(), 0};
  const RowOrder order(g, at::get_num_threads(), false);
  at::parallel_for(0, rows_total, 1, [&](int64_t begin, int64_t end) { pass1(begin, end, order, gscore); });
  at::parallel_for(0, rows_total, 1, [&](int64_t begin, int64_t end) { pass2(begin, end, order, gscore); });
}

// taps (K, W, D): the kernel's value at each window offset, 0 where tap_index is -1; empty without a kernel.
// kernel (K, D, P).
template <typename T>
Buffer<T> taps_at_offsets(const at::Tensor& kernel, const at::Tensor& tap_index) {
  if (!kernel.numel()) return {};
  const at::Tensor entries = kernel.contiguous();
  const int64_t K = entries.size(0), D = entries.size(1), P = entries.size(2), W = tap_index.size(0);
  const T* src = entries.data_ptr<T>();
  const int64_t* index = tap_index.data_ptr<int64_t>();
  Buffer<T> taps(K * W * D);
  for (int64_t h = 0; h < K; ++h)
    for (int64_t w = 0; w < W; ++w)
      for (int64_t d = 0; d < D; ++d) taps[(h * W + w) * D + d] = index[w] < 0 ? T(0) : src[(h * D + d) * P + index[w]];
  return taps;
}

// The kernel's gradient (K, D, P), of its dtype: each tap's gradient gtaps (K, D, W) summed, in double, into its
// kernel entry (none where tap_index is -1).
at::Tensor kernel_gradient(const at::Tensor& kernel, const at::Tensor& tap_index, const at::Tensor& gtaps) {
  auto gkernel = at::zeros(kernel.sizes(), kernel.options().dtype(at::kDouble));
  if (!kernel.numel()) return gkernel.to(kernel.scalar_type());
  const int64_t rows = kernel.size(0) * kernel.size(1), P = kernel.size(2), W = tap_index.size(0);
  const int64_t* index = tap_index.data_ptr<int64_t>();
  const double* src = gtaps.data_ptr<double>();
  double* dst = gkernel.data_ptr<double>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t w = 0; w < W; ++w)
      if (index[w] >= 0) dst[r * P + index[w]] += src[r * W + w];
  return gkernel.to(kernel.scalar_type());
}

// The checks shared by the windowed-mix entry points: v (B, K, D, T, H, X) of any strides fixes the dtype and the
// sizes; query (q or features, named query_name) (B, K, Dq, T, H, X) of any strides; gain (K,); offsets (W, 3)
// inside the grid, including the query's own row; kernel (K, D, P) with tap_index (W,) of entries in [-1, P), or
// both empty.
void check_window(const ArgumentChecks& check, const char* query_name, const at::Tensor& query,
                  const at::Tensor& v, const at::Tensor& gain, const at::Tensor& kernel,
                  const at::Tensor& tap_index, const at::Tensor& offsets) {
  check.floating("v", v, true);
  check.rank("v", v, 6, "(B, K, D, T, H, X)");
  const int64_t B = v.size(0), K = v.size(1), D = v.size(2), T = v.size(3), H = v.size(4), X = v.size(5);
  check.like(query_name, query, "v", v, true);
  check.rank(query_name, query, 6, "(B, K, Dq, T, H, X)");
  check.shape(query_name, query, {B, K, query.size(2), T, H, X}, "(B, K, Dq, T, H, X)");
  check.like("gain", gain, "v", v);
  check.shape("gain", gain, {K}, "(K,)");
  check.index("offsets", offsets);
  check.rank("offsets", offsets, 2, "(W, 3)");
  const int64_t W = offsets.size(0);
  check.require(W >= 1 && offsets.size(1) == 3, "offsets must have shape (W, 3) with W >= 1, got ", offsets.sizes());
  const auto off = offsets.accessor<int64_t, 2>();
  const int64_t extent[3] = {T, H, X};
  bool own_row = false;
  for (int64_t w = 0; w < W; ++w) {
    for (int64_t d = 0; d < 3; ++d)
      check.require(-extent[d] < off[w][d] && off[w][d] < extent[d],
                    "offsets must lie inside the grid (|offset| < (T, H, X) = (", T, ", ", H, ", ", X,
                    ") in every dim), got offsets[", w, "] = (", off[w][0], ", ", off[w][1], ", ", off[w][2], ")");
    own_row = own_row || (off[w][0] == 0 && off[w][1] == 0);
  }
  check.require(own_row, "offsets must include the query's own row (an offset (0, 0, x)), got none");
  check.like("kernel", kernel, "v", v);
  check.index("tap_index", tap_index);
  check.rank("tap_index", tap_index, 1, "(W,)");
  if (!kernel.numel()) {
    check.require(!tap_index.numel(), "tap_index must have shape (0,) as kernel is empty, got ", tap_index.sizes());
    return;
  }
  check.rank("kernel", kernel, 3, "(K, D, P) or empty");
  const int64_t P = kernel.size(2);
  check.shape("kernel", kernel, {K, D, P}, "(K, D, P)");
  check.shape("tap_index", tap_index, {W}, "(W,)");
  for (const int64_t entry : c10::ArrayRef<int64_t>(tap_index.data_ptr<int64_t>(), W))
    check.require(-1 <= entry && entry < P, "tap_index must hold kernel entries in [-1, P = ", P, "), got ", entry);
}

// bounds (T + H + X, 2) int64: per coordinate c of a dim of size S, a window lo <= 0 <= hi inside the grid.
void check_bounds(const ArgumentChecks& check, const at::Tensor& bounds, const at::Tensor& v) {
  check.index("bounds", bounds);
  const int64_t extent[3] = {v.size(3), v.size(4), v.size(5)};
  check.shape("bounds", bounds, {extent[0] + extent[1] + extent[2], 2}, "(T + H + X, 2)");
  const auto b = bounds.accessor<int64_t, 2>();
  int64_t row = 0;
  for (int64_t d = 0; d < 3; ++d)
    for (int64_t c = 0; c < extent[d]; ++c, ++row)
      check.require(-c <= b[row][0] && b[row][0] <= 0 && 0 <= b[row][1] && b[row][1] < extent[d] - c,
                    "bounds must hold a window lo <= 0 <= hi inside the grid at every coordinate, got bounds[", row,
                    "] = (", b[row][0], ", ", b[row][1], ")");
}

// bias (K, D) or empty, of the dtype of v.
void check_bias(const ArgumentChecks& check, const at::Tensor& bias, const at::Tensor& v,
                const at::Tensor& gain) {
  check.like("bias", bias, "v", v);
  if (bias.numel()) check.shape("bias", bias, {v.size(1), v.size(2)}, "(K, D)");
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& features,
                                   const at::Tensor& pos, const at::Tensor& temperature, const at::Tensor& v,
                                   const at::Tensor& gain, const at::Tensor& kernel,
                                   const at::Tensor& tap_index, const at::Tensor& offsets,
                                   const at::Tensor& bounds, const at::Tensor& bias, bool save_probs) {
  const at::Tensor& shape = features.dim() == 6 ? features : q;
  const Geometry g(shape, v, offsets, kVectorBytes / v.element_size());
  const WindowBounds window(bounds, g);
  auto out = at::empty_like(v);
  auto probs = at::empty({save_probs ? g.BK * g.T * g.H : 0, g.W, g.Xr}, v.options());
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "convplus_window_mix_forward", [&] {
    auto data = [](const at::Tensor& t) { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    auto rows = [](const at::Tensor& t) { return t.dim() == 6 ? Rows<const scalar_t>(t) : Rows<const scalar_t>(); };
    const ScoreInputs<scalar_t> score{rows(q), rows(k), rows(features), data(pos), data(temperature)};
    const Buffer<scalar_t> taps = taps_at_offsets<scalar_t>(kernel, tap_index);
    forward_kernel<scalar_t>(score, Rows<const scalar_t>(v), gain.data_ptr<scalar_t>(),
                             taps.empty() ? nullptr : taps.data(), data(bias), g, window, Rows<scalar_t>(out),
                             save_probs ? probs.data_ptr<scalar_t>() : nullptr);
  });
  return {out, probs};
}

}  // namespace

std::vector<at::Tensor> window_mix_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor gain,
                                              at::Tensor kernel, at::Tensor tap_index, at::Tensor offsets,
                                              at::Tensor bounds, at::Tensor bias, bool save_probs) {
  const ArgumentChecks check("window_mix_forward");
  check_window(check, "q", q, v, gain, kernel, tap_index, offsets);
  check.like("k", k, "v", v, true);
  check.shape("k", k, q.sizes().vec(), "(B, K, Dq, T, H, X)");
  check_bounds(check, bounds, v);
  check_bias(check, bias, v, gain);
  const auto none = v.new_empty({0});
  return forward(q, k, none, none, none, v, gain, kernel, tap_index, offsets, bounds, bias, save_probs);
}

std::vector<at::Tensor> direct_window_mix_forward(at::Tensor features, at::Tensor pos,
                                                     at::Tensor temperature, at::Tensor v, at::Tensor gain,
                                                     at::Tensor kernel, at::Tensor tap_index,
                                                     at::Tensor offsets, at::Tensor bounds, at::Tensor bias,
                                                     bool save_probs) {
  const ArgumentChecks check("direct_window_mix_forward");
  check_window(check, "features", features, v, gain, kernel, tap_index, offsets);
  const int64_t K = v.size(1), Dq = features.size(2), N = v.size(3) * v.size(4) * v.size(5);
  check.like("pos", pos, "v", v);
  if (pos.numel()) check.shape("pos", pos, {K, Dq, N}, "(K, Dq, N)");
  check.like("temperature", temperature, "v", v);
  check.shape("temperature", temperature, {K}, "(K,)");
  check_bounds(check, bounds, v);
  check_bias(check, bias, v, gain);
  const auto none = v.new_empty({0});
  return forward(none, none, features, pos, temperature, v, gain, kernel, tap_index, offsets, bounds, bias,
                 save_probs);
}

std::vector<at::Tensor> window_mix_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor gain,
                                               at::Tensor kernel, at::Tensor tap_index, at::Tensor probs,
                                               at::Tensor gout, at::Tensor offsets) {
  const ArgumentChecks check("window_mix_backward");
  check_window(check, "q", q, v, gain, kernel, tap_index, offsets);
  check.like("k", k, "v", v, true);
  check.shape("k", k, q.sizes().vec(), "(B, K, Dq, T, H, X)");
  check.like("gout", gout, "v", v, true);
  check.shape("gout", gout, v.sizes().vec(), "(B, K, D, T, H, X)");
  const Geometry g(q, v, offsets, kVectorBytes / q.element_size());
  check.like("probs", probs, "v", v);
  check.shape("probs", probs, {g.BK * g.T * g.H, g.W, g.Xr}, "(BK*T*H, W, Xr)");
  auto gq = at::empty_like(q), gk = at::empty_like(k), gv = at::empty_like(v);
  auto acc = q.options().dtype(at::kDouble);
  auto ggain = at::zeros({g.K}, acc), gtaps = at::zeros({kernel.numel() ? g.K * g.D * g.W : 0}, acc);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "convplus_window_mix_backward", [&] {
    using In = Rows<const scalar_t>;
    using Out = Rows<scalar_t>;
    const Buffer<scalar_t> taps = taps_at_offsets<scalar_t>(kernel, tap_index);
    backward_kernel<scalar_t>(In(q), In(k), In(v), gain.data_ptr<scalar_t>(), taps.empty() ? nullptr : taps.data(),
                              probs.data_ptr<scalar_t>(), In(gout), g, Out(gq), Out(gk),
                              Out(gv), ggain.data_ptr<double>(), gtaps.data_ptr<double>());
  });
  return {gq, gk, gv, ggain.to(q.scalar_type()), kernel_gradient(kernel, tap_index, gtaps)};
}

}  // namespace convplus
