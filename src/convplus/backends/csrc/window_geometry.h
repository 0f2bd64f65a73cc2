// The window of the CPU mixing kernel on one grid: sizes, the offsets, the distinct (t, y) row offsets they use,
// each query's own window among them, and the padded row layout (X rounded up to whole vectors, with a zero halo
// of max|o_x| widened to whole vectors on each side).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <vector>

namespace convplus::detail {
namespace {  // internal linkage, see simd.h

// Sizes, the window's offsets, and the distinct (t, y) row offsets they use.
struct Geometry {
  int64_t BK, K, Dq, D, T, H, X, N;
  int64_t W, halo, lead, Xr, Xp;  // offsets; max |o_x|; halo, X rounded up to whole vectors; lead + Xr + lead
  std::vector<int64_t> ox, row;  // per offset: x offset, index of its (t, y) row offset
  std::vector<int64_t> rt, ry;   // distinct (t, y) row offsets
  std::vector<std::vector<int64_t>> by_row;  // per distinct row offset: the offsets w that use it
  // For a symmetric score (s(i, j) = s(j, i)): per offset, the index of -o_w or -1; per distinct row offset, the
  // offsets w computed at each query ('own': o_w >= 0 in row-major order, or without a mirror) and those read
  // back from the query i + o_w, which computed s(i + o_w, i) at its own offset -o_w ('mirrored').
  std::vector<int64_t> mirror;
  std::vector<std::vector<int64_t>> own_by_row, mirrored_by_row;
  int64_t span_t, span_y;        // rows from the lowest to the highest row offset, per dim
  int64_t ry_max;                // the highest y row offset: the rows entering the window as y advances
  int64_t center_row = -1;       // the row offset (0, 0): the query's own row

  // q (B, K, Dq, T, H, X), v (B, K, D, T, H, X); offsets (W, 3) int64, W >= 1, including the query's own row
  // (0, 0, x): the entry points check them. width: the lanes of a vector.
  Geometry(const at::Tensor& q, const at::Tensor& v, const at::Tensor& offsets, int64_t width)
      : BK(q.size(0) * q.size(1)), K(q.size(1)), Dq(q.size(2)), D(v.size(2)), T(q.size(3)), H(q.size(4)),
        X(q.size(5)), N(T * H * X), W(offsets.size(0)), halo(0) {
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
    own_by_row.resize(rows());
    mirrored_by_row.resize(rows());
    for (int64_t w = 0; w < W; ++w) {
      const int64_t o[3] = {off[w][0], off[w][1], off[w][2]};
      int64_t m = 0;
      while (m < W && !(off[m][0] == -o[0] && off[m][1] == -o[1] && off[m][2] == -o[2])) ++m;
      mirror.push_back(m < W ? m : -1);
      const bool negative = o[0] < 0 || (o[0] == 0 && (o[1] < 0 || (o[1] == 0 && o[2] < 0)));
      (negative && m < W ? mirrored_by_row : own_by_row)[row[w]].push_back(w);
    }
    span_t = *std::max_element(rt.begin(), rt.end()) - *std::min_element(rt.begin(), rt.end()) + 1;
    ry_max = *std::max_element(ry.begin(), ry.end());
    span_y = ry_max - *std::min_element(ry.begin(), ry.end()) + 1;
    lead = (halo + width - 1) / width * width;
    Xr = (X + width - 1) / width * width;
    Xp = lead + Xr + lead;
  }

  int64_t rows() const { return static_cast<int64_t>(rt.size()); }
  bool row_in_grid(int64_t t, int64_t y) const { return t >= 0 && t < T && y >= 0 && y < H; }
};

// Each query's own window among the offsets, from bounds (T + H + X, 2) int64: for each coordinate of each dim
// in turn, the first and last offset of its window (all inside the grid; wider than the grid's edges only under
// border='shift', where the offsets are the union of the queries' windows).
struct WindowBounds {
  std::vector<int64_t> lo, hi;                  // T + H + X entries
  std::vector<std::vector<int64_t>> blocked_x;  // per offset w: the columns x whose window leaves out o_x[w]
  bool symmetric = true;  // in every dim, key c + o is in the window of query c exactly when c is in that of c + o

  WindowBounds(const at::Tensor& bounds, const Geometry& g) : blocked_x(g.W) {
    const auto b = bounds.accessor<int64_t, 2>();
    for (int64_t c = 0; c < bounds.size(0); ++c) {
      lo.push_back(b[c][0]);
      hi.push_back(b[c][1]);
    }
    for (int64_t w = 0; w < g.W; ++w)
      for (int64_t x = 0; x < g.X; ++x)
        if (g.ox[w] < lo[g.T + g.H + x] || g.ox[w] > hi[g.T + g.H + x]) blocked_x[w].push_back(x);
    const int64_t extent[3] = {g.T, g.H, g.X};
    const std::vector<int64_t>* used[3] = {&g.rt, &g.ry, &g.ox};  // the offsets' values in each dim
    for (int64_t d = 0, first = 0; d < 3; first += extent[d], ++d)
      for (int64_t c = 0; c < extent[d]; ++c)
        for (const int64_t o : *used[d]) {
          const int64_t j = c + o;
          const bool there = lo[first + c] <= o && o <= hi[first + c];
          const bool back = j >= 0 && j < extent[d] && lo[first + j] <= -o && -o <= hi[first + j];
          symmetric = symmetric && there == back;
        }
  }

  // Whether the row offset r lies in the window of query row (t, y).
  bool row_in_window(const Geometry& g, int64_t t, int64_t y, int64_t r) const {
    return lo[t] <= g.rt[r] && g.rt[r] <= hi[t] && lo[g.T + y] <= g.ry[r] && g.ry[r] <= hi[g.T + y];
  }
};

inline int64_t head(const Geometry& g, int64_t bk) { return bk % g.K; }

// The order in which the threads take the query rows, index (bk * T + t) * H + y: image by image, each image's
// (t, y) rows cut into runs where it has fewer images than threads. Threads that share an image then write
// disjoint rows of it; taking its heads apart, they would write the heads of the same positions at once, which
// share cache lines in a channels-last tensor. Within a run, heads_inner takes the K heads of each row in turn
// (a row's heads can then be written out together), else all rows of one head before the next head.
class RowOrder {
 public:
  RowOrder(const Geometry& g, int64_t threads, bool heads_inner)
      : K_(g.K), rows_(g.T * g.H), heads_inner_(heads_inner) {
    const int64_t images = g.BK / g.K;
    runs_ = images >= threads ? 1 : std::min(rows_, (threads + images - 1) / images);
  }
  // The index of the row at position i of the order.
  int64_t operator[](int64_t i) const {
    const int64_t image = i / (K_ * rows_), at = i % (K_ * rows_);
    int64_t run = runs_ - 1;
    while (K_ * start(run) > at) --run;
    const int64_t first = start(run), length = start(run + 1) - first, local = at - K_ * first;
    const int64_t h = heads_inner_ ? local % K_ : local / length, row = heads_inner_ ? local / K_ : local % length;
    return (image * K_ + h) * rows_ + first + row;
  }

 private:
  int64_t start(int64_t run) const { return run * rows_ / runs_; }
  int64_t K_, rows_, runs_;
  bool heads_inner_;
};

}  // namespace
}  // namespace convplus::detail
