// Attention over every position of a small grid on CPU (the 'global' backend's), added to a term computed before,
// forward and backward:
//
//   z[d, i] = base[d, i] + g_h * sum_j P[i, j] v[d, j],   P[i, .] = softmax_j(<q[:, i], k[:, j]>)
//
// With the 'direct' score the keys and queries are computed in the pass from the features f instead of read:
// k = unit(f + pos) over each head's channels (as direct_score.cpp computes it), s(i, j) = tau_h <k_i, k_j>; the
// backward takes them recomputed by direct_score.cpp.
//
// Layout: q, k or f (B, K, Dq, N), v and base (B, K, D, N), of any strides; z is made like base (channels-last stays
// channels-last). gain (K,), pos (K, Dq, N) or empty, temperature (K,). Head of slice bk is bk % K. probs
// (B * K, N, Np): P, kept by the forward for the backward.
//
// Each (B, K) slice is one task, and every product a register-tiled one of small packed matrices whose rows are a
// whole number of vectors (zeros past the end). The forward packs the keys into (Dq, Np) and the values into
// (N, Dp); the scores are an (N, Np) product of tiles of queries by vectors of keys (the symmetric 'direct' scores
// skip the tiles below the diagonal and copy their mirror images), the softmax runs on them in place, and the
// weighted sum is an (N, Dp) product of tiles of queries by vectors of channels, added to base as it is written out.
#include "ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "direct_score.h"
#include "register_tiles.h"
#include "simd.h"
#include "strided.h"

namespace convplus {
namespace {

using detail::Buffer;
using detail::exp_vec;
using detail::load;
using detail::Simd;
using detail::store;

// A register tile: its accumulators, its operand vectors and a broadcast fill the vector registers.
#if defined(__AVX512VL__)
constexpr int kTileRows = 8, kTileVectors = 3;  // 24 + 3 of AVX-512's 32
#else
constexpr int kTileRows = 6, kTileVectors = 2;  // 12 + 2 + 1 of AVX2's 16
#endif

// A (B, K, C, N) tensor of any strides, by slice.
template <typename T>
struct Slices {
  T* data;
  int64_t K, batch, head, channel, position;
  explicit Slices(const at::Tensor& t)
      : data(t.data_ptr<std::remove_const_t<T>>()), K(t.size(1)), batch(t.stride(0)), head(t.stride(1)),
        channel(t.stride(2)), position(t.stride(3)) {}
  T* at(int64_t bk) const { return data + bk / K * batch + bk % K * head; }
};

// out[r * ld_out + v * W ..] = sum_c a[r * a_row + c * a_col] * b[c * ld_b + v * W ..] for rows r < R and vectors
// v < Cv of W lanes (Simd S): R rows of a broadcast against Cv vectors of b, over depth.
template <typename T, int R, int Cv, typename S = Simd<T>>
inline void tile_product(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ld_b, int64_t depth, T* out,
                         int64_t ld_out) {
  using V = typename S::vec;
  constexpr int64_t W = S::width;
  V acc[R][Cv] = {};
  for (int64_t c = 0; c < depth; ++c) {
    V bv[Cv];
    for (int v = 0; v < Cv; ++v) bv[v] = load<V>(b + c * ld_b + v * W);
    for (int r = 0; r < R; ++r) {
      const T av = a[r * a_row + c * a_col];
      for (int v = 0; v < Cv; ++v) acc[r][v] += bv[v] * av;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < Cv; ++v) store(out + r * ld_out + v * W, acc[r][v]);
}

// out (R, columns) = a (R, depth) b (depth, columns), a[r * a_row + c * a_col], b and out row-major with columns
// a whole number of vectors; by tiles of up to kTileVectors vectors, the widest first (detail::over_tiles).
template <typename T, int R>
void rows_product(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ld_b, int64_t depth, int64_t columns,
                  T* out, int64_t ld_out) {
  detail::over_tiles<T, kTileVectors>(columns, [&](auto n, int64_t j, auto simd) {
    tile_product<T, R, decltype(n)::value, decltype(simd)>(a, a_row, a_col, b + j, ld_b, depth, out + j, ld_out);
  });
}

// rows_product of the last rows < R rows.
template <typename T, int R>
void last_rows(int64_t rows, const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ld_b, int64_t depth,
               int64_t columns, T* out, int64_t ld_out) {
  if constexpr (R > 1) {
    if (rows == R - 1) return rows_product<T, R - 1>(a, a_row, a_col, b, ld_b, depth, columns, out, ld_out);
    last_rows<T, R - 1>(rows, a, a_row, a_col, b, ld_b, depth, columns, out, ld_out);
  }
}

// out (rows, columns) = a (rows, depth) b (depth, columns), as rows_product, by tiles of kTileRows rows. symmetric:
// the product is known to be symmetric (b = a^T), and each tile of rows leaves out the blocks of kTileVectors
// vectors of columns that lie wholly before its first row (``mirror`` fills them in).
template <typename T>
void product(const T* a, int64_t a_row, int64_t a_col, const T* b, int64_t ld_b, int64_t depth, int64_t rows,
             int64_t columns, T* out, int64_t ld_out, bool symmetric = false) {
  constexpr int64_t block = kTileVectors * Simd<T>::width;
  for (int64_t i = 0; i < rows; i += kTileRows) {
    const int64_t first = symmetric ? i / block * block : 0;
    const T* rows_a = a + i * a_row;
    T* rows_out = out + i * ld_out + first;
    if (i + kTileRows <= rows)
      rows_product<T, kTileRows>(rows_a, a_row, a_col, b + first, ld_b, depth, columns - first, rows_out, ld_out);
    else
      last_rows<T, kTileRows>(rows - i, rows_a, a_row, a_col, b + first, ld_b, depth, columns - first, rows_out,
                              ld_out);
  }
}

// The entries of the symmetric (n, n) s (rows ld apart) that product(..., symmetric) left out, from their mirror
// images (the same products in the same order: the same values).
template <typename T>
void mirror(T* s, int64_t n, int64_t ld) {
  constexpr int64_t block = kTileVectors * Simd<T>::width;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t computed_from = i / kTileRows * kTileRows / block * block;
    for (int64_t j = 0; j < std::min(computed_from, n); ++j) s[i * ld + j] = s[j * ld + i];
  }
}

// (rows, columns) of src (src[r * src_row + c * src_column]) into dst, row-major with ld columns (a whole number of
// vectors), zeros from column `columns` to ld: rows copied whole where the source's columns are contiguous, blocks
// transposed where its rows are (channels-last features into channel rows), entry by entry otherwise.
template <typename T>
void pack(const T* src, int64_t src_row, int64_t src_column, int64_t rows, int64_t columns, T* dst, int64_t ld) {
  detail::copy_block(src, src_row, src_column, dst, ld, int64_t{1}, rows, columns);
  for (int64_t r = 0; r < rows; ++r) std::fill(dst + r * ld + columns, dst + (r + 1) * ld, T(0));
}

// Each row of s (rows, ld), its first n entries scores, becomes the softmax of them times scale, zeros past them.
template <typename T>
void softmax_rows(T* s, int64_t rows, int64_t n, int64_t ld, T scale) {
  using V = typename Simd<T>::vec;
  constexpr int64_t W = Simd<T>::width;
  for (int64_t i = 0; i < rows; ++i) {
    T* row = s + i * ld;
    for (int64_t j = 0; j < ld; ++j) row[j] *= scale;
    std::fill(row + n, row + ld, -std::numeric_limits<T>::infinity());  // exp: zeros
    V most = load<V>(row);
    for (int64_t j = W; j < ld; j += W) {
      const V x = load<V>(row + j);
      most = most > x ? most : x;
    }
    T top = most[0];
    for (int64_t l = 1; l < W; ++l) top = std::max(top, most[l]);
    V sum{};
    for (int64_t j = 0; j < ld; j += W) {
      const V e = exp_vec<V, T>(load<V>(row + j) - top);
      sum += e;
      store(row + j, e);
    }
    T total = 0;
    for (int64_t l = 0; l < W; ++l) total += sum[l];
    const T inverse = T(1) / total;
    for (int64_t j = 0; j < ld; ++j) row[j] *= inverse;
  }
}

// The features packed in keys (Dq, ld), their first n columns positions, become the 'direct' score's unit keys
// unit(f + pos) over the Dq channels of each position (as direct_score.cpp computes them); pos (Dq, n) or null.
template <typename T>
void unit_keys(T* keys, const T* pos, int64_t Dq, int64_t n, int64_t ld, T* norm) {
  std::fill(norm, norm + ld, T(0));
  for (int64_t c = 0; c < Dq; ++c) {  // the columns from n on are zeros, and stay zeros
    T* row = keys + c * ld;
    if (pos)
      for (int64_t j = 0; j < n; ++j) {
        row[j] += pos[c * n + j];
        norm[j] += row[j] * row[j];
      }
    else
      for (int64_t j = 0; j < n; ++j) norm[j] += row[j] * row[j];
  }
  for (int64_t j = 0; j < ld; ++j) norm[j] = T(1) / std::sqrt(std::max(norm[j], T(detail::kMinSquaredNorm)));
  for (int64_t c = 0; c < Dq; ++c)
    for (int64_t j = 0; j < ld; ++j) keys[c * ld + j] *= norm[j];
}

// Where the scores come from: q and k (B, K, Dq, N); or, with the 'direct' score (temperature non-null), the
// features f in k, pos (K, Dq, N) contiguous or null and temperature (K,): the unit keys k = unit(f + pos) and
// q = tau_h k are computed in the pass.
template <typename T>
struct ScoreInputs {
  Slices<const T> q, k;
  const T* pos;
  const T* temperature;
};

// probs: (BK, N, Np) for the probabilities of each slice (zeros past column N), kept for backward; or null.
template <typename T>
void forward_kernel(const ScoreInputs<T>& score, const Slices<const T>& v, const T* gain, const Slices<const T>& base,
                    const Slices<T>& z, int64_t BK, int64_t Dq, int64_t D, int64_t N, T* probs) {
  constexpr int64_t W = Simd<T>::width;
  const int64_t Np = (N + W - 1) / W * W, Dp = (D + W - 1) / W * W;
  const bool direct = score.temperature != nullptr;
  at::parallel_for(0, BK, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> keys(Dq * Np), values(N * Dp), scores(N * Np), sums(N * Dp), norm(Np);
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t h = bk % v.K;
      pack(score.k.at(bk), score.k.channel, score.k.position, Dq, N, keys.data(), Np);
      pack(v.at(bk), v.position, v.channel, N, D, values.data(), Dp);
      if (direct) {  // s(i, j) = tau <k_i, k_j>
        unit_keys(keys.data(), score.pos ? score.pos + h * Dq * N : nullptr, Dq, N, Np, norm.data());
        product(keys.data(), int64_t{1}, Np, keys.data(), Np, Dq, N, Np, scores.data(), Np, true);
        mirror(scores.data(), N, Np);
      } else {
        product(score.q.at(bk), score.q.position, score.q.channel, keys.data(), Np, Dq, N, Np, scores.data(), Np);
      }
      softmax_rows(scores.data(), N, N, Np, direct ? score.temperature[h] : T(1));
      if (probs) std::memcpy(probs + bk * N * Np, scores.data(), N * Np * sizeof(T));
      product<T>(scores.data(), Np, 1, values.data(), Dp, N, N, Dp, sums.data(), Dp);
      const T g = gain[h];
      const T* from = base.at(bk);
      T* to = z.at(bk);
      for (int64_t i = 0; i < N; ++i) {
        const T* row = sums.data() + i * Dp;
        const T* b = from + i * base.position;
        T* out = to + i * z.position;
        if (base.channel == 1 && z.channel == 1)
          for (int64_t d = 0; d < D; ++d) out[d] = b[d] + g * row[d];
        else
          for (int64_t d = 0; d < D; ++d) out[d * z.channel] = b[d * base.channel] + g * row[d];
      }
    }
  });
}

// The gradients from those of z (gout), per slice, with the probabilities P of the forward pass and A = g P:
//   dP[i, j] = <gout[:, i], v[:, j]>,  dgain_h += sum P dP,  dS = g P (dP - sum_j P dP),
//   dv[:, j] = g sum_i P[i, j] gout[:, i],  dq[:, i] = sum_j dS[i, j] k[:, j],  dk[:, j] = sum_i dS[i, j] q[:, i].
// q, k (B, K, Dq, N), v, gout (B, K, D, N) of any strides; dq, dk contiguous (B, K, Dq, N), dv like v; probs
// (BK, N, Np); dgain (K,) summed in double.
template <typename T>
void backward_kernel(const Slices<const T>& q, const Slices<const T>& k, const Slices<const T>& v, const T* gain,
                     const T* probs, const Slices<const T>& gout, T* dq, T* dk, const Slices<T>& dv, double* dgain,
                     int64_t BK, int64_t Dq, int64_t D, int64_t N) {
  constexpr int64_t W = Simd<T>::width;
  const int64_t Np = (N + W - 1) / W * W;
  std::mutex reduce;
  at::parallel_for(0, BK, 1, [&](int64_t begin, int64_t end) {
    Buffer<T> grads(D * Np), values(D * Np), keys(Dq * Np), ds(N * Np), transposed(N * Np), out(std::max(D, Dq) * Np);
    std::vector<double> local(v.K, 0.0);
    for (int64_t bk = begin; bk < end; ++bk) {
      const int64_t h = bk % v.K;
      const T g = gain[h];
      const T* p = probs + bk * N * Np;
      pack(gout.at(bk), gout.channel, gout.position, D, N, grads.data(), Np);
      pack(v.at(bk), v.channel, v.position, D, N, values.data(), Np);
      product(grads.data(), int64_t{1}, Np, values.data(), Np, D, N, Np, ds.data(), Np);  // dP
      double gain_part = 0;
      for (int64_t i = 0; i < N; ++i) {  // dS = g P (dP - <P, dP>) in place of dP
        T* row = ds.data() + i * Np;
        const T* pi = p + i * Np;
        T dot = 0;
        for (int64_t j = 0; j < N; ++j) dot += pi[j] * row[j];
        gain_part += dot;
        for (int64_t j = 0; j < Np; ++j) row[j] = g * pi[j] * (row[j] - dot);
      }
      local[h] += gain_part;
      product<T>(grads.data(), Np, 1, p, Np, N, D, Np, out.data(), Np);  // gout P, (D, Np)
      for (int64_t x = 0; x < D * Np; ++x) out[x] *= g;
      detail::copy_block(static_cast<const T*>(out.data()), Np, int64_t{1}, dv.at(bk), dv.channel, dv.position, D, N);
      pack(static_cast<const T*>(ds.data()), int64_t{1}, Np, N, N, transposed.data(), Np);  // dS^T
      pack(k.at(bk), k.channel, k.position, Dq, N, keys.data(), Np);
      product<T>(keys.data(), Np, 1, transposed.data(), Np, N, Dq, Np, out.data(), Np);  // k dS^T
      for (int64_t c = 0; c < Dq; ++c) std::memcpy(dq + (bk * Dq + c) * N, out.data() + c * Np, N * sizeof(T));
      product<T>(q.at(bk), q.channel, q.position, ds.data(), Np, N, Dq, Np, out.data(), Np);  // q dS
      for (int64_t c = 0; c < Dq; ++c) std::memcpy(dk + (bk * Dq + c) * N, out.data() + c * Np, N * sizeof(T));
    }
    std::lock_guard<std::mutex> lock(reduce);
    for (int64_t h = 0; h < v.K; ++h) dgain[h] += local[h];
  });
}

// The checks shared by both forward entry points, of v, gain and base; and z, made like base, and the
// probabilities, (BK, N, Np) if save_probs, else (0, N, Np).
std::vector<at::Tensor> checked_outputs(const detail::ArgumentChecks& check, const at::Tensor& v,
                                        const at::Tensor& gain, const at::Tensor& base, bool save_probs) {
  check.floating("v", v, true);
  check.rank("v", v, 4, "(B, K, D, N)");
  check.like("base", base, "v", v, true);
  check.shape("base", base, v.sizes().vec(), "(B, K, D, N)");
  check.like("gain", gain, "v", v);
  check.shape("gain", gain, {v.size(1)}, "(K,)");
  const int64_t lanes = detail::kVectorBytes / v.element_size(), N = v.size(3);
  const int64_t rows = save_probs ? v.size(0) * v.size(1) : 0;
  return {at::empty_like(base), at::zeros({rows, N, (N + lanes - 1) / lanes * lanes}, v.options())};
}

template <typename T>
void run_forward(const ScoreInputs<T>& score, const at::Tensor& v, const at::Tensor& gain, const at::Tensor& base,
                 std::vector<at::Tensor>& outputs, int64_t Dq) {
  if (!outputs[0].numel()) return;
  forward_kernel<T>(score, Slices<const T>(v), gain.data_ptr<T>(), Slices<const T>(base), Slices<T>(outputs[0]),
                    v.size(0) * v.size(1), Dq, v.size(2), v.size(3),
                    outputs[1].numel() ? outputs[1].data_ptr<T>() : nullptr);
}

// q and k (B, K, Dq, N) like v, checked.
int64_t check_scores(const detail::ArgumentChecks& check, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v) {
  check.like("q", q, "v", v, true);
  check.rank("q", q, 4, "(B, K, Dq, N)");
  const int64_t Dq = q.size(2);
  check.shape("q", q, {v.size(0), v.size(1), Dq, v.size(3)}, "(B, K, Dq, N)");
  check.like("k", k, "v", v, true);
  check.shape("k", k, q.sizes().vec(), "(B, K, Dq, N)");
  return Dq;
}

}  // namespace

std::vector<at::Tensor> global_mix_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor gain,
                                           at::Tensor base, bool save_probs) {
  const detail::ArgumentChecks check("global_mix_forward");
  auto outputs = checked_outputs(check, v, gain, base, save_probs);
  const int64_t Dq = check_scores(check, q, k, v);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "convplus_global_mix_forward", [&] {
    run_forward<scalar_t>({Slices<const scalar_t>(q), Slices<const scalar_t>(k), nullptr, nullptr}, v, gain, base,
                          outputs, Dq);
  });
  return outputs;
}

std::vector<at::Tensor> direct_global_mix_forward(at::Tensor features, at::Tensor pos, at::Tensor temperature,
                                                  at::Tensor v, at::Tensor gain, at::Tensor base, bool save_probs) {
  const detail::ArgumentChecks check("direct_global_mix_forward");
  auto outputs = checked_outputs(check, v, gain, base, save_probs);
  check.like("features", features, "v", v, true);
  check.rank("features", features, 4, "(B, K, Dq, N)");
  const int64_t K = v.size(1), Dq = features.size(2), N = v.size(3);
  check.shape("features", features, {v.size(0), K, Dq, N}, "(B, K, Dq, N)");
  check.like("pos", pos, "v", v);
  if (pos.numel()) check.shape("pos", pos, {K, Dq, N}, "(K, Dq, N)");
  check.like("temperature", temperature, "v", v);
  check.shape("temperature", temperature, {K}, "(K,)");
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "convplus_direct_global_mix_forward", [&] {
    const Slices<const scalar_t> f(features);
    run_forward<scalar_t>({f, f, pos.numel() ? pos.data_ptr<scalar_t>() : nullptr, temperature.data_ptr<scalar_t>()},
                          v, gain, base, outputs, Dq);
  });
  return outputs;
}

std::vector<at::Tensor> global_mix_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor gain,
                                            at::Tensor probs, at::Tensor gout) {
  const detail::ArgumentChecks check("global_mix_backward");
  check.floating("v", v, true);
  check.rank("v", v, 4, "(B, K, D, N)");
  const int64_t B = v.size(0), K = v.size(1), D = v.size(2), N = v.size(3);
  const int64_t Dq = check_scores(check, q, k, v);
  check.like("gain", gain, "v", v);
  check.shape("gain", gain, {K}, "(K,)");
  check.like("gout", gout, "v", v, true);
  check.shape("gout", gout, v.sizes().vec(), "(B, K, D, N)");
  check.like("probs", probs, "v", v);
  const int64_t lanes = detail::kVectorBytes / v.element_size();
  check.shape("probs", probs, {B * K, N, (N + lanes - 1) / lanes * lanes}, "(B * K, N, N rounded up to vectors)");
  auto dq = at::empty({B, K, Dq, N}, v.options()), dk = at::empty_like(dq), dv = at::empty_like(v);
  auto dgain = at::zeros({K}, v.options().dtype(at::kDouble));
  if (dv.numel())
    AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "convplus_global_mix_backward", [&] {
      backward_kernel<scalar_t>(Slices<const scalar_t>(q), Slices<const scalar_t>(k), Slices<const scalar_t>(v),
                                gain.data_ptr<scalar_t>(), probs.data_ptr<scalar_t>(), Slices<const scalar_t>(gout),
                                dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), Slices<scalar_t>(dv),
                                dgain.data_ptr<double>(), B * K, Dq, D, N);
    });
  else
    dq.zero_(), dk.zero_();
  return {dq, dk, dv, dgain.to(v.scalar_type())};
}

}  // namespace convplus
