// One set of x86 instruction-set levels for every multiversioned CPU loop of the extension, and the one place that
// picks among them at run time.
//
// The levels are the x86-64 psABI micro-architecture levels:
//   x86-64-v4  AVX-512 (F/BW/DQ/VL): 16 fp32 lanes per register, 32 vector registers;
//   x86-64-v3  AVX2 + FMA + F16C: every x86-64 server and desktop CPU of the last decade;
//   default    the baseline x86-64 (SSE2) the wheel is built for, so the extension runs anywhere.
// Named levels rather than feature lists, because a level is a fixed feature bundle that GCC knows both as a
// target attribute and as a __builtin_cpu_supports query, so a loop compiled for a level is only ever run where
// every instruction the compiler may emit for it exists (an "avx2" clone alone would not allow FMA, an "avx512f"
// one not the BW/VL forms). Three versions per loop keep compile time and code size small; nothing in the
// kernels profits from a level between these.
//
// Two ways to use them:
//   HASS_CPU_CLONES before a function: GCC compiles it once per level and an ifunc picks one at load time
//     (for auto-vectorised loops whose code is the same at every level);
//   HASS_CPU_V4 / HASS_CPU_V3 on hand-written versions (e.g. a different register blocking per level) and
//     hass_cpu::pick(v4, v3, baseline) to choose among them once, with the same rule as the ifunc.
// Other compilers and architectures get the baseline version only (the macros expand to nothing).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define HASS_CPU_MULTIVERSION 1
#define HASS_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define HASS_CPU_V4 __attribute__((target("arch=x86-64-v4")))
#define HASS_CPU_V3 __attribute__((target("arch=x86-64-v3")))
#else
#define HASS_CPU_MULTIVERSION 0
#define HASS_CPU_CLONES
#define HASS_CPU_V4
#define HASS_CPU_V3
#endif

namespace hass_cpu {

enum class Level { kBaseline = 0, kV3 = 3, kV4 = 4 };

// The widest level this CPU supports (kBaseline where multiversioning is off).
inline Level level() {
#if HASS_CPU_MULTIVERSION
  static const Level l = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return Level::kV4;
    if (__builtin_cpu_supports("x86-64-v3")) return Level::kV3;
    return Level::kBaseline;
  }();
  return l;
#else
  return Level::kBaseline;
#endif
}

// The version of a hand-multiversioned function for this CPU.
template <typename T>
T pick(T v4, T v3, T baseline) {
  switch (level()) {
    case Level::kV4: return v4;
    case Level::kV3: return v3;
    default: return baseline;
  }
}

}  // namespace hass_cpu
