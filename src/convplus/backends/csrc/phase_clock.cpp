// The process-wide totals of the phase clock (phase_clock.h).
#include "phase_clock.h"

#include <atomic>

namespace convplus {
namespace {

constexpr size_t kPhases = static_cast<size_t>(Phase::kCount);

const std::array<const char*, kPhases> kPhaseNames = {
    "forward: rows in (copied into the row buffers)",
    "forward: keys ('direct' score: positional encoding, unit norm)",
    "forward: scores (dot products, exponentials)",
    "forward: softmax (masking, sums, kept probabilities)",
    "forward: aggregation, convolution term and bias (one product)",
    "forward: rows out (copied out of the row buffers)",
    "backward: rows in (copied into the row buffers, saved dS and P)",
    "backward: dP dot products and tap gradients",
    "backward: softmax backward (dS, gain gradient)",
    "backward: dq product",
    "backward: dk product",
    "backward: dv and convolution term product",
    "backward: rows out (copied out of the row buffers)",
};

std::atomic<bool> clock_on{false};
std::array<std::atomic<int64_t>, kPhases> totals{};

}  // namespace

void set_phase_clock(bool on) {
  if (on)
    for (auto& total : totals) total = 0;
  clock_on = on;
}

std::vector<std::pair<std::string, double>> phase_times() {
  std::vector<std::pair<std::string, double>> times;
  for (size_t p = 0; p < kPhases; ++p) times.emplace_back(kPhaseNames[p], totals[p] * 1e-9);
  return times;
}

namespace detail {

bool phase_clock_on() { return clock_on.load(std::memory_order_relaxed); }

void add_phase_times(const std::array<int64_t, kPhases>& nanoseconds) {
  for (size_t p = 0; p < kPhases; ++p) totals[p] += nanoseconds[p];
}

}  // namespace detail
}  // namespace convplus
