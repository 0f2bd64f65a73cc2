// Python bindings of the convplus CPU kernels (built by convplus.backends.cpu.extension()).
#include <torch/extension.h>

#include "ops.h"
#include "phase_clock.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("window_mix_forward", &convplus::window_mix_forward, "Conv+ windowed mix, forward: (z, probs)");
  m.def("direct_window_mix_forward", &convplus::direct_window_mix_forward,
        "Conv+ windowed mix with the 'direct' score computed in the pass, forward: (z, probs)");
  m.def("window_mix_backward", &convplus::window_mix_backward,
        "Conv+ windowed mix, backward: (dq, dk, dv, dgain, dkernel)");
  m.def("global_mix_forward", &convplus::global_mix_forward,
        "Conv+ attention over every position, added to a precomputed term, forward: (z, probs)");
  m.def("direct_global_mix_forward", &convplus::direct_global_mix_forward,
        "Conv+ attention over every position with the 'direct' score computed in the pass, added to a precomputed "
        "term, forward: (z, probs)");
  m.def("global_mix_backward", &convplus::global_mix_backward,
        "Conv+ attention over every position, backward: (dq, dk, dv, dgain)");
  m.def("direct_score_forward", &convplus::direct_score_forward, "'direct' score features: (q, k, inverse_norm)");
  m.def("direct_score_backward", &convplus::direct_score_backward,
        "'direct' score features, backward: (dx, dpos, dtemperature)");
  m.def("set_phase_clock", &convplus::set_phase_clock,
        "Starts (clearing the totals) or stops the mixing kernel's per-phase clock");
  m.def("phase_times", &convplus::phase_times,
        "(phase, seconds summed over threads) per phase of the mixing kernel since the clock was started");
}
