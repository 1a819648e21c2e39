// Unit tests of csrc/include/hass/common.h: hass::fast_exp, the one exp approximation of the CPU kernels
// (softmax rows of the attention kernels, vocabulary rows of the distillation loss, node masses of verify_tree).
#include <algorithm>
#include <cmath>

#include "check.h"
#include "hass/common.h"

namespace {

void test_accuracy() {
  double worst = 0;
  for (float x = -87.0f; x <= 0.5f; x += 0.0137f) {
    const double rel = std::fabs(hass::fast_exp(x) - std::exp((double)x)) / std::exp((double)x);
    worst = std::max(worst, rel);
  }
  CHECK(worst < 3e-7);  // about 2 ulp
}

// What the kernels rely on: exp(x - max) is exactly 1 at the maximum, a masked (-inf) or far-below entry is
// exactly 0, NaN is not hidden, and the values never increase as x decreases (mass orderings are kept).
void test_edges() {
  CHECK(hass::fast_exp(0.0f) == 1.0f);
  CHECK(hass::fast_exp(-0.0f) == 1.0f);
  CHECK(hass::fast_exp(-100.0f) == 0.0f);
  CHECK(hass::fast_exp(-INFINITY) == 0.0f);
  CHECK(std::isnan(hass::fast_exp(NAN)));
  float prev = hass::fast_exp(0.0f);
  int rises = 0;
  for (float x = -1e-3f; x > -87.5f; x -= 1e-3f) {
    const float y = hass::fast_exp(x);
    rises += y > prev;
    prev = y;
  }
  CHECK(rises == 0);
}

}  // namespace

int main() {
  test_accuracy();
  test_edges();
  TEST_MAIN_END();
}
