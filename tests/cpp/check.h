// A minimal assertion helper for the header-math unit tests (no framework needed).
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>

static int hass_failures = 0;

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++hass_failures;                                                           \
    }                                                                            \
  } while (0)

#define CHECK_NEAR(a, b, tol) CHECK(std::fabs((double)(a) - (double)(b)) <= (tol))

#define TEST_MAIN_END()                                                          \
  do {                                                                           \
    if (hass_failures) {                                                         \
      std::fprintf(stderr, "%d check(s) failed\n", hass_failures);             \
      return 1;                                                                  \
    }                                                                            \
    std::printf("all checks passed\n");                                         \
    return 0;                                                                    \
  } while (0)
