// One AMSGrad training step for every leaf of one dtype group, in place, in one pass.
//
// The interface (targets, operand and result order, the step's scalars, the decay codes)
// is defined in amsgrad_jax/_native/_interface.py and reaches this file as the generated
// header "amsgrad_interface.h"; every index below is one of its names, and
// AmsgradJaxInterface() reports the interface this library was built with so that the
// loader refuses a mismatch. In short: "amsgrad_jax_step" takes the scalars and, per leaf,
// params, grads, mu, nu, nu_max, and returns per leaf params, mu, nu, nu_max, aliased to
// the operands; "amsgrad_jax_step_flat" (the flat_state layout) takes the scalars, the
// group's mu, nu and nu_max buffers and, per leaf, params and grads at an offset.
// The scalars are in the compute dtype C (float32 or float64), computed in JAX by the
// functions the Optax path uses; -lr and weight_decay are already rounded to the parameter
// dtype P. Attribute `decay`: none, coupled (g += wd p before the moments) or decoupled
// (u += wd p after the step, as optax.add_decayed_weights after scale_by_amsgrad).
//
// Per element, in C, with the rule's coefficients a, b, d (amsgrad_jax/_rules.py):
//   g = (g / divisor) * multiplier  (a global-norm clip in front; 1 and 1 without one)
//   m = b1 m + (1-b1) g;   v = b2 v + (1-b2) g^2;   nu_max = max(nu_max, a v)
//   u = (b m) / (d sqrt(nu_max + eps_root) + eps);   p = p + (-lr) u
// Each intermediate that the Optax chain holds in the parameter dtype is rounded to it
// here too (u, the decayed gradient, -lr u), the state is stored rounded to nearest
// (bfloat16 mu and nu stochastically when the attribute `state_rounding` says so) and
// nu_max rounded toward +infinity. XLA:CPU contracts a product feeding a sum into a fused
// multiply-add (LLVM's AllowFPOpFusion=Fast; for `x*y + z*w` it fuses the left product);
// the kernel writes those same fused multiply-adds out with std::fma and is built with
// -ffp-contract=off so the compiler adds no others. Results then equal the JAX path.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "amsgrad_interface.h"
#include "xla/ffi/api/ffi.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define AMSGRAD_JAX_VECTOR_CODES 1
#else
#define AMSGRAD_JAX_VECTOR_CODES 0
#endif

namespace ffi = xla::ffi;

namespace {

using bf16 = uint16_t;  // bfloat16 storage: the high half of a float32

// ---- conversions -----------------------------------------------------------------------

inline float BitsToFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t FloatToBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// float -> bfloat16, rounding to nearest even; NaN stays a (quiet) NaN.
inline bf16 Bf16Nearest(float f) {
  uint32_t u = FloatToBits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet_nan = (u >> 16) | 0x40u;
  return static_cast<bf16>(f != f ? quiet_nan : rounded);
}

// The next representable number toward +infinity, on the raw bits of a sign-magnitude float.
template <typename Bits, Bits kSign>
inline Bits NextUp(Bits bits) {
  const Bits next = (bits & kSign) ? Bits(bits - 1) : Bits(bits + 1);
  return bits == kSign ? Bits{1} : next;  // -0 -> the smallest positive subnormal
}

template <typename C>
inline C Load(float x) { return static_cast<C>(x); }
template <typename C>
inline C Load(double x) { return static_cast<C>(x); }
template <typename C>
inline C Load(bf16 x) { return static_cast<C>(BitsToFloat(uint32_t{x} << 16)); }

// Round a compute value to storage type T, to nearest.
template <typename T, typename C>
inline T Nearest(C x) {
  if constexpr (std::is_same_v<T, bf16>) {
    static_assert(std::is_same_v<C, float>, "bfloat16 is only stored from float32");
    return Bf16Nearest(x);
  } else {
    return static_cast<T>(x);
  }
}

// Round a compute value to storage type T, toward +infinity where T is narrower.
template <typename T, typename C>
inline T Upward(C x) {
  if constexpr (std::is_same_v<T, bf16>) {
    // bfloat16 is float32's top half: a positive x rounds up by carrying a nonzero low
    // half into it, a negative one by dropping the low half; a NaN stays a quiet NaN.
    const uint32_t bits = FloatToBits(x);
    const uint32_t toward_zero = bits >> 16, away = (bits + 0xFFFFu) >> 16;
    const uint32_t rounded = (bits >> 31) ? toward_zero : away;
    return static_cast<bf16>(x != x ? (toward_zero | 0x40u) : rounded);
  } else if constexpr (std::is_same_v<T, float> && std::is_same_v<C, double>) {
    float nearest = static_cast<float>(x);
    float up = BitsToFloat(NextUp<uint32_t, 0x80000000u>(FloatToBits(nearest)));
    return static_cast<double>(nearest) < x ? up : nearest;
  } else {
    return static_cast<T>(x);
  }
}

// x rounded to T and read back: what the Optax chain holds in T.
template <typename T, typename C>
inline C Through(C x) {
  if constexpr (std::is_same_v<T, C>) {
    return x;
  } else {
    return Load<C>(Nearest<T>(x));
  }
}

// x*y + z, as the Optax chain forms it in parameter dtype P: one fused multiply-add when P
// is the compute dtype, else a product and a sum each rounded to P (no fusion across them).
template <typename P, typename C>
inline C MulAdd(C x, C y, C z) {
  if constexpr (std::is_same_v<P, C>) {
    return std::fma(x, y, z);
  } else {
    return Through<P>(Through<P>(x * y) + z);
  }
}

// ---- stochastic rounding (amsgrad_jax/_rounding.py) -------------------------------------

// MurmurHash3's 32-bit finaliser.
constexpr uint32_t kMixFirst = 0x85EBCA6Bu, kMixSecond = 0xC2B2AE35u;

inline uint32_t Mix(uint32_t x) {
  x ^= x >> 16;
  x *= kMixFirst;
  x ^= x >> 13;
  x *= kMixSecond;
  return x ^ (x >> 16);
}

inline uint32_t LeafKey(uint32_t key, int64_t leaf, uint32_t salt = 0) {
  return Mix(key + static_cast<uint32_t>(leaf) * kRoundLeafMultiplier + salt);
}

// 32 random bits of element `index` of a leaf (as _rounding.leaf_bits).
inline uint32_t ElementBits(uint32_t key, uint32_t leaf_key, size_t index) {
  return Mix(Mix(static_cast<uint32_t>(index) + leaf_key) ^ key);
}

// 32 random bits of element `index` for the stochastic rounding of a leaf's moments (as
// _rounding.moment_bits): one hash, SplitMix32's.
inline uint32_t MomentBits(uint32_t state_key, size_t index) {
  return Mix(static_cast<uint32_t>(index) * kRoundGolden + state_key);
}

// The bfloat16 neighbour of `x` toward +infinity (upward) or -infinity.
inline bf16 NextBf16(bf16 x, bool upward) {
  const bool negative = x >= 0x8000u;
  const bf16 from_zero = upward ? bf16{1} : bf16{0x8001u};
  const bf16 next = static_cast<bf16>(upward != negative ? x + 1 : x - 1);
  return (x & 0x7FFFu) == 0 ? from_zero : next;
}

// Float x rounded to bfloat16 stochastically (as _rounding.stochastic_round): its bits
// plus the low 16 random bits, truncated, so up in magnitude with probability equal to the
// dropped fraction; a finite x that would carry into infinity is truncated instead.
inline bf16 StochasticBf16(float x, uint32_t random) {
  const uint32_t bits = FloatToBits(x);
  const uint32_t up = (bits + (random & 0xFFFFu)) >> 16;
  const uint32_t down = bits >> 16;
  const bool overflow = (up & 0x7FFFu) == 0x7F80u && (down & 0x7F80u) != 0x7F80u;
  const uint32_t rounded = overflow ? down : up;
  return x != x ? Bf16Nearest(x) : static_cast<bf16>(rounded);
}

// ---- 8-bit block-wise codes (amsgrad_jax/_blockwise.py) ----------------------------------
//
// Written without branches or library calls, so that the per-element loops vectorise.

// The bits of a non-negative float rounded to kMantissaBits bits: up, or to nearest even.
template <int kMantissaBits>
inline uint32_t RoundMantissa(uint32_t bits, bool upward) {
  constexpr int kShift = 23 - kMantissaBits;
  constexpr uint32_t kLow = (1u << kShift) - 1;
  constexpr uint32_t kHalf = (1u << (kShift - 1)) - 1;
  return upward ? (bits + kLow) & ~kLow : (bits + kHalf + ((bits >> kShift) & 1u)) & ~kLow;
}

// 2**e as a float, for e in [-126, 127].
constexpr float PowerOfTwo(int e) {
  float x = 1.0f;
  for (; e > 0; --e) x *= 2.0f;
  for (; e < 0; ++e) x *= 0.5f;
  return x;
}

inline float PowerOfTwoBits(int e) { return BitsToFloat(static_cast<uint32_t>(e + 127) << 23); }

// The codes of the three moments: mu (signed), nu (1 - a v / nu_max, scale 1) and nu_max.
enum CodeKind : int { kMu = 0, kNu = 1, kNuMax = 2 };

template <int kKind>
struct CodeOf {
  static constexpr bool kSigned = kKind == kMu;
  static constexpr int kMantissaBits = kKind == kMu   ? kMuCodeMantissaBits
                                       : kKind == kNu ? kNuCodeMantissaBits
                                                      : kNuMaxCodeMantissaBits;
  static constexpr int kEmin = kKind == kMu ? kMuCodeEmin : kKind == kNu ? kNuCodeEmin : kNuMaxCodeEmin;
  static constexpr int kLargest = kKind == kMu   ? kMuCodeLargest
                                  : kKind == kNu ? kNuCodeLargest
                                                 : kNuMaxCodeLargest;
  static constexpr int kLowestScale = kKind == kMu   ? kMuCodeLowestScale
                                      : kKind == kNu ? kNuCodeLowestScale
                                                     : kNuMaxCodeLowestScale;
  static constexpr float kSmallestNormal = PowerOfTwo(kEmin);
  static constexpr float kSubnormalUnit = PowerOfTwo(kEmin - kMantissaBits);
  static constexpr float kPerSubnormalUnit = PowerOfTwo(kMantissaBits - kEmin);
};

// A block's exponent from the float32 bits of its largest magnitude (as _blockwise.py).
template <int kKind>
inline int BlockExponent(uint32_t amax_bits, bool upward) {
  using Code = CodeOf<kKind>;
  const uint32_t rounded = RoundMantissa<Code::kMantissaBits>(amax_bits, upward);
  const int exponent = static_cast<int>((rounded >> 23) & 0xFFu) - 127;
  return std::clamp(exponent, Code::kLowestScale, kCodeHighestScale);
}

// |x| as float32 bits: unsigned order is the order of the magnitudes (a NaN above all).
inline uint32_t MagnitudeBits(float x) { return FloatToBits(x) & 0x7FFFFFFFu; }

template <int kKind, bool kUpward>
inline uint8_t Encode(float x, float inverse_scale) {
  using Code = CodeOf<kKind>;
  constexpr int m = Code::kMantissaBits;
  const float scaled = std::fabs(x) * inverse_scale;
  const uint32_t rounded = RoundMantissa<m>(FloatToBits(scaled), kUpward);
  const int32_t normal = static_cast<int32_t>(rounded >> (23 - m)) - ((127 + Code::kEmin - 1) << m);
  const float tiny = scaled * Code::kPerSubnormalUnit;
  float tiny_rounded = kUpward ? std::ceil(tiny) : std::nearbyint(tiny);
  tiny_rounded = tiny_rounded < 256.0f ? tiny_rounded : 256.0f;  // and NaN: not selected
  const int32_t subnormal = static_cast<int32_t>(tiny_rounded);
  int32_t magnitude = scaled < Code::kSmallestNormal ? subnormal : normal;
  if (kUpward) magnitude = (x > 0 && magnitude < 1) ? 1 : magnitude;
  magnitude = magnitude < 0 ? 0 : (magnitude > Code::kLargest ? Code::kLargest : magnitude);
  if (Code::kSigned) magnitude |= (x < 0 && magnitude > 0) ? 0x80 : 0;
  return static_cast<uint8_t>(magnitude);
}

// Stochastic rounding onto the code (as _blockwise._encode_stochastic): 16 random bits
// added just below the code's cut of |x|'s float32 bits carry into the code above with the
// probability of the dropped fraction; below the smallest normal code, |x| + 2**emin puts
// the units of the gradual underflow at the cut.
template <int kKind>
inline uint8_t EncodeStochastic(float x, float inverse_scale, uint32_t random) {
  using Code = CodeOf<kKind>;
  constexpr int m = Code::kMantissaBits;
  const float scaled = std::fabs(x) * inverse_scale;
  const bool subnormal = scaled < Code::kSmallestNormal;
  const float shifted = subnormal ? scaled + Code::kSmallestNormal : scaled;
  const uint32_t bits = FloatToBits(shifted) + ((random & 0xFFFFu) << (7 - m));
  int32_t magnitude = static_cast<int32_t>(bits >> (23 - m)) - ((127 + Code::kEmin - 1) << m) -
                      (subnormal ? (1 << m) : 0);
  magnitude = magnitude > Code::kLargest ? Code::kLargest : magnitude;
  if (Code::kSigned) magnitude |= (x < 0 && magnitude > 0) ? 0x80 : 0;
  return static_cast<uint8_t>(magnitude);
}

template <int kKind>
inline float Decode(uint8_t code, float scale) {
  using Code = CodeOf<kKind>;
  constexpr int m = Code::kMantissaBits;
  const uint32_t magnitude = code & static_cast<uint32_t>(Code::kLargest);
  // A normal code is float32's exponent and top mantissa bits, with the exponent's bias
  // moved; below 1 << m, whole units of the gradual underflow.
  const float normal = BitsToFloat((magnitude << (23 - m)) +
                                   (static_cast<uint32_t>(Code::kEmin - 1 + 127) << 23));
  const float subnormal =
      static_cast<float>(static_cast<int32_t>(magnitude)) * Code::kSubnormalUnit;
  const float value = (magnitude < (1u << m) ? subnormal : normal) * scale;
  if constexpr (Code::kSigned) {
    return BitsToFloat(FloatToBits(value) | (static_cast<uint32_t>(code & 0x80u) << 24));
  }
  return value;
}

#if AMSGRAD_JAX_VECTOR_CODES
// ---- 8-bit codes, sixteen at a time (AVX-512) ----------------------------------------------
//
// Every code's gradual underflow starts at 2**-14 and its top binade is [1, 2), as float16's
// below 2: a code is the float16 bit pattern of its value with the low 10 - m mantissa bits
// dropped (mu's sign moved from bit 7 to bit 15). So float16 conversions decode a code
// exactly, and encode it in two roundings that equal the scalar functions' one: onto the
// float16 grid, which contains the code's, then onto the code, toward +infinity both times
// (ceil of ceil is ceil), or to nearest after a round-to-odd conversion (which keeps the
// sticky bit: float16 has at least 6 bits below the code's cut). Stochastic rounding is
// the scalar integer arithmetic, vectorised.

template <int kKind>
constexpr void CheckFloat16Layout() {
  using Code = CodeOf<kKind>;
  static_assert(Code::kEmin == -14, "a code's gradual underflow must start where float16's does");
  static_assert(Code::kLargest == (Code::kSigned ? 0x7F : 0xFF),
                "a code's magnitude is 7 or 8 bits");
}

// The values of 16 codes, one per 16-bit lane, times `scale` (as Decode).
template <int kKind>
inline __m512 ValuesOfSixteen(__m256i codes, __m512 scale) {
  using Code = CodeOf<kKind>;
  CheckFloat16Layout<kKind>();
  constexpr int kShift = 10 - Code::kMantissaBits;
  __m256i half = _mm256_slli_epi16(codes, kShift);
  if constexpr (Code::kSigned) {
    // Sign-extended codes: shifted, the sign reaches bit 15 and also bit 14, cleared here.
    half = _mm256_and_si256(half, _mm256_set1_epi16(static_cast<int16_t>(0xBFFF)));
  }
  return _mm512_mul_ps(_mm512_cvtph_ps(half), scale);
}

// The values of 16 stored codes times `scale` (as Decode).
template <int kKind>
inline __m512 DecodeSixteen(const uint8_t* codes, __m512 scale) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes));
  const __m256i wide =
      CodeOf<kKind>::kSigned ? _mm256_cvtepi8_epi16(bytes) : _mm256_cvtepu8_epi16(bytes);
  return ValuesOfSixteen<kKind>(wide, scale);
}

inline void StoreSixteen(uint8_t* to, __m256i codes16) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(to), _mm256_cvtepi16_epi8(codes16));
}

inline void StoreSixteen(uint8_t* to, __m512i codes32) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(to), _mm512_cvtepi32_epi8(codes32));
}

// The 16-bit float16 patterns of |x| * inverse: rounded toward +infinity, or to odd.
inline __m256i Float16Upward(__m512 scaled) {
  return _mm512_cvtps_ph(scaled, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC);
}

inline __m256i Float16ToOdd(__m512 scaled) {
  const __m256i truncated = _mm512_cvtps_ph(scaled, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
  const __mmask16 inexact = _mm512_cmp_ps_mask(_mm512_cvtph_ps(truncated), scaled, _CMP_NEQ_UQ);
  const __m256i odd = _mm256_or_si256(truncated, _mm256_set1_epi16(1));
  return _mm256_mask_mov_epi16(truncated, inexact, odd);
}

// 16 codes of x (as Encode): toward +infinity (kUpward) or to nearest, ties to even.
template <int kKind, bool kUpward>
inline __m256i EncodeSixteen(__m512 x, __m512 inverse) {
  using Code = CodeOf<kKind>;
  CheckFloat16Layout<kKind>();
  constexpr int kShift = 10 - Code::kMantissaBits;
  const __m512 scaled = _mm512_mul_ps(_mm512_abs_ps(x), inverse);
  __m256i magnitude;
  if constexpr (kUpward) {
    const __m256i half = Float16Upward(scaled);
    const __m256i below = _mm256_set1_epi16((1 << kShift) - 1);
    magnitude = _mm256_srli_epi16(_mm256_add_epi16(half, below), kShift);
  } else {
    const __m256i half = Float16ToOdd(scaled);
    const __m256i even = _mm256_and_si256(_mm256_srli_epi16(half, kShift), _mm256_set1_epi16(1));
    const __m256i bias = _mm256_set1_epi16((1 << (kShift - 1)) - 1);
    magnitude = _mm256_srli_epi16(_mm256_add_epi16(_mm256_add_epi16(half, bias), even), kShift);
  }
  magnitude = _mm256_min_epu16(magnitude, _mm256_set1_epi16(Code::kLargest));
  const __m256i one = _mm256_set1_epi16(1);
  if constexpr (kUpward) {  // a positive x whose scaled value underflowed still rounds up
    const __mmask16 positive = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_GT_OQ);
    magnitude = _mm256_mask_max_epu16(magnitude, positive, magnitude, one);
  }
  if constexpr (Code::kSigned) {
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ) &
                               _mm256_cmpgt_epi16_mask(magnitude, _mm256_setzero_si256());
    magnitude = _mm256_mask_mov_epi16(magnitude, negative,
                                      _mm256_or_si256(magnitude, _mm256_set1_epi16(0x80)));
  }
  return magnitude;
}

// 16 codes of x rounded stochastically with the low 16 bits of `random` (as EncodeStochastic).
template <int kKind>
inline __m512i EncodeSixteenStochastic(__m512 x, __m512 inverse, __m512i random) {
  using Code = CodeOf<kKind>;
  constexpr int m = Code::kMantissaBits;
  const __m512 smallest_normal = _mm512_set1_ps(Code::kSmallestNormal);
  const __m512 scaled = _mm512_mul_ps(_mm512_abs_ps(x), inverse);
  const __mmask16 subnormal = _mm512_cmp_ps_mask(scaled, smallest_normal, _CMP_LT_OQ);
  const __m512 shifted = _mm512_mask_add_ps(scaled, subnormal, scaled, smallest_normal);
  const __m512i low = _mm512_and_si512(random, _mm512_set1_epi32(0xFFFF));
  const __m512i uniform = _mm512_slli_epi32(low, 7 - m);  // 16 bits under the cut
  const __m512i bits = _mm512_add_epi32(_mm512_castps_si512(shifted), uniform);
  __m512i magnitude = _mm512_sub_epi32(_mm512_srli_epi32(bits, 23 - m),
                                       _mm512_set1_epi32((127 + Code::kEmin - 1) << m));
  magnitude = _mm512_mask_sub_epi32(magnitude, subnormal, magnitude, _mm512_set1_epi32(1 << m));
  magnitude = _mm512_min_epi32(magnitude, _mm512_set1_epi32(Code::kLargest));
  if constexpr (Code::kSigned) {
    const __mmask16 negative = _mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ) &
                               _mm512_cmpgt_epi32_mask(magnitude, _mm512_setzero_si512());
    magnitude = _mm512_mask_or_epi32(magnitude, negative, magnitude, _mm512_set1_epi32(0x80));
  }
  return magnitude;
}

// Mix, lane by lane.
inline __m512i MixSixteen(__m512i x) {
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int32_t>(kMixFirst)));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
  x = _mm512_mullo_epi32(x, _mm512_set1_epi32(static_cast<int32_t>(kMixSecond)));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}

// MomentBits of elements index .. index + 15: (index + k) * golden + key is
// index * golden + key plus k * golden, in 32-bit arithmetic.
inline __m512i MomentBitsSixteen(uint32_t state_key, size_t index) {
  constexpr uint32_t g = kRoundGolden;
  const __m512i steps = _mm512_setr_epi32(0, g, 2 * g, 3 * g, 4 * g, 5 * g, 6 * g, 7 * g, 8 * g,
                                          9 * g, 10 * g, 11 * g, 12 * g, 13 * g, 14 * g, 15 * g);
  const uint32_t base = static_cast<uint32_t>(index) * g + state_key;
  return MixSixteen(_mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(base)), steps));
}
#endif  // AMSGRAD_JAX_VECTOR_CODES

// ---- the step --------------------------------------------------------------------------

// The step's scalars, read once per range.
template <typename C>
struct Scalars {
  C b1, b2, one_minus_b1, one_minus_b2, eps, eps_root, a, b, d, neg_lr, weight_decay;
  C grad_divisor, grad_multiplier;
  C nu_unscale_before;  // 1 / a of the step before: a blockwise8 nu's decoding
  uint32_t key;
  bool clipping;  // whether the clip's scalars are not both 1

  explicit Scalars(const void* raw) {
    const C* s = static_cast<const C*>(raw);
    b1 = s[kScalarB1], b2 = s[kScalarB2];
    one_minus_b1 = s[kScalarOneMinusB1], one_minus_b2 = s[kScalarOneMinusB2];
    eps = s[kScalarEps], eps_root = s[kScalarEpsRoot];
    a = s[kScalarNuScale], b = s[kScalarMuScale], d = s[kScalarRootScale];
    nu_unscale_before = s[kScalarNuUnscaleBefore];
    neg_lr = s[kScalarNegLr], weight_decay = s[kScalarWeightDecay];
    grad_divisor = s[kScalarGradDivisor], grad_multiplier = s[kScalarGradMultiplier];
    key = (static_cast<uint32_t>(s[kScalarRoundKeyHigh]) << 16) |
          static_cast<uint32_t>(s[kScalarRoundKeyLow]);
    clipping = !(grad_divisor == C(1) && grad_multiplier == C(1));
  }
};

// One element's step in C, from the parameter, the raw gradient and the stored moments.
template <typename C>
struct Element {
  C g, m, v, v_max, u;
};

// kDecoded: the moments were decoded from blockwise8 codes (each a product, code value
// times its block's scale). XLA:CPU then contracts the *right* product of each moment's
// sum into the fused multiply-add, m = fma(1-b1, g, b1 m), as it does on the Optax path.
// kClip: a global-norm clip may apply (without one, g / 1 * 1 is g: no division).
template <typename P, typename C, int64_t kDecay, bool kDecoded = false, bool kClip = true>
inline Element<C> Compute(C p, C raw_grad, C mu, C nu, C nu_max, const Scalars<C>& s) {
  // A global-norm clip, as optax.clip_by_global_norm forms it: (g / norm) * max_norm in P.
  C g = kClip ? Through<P>(Through<P>(raw_grad / s.grad_divisor) * s.grad_multiplier) : raw_grad;
  if constexpr (kDecay == kDecayCoupled) {
    // XLA keeps this sum in the compute dtype (its convert pair to P and back is removed
    // as excess precision), so only the product is rounded to P.
    if constexpr (std::is_same_v<P, C>) {
      g = std::fma(s.weight_decay, p, g);
    } else {
      g = g + Through<P>(s.weight_decay * p);
    }
  }
  const C m = kDecoded ? std::fma(s.one_minus_b1, g, s.b1 * mu) : std::fma(s.b1, mu, s.one_minus_b1 * g);
  const C v = kDecoded ? std::fma(s.one_minus_b2, g * g, s.b2 * nu)
                       : std::fma(s.b2, nu, s.one_minus_b2 * (g * g));
  const C scaled = s.a * v;
  const C v_max = ((nu_max != nu_max) | (nu_max > scaled)) ? nu_max : scaled;  // NaN wins
  const C denominator = std::fma(s.d, std::sqrt(v_max + s.eps_root), s.eps);
  C u = Through<P>((s.b * m) / denominator);
  if constexpr (kDecay == kDecayDecoupled) u = MulAdd<P>(s.weight_decay, p, u);
  return {g, m, v, v_max, u};
}

// The new parameter p + (-lr) u: rounded to nearest, or (kStochastic, bfloat16 only) to
// the neighbour above or below at random, written as optax.apply_updates lands on it.
template <typename P, typename C, bool kStochastic>
inline P NewParam(C p, C u, const Scalars<C>& s, size_t index, uint32_t leaf_key) {
  if constexpr (kStochastic && std::is_same_v<P, bf16>) {
    const C x = Through<P>(s.neg_lr * u) + p;
    const uint32_t random = ElementBits(s.key, leaf_key, index);
    const C q = Load<C>(StochasticBf16(x, random));
    // The update optax.apply_updates adds (_rounding.landing_update), then the sum.
    const bf16 update = Nearest<P>(q - p);
    const C landed = Through<P>(p + Load<C>(update));
    const bf16 nudged = NextBf16(update, landed < q);
    return Nearest<P>(p + Load<C>(landed != q ? nudged : update));
  } else {
    return Nearest<P>(MulAdd<P>(s.neg_lr, u, p));
  }
}

// A moment stored in M: rounded to nearest, or (kStochastic, bfloat16 only) to the
// neighbour above or below at random (as _transform._store).
template <typename M, typename C, bool kStochastic>
inline M StoreMoment(C x, uint32_t random) {
  if constexpr (kStochastic && std::is_same_v<M, bf16>) {
    return StochasticBf16(x, random);
  } else {
    return Nearest<M>(x);
  }
}

// Whether x is finite: x - x is 0 for a finite x and NaN for inf or NaN (vectorises).
template <typename C>
inline bool Finite(C x) { return (x - x) == C(0); }

// kCheck: write nothing; return whether the step would leave every value the guard
// (skip_nonfinite) looks at finite: the gradient, the update and the stored state.
// kStochastic: the bfloat16 parameters are rounded stochastically; kStateStochastic: the
// bfloat16 moments, mu with the low and nu with the high 16 of the element's bits under
// `state_key`.
template <typename P, typename M, typename N, typename C, int64_t kDecay, bool kCheck,
          bool kStochastic, bool kStateStochastic, bool kClip>
inline bool StepRun(P* __restrict__ params, const P* __restrict__ grads, M* __restrict__ mu,
                    N* __restrict__ nu, N* __restrict__ nu_max, size_t begin, size_t end,
                    const Scalars<C>& s, uint32_t leaf_key, uint32_t state_key) {
  // A 32-bit flag, not a bool: GCC vectorises an AND over unsigned lanes, not over bools.
  uint32_t finite = 1;
  for (size_t i = begin; i < end; ++i) {
    const C p = Load<C>(params[i]);
    const Element<C> e = Compute<P, C, kDecay, false, kClip>(
        p, Load<C>(grads[i]), Load<C>(mu[i]), Load<C>(nu[i]), Load<C>(nu_max[i]), s);
    if constexpr (kCheck) {
      const bool all = Finite(e.g) & Finite(Through<P>(s.neg_lr * e.u)) &
                       Finite(Load<C>(Nearest<M>(e.m))) & Finite(Load<C>(Nearest<N>(e.v))) &
                       Finite(Load<C>(Upward<N>(e.v_max)));
      finite &= static_cast<uint32_t>(all);
    } else {
      params[i] = NewParam<P, C, kStochastic>(p, e.u, s, i, leaf_key);
      if constexpr (kStateStochastic) {
        const uint32_t random = MomentBits(state_key, i);
        mu[i] = StoreMoment<M, C, true>(e.m, random);
        nu[i] = StoreMoment<N, C, true>(e.v, random >> 16);
      } else {
        mu[i] = Nearest<M>(e.m);
        nu[i] = Nearest<N>(e.v);
      }
      nu_max[i] = Upward<N>(e.v_max);
    }
  }
  return finite != 0;
}

// Elements a loop runs between software prefetches, and how far ahead those reach. The
// hardware prefetcher stops at every 4 KiB page; with five streams of a few hundred
// elements a page (bfloat16 moments), it keeps restarting, and a bfloat16-state step
// stayed well above its memory time (benchmarks page).
constexpr size_t kPrefetchRun = 128;
constexpr size_t kPrefetchAhead = 512;

// Prefetch the cache lines of elements [first + kPrefetchAhead, + kPrefetchRun) of `x`
// (addresses past the end are harmless: a prefetch never faults).
template <typename T>
inline void PrefetchAhead(const T* x, size_t first) {
  const uintptr_t start = reinterpret_cast<uintptr_t>(x) + (first + kPrefetchAhead) * sizeof(T);
  for (uintptr_t at = start; at < start + kPrefetchRun * sizeof(T); at += 64) {
    __builtin_prefetch(reinterpret_cast<const void*>(at));
  }
}

template <typename P, typename M, typename N, typename C, int64_t kDecay, bool kCheck,
          bool kStochastic, bool kStateStochastic, bool kClip>
bool StepLoop(P* __restrict__ params, const P* __restrict__ grads, M* __restrict__ mu,
              N* __restrict__ nu, N* __restrict__ nu_max, size_t begin, size_t end,
              const Scalars<C>& s, uint32_t leaf_key, uint32_t state_key) {
  bool finite = true;
  for (size_t run = begin; run < end; run += kPrefetchRun) {
    PrefetchAhead(params, run), PrefetchAhead(grads, run), PrefetchAhead(mu, run);
    PrefetchAhead(nu, run), PrefetchAhead(nu_max, run);
    finite &= StepRun<P, M, N, C, kDecay, kCheck, kStochastic, kStateStochastic, kClip>(
        params, grads, mu, nu, nu_max, run, std::min(end, run + kPrefetchRun), s, leaf_key,
        state_key);
  }
  return finite;
}

template <typename P, typename M, typename N, typename C, int64_t kDecay, bool kCheck,
          bool kStochastic, bool kStateStochastic>
bool StepRange(void* params_raw, const void* grads_raw, void* mu_raw, void* nu_raw,
               void* nu_max_raw, size_t begin, size_t end, const void* scalars_raw,
               uint32_t leaf_key, uint32_t state_key) {
  P* params = static_cast<P*>(params_raw);
  const P* grads = static_cast<const P*>(grads_raw);
  M* mu = static_cast<M*>(mu_raw);
  N* nu = static_cast<N*>(nu_raw);
  N* nu_max = static_cast<N*>(nu_max_raw);
  const Scalars<C> s(scalars_raw);
  // Without a clip, g / 1 * 1 is g: the loop leaves out the division.
  return s.clipping
             ? StepLoop<P, M, N, C, kDecay, kCheck, kStochastic, kStateStochastic, true>(
                   params, grads, mu, nu, nu_max, begin, end, s, leaf_key, state_key)
             : StepLoop<P, M, N, C, kDecay, kCheck, kStochastic, kStateStochastic, false>(
                   params, grads, mu, nu, nu_max, begin, end, s, leaf_key, state_key);
}
using StepFn = bool (*)(void*, const void*, void*, void*, void*, size_t, size_t, const void*,
                        uint32_t, uint32_t);

// What one call does: check only, or step with the parameters and the moments each rounded
// to nearest or stochastically.
struct Mode {
  bool check;
  bool stochastic;        // the parameters
  bool state_stochastic;  // mu and nu
};

template <typename P, typename M, typename N, typename C, bool kCheck, bool kStochastic,
          bool kStateStochastic>
StepFn ForDecay(int64_t decay) {
  switch (decay) {
    case kDecayNone:
      return &StepRange<P, M, N, C, kDecayNone, kCheck, kStochastic, kStateStochastic>;
    case kDecayCoupled:
      return &StepRange<P, M, N, C, kDecayCoupled, kCheck, kStochastic, kStateStochastic>;
    case kDecayDecoupled:
      return &StepRange<P, M, N, C, kDecayDecoupled, kCheck, kStochastic, kStateStochastic>;
    default: return nullptr;
  }
}

template <typename P, typename M, typename N, typename C, bool kStochastic>
StepFn ForStateRounding(int64_t decay, bool state_stochastic) {
  if constexpr (std::is_same_v<M, bf16> || std::is_same_v<N, bf16>) {
    if (state_stochastic) return ForDecay<P, M, N, C, false, kStochastic, true>(decay);
  }
  return ForDecay<P, M, N, C, false, kStochastic, false>(decay);
}

// Stochastic rounding applies to bfloat16 values only (wider ones round to nearest).
template <typename P, typename M, typename N, typename C>
StepFn ForMode(int64_t decay, Mode mode) {
  if (mode.check) return ForDecay<P, M, N, C, true, false, false>(decay);
  if constexpr (std::is_same_v<P, bf16>) {
    if (mode.stochastic) return ForStateRounding<P, M, N, C, true>(decay, mode.state_stochastic);
  }
  return ForStateRounding<P, M, N, C, false>(decay, mode.state_stochastic);
}

template <typename P, typename M>
StepFn ForNu32(ffi::DataType n, int64_t decay, Mode mode) {
  switch (n) {
    case ffi::DataType::BF16: return ForMode<P, M, bf16, float>(decay, mode);
    case ffi::DataType::F32: return ForMode<P, M, float, float>(decay, mode);
    default: return nullptr;
  }
}

template <typename P, typename M>
StepFn ForNu64(ffi::DataType n, int64_t decay, Mode mode) {
  switch (n) {
    case ffi::DataType::F32: return ForMode<P, M, float, double>(decay, mode);
    case ffi::DataType::F64: return ForMode<P, M, double, double>(decay, mode);
    default: return nullptr;
  }
}

StepFn SelectStep(ffi::DataType p, ffi::DataType m, ffi::DataType n, int64_t decay, Mode mode) {
  using T = ffi::DataType;
  const bool narrow = (p == T::BF16 || m == T::BF16 || n == T::BF16);
  const bool wide = (p == T::F64 || m == T::F64 || n == T::F64);
  if (narrow && wide) return nullptr;
  if (!wide) {
    if (p == T::BF16 && m == T::BF16) return ForNu32<bf16, bf16>(n, decay, mode);
    if (p == T::BF16 && m == T::F32) return ForNu32<bf16, float>(n, decay, mode);
    if (p == T::F32 && m == T::BF16) return ForNu32<float, bf16>(n, decay, mode);
    if (p == T::F32 && m == T::F32) return ForNu32<float, float>(n, decay, mode);
    return nullptr;
  }
  if (p == T::F32 && m == T::F32) return ForNu64<float, float>(n, decay, mode);
  if (p == T::F32 && m == T::F64) return ForNu64<float, double>(n, decay, mode);
  if (p == T::F64 && m == T::F32) return ForNu64<double, float>(n, decay, mode);
  if (p == T::F64 && m == T::F64) return ForNu64<double, double>(n, decay, mode);
  return nullptr;
}

// ---- work split over XLA's CPU thread pool ---------------------------------------------

struct Leaf {
  void* params;
  const void* grads;
  void* mu;
  void* nu;
  void* nu_max;
  uint32_t key;        // the stochastic rounding's key of this leaf's parameters
  uint32_t state_key;  // and of its moments
};

struct Chunk {
  uint32_t leaf;
  size_t begin, end;
};

// Shared with the pool's tasks through a shared_ptr: a task that starts after the caller
// has finished every chunk finds nothing to do, and the state outlives it.
struct Work {
  StepFn step;
  std::vector<Leaf> leaves;
  std::vector<Chunk> chunks;
  alignas(16) unsigned char scalars[kNumScalars * sizeof(double)];
  uint32_t key = 0;  // the stochastic rounding's key of this step
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};
  std::atomic<bool> finite{true};

  void Drain() {
    size_t finished = 0;
    bool all_finite = true;
    for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < chunks.size();) {
      const Chunk& c = chunks[i];
      const Leaf& l = leaves[c.leaf];
      all_finite &= step(l.params, l.grads, l.mu, l.nu, l.nu_max, c.begin, c.end, scalars, l.key,
                         l.state_key);
      ++finished;
    }
    if (!all_finite) finite.store(false, std::memory_order_relaxed);
    if (finished) done.fetch_add(finished, std::memory_order_release);
  }
};

// Elements per chunk: from 32k up to 1M, aiming at 4 chunks a thread. Long contiguous runs
// keep the hardware prefetchers streaming (one 16M leaf: 32k chunks 8.5 ms, 1M chunks
// 8.1 ms); several chunks a thread still balance leaves of different sizes.
constexpr size_t kMinChunk = size_t{1} << 15;
constexpr size_t kMaxChunk = size_t{1} << 20;
constexpr size_t kChunksPerThread = 4;
// Below this many elements in total the step runs on the calling thread alone.
constexpr size_t kSerialBelow = 1 << 16;

// Copies `from` into `to` unless they are the same buffer (XLA honoured the alias).
void StartFrom(ffi::AnyBuffer from, ffi::AnyBuffer to) {
  if (to.untyped_data() != from.untyped_data() && to.size_bytes() > 0) {
    std::memcpy(to.untyped_data(), from.untyped_data(), to.size_bytes());
  }
}

// Runs the work's step over its leaves (sizes in `sizes`, in units of `unit` elements: 1,
// or a block) on the calling thread and the pool.
template <typename W>
ffi::Error RunOnPool(ffi::ThreadPool& pool, std::shared_ptr<W> work,
                     const std::vector<size_t>& sizes, size_t unit = 1) {
  size_t total = 0;
  for (size_t n : sizes) total += n;
  // The calling thread drains chunks too, so num_threads - 1 helpers keep every core busy
  // without oversubscribing them (a memory-bound loop gains nothing from more threads).
  const int64_t threads =
      total * unit < kSerialBelow ? 1 : std::max<int64_t>(1, pool.num_threads());
  const size_t chunk = std::clamp<size_t>(
      total / (kChunksPerThread * static_cast<size_t>(threads)), std::max<size_t>(1, kMinChunk / unit),
      std::max<size_t>(1, kMaxChunk / unit));
  for (size_t i = 0; i < sizes.size(); ++i) {
    for (size_t begin = 0; begin < sizes[i]; begin += chunk) {
      work->chunks.push_back({static_cast<uint32_t>(i), begin, std::min(sizes[i], begin + chunk)});
    }
  }
  const size_t num_chunks = work->chunks.size();
  if (num_chunks == 0) return ffi::Error::Success();
  const size_t helpers = std::min<size_t>(threads > 1 ? threads - 1 : 0, num_chunks - 1);
  for (size_t t = 0; t < helpers; ++t) {
    pool.Schedule([work] { work->Drain(); });
  }
  work->Drain();
  while (work->done.load(std::memory_order_acquire) < num_chunks) {
    std::this_thread::yield();
  }
  return ffi::Error::Success();
}

// A new Work with the step's scalars, or an error.
template <typename W = Work>
ffi::ErrorOr<std::shared_ptr<W>> NewWork(ffi::AnyBuffer scalars) {
  auto work = std::make_shared<W>();
  const size_t scalar_bytes = scalars.size_bytes();
  if (scalars.element_count() != kNumScalars || scalar_bytes > sizeof work->scalars) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("amsgrad_jax_step: wrong number of scalars"));
  }
  std::memcpy(work->scalars, scalars.untyped_data(), scalar_bytes);
  work->key = scalars.element_type() == ffi::DataType::F64 ? Scalars<double>(work->scalars).key
                                                            : Scalars<float>(work->scalars).key;
  return work;
}

// Selects the step of one leaf and checks it against the call's; nullptr when unsupported.
bool AcceptStep(Work& work, size_t leaf, StepFn step) {
  if (step == nullptr) return false;
  if (leaf == 0) work.step = step;
  return step == work.step;
}

// A leaf's operand `k` of `per_leaf`, or its result.
ffi::AnyBuffer Operand(ffi::RemainingArgs& args, size_t leaf, int per_leaf, int k) {
  return *args.get<ffi::AnyBuffer>(leaf * per_leaf + k);
}
ffi::AnyBuffer Result(ffi::RemainingRets& rets, size_t first, size_t leaf, int per_leaf, int k) {
  return **rets.get<ffi::AnyBuffer>(first + leaf * per_leaf + k);
}

// Fills `work` with every leaf of the tree layout's operands (TreeOperandIndex order) and
// returns their sizes in `sizes`. With `rets` (the step) each leaf's results
// (TreeResultIndex order) start from its operands and are updated in place; without (the
// check) nothing is written and the operands are read only.
ffi::Error TreeLeaves(Work& work, ffi::RemainingArgs& args, ffi::RemainingRets* rets,
                      int64_t decay, int64_t rounding, int64_t state_rounding,
                      ffi::Span<const int64_t> leaf_ids, std::vector<size_t>& sizes) {
  const char* name = rets ? "amsgrad_jax_step" : "amsgrad_jax_check";
  const size_t num_leaves = args.size() / kTreeOperandsPerLeaf;
  if (args.size() % kTreeOperandsPerLeaf != 0 ||
      (rets && rets->size() != num_leaves * kTreeResultsPerLeaf) ||
      (rets && leaf_ids.size() != num_leaves)) {
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": wrong number of operands or results");
  }
  // Each result and the operand it updates (aliased to it).
  const std::pair<int, int> updated[kTreeResultsPerLeaf] = {
      {kTreeResultParams, kTreeOperandParams}, {kTreeResultMu, kTreeOperandMu},
      {kTreeResultNu, kTreeOperandNu}, {kTreeResultNuMax, kTreeOperandNuMax}};
  work.leaves.reserve(num_leaves);
  sizes.reserve(num_leaves);
  for (size_t i = 0; i < num_leaves; ++i) {
    auto in = [&](int k) { return Operand(args, i, kTreeOperandsPerLeaf, k); };
    const ffi::AnyBuffer params = in(kTreeOperandParams);
    const size_t n = params.element_count();
    bool shapes_match = true;
    for (int k = 0; k < kTreeOperandsPerLeaf; ++k) shapes_match &= in(k).element_count() == n;
    if (!shapes_match || in(kTreeOperandGrads).element_type() != params.element_type() ||
        in(kTreeOperandNuMax).element_type() != in(kTreeOperandNu).element_type()) {
      return ffi::Error::InvalidArgument(std::string(name) + ": unsupported dtypes or shapes");
    }
    const Mode mode{rets == nullptr, rounding == kRoundingStochastic,
                    state_rounding == kRoundingStochastic};
    StepFn step = SelectStep(params.element_type(), in(kTreeOperandMu).element_type(),
                             in(kTreeOperandNu).element_type(), decay, mode);
    if (!AcceptStep(work, i, step)) {
      return ffi::Error::InvalidArgument(std::string(name) + ": one call takes one dtype group");
    }
    void* data[kTreeResultsPerLeaf];
    for (const auto& [result, operand] : updated) {
      data[result] = in(operand).untyped_data();
      if (rets) {
        // In place when XLA honoured the aliases; otherwise start from a copy.
        const ffi::AnyBuffer out = Result(*rets, 0, i, kTreeResultsPerLeaf, result);
        StartFrom(in(operand), out);
        data[result] = out.untyped_data();
      }
    }
    work.leaves.push_back({data[kTreeResultParams], in(kTreeOperandGrads).untyped_data(),
                           data[kTreeResultMu], data[kTreeResultNu], data[kTreeResultNuMax],
                           rets ? LeafKey(work.key, leaf_ids[i]) : 0u,
                           rets ? LeafKey(work.key, leaf_ids[i], kRoundStateSalt) : 0u});
    sizes.push_back(n);
  }
  return ffi::Error::Success();
}

// State as one buffer per leaf: TreeOperandIndex and TreeResultIndex give the order.
ffi::Error AmsgradStep(ffi::ThreadPool pool, int64_t decay, int64_t rounding,
                       int64_t state_rounding, ffi::Span<const int64_t> leaf_ids,
                       ffi::AnyBuffer scalars,
                       ffi::RemainingArgs args, ffi::RemainingRets rets) {
  auto made = NewWork(scalars);
  if (made.has_error()) return made.error();
  std::shared_ptr<Work> work = *made;
  std::vector<size_t> sizes;
  ffi::Error error =
      TreeLeaves(*work, args, &rets, decay, rounding, state_rounding, leaf_ids, sizes);
  if (error.failure()) return error;
  return RunOnPool(pool, work, sizes);
}

// The check's result: an int32 scalar, 1 when every value looked at is finite.
using FiniteFlag = ffi::Buffer<ffi::DataType::S32, 0>;

// The guard's check: the tree layout's operands, nothing written; the result is 1 when the
// step would leave the gradient, the update and the stored state finite, else 0.
ffi::Error AmsgradCheck(ffi::ThreadPool pool, int64_t decay, ffi::AnyBuffer scalars,
                        ffi::RemainingArgs args, ffi::Result<FiniteFlag> finite) {
  auto made = NewWork(scalars);
  if (made.has_error()) return made.error();
  std::shared_ptr<Work> work = *made;
  std::vector<size_t> sizes;
  ffi::Error error =
      TreeLeaves(*work, args, nullptr, decay, kRoundingNearest, kRoundingNearest, {}, sizes);
  if (error.failure()) return error;
  error = RunOnPool(pool, work, sizes);
  *finite->typed_data() = work->finite.load() ? 1 : 0;
  return error;
}

// Flat layout: the group's FlatStateIndex buffers, then per leaf FlatLeafOperandIndex;
// results: the state buffers, then per leaf FlatLeafResultIndex. Attribute `offsets`: each
// leaf's first element in the state buffers.
ffi::Error AmsgradStepFlat(ffi::ThreadPool pool, int64_t decay, int64_t rounding,
                           int64_t state_rounding, ffi::Span<const int64_t> leaf_ids,
                           ffi::Span<const int64_t> offsets,
                           ffi::AnyBuffer scalars, ffi::RemainingArgs args,
                           ffi::RemainingRets rets) {
  const size_t num_leaves = offsets.size();
  if (leaf_ids.size() != num_leaves) {
    return ffi::Error::InvalidArgument("amsgrad_jax_step_flat: one leaf id per offset");
  }
  if (args.size() != kFlatStateBuffers + kFlatOperandsPerLeaf * num_leaves ||
      rets.size() != kFlatStateBuffers + kFlatResultsPerLeaf * num_leaves) {
    return ffi::Error::InvalidArgument(
        "amsgrad_jax_step_flat: wrong number of operands, results or offsets");
  }
  auto made = NewWork(scalars);
  if (made.has_error()) return made.error();
  std::shared_ptr<Work> work = *made;
  auto state_in = [&](int k) { return *args.get<ffi::AnyBuffer>(k); };
  auto state_out = [&](int k) { return **rets.get<ffi::AnyBuffer>(k); };
  const ffi::AnyBuffer mu = state_in(kFlatStateMu);
  const ffi::AnyBuffer nu = state_in(kFlatStateNu);
  const ffi::AnyBuffer nu_max = state_in(kFlatStateNuMax);
  const size_t state_size = mu.element_count();
  if (nu.element_count() != state_size || nu_max.element_count() != state_size ||
      nu_max.element_type() != nu.element_type()) {
    return ffi::Error::InvalidArgument("amsgrad_jax_step_flat: mismatched state buffers");
  }
  void* state_data[kFlatStateBuffers];
  size_t width[kFlatStateBuffers];
  for (int k = 0; k < kFlatStateBuffers; ++k) {
    StartFrom(state_in(k), state_out(k));
    state_data[k] = state_out(k).untyped_data();
    width[k] = ffi::ByteWidth(state_in(k).element_type());
  }
  work->leaves.reserve(num_leaves);
  std::vector<size_t> sizes;
  sizes.reserve(num_leaves);
  for (size_t i = 0; i < num_leaves; ++i) {
    const size_t first = kFlatStateBuffers + i * kFlatOperandsPerLeaf;
    ffi::AnyBuffer params = *args.get<ffi::AnyBuffer>(first + kFlatLeafOperandParams);
    ffi::AnyBuffer grads = *args.get<ffi::AnyBuffer>(first + kFlatLeafOperandGrads);
    ffi::AnyBuffer params_out =
        Result(rets, kFlatStateBuffers, i, kFlatResultsPerLeaf, kFlatLeafResultParams);
    const size_t n = params.element_count();
    const int64_t offset = offsets[i];
    if (grads.element_type() != params.element_type() || grads.element_count() != n ||
        offset < 0 || static_cast<size_t>(offset) + n > state_size) {
      return ffi::Error::InvalidArgument("amsgrad_jax_step_flat: unsupported dtypes or shapes");
    }
    const Mode mode{false, rounding == kRoundingStochastic, state_rounding == kRoundingStochastic};
    StepFn step =
        SelectStep(params.element_type(), mu.element_type(), nu.element_type(), decay, mode);
    if (!AcceptStep(*work, i, step)) {
      return ffi::Error::InvalidArgument("amsgrad_jax_step_flat: one call takes one dtype group");
    }
    StartFrom(params, params_out);
    auto at = [&](int k) {
      return static_cast<void*>(static_cast<unsigned char*>(state_data[k]) +
                                width[k] * static_cast<size_t>(offset));
    };
    work->leaves.push_back({params_out.untyped_data(), grads.untyped_data(), at(kFlatStateMu),
                            at(kFlatStateNu), at(kFlatStateNuMax), LeafKey(work->key, leaf_ids[i]),
                            LeafKey(work->key, leaf_ids[i], kRoundStateSalt)});
    sizes.push_back(n);
  }
  return RunOnPool(pool, work, sizes);
}

// ---- 8-bit block-wise state ----------------------------------------------------------------

// One leaf in blockwise8 storage: codes shaped like the parameter, one exponent per block
// of `block` elements along each row of `row` elements.
struct BlockLeaf {
  void* params;
  const void* grads;
  uint8_t* codes[3];  // mu, nu, nu_max
  int8_t* exponents[3];
  size_t row, block, blocks_per_row;
  uint32_t key;        // the parameters' stochastic rounding
  uint32_t state_key;  // the moments'
};

using BlockFn = void (*)(const BlockLeaf&, size_t, size_t, const void*);

// One block's moments decoded: mu, the second moment v = (1 - code) * nu_max / a_before
// (nu is stored against the running maximum) and the running maximum.
inline void DecodeBlock(const uint8_t* __restrict__ mu, const uint8_t* __restrict__ nu,
                        const uint8_t* __restrict__ nu_max, size_t count, float mu_scale,
                        float nu_max_scale, float nu_unscale_before, float* __restrict__ first,
                        float* __restrict__ second, float* __restrict__ maximum) {
  size_t k = 0;
#if AMSGRAD_JAX_VECTOR_CODES
  const __m512 one = _mm512_set1_ps(1.0f), unscale = _mm512_set1_ps(nu_unscale_before);
  for (; k + 16 <= count; k += 16) {
    const __m512 w = DecodeSixteen<kNuMax>(nu_max + k, _mm512_set1_ps(nu_max_scale));
    const __m512 ratio = DecodeSixteen<kNu>(nu + k, one);
    _mm512_storeu_ps(maximum + k, w);
    const __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(one, ratio), w), unscale);
    _mm512_storeu_ps(second + k, v);
    _mm512_storeu_ps(first + k, DecodeSixteen<kMu>(mu + k, _mm512_set1_ps(mu_scale)));
  }
#endif
  for (; k < count; ++k) {
    maximum[k] = Decode<kNuMax>(nu_max[k], nu_max_scale);
    second[k] = (1.0f - Decode<kNu>(nu[k], 1.0f)) * maximum[k] * nu_unscale_before;
    first[k] = Decode<kMu>(mu[k], mu_scale);
  }
}

// The step of `count` elements from their decoded moments: new parameters in place; m,
// a v (the rule's scaled second moment) and the running maximum into `m`, `v`, `w`.
// (Pointers as restrict parameters, so that it vectorises.)
template <typename P, int64_t kDecay, bool kStochastic, bool kClip>
inline void StepDecoded(P* __restrict__ params, const P* __restrict__ grads,
                        const float* __restrict__ mu, const float* __restrict__ nu,
                        const float* __restrict__ nu_max, float* __restrict__ m,
                        float* __restrict__ v, float* __restrict__ w, size_t count,
                        const Scalars<float>& s, size_t first, uint32_t key) {
  for (size_t k = 0; k < count; ++k) {
    const float p = Load<float>(params[k]);
    const Element<float> e = Compute<P, float, kDecay, /*kDecoded=*/true, kClip>(
        p, Load<float>(grads[k]), mu[k], nu[k], nu_max[k], s);
    params[k] = NewParam<P, float, kStochastic>(p, e.u, s, first + k, key);
    m[k] = e.m, v[k] = s.a * e.v, w[k] = e.v_max;
  }
}

// The step of one block's `count` elements from their codes, in groups of 128 decoded
// just before they are stepped, so that a group's decoding runs beside the previous
// group's square roots and divisions (it measured faster than groups of 16 or 256).
template <typename P, int64_t kDecay, bool kStochastic, bool kClip>
inline void StepBlock(P* params, const P* grads, const uint8_t* mu, const uint8_t* nu,
                      const uint8_t* nu_max, float* m, float* v, float* w, size_t count,
                      const float scale[2], const Scalars<float>& s, size_t first,
                      uint32_t key) {
  constexpr size_t kGroup = 128;
  alignas(64) float decoded[3][kGroup];
  for (size_t k = 0; k < count; k += kGroup) {
    const size_t n = std::min(kGroup, count - k);  // a whole group: a constant trip count
    DecodeBlock(mu + k, nu + k, nu_max + k, n, scale[0], scale[1], s.nu_unscale_before,
                decoded[0], decoded[1], decoded[2]);
    if (n == kGroup) {
      StepDecoded<P, kDecay, kStochastic, kClip>(params + k, grads + k, decoded[0], decoded[1],
                                                 decoded[2], m + k, v + k, w + k, kGroup, s,
                                                 first + k, key);
    } else {
      StepDecoded<P, kDecay, kStochastic, kClip>(params + k, grads + k, decoded[0], decoded[1],
                                                 decoded[2], m + k, v + k, w + k, n, s,
                                                 first + k, key);
    }
  }
}

// The largest magnitudes of a block's m and running maximum, as float32 bits.
inline void BlockTops(const float* __restrict__ m, const float* __restrict__ w, size_t count,
                      uint32_t top[2]) {
  uint32_t m_top = 0, w_top = 0;
  for (size_t k = 0; k < count; ++k) {
    m_top = std::max(m_top, MagnitudeBits(m[k]));
    w_top = std::max(w_top, MagnitudeBits(w[k]));
  }
  top[0] = m_top, top[1] = w_top;
}

// One block's codes from its m, a v and running maximum, with the exponents' inverse
// scales: the maximum upward; m rounded stochastically (the low 16 bits of each element's
// random bits) or to nearest; nu as 1 - a v / nu_max against the maximum just stored,
// rounded with the high 16 bits or to nearest.
template <bool kStateStochastic>
inline void EncodeBlock(const float* __restrict__ m, const float* __restrict__ v,
                        const float* __restrict__ w, uint8_t* __restrict__ mu,
                        uint8_t* __restrict__ nu, uint8_t* __restrict__ nu_max, size_t count,
                        float m_inverse, int w_exponent, uint32_t state_key, size_t first) {
  const float w_inverse = PowerOfTwoBits(-w_exponent), w_scale = PowerOfTwoBits(w_exponent);
  size_t k = 0;
#if AMSGRAD_JAX_VECTOR_CODES
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  for (; k + 16 <= count; k += 16) {
    const __m256i maximum_codes = EncodeSixteen<kNuMax, true>(_mm512_loadu_ps(w + k),
                                                              _mm512_set1_ps(w_inverse));
    StoreSixteen(nu_max + k, maximum_codes);
    const __m512 maximum = ValuesOfSixteen<kNuMax>(maximum_codes, _mm512_set1_ps(w_scale));
    const __mmask16 positive = _mm512_cmp_ps_mask(maximum, zero, _CMP_GT_OQ);
    const __m512 complement =
        _mm512_sub_ps(one, _mm512_maskz_div_ps(positive, _mm512_loadu_ps(v + k), maximum));
    const __m512 moment = _mm512_loadu_ps(m + k);
    if constexpr (kStateStochastic) {
      const __m512i random = MomentBitsSixteen(state_key, first + k);
      StoreSixteen(mu + k, EncodeSixteenStochastic<kMu>(moment, _mm512_set1_ps(m_inverse), random));
      const __m512i high = _mm512_srli_epi32(random, 16);
      StoreSixteen(nu + k, EncodeSixteenStochastic<kNu>(complement, one, high));
    } else {
      StoreSixteen(mu + k, EncodeSixteen<kMu, false>(moment, _mm512_set1_ps(m_inverse)));
      StoreSixteen(nu + k, EncodeSixteen<kNu, false>(complement, one));
    }
  }
#endif
  for (; k < count; ++k) {
    const uint8_t maximum_code = Encode<kNuMax, true>(w[k], w_inverse);
    const float maximum = Decode<kNuMax>(maximum_code, w_scale);
    const float ratio = maximum > 0.0f ? v[k] / (maximum > 0.0f ? maximum : 1.0f) : 0.0f;
    const float complement = 1.0f - ratio;
    nu_max[k] = maximum_code;
    if constexpr (kStateStochastic) {
      const uint32_t random = MomentBits(state_key, first + k);
      mu[k] = EncodeStochastic<kMu>(m[k], m_inverse, random);
      nu[k] = EncodeStochastic<kNu>(complement, 1.0f, random >> 16);
    } else {
      mu[k] = Encode<kMu, false>(m[k], m_inverse);
      nu[k] = Encode<kNu, false>(complement, 1.0f);
    }
  }
}

// Blocks [begin, end) of one leaf: decode, step, and encode each block with its new
// exponents (the largest |m| and running maximum of the block, as _blockwise.py; nu's
// exponent is always 0): vectorised passes over a block, kept in buffers of the block's
// length: the decoding and the step, the block's largest values, then the encoding.
template <typename P, int64_t kDecay, bool kStochastic, bool kStateStochastic>
void StepBlocks(const BlockLeaf& leaf, size_t begin, size_t end, const void* scalars_raw) {
  const Scalars<float> s(scalars_raw);
  std::vector<float> buffer(3 * leaf.block);
  float* m = buffer.data();
  float* v = m + leaf.block;
  float* w = v + leaf.block;
  for (size_t index = begin; index < end; ++index) {
    const size_t row = index / leaf.blocks_per_row, in_row = index % leaf.blocks_per_row;
    const size_t first = row * leaf.row + in_row * leaf.block;
    const size_t count = std::min(leaf.block, leaf.row - in_row * leaf.block);
    uint8_t* mu = leaf.codes[0] + first;
    uint8_t* nu = leaf.codes[1] + first;
    uint8_t* nu_max = leaf.codes[2] + first;
    const float scale[2] = {PowerOfTwoBits(leaf.exponents[0][index]),
                            PowerOfTwoBits(leaf.exponents[2][index])};
    P* params = static_cast<P*>(leaf.params) + first;
    const P* grads = static_cast<const P*>(leaf.grads) + first;
    if (s.clipping) {
      StepBlock<P, kDecay, kStochastic, true>(params, grads, mu, nu, nu_max, m, v, w, count,
                                              scale, s, first, leaf.key);
    } else {
      StepBlock<P, kDecay, kStochastic, false>(params, grads, mu, nu, nu_max, m, v, w, count,
                                               scale, s, first, leaf.key);
    }
    uint32_t top[2];
    BlockTops(m, w, count, top);
    // Stochastically m may round up: its exponent leaves room for it.
    const int m_exponent = BlockExponent<kMu>(top[0], kStateStochastic);
    const int w_exponent = BlockExponent<kNuMax>(top[1], true);
    EncodeBlock<kStateStochastic>(m, v, w, mu, nu, nu_max, count, PowerOfTwoBits(-m_exponent),
                                  w_exponent, leaf.state_key, first);
    leaf.exponents[0][index] = static_cast<int8_t>(m_exponent);
    leaf.exponents[1][index] = 0;
    leaf.exponents[2][index] = static_cast<int8_t>(w_exponent);
  }
}

template <typename P, bool kStochastic, bool kStateStochastic>
BlockFn BlocksForDecay(int64_t decay) {
  constexpr bool p = kStochastic, q = kStateStochastic;
  switch (decay) {
    case kDecayNone: return &StepBlocks<P, kDecayNone, p, q>;
    case kDecayCoupled: return &StepBlocks<P, kDecayCoupled, p, q>;
    case kDecayDecoupled: return &StepBlocks<P, kDecayDecoupled, p, q>;
    default: return nullptr;
  }
}

template <bool kStateStochastic>
BlockFn SelectBlocksFor(ffi::DataType p, int64_t decay, bool stochastic) {
  if (p == ffi::DataType::F32) return BlocksForDecay<float, false, kStateStochastic>(decay);
  if (p == ffi::DataType::BF16) {
    return stochastic ? BlocksForDecay<bf16, true, kStateStochastic>(decay)
                      : BlocksForDecay<bf16, false, kStateStochastic>(decay);
  }
  return nullptr;
}

BlockFn SelectBlocks(ffi::DataType p, int64_t decay, bool stochastic, bool state_stochastic) {
  return state_stochastic ? SelectBlocksFor<true>(p, decay, stochastic)
                          : SelectBlocksFor<false>(p, decay, stochastic);
}

struct BlockWork {
  BlockFn step = nullptr;
  std::vector<BlockLeaf> leaves;
  std::vector<Chunk> chunks;
  alignas(16) unsigned char scalars[kNumScalars * sizeof(double)];
  uint32_t key = 0;
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};

  void Drain() {
    size_t finished = 0;
    for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < chunks.size();) {
      const Chunk& c = chunks[i];
      step(leaves[c.leaf], c.begin, c.end, scalars);
      ++finished;
    }
    if (finished) done.fetch_add(finished, std::memory_order_release);
  }
};

// One leaf of an 8-bit step: its parameters (read from `params`, written to `params_out`),
// its gradient, and its moments' codes (`n` each) and block exponents, written in place.
// Checks dtypes and sizes against the parameter's shape; adds the leaf to `work`.
bool AddBlockLeaf(BlockWork& work, ffi::AnyBuffer params, ffi::AnyBuffer grads,
                  ffi::AnyBuffer params_out, uint8_t* const codes[3], int8_t* const exponents[3],
                  size_t codes_left, size_t exponents_left, int64_t block_size, int64_t leaf_id,
                  BlockFn step, std::vector<size_t>& sizes, size_t& largest_block) {
  const size_t n = params.element_count();
  const auto dims = params.dimensions();
  const size_t row = dims.size() == 0 ? 1 : static_cast<size_t>(dims.back());
  const size_t block = std::max<size_t>(1, std::min<size_t>(block_size, row));
  const size_t blocks_per_row = row == 0 ? 0 : (row + block - 1) / block;
  const size_t blocks = row == 0 ? 0 : n / row * blocks_per_row;
  if (step == nullptr || (!work.leaves.empty() && step != work.step) ||
      grads.element_type() != params.element_type() || grads.element_count() != n ||
      n > codes_left || blocks > exponents_left) {
    return false;
  }
  work.step = step;
  StartFrom(params, params_out);
  work.leaves.push_back({params_out.untyped_data(), grads.untyped_data(),
                         {codes[0], codes[1], codes[2]},
                         {exponents[0], exponents[1], exponents[2]}, row, block, blocks_per_row,
                         LeafKey(work.key, leaf_id), LeafKey(work.key, leaf_id, kRoundStateSalt)});
  sizes.push_back(blocks);
  largest_block = std::max(largest_block, block);
  return true;
}

// State in blockwise8: per leaf BlockwiseOperandIndex, results BlockwiseResultIndex, each
// aliased to the operand of the same name. Attributes as the tree target's, and
// `block_size`.
ffi::Error AmsgradStepBlockwise(ffi::ThreadPool pool, int64_t decay, int64_t rounding,
                                int64_t state_rounding, int64_t block_size,
                                ffi::Span<const int64_t> leaf_ids,
                                ffi::AnyBuffer scalars, ffi::RemainingArgs args,
                                ffi::RemainingRets rets) {
  constexpr const char* kName = "amsgrad_jax_step_blockwise";
  const size_t num_leaves = args.size() / kBlockwiseOperandsPerLeaf;
  if (args.size() % kBlockwiseOperandsPerLeaf != 0 ||
      rets.size() != num_leaves * kBlockwiseResultsPerLeaf || leaf_ids.size() != num_leaves ||
      block_size < 1 || scalars.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument(std::string(kName) + ": wrong operands or attributes");
  }
  auto made = NewWork<BlockWork>(scalars);
  if (made.has_error()) return made.error();
  std::shared_ptr<BlockWork> work = *made;
  constexpr int kCodes[3] = {kBlockwiseOperandMu, kBlockwiseOperandNu, kBlockwiseOperandNuMax};
  constexpr int kExponents[3] = {kBlockwiseOperandMuExponents, kBlockwiseOperandNuExponents,
                                 kBlockwiseOperandNuMaxExponents};
  constexpr int kCodeResults[3] = {kBlockwiseResultMu, kBlockwiseResultNu,
                                   kBlockwiseResultNuMax};
  constexpr int kExponentResults[3] = {kBlockwiseResultMuExponents, kBlockwiseResultNuExponents,
                                       kBlockwiseResultNuMaxExponents};
  std::vector<size_t> sizes;
  size_t largest_block = 1;
  for (size_t i = 0; i < num_leaves; ++i) {
    auto in = [&](int k) { return Operand(args, i, kBlockwiseOperandsPerLeaf, k); };
    auto out = [&](int k) { return Result(rets, 0, i, kBlockwiseResultsPerLeaf, k); };
    const ffi::AnyBuffer params = in(kBlockwiseOperandParams);
    const size_t n = params.element_count();
    bool ok = true;
    uint8_t* codes[3];
    int8_t* exponents[3];
    size_t blocks = in(kExponents[0]).element_count();
    for (int k = 0; k < 3; ++k) {
      ok &= in(kCodes[k]).element_type() == ffi::DataType::U8 &&
            in(kCodes[k]).element_count() == n &&
            in(kExponents[k]).element_type() == ffi::DataType::S8 &&
            in(kExponents[k]).element_count() == blocks;
      StartFrom(in(kCodes[k]), out(kCodeResults[k]));
      StartFrom(in(kExponents[k]), out(kExponentResults[k]));
      codes[k] = static_cast<uint8_t*>(out(kCodeResults[k]).untyped_data());
      exponents[k] = static_cast<int8_t*>(out(kExponentResults[k]).untyped_data());
    }
    BlockFn step = SelectBlocks(params.element_type(), decay, rounding == kRoundingStochastic,
                                state_rounding == kRoundingStochastic);
    ok = ok && AddBlockLeaf(*work, params, in(kBlockwiseOperandGrads),
                            out(kBlockwiseResultParams), codes, exponents, n, blocks, block_size,
                            leaf_ids[i], step, sizes, largest_block);
    // Every exponent of the leaf is used: the exponents are shaped like its blocks.
    if (!ok || sizes.back() != blocks) {
      return ffi::Error::InvalidArgument(std::string(kName) + ": unsupported dtypes or shapes");
    }
  }
  return RunOnPool(pool, work, sizes, largest_block);
}

// blockwise8 state in the flat layout: the group's FlatBlockwiseStateIndex buffers (codes
// and exponents of mu, nu and nu_max), then per leaf FlatLeafOperandIndex; results: the
// state buffers, then per leaf FlatLeafResultIndex. Attributes as the blockwise target's,
// `offsets` (each leaf's first code) and `block_offsets` (each leaf's first exponent).
ffi::Error AmsgradStepFlatBlockwise(ffi::ThreadPool pool, int64_t decay, int64_t rounding,
                                    int64_t state_rounding, int64_t block_size,
                                    ffi::Span<const int64_t> leaf_ids,
                                    ffi::Span<const int64_t> offsets,
                                    ffi::Span<const int64_t> block_offsets,
                                    ffi::AnyBuffer scalars, ffi::RemainingArgs args,
                                    ffi::RemainingRets rets) {
  constexpr const char* kName = "amsgrad_jax_step_flat_blockwise";
  const size_t num_leaves = offsets.size();
  if (leaf_ids.size() != num_leaves || block_offsets.size() != num_leaves || block_size < 1 ||
      args.size() != kFlatBlockwiseStateBuffers + kFlatOperandsPerLeaf * num_leaves ||
      rets.size() != kFlatBlockwiseStateBuffers + kFlatResultsPerLeaf * num_leaves ||
      scalars.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument(std::string(kName) + ": wrong operands or attributes");
  }
  auto made = NewWork<BlockWork>(scalars);
  if (made.has_error()) return made.error();
  std::shared_ptr<BlockWork> work = *made;
  constexpr int kCodes[3] = {kFlatBlockwiseStateMu, kFlatBlockwiseStateNu,
                             kFlatBlockwiseStateNuMax};
  constexpr int kExponents[3] = {kFlatBlockwiseStateMuExponents, kFlatBlockwiseStateNuExponents,
                                 kFlatBlockwiseStateNuMaxExponents};
  auto state_in = [&](int k) { return *args.get<ffi::AnyBuffer>(k); };
  auto state_out = [&](int k) { return **rets.get<ffi::AnyBuffer>(k); };
  const size_t num_codes = state_in(kCodes[0]).element_count();
  const size_t num_blocks = state_in(kExponents[0]).element_count();
  uint8_t* codes[3];
  int8_t* exponents[3];
  for (int k = 0; k < 3; ++k) {
    if (state_in(kCodes[k]).element_type() != ffi::DataType::U8 ||
        state_in(kCodes[k]).element_count() != num_codes ||
        state_in(kExponents[k]).element_type() != ffi::DataType::S8 ||
        state_in(kExponents[k]).element_count() != num_blocks) {
      return ffi::Error::InvalidArgument(std::string(kName) + ": mismatched state buffers");
    }
    StartFrom(state_in(kCodes[k]), state_out(kCodes[k]));
    StartFrom(state_in(kExponents[k]), state_out(kExponents[k]));
    codes[k] = static_cast<uint8_t*>(state_out(kCodes[k]).untyped_data());
    exponents[k] = static_cast<int8_t*>(state_out(kExponents[k]).untyped_data());
  }
  std::vector<size_t> sizes;
  size_t largest_block = 1;
  for (size_t i = 0; i < num_leaves; ++i) {
    const size_t first = kFlatBlockwiseStateBuffers + i * kFlatOperandsPerLeaf;
    const ffi::AnyBuffer params = *args.get<ffi::AnyBuffer>(first + kFlatLeafOperandParams);
    const ffi::AnyBuffer grads = *args.get<ffi::AnyBuffer>(first + kFlatLeafOperandGrads);
    const ffi::AnyBuffer params_out =
        Result(rets, kFlatBlockwiseStateBuffers, i, kFlatResultsPerLeaf, kFlatLeafResultParams);
    const int64_t offset = offsets[i], block_offset = block_offsets[i];
    if (offset < 0 || block_offset < 0 || static_cast<size_t>(offset) > num_codes ||
        static_cast<size_t>(block_offset) > num_blocks) {
      return ffi::Error::InvalidArgument(std::string(kName) + ": offsets out of range");
    }
    uint8_t* leaf_codes[3];
    int8_t* leaf_exponents[3];
    for (int k = 0; k < 3; ++k) {
      leaf_codes[k] = codes[k] + offset;
      leaf_exponents[k] = exponents[k] + block_offset;
    }
    BlockFn step = SelectBlocks(params.element_type(), decay, rounding == kRoundingStochastic,
                                state_rounding == kRoundingStochastic);
    if (!AddBlockLeaf(*work, params, grads, params_out, leaf_codes, leaf_exponents,
                      num_codes - offset, num_blocks - block_offset, block_size, leaf_ids[i],
                      step, sizes, largest_block)) {
      return ffi::Error::InvalidArgument(std::string(kName) + ": unsupported dtypes or shapes");
    }
  }
  return RunOnPool(pool, work, sizes, largest_block);
}

// What every step target's binding starts with: the pool, then the attributes `decay`,
// `rounding` and `state_rounding`.
auto StepBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Attr<int64_t>("decay")
      .Attr<int64_t>("rounding")
      .Attr<int64_t>("state_rounding");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradJaxStepBlockwise, AmsgradStepBlockwise,
                              StepBinding()
                                  .Attr<int64_t>("block_size")
                                  .Attr<ffi::Span<const int64_t>>("leaf_ids")
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradJaxStepFlatBlockwise, AmsgradStepFlatBlockwise,
                              StepBinding()
                                  .Attr<int64_t>("block_size")
                                  .Attr<ffi::Span<const int64_t>>("leaf_ids")
                                  .Attr<ffi::Span<const int64_t>>("offsets")
                                  .Attr<ffi::Span<const int64_t>>("block_offsets")
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradJaxStep, AmsgradStep,
                              StepBinding()
                                  .Attr<ffi::Span<const int64_t>>("leaf_ids")
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradJaxStepFlat, AmsgradStepFlat,
                              StepBinding()
                                  .Attr<ffi::Span<const int64_t>>("leaf_ids")
                                  .Attr<ffi::Span<const int64_t>>("offsets")
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradJaxCheck, AmsgradCheck,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("decay")
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .Ret<FiniteFlag>());

// The interface this library was built with, for the loader to check.
extern "C" __attribute__((visibility("default"))) const char* AmsgradJaxInterface() {
  return kInterface;
}
