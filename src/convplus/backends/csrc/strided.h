// Tensors of any strides (channels-first, channels-last, broadcast) as the CPU kernels read and write them: by
// blocks of (channels, positions), copied in and out of contiguous buffers, transposed where the channels are
// innermost.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace convplus::detail {
namespace {  // internal linkage, see simd.h

// A (B, K, C, T, H, X) tensor of any strides (channels-first, channels-last, broadcast), addressed by rows: row
// (t, y) of channel c of slice bk = b * K + k starts at at(bk, c, t, y) and its columns lie x apart. T const for
// a tensor that is only read; data null for an absent tensor.
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t K = 1, batch = 0, head = 0, channel = 0, t = 0, y = 0, x = 0;

  Rows() = default;
  explicit Rows(const at::Tensor& tensor)
      : data(tensor.numel() ? tensor.data_ptr<std::remove_const_t<T>>() : nullptr), K(tensor.size(1)),
        batch(tensor.stride(0)), head(tensor.stride(1)), channel(tensor.stride(2)), t(tensor.stride(3)),
        y(tensor.stride(4)), x(tensor.stride(5)) {}

  bool same_as(const Rows& other) const {
    return data == other.data && K == other.K && batch == other.batch && head == other.head &&
           channel == other.channel && t == other.t && y == other.y && x == other.x;
  }

  T* at(int64_t bk, int64_t c, int64_t tt, int64_t yy) const {
    return data + bk / K * batch + bk % K * head + c * channel + tt * t + yy * y;
  }
};

// Which side of a transpose has room past its entries: the partial blocks at the end of a row of positions are
// then moved whole (8 wide) there instead of entry by entry. kDestination: each destination row can take its
// columns up to a whole block (zeros are written past the end); kSource: each source row can be read up to a whole
// block (what lies past the end is read and dropped); kNone: neither.
enum class Room { kNone, kDestination, kSource };

#if defined(__AVX2__)
// The 8x8 block of floats whose rows are r[0..7], transposed in place: r[j] becomes its column j.
inline void transpose_registers(__m256 (&r)[8]) {
  __m256 u[8];
  for (int i = 0; i < 8; i += 2) {
    u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    u[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    u[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = u[i];
}

// The block of src_rows <= 8 rows of 8 floats at src (rows stride apart; the missing rows read as zeros)
// transposed, of which the first dst_rows <= 8 rows are stored at dst (rows dst_stride apart).
inline void transpose_8x8(const float* src, int64_t stride, float* dst, int64_t dst_stride, int64_t src_rows,
                          int64_t dst_rows) {
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = i < src_rows ? _mm256_loadu_ps(src + i * stride) : _mm256_setzero_ps();
  transpose_registers(r);
  for (int i = 0; i < dst_rows; ++i) _mm256_storeu_ps(dst + i * dst_stride, r[i]);
}

#if defined(__AVX512F__) && defined(__AVX512VL__)
// The block of src_rows <= 8 rows of src_cols <= 8 floats at src (rows stride apart) transposed into the src_cols
// rows of src_rows floats at dst (rows dst_stride apart), by masked loads and stores: nothing outside the block is
// read or written.
inline void transpose_block(const float* src, int64_t stride, float* dst, int64_t dst_stride, int64_t src_rows,
                            int64_t src_cols) {
  const __mmask8 cols = static_cast<__mmask8>((1u << src_cols) - 1), rows = static_cast<__mmask8>((1u << src_rows) - 1);
  __m256 r[8];
  for (int i = 0; i < 8; ++i) r[i] = i < src_rows ? _mm256_maskz_loadu_ps(cols, src + i * stride) : _mm256_setzero_ps();
  transpose_registers(r);
  for (int i = 0; i < src_cols; ++i) _mm256_mask_storeu_ps(dst + i * dst_stride, rows, r[i]);
}
#endif

// The block of src_rows <= 8 rows of 4 floats at src (the missing rows read as zeros) transposed into the 4 rows
// of 8 at dst.
inline void transpose_8x4(const float* src, int64_t stride, float* dst, int64_t dst_stride, int64_t src_rows) {
  __m128 r[8];
  for (int i = 0; i < 8; ++i) r[i] = i < src_rows ? _mm_loadu_ps(src + i * stride) : _mm_setzero_ps();
  _MM_TRANSPOSE4_PS(r[0], r[1], r[2], r[3]);
  _MM_TRANSPOSE4_PS(r[4], r[5], r[6], r[7]);
  for (int j = 0; j < 4; ++j) {
    _mm_storeu_ps(dst + j * dst_stride, r[j]);
    _mm_storeu_ps(dst + j * dst_stride + 4, r[4 + j]);
  }
}
#endif

// dst[j * dst_stride + i] = src[i * stride + j] for i < rows, j < cols: a block of rows of contiguous entries
// transposed (a channels-last row of a tensor to channel rows, and back). For floats: with AVX-512, in blocks of up
// to 8x8, partial ones included (masked); with AVX2 alone, 8 rows at a time in 8x8 and 8x4 blocks, the last
// partial block of rows (Room::kDestination) or of columns (Room::kSource) too where that side has room.
template <typename T>
void transpose(const T* src, int64_t stride, T* dst, int64_t dst_stride, int64_t rows, int64_t cols, Room room) {
  int64_t i0 = 0;
#if defined(__AVX512F__) && defined(__AVX512VL__)
  if constexpr (std::is_same_v<T, float>) {  // every block in vectors, the partial ones by masked loads and stores
    for (; i0 < rows; i0 += 8)
      for (int64_t j = 0; j < cols; j += 8) {
        const int64_t n = std::min<int64_t>(8, rows - i0), m = std::min<int64_t>(8, cols - j);
        const float* from = src + i0 * stride + j;
        float* to = dst + j * dst_stride + i0;
        if (n == 8 && m == 8)
          transpose_8x8(from, stride, to, dst_stride, 8, 8);
        else
          transpose_block(from, stride, to, dst_stride, n, m);
      }
    return;
  }
#endif
#if defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const int64_t vector_rows = room == Room::kDestination ? rows : rows - rows % 8;
    for (; i0 < vector_rows; i0 += 8) {
      const int64_t n = std::min<int64_t>(8, rows - i0);
      const float* from = src + i0 * stride;
      float* to = dst + i0;
      int64_t j = 0;
      for (; j + 8 <= cols; j += 8) transpose_8x8(from + j, stride, to + j * dst_stride, dst_stride, n, 8);
      if (room == Room::kSource && j < cols) {
        transpose_8x8(from + j, stride, to + j * dst_stride, dst_stride, n, cols - j);
        j = cols;
      }
      for (; j + 4 <= cols; j += 4) transpose_8x4(from + j, stride, to + j * dst_stride, dst_stride, n);
      for (; j < cols; ++j)
        for (int64_t i = 0; i < n; ++i) to[j * dst_stride + i] = from[i * stride + j];
    }
    i0 = std::min(i0, rows);
  }
#endif
  for (int64_t i = i0; i < rows; ++i)  // the rows left (all rows without AVX2)
    for (int64_t j = 0; j < cols; ++j) dst[j * dst_stride + i] = src[i * stride + j];
}

// A (C, len) block from one layout to another: dst[c * dst_channel + i * dst_column] = src[c * channel + i * column],
// one side with contiguous positions (column 1: a channel-first buffer), whose rows have room for len rounded up
// to a whole 8 positions (the transposes read, and write zeros, past len there). Whole rows are copied where both
// sides' positions are contiguous, blocks transposed where one side's channels are, entry by entry otherwise.
template <typename T>
void copy_block(const T* src, int64_t channel, int64_t column, T* dst, int64_t dst_channel, int64_t dst_column,
                int64_t C, int64_t len) {
  if (column == 1 && dst_column == 1) {
    for (int64_t c = 0; c < C; ++c) std::memcpy(dst + c * dst_channel, src + c * channel, len * sizeof(T));
  } else if (channel == 1 && dst_column == 1) {
    transpose(src, column, dst, dst_channel, len, C, Room::kDestination);
  } else if (column == 1 && dst_channel == 1) {
    transpose(src, channel, dst, dst_column, C, len, Room::kSource);
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < len; ++i) dst[c * dst_channel + i * dst_column] = src[c * channel + i * column];
  }
}

}  // namespace
}  // namespace convplus::detail
