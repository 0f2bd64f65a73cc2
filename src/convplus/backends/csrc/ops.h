// The C++ CPU kernels of convplus (see the .cpp file of each for its layout and math). Every entry point checks
// its arguments first (checks.h): a bad call raises c10::Error, a RuntimeError in Python.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace convplus {

// Windowed mixing step (window_mix.cpp): (z, probs) and (dq, dk, dv, dgain, dkernel); bounds (T + H + X, 2) each
// query's window among the offsets; bias (K, D) or empty.
std::vector<at::Tensor> window_mix_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor gain,
                                              at::Tensor kernel, at::Tensor tap_index, at::Tensor offsets,
                                              at::Tensor bounds, at::Tensor bias, bool save_probs);
// The same with the 'direct' score computed in the pass from features (B, K, Dq, T, H, X), pos and temperature.
std::vector<at::Tensor> direct_window_mix_forward(at::Tensor features, at::Tensor pos,
                                                     at::Tensor temperature, at::Tensor v, at::Tensor gain,
                                                     at::Tensor kernel, at::Tensor tap_index,
                                                     at::Tensor offsets, at::Tensor bounds, at::Tensor bias,
                                                     bool save_probs);
std::vector<at::Tensor> window_mix_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor gain,
                                               at::Tensor kernel, at::Tensor tap_index, at::Tensor probs,
                                               at::Tensor gout, at::Tensor offsets);

// Attention over every position, added to base (global_mix.cpp): (z, probs), z = base + g * softmax(q^T k) v^T made
// like base; and (dq, dk, dv, dgain).
std::vector<at::Tensor> global_mix_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor gain,
                                           at::Tensor base, bool save_probs);
// The same with the 'direct' score computed in the pass from features (B, K, Dq, N), pos and temperature.
std::vector<at::Tensor> direct_global_mix_forward(at::Tensor features, at::Tensor pos, at::Tensor temperature,
                                                  at::Tensor v, at::Tensor gain, at::Tensor base, bool save_probs);
std::vector<at::Tensor> global_mix_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor gain,
                                            at::Tensor probs, at::Tensor gout);

// 'direct' score features (direct_score.cpp): (q, k, inverse_norm) and (dx, dpos, dtemperature), dx made like x
// (only its layout is read).
std::vector<at::Tensor> direct_score_forward(at::Tensor x, at::Tensor pos, at::Tensor temperature);
std::vector<at::Tensor> direct_score_backward(at::Tensor gq, at::Tensor gk, at::Tensor k,
                                                 at::Tensor inverse_norm, at::Tensor temperature, at::Tensor x,
                                                 bool with_pos);

}  // namespace convplus
