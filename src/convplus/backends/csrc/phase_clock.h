// Where the mixing kernel's time goes, by phase (scores, softmax, aggregation, row copies, ...), for the speed
// suite's profile table: the fused kernel is one operator to a profiler. Off unless switched on; then each thread
// reads a steady clock at every phase boundary of a query row and adds its per-phase durations to process-wide
// totals when its share of a pass ends. Off, a boundary costs one test of a flag.
#pragma once

#include <array>
#include <chrono>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace convplus {

// The phases, in the order the passes run them.
enum class Phase : int {
  kForwardRowsIn,     // copying the rows a query row needs into the padded row buffers (transposing channels-last rows)
  kForwardKeys,       // the 'direct' score's keys: positional encoding added, unit norm
  kForwardScores,     // score dot products and their exponentials, mirrored scores copied back
  kForwardSoftmax,    // masking, the softmax's sums and reciprocals, probabilities kept for backward
  kForwardMix,        // aggregation, convolution term and bias: one product with weights g P + r, plus b
  kForwardRowsOut,    // copying the output rows out of the row buffers
  kBackwardRowsIn,    // copying rows (and, per key row, the saved dS and P) into the padded buffers
  kBackwardProbabilityGrads,  // dP dot products and the taps' gradients
  kBackwardSoftmax,   // dS = g P (dP - sum P dP) and the gain's gradient
  kBackwardQueryGrads,        // dq = sum_w dS k
  kBackwardKeyGrads,          // dk = sum_w dS q
  kBackwardValueGrads,        // dv = sum_w (g P + r) gout
  kBackwardRowsOut,   // copying the gradient rows out of the row buffers
  kCount
};

// Starts (on) or stops (off) the clock; starting clears the totals.
void set_phase_clock(bool on);
// (phase name, seconds summed over threads) per phase since the clock was last started.
std::vector<std::pair<std::string, double>> phase_times();

namespace detail {

bool phase_clock_on();
void add_phase_times(const std::array<int64_t, static_cast<size_t>(Phase::kCount)>& nanoseconds);

namespace {  // internal linkage, see simd.h

// One thread's clock over its share of a pass: lap(phase) charges the time since the previous lap (or since the
// clock was made) to phase; the totals are added when the clock goes out of scope.
class PhaseClock {
 public:
  PhaseClock() : on_(phase_clock_on()) {
    if (on_) last_ = Clock::now();
  }
  PhaseClock(const PhaseClock&) = delete;
  PhaseClock& operator=(const PhaseClock&) = delete;
  ~PhaseClock() {
    if (on_) add_phase_times(spent_);
  }
  void lap(Phase phase) {
    if (!on_) return;
    const auto now = Clock::now();
    spent_[static_cast<size_t>(phase)] += std::chrono::duration_cast<std::chrono::nanoseconds>(now - last_).count();
    last_ = now;
  }

 private:
  using Clock = std::chrono::steady_clock;
  bool on_;
  Clock::time_point last_;
  std::array<int64_t, static_cast<size_t>(Phase::kCount)> spent_{};
};

}  // namespace
}  // namespace detail
}  // namespace convplus
