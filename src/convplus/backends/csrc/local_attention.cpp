// Windowed (neighborhood) attention term of Conv+ on CPU: forward and backward, fused over the window.
//
// Layout: q, k (B*K, Dq, T, H, X), v (B*K, D, T, H, X), contiguous (channels first, n-d grids padded to 3
// spatial dims with size 1). offsets (W, 3) int64: the window's offsets j - i that can land in the grid.
// Scores and softmax probabilities are (B*K, T, H, W, X): for a fixed row (t, y) and offset, the X positions
// are contiguous, so every inner loop runs over x and vectorizes.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

struct Grid {
  int64_t T, H, X, N;
};

// Range [x0, x1) of x for which x + ox stays in [0, X).
inline void x_range(int64_t X, int64_t ox, int64_t& x0, int64_t& x1) {
  x0 = std::max<int64_t>(0, -ox);
  x1 = std::min<int64_t>(X, X - ox);
}

template <typename scalar_t>
void forward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const int64_t* off, int64_t W,
                    int64_t BK, int64_t Dq, int64_t D, Grid g, scalar_t* out, scalar_t* probs) {
  const scalar_t neg_inf = -std::numeric_limits<scalar_t>::infinity();
#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t bk = 0; bk < BK; ++bk)
    for (int64_t t = 0; t < g.T; ++t)
      for (int64_t y = 0; y < g.H; ++y) {
        scalar_t* p = probs + ((bk * g.T + t) * g.H + y) * W * g.X;  // (W, X)
        for (int64_t w = 0; w < W; ++w) {
          const int64_t ot = off[3 * w], oy = off[3 * w + 1], ox = off[3 * w + 2];
          scalar_t* pw = p + w * g.X;
          int64_t x0, x1;
          x_range(g.X, ox, x0, x1);
          const bool row_ok = t + ot >= 0 && t + ot < g.T && y + oy >= 0 && y + oy < g.H;
          for (int64_t x = 0; x < g.X; ++x) pw[x] = (row_ok && x >= x0 && x < x1) ? scalar_t(0) : neg_inf;
          if (!row_ok) continue;
          for (int64_t d = 0; d < Dq; ++d) {
            const scalar_t* qr = q + ((bk * Dq + d) * g.T + t) * g.H * g.X + y * g.X;
            const scalar_t* kr = k + ((bk * Dq + d) * g.T + t + ot) * g.H * g.X + (y + oy) * g.X + ox;
            for (int64_t x = x0; x < x1; ++x) pw[x] += qr[x] * kr[x];
          }
        }
        // softmax over w for every x
        std::vector<scalar_t> mx(g.X, neg_inf), sum(g.X, scalar_t(0));
        for (int64_t w = 0; w < W; ++w)
          for (int64_t x = 0; x < g.X; ++x) mx[x] = std::max(mx[x], p[w * g.X + x]);
        for (int64_t w = 0; w < W; ++w)
          for (int64_t x = 0; x < g.X; ++x) {
            const scalar_t e = std::exp(p[w * g.X + x] - mx[x]);
            p[w * g.X + x] = e;
            sum[x] += e;
          }
        for (int64_t w = 0; w < W; ++w)
          for (int64_t x = 0; x < g.X; ++x) p[w * g.X + x] /= sum[x];
        // aggregation: out[d, t, y, x] = sum_w p[w, x] v[d, t + ot, y + oy, x + ox]
        for (int64_t d = 0; d < D; ++d) {
          scalar_t* o = out + ((bk * D + d) * g.T + t) * g.H * g.X + y * g.X;
          for (int64_t x = 0; x < g.X; ++x) o[x] = 0;
          for (int64_t w = 0; w < W; ++w) {
            const int64_t ot = off[3 * w], oy = off[3 * w + 1], ox = off[3 * w + 2];
            if (t + ot < 0 || t + ot >= g.T || y + oy < 0 || y + oy >= g.H) continue;
            int64_t x0, x1;
            x_range(g.X, ox, x0, x1);
            const scalar_t* vr = v + ((bk * D + d) * g.T + t + ot) * g.H * g.X + (y + oy) * g.X + ox;
            const scalar_t* pw = p + w * g.X;
            for (int64_t x = x0; x < x1; ++x) o[x] += pw[x] * vr[x];
          }
        }
      }
}

template <typename scalar_t>
void backward_kernel(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* probs,
                     const scalar_t* gout, const int64_t* off, int64_t W, int64_t BK, int64_t Dq, int64_t D, Grid g,
                     scalar_t* gs, scalar_t* gq, scalar_t* gk, scalar_t* gv) {
  // pass 1, per query row: dP[w, x] = <gout[:, i], v[:, i + o_w]>, dS = P * (dP - sum_w P dP); and
  // dq[:, i] = sum_w dS[w, x] k[:, i + o_w].
#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t bk = 0; bk < BK; ++bk)
    for (int64_t t = 0; t < g.T; ++t)
      for (int64_t y = 0; y < g.H; ++y) {
        const int64_t row = ((bk * g.T + t) * g.H + y) * W * g.X;
        const scalar_t* p = probs + row;
        scalar_t* s = gs + row;
        std::vector<scalar_t> dot(g.X, scalar_t(0));
        for (int64_t w = 0; w < W; ++w) {
          const int64_t ot = off[3 * w], oy = off[3 * w + 1], ox = off[3 * w + 2];
          scalar_t* sw = s + w * g.X;
          for (int64_t x = 0; x < g.X; ++x) sw[x] = 0;
          if (t + ot < 0 || t + ot >= g.T || y + oy < 0 || y + oy >= g.H) continue;
          int64_t x0, x1;
          x_range(g.X, ox, x0, x1);
          for (int64_t d = 0; d < D; ++d) {
            const scalar_t* go = gout + ((bk * D + d) * g.T + t) * g.H * g.X + y * g.X;
            const scalar_t* vr = v + ((bk * D + d) * g.T + t + ot) * g.H * g.X + (y + oy) * g.X + ox;
            for (int64_t x = x0; x < x1; ++x) sw[x] += go[x] * vr[x];
          }
          const scalar_t* pw = p + w * g.X;
          for (int64_t x = 0; x < g.X; ++x) dot[x] += pw[x] * sw[x];
        }
        for (int64_t w = 0; w < W; ++w)
          for (int64_t x = 0; x < g.X; ++x) s[w * g.X + x] = p[w * g.X + x] * (s[w * g.X + x] - dot[x]);
        for (int64_t d = 0; d < Dq; ++d) {
          scalar_t* dq = gq + ((bk * Dq + d) * g.T + t) * g.H * g.X + y * g.X;
          for (int64_t x = 0; x < g.X; ++x) dq[x] = 0;
          for (int64_t w = 0; w < W; ++w) {
            const int64_t ot = off[3 * w], oy = off[3 * w + 1], ox = off[3 * w + 2];
            if (t + ot < 0 || t + ot >= g.T || y + oy < 0 || y + oy >= g.H) continue;
            int64_t x0, x1;
            x_range(g.X, ox, x0, x1);
            const scalar_t* kr = k + ((bk * Dq + d) * g.T + t + ot) * g.H * g.X + (y + oy) * g.X + ox;
            const scalar_t* sw = s + w * g.X;
            for (int64_t x = x0; x < x1; ++x) dq[x] += sw[x] * kr[x];
          }
        }
      }
  // pass 2, per key row j (gather form, no write conflicts): with i = j - o_w,
  // dk[:, j] = sum_w dS[i, w] q[:, i] and dv[:, j] = sum_w P[i, w] gout[:, i].
#pragma omp parallel for collapse(3) schedule(static)
  for (int64_t bk = 0; bk < BK; ++bk)
    for (int64_t t = 0; t < g.T; ++t)
      for (int64_t y = 0; y < g.H; ++y) {
        for (int64_t d = 0; d < Dq; ++d) {
          scalar_t* dk = gk + ((bk * Dq + d) * g.T + t) * g.H * g.X + y * g.X;
          for (int64_t x = 0; x < g.X; ++x) dk[x] = 0;
        }
        for (int64_t d = 0; d < D; ++d) {
          scalar_t* dv = gv + ((bk * D + d) * g.T + t) * g.H * g.X + y * g.X;
          for (int64_t x = 0; x < g.X; ++x) dv[x] = 0;
        }
        for (int64_t w = 0; w < W; ++w) {
          const int64_t ot = off[3 * w], oy = off[3 * w + 1], ox = off[3 * w + 2];
          const int64_t ti = t - ot, yi = y - oy;  // the query row that reaches this key row through o_w
          if (ti < 0 || ti >= g.T || yi < 0 || yi >= g.H) continue;
          int64_t x0, x1;  // key x such that query x - ox is in the grid
          x_range(g.X, -ox, x0, x1);
          const int64_t row = ((bk * g.T + ti) * g.H + yi) * W * g.X + w * g.X - ox;
          const scalar_t* sw = gs + row;
          const scalar_t* pw = probs + row;
          for (int64_t d = 0; d < Dq; ++d) {
            scalar_t* dk = gk + ((bk * Dq + d) * g.T + t) * g.H * g.X + y * g.X;
            const scalar_t* qr = q + ((bk * Dq + d) * g.T + ti) * g.H * g.X + yi * g.X - ox;
            for (int64_t x = x0; x < x1; ++x) dk[x] += sw[x] * qr[x];
          }
          for (int64_t d = 0; d < D; ++d) {
            scalar_t* dv = gv + ((bk * D + d) * g.T + t) * g.H * g.X + y * g.X;
            const scalar_t* go = gout + ((bk * D + d) * g.T + ti) * g.H * g.X + yi * g.X - ox;
            for (int64_t x = x0; x < x1; ++x) dv[x] += pw[x] * go[x];
          }
        }
      }
}

Grid grid_of(const torch::Tensor& t) { return {t.size(2), t.size(3), t.size(4), t.size(2) * t.size(3) * t.size(4)}; }

std::vector<torch::Tensor> forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor offsets) {
  const Grid g = grid_of(q);
  const int64_t W = offsets.size(0), BK = q.size(0), Dq = q.size(1), D = v.size(1);
  auto out = torch::empty_like(v);
  auto probs = torch::empty({BK, g.T, g.H, W, g.X}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "convplus_local_forward", [&] {
    forward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             offsets.data_ptr<int64_t>(), W, BK, Dq, D, g, out.data_ptr<scalar_t>(),
                             probs.data_ptr<scalar_t>());
  });
  return {out, probs};
}

std::vector<torch::Tensor> backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor probs,
                                    torch::Tensor gout, torch::Tensor offsets) {
  const Grid g = grid_of(q);
  const int64_t W = offsets.size(0), BK = q.size(0), Dq = q.size(1), D = v.size(1);
  auto gs = torch::empty_like(probs);
  auto gq = torch::empty_like(q), gk = torch::empty_like(k), gv = torch::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "convplus_local_backward", [&] {
    backward_kernel<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                              probs.data_ptr<scalar_t>(), gout.data_ptr<scalar_t>(), offsets.data_ptr<int64_t>(), W,
                              BK, Dq, D, g, gs.data_ptr<scalar_t>(), gq.data_ptr<scalar_t>(),
                              gk.data_ptr<scalar_t>(), gv.data_ptr<scalar_t>());
  });
  return {gq, gk, gv};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "Conv+ windowed attention term, forward: (out, probs)");
  m.def("backward", &backward, "Conv+ windowed attention term, backward: (dq, dk, dv)");
}
