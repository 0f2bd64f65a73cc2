// What the 'direct' score's two computations of the unit keys share: direct_score.cpp's and the mixing kernel's
// row cache's (row_cache.h).
#pragma once

namespace convplus::detail {

// The 'direct' score's unit vectors divide by max(||x||, 1e-12), as F.normalize does.
constexpr double kMinSquaredNorm = 1e-24;

}  // namespace convplus::detail
