// Checks the kernel's sixteen-at-a-time 8-bit codes (AVX-512, float16 conversions) against
// its scalar functions, which mirror amsgrad_jax/_blockwise.py: every code decoded at many
// block scales, and random blocks (every bit pattern, NaN and infinity included, tiny,
// huge, zero, nu at the maximum) encoded to nearest, upward and stochastically, with the
// processor's denormal flags off and on. Prints one line; exit status 0 when all agree.
// Built by tests/test_native_vector_codes.py with the kernel's own flags.

#include "amsgrad_step.cc"

#include <cstdio>
#include <random>
#include <xmmintrin.h>

namespace {

long failures = 0;
long compared = 0;

template <typename T>
void Same(T got, T want, const char* what, size_t at) {
  ++compared;
  const bool both_nan = got != got && want != want;
  if (std::memcmp(&got, &want, sizeof got) != 0 && !both_nan && failures++ < 10) {
    std::printf("%s: element %zu differs\n", what, at);
  }
}

void CheckDecoding() {
  uint8_t codes[256];
  for (int c = 0; c < 256; ++c) codes[c] = static_cast<uint8_t>(c);
  for (int e : {-109, -108, -60, -20, -1, 0, 3, 40, 126}) {
    const float scale = PowerOfTwoBits(e);
    float mu[256], second[256], maximum[256];
    DecodeBlock(codes, codes, codes, 256, scale, scale, 0.75f, mu, second, maximum);
    for (int c = 0; c < 256; ++c) {
      Same(mu[c], Decode<kMu>(codes[c], scale), "decoded mu", c);
      Same(maximum[c], Decode<kNuMax>(codes[c], scale), "decoded nu_max", c);
      const float want = (1.0f - Decode<kNu>(codes[c], 1.0f)) * maximum[c] * 0.75f;
      Same(second[c], want, "decoded nu", c);
    }
  }
}

float Magnitude(uint32_t r, int shift) {
  return std::ldexp(1.0f + static_cast<float>(r & 0xFFFFFu) / 1048576.0f, shift);
}

void CheckEncoding(std::mt19937& rng) {
  std::uniform_int_distribution<uint32_t> bits;
  constexpr size_t n = 256;
  for (int trial = 0; trial < 4000; ++trial) {
    const int kind = trial % 4;  // any bit pattern; ordinary; small m; tiny maximum
    float m[n], v[n], w[n];
    for (size_t k = 0; k < n; ++k) {
      const uint32_t r = bits(rng), r2 = bits(rng), r3 = bits(rng);
      const float mag = Magnitude(r, -static_cast<int>(r >> 27) - (kind == 2 ? 20 : 0));
      m[k] = kind == 0 ? BitsToFloat(r) : ((r & 0x100000u) ? -mag : mag);
      w[k] = kind == 0 ? BitsToFloat(r2)
                       : Magnitude(r2, -static_cast<int>(r2 >> 26) - (kind == 3 ? 100 : 0));
      if ((r2 & 0xF00000u) == 0) w[k] = 0.0f;
      v[k] = w[k] * (static_cast<float>(r3 & 0xFFFFFFu) / 16777216.0f);
      if ((r3 >> 24) == 7) v[k] = w[k];
      if ((r3 >> 24) == 9) m[k] = 0.0f;
    }
    const int m_exponent = static_cast<int>(bits(rng) % 236) - 109;
    const int w_exponent = static_cast<int>(bits(rng) % 235) - 108;
    const float m_inverse = PowerOfTwoBits(-m_exponent);
    const float w_inverse = PowerOfTwoBits(-w_exponent), w_scale = PowerOfTwoBits(w_exponent);
    for (bool stochastic : {false, true}) {
      const uint32_t key = bits(rng);
      const size_t first = bits(rng);
      uint8_t got[3][n];
      if (stochastic) {
        EncodeBlock<true>(m, v, w, got[0], got[1], got[2], n, m_inverse, w_exponent, key, first);
      } else {
        EncodeBlock<false>(m, v, w, got[0], got[1], got[2], n, m_inverse, w_exponent, key, first);
      }
      for (size_t k = 0; k < n; ++k) {
        const uint8_t maximum_code = Encode<kNuMax, true>(w[k], w_inverse);
        const float maximum = Decode<kNuMax>(maximum_code, w_scale);
        const float ratio = maximum > 0.0f ? v[k] / (maximum > 0.0f ? maximum : 1.0f) : 0.0f;
        const float complement = 1.0f - ratio;
        uint8_t mu, nu;
        if (stochastic) {
          const uint32_t random = MomentBits(key, first + k);
          mu = EncodeStochastic<kMu>(m[k], m_inverse, random);
          nu = EncodeStochastic<kNu>(complement, 1.0f, random >> 16);
        } else {
          mu = Encode<kMu, false>(m[k], m_inverse);
          nu = Encode<kNu, false>(complement, 1.0f);
        }
        Same(got[0][k], mu, stochastic ? "stochastic mu" : "nearest mu", k);
        Same(got[1][k], nu, stochastic ? "stochastic nu" : "nearest nu", k);
        Same(got[2][k], maximum_code, "upward nu_max", k);
      }
    }
  }
}

}  // namespace

int main() {
  if (!AMSGRAD_JAX_VECTOR_CODES) {
    std::printf("no vector path: this processor or compiler lacks AVX-512 F, BW and VL\n");
    return 77;
  }
  std::mt19937 rng(20180430);
  for (bool flush : {false, true}) {  // MXCSR flush-to-zero and denormals-are-zero
    const unsigned flags = 0x8040u;
    _mm_setcsr(flush ? (_mm_getcsr() | flags) : (_mm_getcsr() & ~flags));
    CheckDecoding();
    CheckEncoding(rng);
  }
  std::printf("compared %ld codes and values, %ld differ\n", compared, failures);
  return failures == 0 ? 0 : 1;
}
