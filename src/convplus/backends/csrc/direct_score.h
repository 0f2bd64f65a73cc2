// What the 'direct' score's computations of the unit keys share: direct_score.cpp's, the mixing kernel's row
// cache's (row_cache.h) and global_mix.cpp's.
#pragma once

namespace convplus::detail {

// The 'direct' score's unit vectors divide by max(||x||, 1e-12), as F.normalize does.
constexpr double kMinSquaredNorm = 1e-24;

}  // namespace convplus::detail
