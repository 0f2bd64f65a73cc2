// The 'direct' score features of Conv+ on CPU, forward and backward in one pass each (the forward pass of the
// window kernel computes its keys itself; this forward recomputes them for the backward):
//
//   k = x^ / max(||x^||, 1e-12) over each head's channel slice,  q = tau_h * k,  x^ = x + P.
//
// Layout: x (B, K, D, N) of any strides, and dx made like it (channels-last stays channels-last); q, k and their
// gradients (B, K, D, N) contiguous (the mixing kernel's backward then copies their rows whole); pos (K, D, N) or
// empty, temperature (K,), inverse_norm (B, K, N), contiguous. The norm is over D for every position; every loop
// runs over a block of contiguous positions and vectorizes: x and dx are read and written in place where their
// positions are contiguous, else through (D, block) buffers (strided.h).
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <vector>

#include "checks.h"
#include "direct_score.h"
#include "simd.h"
#include "strided.h"

namespace convplus {
namespace {

using detail::Buffer;
using detail::kMinSquaredNorm;
using detail::Rows;

constexpr int64_t kBlock = 256;  // positions per task

// A (B, K, D, N) tensor as Rows of one row of N positions per channel.
template <typename T>
Rows<T> rows(const at::Tensor& t) {
  return Rows<T>(t.view({t.size(0), t.size(1), t.size(2), 1, 1, t.size(3)}));
}

// Positions n0 .. n0 + len of slice bk of a (B, K, D, N) tensor as a (D, len) matrix whose rows lie ld apart:
// in place where its positions are contiguous, else in a (D, kBlock) buffer (copied in and out by the caller).
template <typename T>
struct Block {
  T* data;
  int64_t ld;
};

// The block of src, in place or copied into buf.
template <typename T>
Block<const T> read_block(const Rows<const T>& src, int64_t bk, int64_t n0, int64_t len, int64_t D, T* buf) {
  const T* start = src.at(bk, 0, 0, 0) + n0 * src.x;
  if (src.x == 1) return {start, src.channel};
  detail::copy_block(start, src.channel, src.x, buf, kBlock, int64_t{1}, D, len);
  return {buf, kBlock};
}

// Where to compute the block of dst: in place, or in buf, which write_back then copies out.
template <typename T>
Block<T> block_of(const Rows<T>& dst, int64_t bk, int64_t n0, T* buf) {
  if (dst.x == 1) return {dst.at(bk, 0, 0, 0) + n0, dst.channel};
  return {buf, kBlock};
}
template <typename T>
void write_back(const Block<T>& block, const Rows<T>& dst, int64_t bk, int64_t n0, int64_t len, int64_t D) {
  if (dst.x != 1)
    detail::copy_block(static_cast<const T*>(block.data), kBlock, int64_t{1}, dst.at(bk, 0, 0, 0) + n0 * dst.x,
                       dst.channel, dst.x, D, len);
}

// q and k contiguous (B, K, D, N).
template <typename T>
void forward_kernel(const Rows<const T>& x, const T* pos, const T* temperature, int64_t B, int64_t K, int64_t D,
                    int64_t N, T* q, T* k, T* inverse_norm) {
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  at::parallel_for(0, B * K * blocks, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> xb(D * kBlock), sum(kBlock);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bk = task / blocks, h = bk % K, n0 = task % blocks * kBlock, len = std::min(kBlock, N - n0);
      const int64_t base = bk * D * N + n0;
      const Block<const T> xr = read_block(x, bk, n0, len, D, xb.data());
      std::fill(sum.begin(), sum.end(), T(0));
      for (int64_t d = 0; d < D; ++d) {
        const T* __restrict__ xd = xr.data + d * xr.ld;
        const T* __restrict__ pr = pos ? pos + (h * D + d) * N + n0 : nullptr;
        T* __restrict__ kr = k + base + d * N;
        for (int64_t i = 0; i < len; ++i) {
          const T value = pr ? xd[i] + pr[i] : xd[i];
          kr[i] = value;
          sum[i] += value * value;
        }
      }
      T* inv = inverse_norm + bk * N + n0;
      for (int64_t i = 0; i < len; ++i) inv[i] = T(1) / std::sqrt(std::max(sum[i], T(kMinSquaredNorm)));
      const T tau = temperature[h];
      for (int64_t d = 0; d < D; ++d) {
        T* __restrict__ kr = k + base + d * N;
        T* __restrict__ qr = q + base + d * N;
        for (int64_t i = 0; i < len; ++i) {
          kr[i] *= inv[i];
          qr[i] = tau * kr[i];
        }
      }
    }
  });
}

// dx^ = (du - k <k, du>) / ||x^|| with du = tau dq + dk (just du / 1e-12 where the norm was clamped);
// dP = sum_b dx^; dtau_h = sum dq * k.
// gq, gk, k contiguous (B, K, D, N).
template <typename T>
void backward_kernel(const T* gq, const T* gk, const T* k, const T* inverse_norm, const T* temperature, int64_t B,
                     int64_t K, int64_t D, int64_t N, const Rows<T>& gx, T* gpos, double* gtemperature) {
  const int64_t blocks = (N + kBlock - 1) / kBlock;
  std::mutex reduce;
  at::parallel_for(0, K * blocks, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> xb(D * kBlock), dot(kBlock), tau_part(kBlock);
    std::vector<double> local(K, 0.0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / blocks, n0 = task % blocks * kBlock, len = std::min(kBlock, N - n0);
      const T tau = temperature[h];
      if (gpos)
        for (int64_t d = 0; d < D; ++d) std::fill_n(gpos + (h * D + d) * N + n0, len, T(0));
      std::fill(tau_part.begin(), tau_part.end(), T(0));
      for (int64_t b = 0; b < B; ++b) {
        const int64_t bk = b * K + h, base = bk * D * N + n0;
        const T* inv = inverse_norm + bk * N + n0;
        std::fill(dot.begin(), dot.end(), T(0));
        for (int64_t d = 0; d < D; ++d) {
          const T* __restrict__ qg = gq + base + d * N;
          const T* __restrict__ kg = gk + base + d * N;
          const T* __restrict__ kr = k + base + d * N;
          for (int64_t i = 0; i < len; ++i) {
            dot[i] += kr[i] * (tau * qg[i] + kg[i]);
            tau_part[i] += qg[i] * kr[i];
          }
        }
        for (int64_t i = 0; i < len; ++i)
          if (inv[i] * inv[i] * T(kMinSquaredNorm) >= T(1)) dot[i] = 0;  // clamped norm: no projection
        const Block<T> xg = block_of(gx, bk, n0, xb.data());
        for (int64_t d = 0; d < D; ++d) {
          const T* __restrict__ qg = gq + base + d * N;
          const T* __restrict__ kg = gk + base + d * N;
          const T* __restrict__ kr = k + base + d * N;
          T* __restrict__ xd = xg.data + d * xg.ld;
          for (int64_t i = 0; i < len; ++i) xd[i] = inv[i] * (tau * qg[i] + kg[i] - kr[i] * dot[i]);
          if (gpos) {
            T* __restrict__ pg = gpos + (h * D + d) * N + n0;
            for (int64_t i = 0; i < len; ++i) pg[i] += xd[i];
          }
        }
        write_back(xg, gx, bk, n0, len, D);
      }
      for (int64_t i = 0; i < len; ++i) local[h] += tau_part[i];
    }
    std::lock_guard<std::mutex> lock(reduce);
    for (int64_t h = 0; h < K; ++h) gtemperature[h] += local[h];
  });
}

}  // namespace

std::vector<at::Tensor> direct_score_forward(at::Tensor x, at::Tensor pos, at::Tensor temperature) {
  const detail::ArgumentChecks check("direct_score_forward");
  check.floating("x", x, true);
  check.rank("x", x, 4, "(B, K, D, N)");
  const int64_t B = x.size(0), K = x.size(1), D = x.size(2), N = x.size(3);
  check.like("pos", pos, "x", x);
  if (pos.numel()) check.shape("pos", pos, {K, D, N}, "(K, D, N)");
  check.like("temperature", temperature, "x", x);
  check.shape("temperature", temperature, {K}, "(K,)");
  auto q = at::empty({B, K, D, N}, x.options()), k = at::empty_like(q);
  auto inverse_norm = at::empty({B, K, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "convplus_direct_score_forward", [&] {
    forward_kernel<scalar_t>(rows<const scalar_t>(x), pos.numel() ? pos.data_ptr<scalar_t>() : nullptr,
                             temperature.data_ptr<scalar_t>(), B, K, D, N, q.data_ptr<scalar_t>(),
                             k.data_ptr<scalar_t>(), inverse_norm.data_ptr<scalar_t>());
  });
  return {q, k, inverse_norm};
}

std::vector<at::Tensor> direct_score_backward(at::Tensor gq, at::Tensor gk, at::Tensor k,
                                                 at::Tensor inverse_norm, at::Tensor temperature, at::Tensor x,
                                                 bool with_pos) {
  const detail::ArgumentChecks check("direct_score_backward");
  check.floating("k", k);
  check.rank("k", k, 4, "(B, K, D, N)");
  const int64_t B = k.size(0), K = k.size(1), D = k.size(2), N = k.size(3);
  check.like("gq", gq, "k", k);
  check.shape("gq", gq, k.sizes().vec(), "(B, K, D, N)");
  check.like("gk", gk, "k", k);
  check.shape("gk", gk, k.sizes().vec(), "(B, K, D, N)");
  check.like("x", x, "k", k, true);
  check.shape("x", x, k.sizes().vec(), "(B, K, D, N)");
  check.like("inverse_norm", inverse_norm, "k", k);
  check.shape("inverse_norm", inverse_norm, {B, K, N}, "(B, K, N)");
  check.like("temperature", temperature, "k", k);
  check.shape("temperature", temperature, {K}, "(K,)");
  auto gx = at::empty_like(x);
  auto gpos = at::empty({with_pos ? K : 0, D, N}, k.options());
  auto gtemperature = at::zeros({K}, k.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "convplus_direct_score_backward", [&] {
    backward_kernel<scalar_t>(gq.data_ptr<scalar_t>(), gk.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                              inverse_norm.data_ptr<scalar_t>(), temperature.data_ptr<scalar_t>(), B, K, D, N,
                              rows<scalar_t>(gx), with_pos ? gpos.data_ptr<scalar_t>() : nullptr,
                              gtemperature.data_ptr<double>());
  });
  return {gx, gpos, gtemperature.to(k.scalar_type())};
}

}  // namespace convplus
