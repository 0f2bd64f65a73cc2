// The per-thread row buffers of the CPU mixing kernel: rows of a (B, K, C, T, H, X) tensor of any strides copied
// into padded (C, Xp) buffers laid out as window_geometry.h describes, optionally turned into the 'direct'
// score's keys, and copied back out.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "direct_score.h"
#include "phase_clock.h"
#include "register_tiles.h"
#include "simd.h"
#include "strided.h"
#include "window_geometry.h"

namespace convplus::detail {
namespace {  // internal linkage, see simd.h

// Copies row (t, y) of src's slice bk into buf (C, Xp) at column lead; the caller zeroes buf once, so the columns
// outside stay zero.
template <typename T>
void gather_row(const Rows<const T>& src, int64_t C, const Geometry& g, int64_t bk, int64_t t, int64_t y, T* buf) {
  copy_block(src.at(bk, 0, t, y), src.channel, src.x, buf + g.lead, g.Xp, int64_t{1}, C, g.X);
}

// The row (t, y) of slice bk that gather_row copied into src (C, Xp), as the 'direct' score's keys in buf (C, Xp;
// src itself for in place): k = x^ / max(||x^||, 1e-12) over the C channels at every column, x^ = x + pos (pos
// (K, C, T, H, X), or null), in the order of operations of direct_score.cpp. By whole vectors, each read once: the
// columns from X on are zero and stay zero.
template <typename T>
void unit_row(const T* src, T* buf, const T* pos, int64_t C, const Geometry& g, int64_t bk, int64_t t, int64_t y) {
  const T* from = src + g.lead;
  T* rows = buf + g.lead;
  const int64_t pos_channel = g.T * g.H * g.X;
  const T* pos_row = pos ? pos + (bk % g.K * C * g.T + t) * g.H * g.X + y * g.X : nullptr;
  over_tiles<T, 1>(g.Xr, [&](auto, int64_t x, auto simd) {
    using V = typename decltype(simd)::vec;
    constexpr int64_t L = decltype(simd)::width;
    V norm{};
    for (int64_t c = 0; c < C; ++c) {
      V r = load<V>(from + c * g.Xp + x);
      if (pos_row) r += load_first<V>(pos_row + c * pos_channel + x, std::min(L, g.X - x));
      store(rows + c * g.Xp + x, r);
      norm += r * r;
    }
    const V inverse = T(1) / sqrt_vec<V, T>(norm < T(kMinSquaredNorm) ? V{} + T(kMinSquaredNorm) : norm);
    for (int64_t c = 0; c < C; ++c) store(rows + c * g.Xp + x, load<V>(rows + c * g.Xp + x) * inverse);
  });
}

// The rows around a query (or key) row, copied into padded (C, Xp) buffers and kept while later rows still use
// them: consecutive rows share all but one of their neighbor rows, so each source row is copied about once.
// Direct-mapped on (t mod span_t, y mod span_y): the rows one query needs never share a slot. With ``unit``,
// each row is turned into the 'direct' score's keys as it is copied (unit_row, with pos or null), timed apart
// from the copy on clock where one is given.
template <typename T>
class RowCache {
 public:
  RowCache(const Rows<const T>& src, int64_t C, const Geometry& g, bool unit = false, const T* pos = nullptr,
           PhaseClock* clock = nullptr)
      : src_(src), pos_(pos), unit_(unit), C_(C), g_(g), clock_(clock), data_(g.span_t * g.span_y * C * g.Xp, T(0)),
        tag_(g.span_t * g.span_y, -1), rows_(g.rows()), valid_(g.rows()) {}

  // Points rows()[r] at row (t + sign * rt[r], y + sign * ry[r]) of slice bk for every r with valid()[r]. A row
  // that copy_of (a cache of the same tensor and C, without unit) holds is copied from it, not read again.
  void gather(int64_t bk, int64_t t, int64_t y, int64_t sign, const RowCache* copy_of = nullptr) {
    for (int64_t r = 0; r < g_.rows(); ++r) {
      const int64_t tt = t + sign * g_.rt[r], yy = y + sign * g_.ry[r];
      valid_[r] = g_.row_in_grid(tt, yy);
      if (!valid_[r]) continue;
      const int64_t slot = tt % g_.span_t * g_.span_y + yy % g_.span_y, id = (bk * g_.T + tt) * g_.H + yy;
      T* buf = data_.data() + slot * C_ * g_.Xp;
      if (tag_[slot] != id) {
        // a row that copy_of holds is read from there (and, with unit, turned into keys in the same pass)
        const T* held = copy_of && copy_of->tag_[slot] == id ? copy_of->data_.data() + slot * C_ * g_.Xp : nullptr;
        if (!held) gather_row(src_, C_, g_, bk, tt, yy, buf);
        if (unit_) {
          if (clock_) clock_->lap(Phase::kForwardRowsIn);
          unit_row(held ? held : buf, buf, pos_, C_, g_, bk, tt, yy);
          if (clock_) clock_->lap(Phase::kForwardKeys);
        } else if (held) {
          std::memcpy(buf, held, C_ * g_.Xp * sizeof(T));
        }
        tag_[slot] = id;
      }
      rows_[r] = buf;
    }
  }
  const T* row(int64_t r) const { return rows_[r]; }
  bool valid(int64_t r) const { return valid_[r]; }

 private:
  Rows<const T> src_;
  const T* pos_;
  bool unit_;
  int64_t C_;
  const Geometry& g_;
  PhaseClock* clock_;
  Buffer<T> data_;
  std::vector<int64_t> tag_;
  std::vector<const T*> rows_;
  std::vector<char> valid_;
};

// Reads row (t, y) of every head of slice bk's image into the cache, where the heads' C channels at each position
// are contiguous (channels-last): one pass of independent whole-vector loads over the row, many lines in flight at
// once, whose lines the gathers of each head's channels alone, a few bytes at every position, then find in cache
// (software prefetches of the same lines measured slower). Nothing for another layout or a row outside the grid.
template <typename T>
void load_row_into_cache(const Rows<const T>& src, int64_t C, const Geometry& g, int64_t bk, int64_t t, int64_t y) {
  if (src.channel != 1 || src.head != C || src.x != g.K * C || !g.row_in_grid(t, y)) return;
  using V = typename Simd<T>::vec;
  constexpr int64_t L = Simd<T>::width;
  const T* row = src.at(bk - bk % g.K, 0, t, y);
  V sum{};
  for (int64_t i = 0; i + L <= g.X * g.K * C; i += L) sum += load<V>(row + i);
  // the loads are kept: their sum is an input of this empty instruction
#if defined(__x86_64__)
  asm volatile("" : : "v"(sum));  // "v": an x86 vector register
#else
  asm volatile("" : : "g"(&sum) : "memory");
#endif
}

// Copies the C rows of buf (C, Xr) to row (t, y) of dst's slice bk.
template <typename T>
void scatter_rows(const T* buf, int64_t C, const Geometry& g, int64_t bk, int64_t t, int64_t y, const Rows<T>& dst) {
  copy_block(static_cast<const T*>(buf), g.Xr, int64_t{1}, dst.at(bk, 0, t, y), dst.channel, dst.x, C, g.X);
}

}  // namespace
}  // namespace convplus::detail
