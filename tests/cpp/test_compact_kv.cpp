// Unit tests of csrc/include/hass/compact_kv.h: plan validation and the row/offset arithmetic.
#include <cstdint>
#include <vector>

#include "check.h"
#include "hass/compact_kv.h"

int main() {
  const int64_t pad[4] = {3, 5, -1, -1};
  CHECK(hass::compact_count(pad, 4) == 2);
  const int64_t none[2] = {-1, -1};
  CHECK(hass::compact_count(none, 2) == 0);

  CHECK(hass::compact_check_row(pad, 4, 2, 8) == hass::kOk);
  CHECK(hass::compact_check_row(pad, 4, 7, 8) == hass::kBadIndex);  // dst + n past the end
  CHECK(hass::compact_check_row(pad, 4, -1, 8) == hass::kBadIndex);
  const int64_t far[2] = {9, 1};
  CHECK(hass::compact_check_row(far, 2, 0, 8) == hass::kBadIndex);   // source past the end
  const int64_t holes[3] = {1, -1, 2};
  CHECK(hass::compact_check_row(holes, 3, 0, 8) == hass::kBadIndex); // entries after padding

  // A contiguous stacked cache [lead=2, B=3, H=4, S=5, D=6]: offsets and row splitting agree.
  hass::CacheGeom g{2, 3, 4, 5, 6, 3 * 4 * 5 * 6, 4 * 5 * 6, 5 * 6, 6};
  int64_t l, b, h;
  hass::split_row(g, 1 * 12 + 2 * 4 + 3, &l, &b, &h);
  CHECK(l == 1 && b == 2 && h == 3);
  CHECK(hass::cache_offset(g, l, b, h, 4) == ((((1 * 3 + 2) * 4 + 3) * 5 + 4) * 6));
  TEST_MAIN_END();
}
