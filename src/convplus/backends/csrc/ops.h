// The C++ CPU kernels of convplus (see the .cpp file of each for its layout and math). Every entry point checks
// its arguments first (checks.h): a bad call raises c10::Error, a RuntimeError in Python.
#pragma once

#include <torch/extension.h>

#include <vector>

namespace convplus {

// Windowed mixing step (window_mix.cpp): (z, probs) and (dq, dk, dv, dgain, dkernel); bias (K, D) or empty.
std::vector<torch::Tensor> window_mix_forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gain,
                                              torch::Tensor kernel, torch::Tensor tap_index, torch::Tensor offsets,
                                              torch::Tensor bias, bool save_probs);
// The same with the 'direct' score computed in the pass from features (BK, Dq, T, H, X), pos and temperature.
std::vector<torch::Tensor> direct_window_mix_forward(torch::Tensor features, torch::Tensor pos,
                                                     torch::Tensor temperature, torch::Tensor v, torch::Tensor gain,
                                                     torch::Tensor kernel, torch::Tensor tap_index,
                                                     torch::Tensor offsets, torch::Tensor bias, bool save_probs);
std::vector<torch::Tensor> window_mix_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor gain,
                                               torch::Tensor kernel, torch::Tensor tap_index, torch::Tensor probs,
                                               torch::Tensor gout, torch::Tensor offsets);

// 'direct' score features (direct_score.cpp): (q, k, inverse_norm) and (dx, dpos, dtemperature).
std::vector<torch::Tensor> direct_score_forward(torch::Tensor x, torch::Tensor pos, torch::Tensor temperature);
std::vector<torch::Tensor> direct_score_backward(torch::Tensor gq, torch::Tensor gk, torch::Tensor k,
                                                 torch::Tensor inverse_norm, torch::Tensor temperature, bool with_pos);

}  // namespace convplus
