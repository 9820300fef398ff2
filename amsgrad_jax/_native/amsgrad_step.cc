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
// here too (u, the decayed gradient, -lr u), the state is stored rounded to nearest and
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
    bf16 nearest = Bf16Nearest(x);
    bf16 up = NextUp<uint16_t, 0x8000u>(nearest);
    return Load<C>(nearest) < x ? up : nearest;
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

// ---- the step --------------------------------------------------------------------------

// Whether x is finite: x - x is 0 for a finite x and NaN for inf or NaN (vectorises).
template <typename C>
inline bool Finite(C x) { return (x - x) == C(0); }

// kCheck: write nothing; return whether the step would leave every value the guard
// (skip_nonfinite) looks at finite: the gradient, the update and the stored state.
template <typename P, typename M, typename N, typename C, int64_t kDecay, bool kCheck>
bool StepRange(void* params_raw, const void* grads_raw, void* mu_raw, void* nu_raw,
               void* nu_max_raw, size_t begin, size_t end, const void* scalars_raw) {
  P* __restrict__ params = static_cast<P*>(params_raw);
  const P* __restrict__ grads = static_cast<const P*>(grads_raw);
  M* __restrict__ mu = static_cast<M*>(mu_raw);
  N* __restrict__ nu = static_cast<N*>(nu_raw);
  N* __restrict__ nu_max = static_cast<N*>(nu_max_raw);
  const C* s = static_cast<const C*>(scalars_raw);
  const C b1 = s[kScalarB1], b2 = s[kScalarB2];
  const C one_minus_b1 = s[kScalarOneMinusB1], one_minus_b2 = s[kScalarOneMinusB2];
  const C eps = s[kScalarEps], eps_root = s[kScalarEpsRoot];
  const C a = s[kScalarNuScale], b = s[kScalarMuScale], d = s[kScalarRootScale];
  const C neg_lr = s[kScalarNegLr], weight_decay = s[kScalarWeightDecay];
  const C grad_divisor = s[kScalarGradDivisor], grad_multiplier = s[kScalarGradMultiplier];
  bool finite = true;
  for (size_t i = begin; i < end; ++i) {
    const C p = Load<C>(params[i]);
    // A global-norm clip, as optax.clip_by_global_norm forms it: (g / norm) * max_norm in P.
    C g = Through<P>(Through<P>(Load<C>(grads[i]) / grad_divisor) * grad_multiplier);
    if constexpr (kDecay == kDecayCoupled) {
      // XLA keeps this sum in the compute dtype (its convert pair to P and back is removed
      // as excess precision), so only the product is rounded to P.
      if constexpr (std::is_same_v<P, C>) {
        g = std::fma(weight_decay, p, g);
      } else {
        g = g + Through<P>(weight_decay * p);
      }
    }
    const C m = std::fma(b1, Load<C>(mu[i]), one_minus_b1 * g);
    const C v = std::fma(b2, Load<C>(nu[i]), one_minus_b2 * (g * g));
    const C scaled = a * v;
    const C previous = Load<C>(nu_max[i]);
    const C v_max = ((previous != previous) | (previous > scaled)) ? previous : scaled;  // NaN wins
    const C denominator = std::fma(d, std::sqrt(v_max + eps_root), eps);
    C u = Through<P>((b * m) / denominator);
    if constexpr (kDecay == kDecayDecoupled) u = MulAdd<P>(weight_decay, p, u);
    if constexpr (kCheck) {
      finite &= Finite(g) & Finite(Through<P>(neg_lr * u)) & Finite(Load<C>(Nearest<M>(m))) &
                Finite(Load<C>(Nearest<N>(v))) & Finite(Load<C>(Upward<N>(v_max)));
    } else {
      params[i] = Nearest<P>(MulAdd<P>(neg_lr, u, p));
      mu[i] = Nearest<M>(m);
      nu[i] = Nearest<N>(v);
      nu_max[i] = Upward<N>(v_max);
    }
  }
  return finite;
}

using StepFn = bool (*)(void*, const void*, void*, void*, void*, size_t, size_t, const void*);

template <typename P, typename M, typename N, typename C, bool kCheck>
StepFn ForDecay(int64_t decay) {
  switch (decay) {
    case kDecayNone: return &StepRange<P, M, N, C, kDecayNone, kCheck>;
    case kDecayCoupled: return &StepRange<P, M, N, C, kDecayCoupled, kCheck>;
    case kDecayDecoupled: return &StepRange<P, M, N, C, kDecayDecoupled, kCheck>;
    default: return nullptr;
  }
}

template <typename P, typename M, typename N, typename C>
StepFn ForMode(int64_t decay, bool check) {
  return check ? ForDecay<P, M, N, C, true>(decay) : ForDecay<P, M, N, C, false>(decay);
}

// Storage dtypes all in {bf16, f32} compute in float; all in {f32, f64} with an f64
// compute in double. (bfloat16 next to float64 is left to the JAX path.)
template <typename P, typename M>
StepFn ForNu32(ffi::DataType n, int64_t decay, bool check) {
  switch (n) {
    case ffi::DataType::BF16: return ForMode<P, M, bf16, float>(decay, check);
    case ffi::DataType::F32: return ForMode<P, M, float, float>(decay, check);
    default: return nullptr;
  }
}

template <typename P, typename M>
StepFn ForNu64(ffi::DataType n, int64_t decay, bool check) {
  switch (n) {
    case ffi::DataType::F32: return ForMode<P, M, float, double>(decay, check);
    case ffi::DataType::F64: return ForMode<P, M, double, double>(decay, check);
    default: return nullptr;
  }
}

StepFn SelectStep(ffi::DataType p, ffi::DataType m, ffi::DataType n, int64_t decay,
                  bool check = false) {
  using T = ffi::DataType;
  const bool narrow = (p == T::BF16 || m == T::BF16 || n == T::BF16);
  const bool wide = (p == T::F64 || m == T::F64 || n == T::F64);
  if (narrow && wide) return nullptr;
  if (!wide) {
    if (p == T::BF16 && m == T::BF16) return ForNu32<bf16, bf16>(n, decay, check);
    if (p == T::BF16 && m == T::F32) return ForNu32<bf16, float>(n, decay, check);
    if (p == T::F32 && m == T::BF16) return ForNu32<float, bf16>(n, decay, check);
    if (p == T::F32 && m == T::F32) return ForNu32<float, float>(n, decay, check);
    return nullptr;
  }
  if (p == T::F32 && m == T::F32) return ForNu64<float, float>(n, decay, check);
  if (p == T::F32 && m == T::F64) return ForNu64<float, double>(n, decay, check);
  if (p == T::F64 && m == T::F32) return ForNu64<double, float>(n, decay, check);
  if (p == T::F64 && m == T::F64) return ForNu64<double, double>(n, decay, check);
  return nullptr;
}

// ---- work split over XLA's CPU thread pool ---------------------------------------------

struct Leaf {
  void* params;
  const void* grads;
  void* mu;
  void* nu;
  void* nu_max;
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
  std::atomic<size_t> next{0};
  std::atomic<size_t> done{0};
  std::atomic<bool> finite{true};

  void Drain() {
    size_t finished = 0;
    bool all_finite = true;
    for (size_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < chunks.size();) {
      const Chunk& c = chunks[i];
      const Leaf& l = leaves[c.leaf];
      all_finite &= step(l.params, l.grads, l.mu, l.nu, l.nu_max, c.begin, c.end, scalars);
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

// Runs `step` over `leaves` (sizes in `sizes`) on the calling thread and the pool.
ffi::Error RunOnPool(ffi::ThreadPool& pool, std::shared_ptr<Work> work,
                     const std::vector<size_t>& sizes) {
  size_t total = 0;
  for (size_t n : sizes) total += n;
  // The calling thread drains chunks too, so num_threads - 1 helpers keep every core busy
  // without oversubscribing them (a memory-bound loop gains nothing from more threads).
  const int64_t threads = total < kSerialBelow ? 1 : std::max<int64_t>(1, pool.num_threads());
  const size_t chunk = std::clamp<size_t>(
      total / (kChunksPerThread * static_cast<size_t>(threads)), kMinChunk, kMaxChunk);
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
ffi::ErrorOr<std::shared_ptr<Work>> NewWork(ffi::AnyBuffer scalars) {
  auto work = std::make_shared<Work>();
  const size_t scalar_bytes = scalars.size_bytes();
  if (scalars.element_count() != kNumScalars || scalar_bytes > sizeof work->scalars) {
    return ffi::Unexpected(ffi::Error::InvalidArgument("amsgrad_jax_step: wrong number of scalars"));
  }
  std::memcpy(work->scalars, scalars.untyped_data(), scalar_bytes);
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
                      int64_t decay, std::vector<size_t>& sizes) {
  const char* name = rets ? "amsgrad_jax_step" : "amsgrad_jax_check";
  const size_t num_leaves = args.size() / kTreeOperandsPerLeaf;
  if (args.size() % kTreeOperandsPerLeaf != 0 ||
      (rets && rets->size() != num_leaves * kTreeResultsPerLeaf)) {
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
    StepFn step = SelectStep(params.element_type(), in(kTreeOperandMu).element_type(),
                             in(kTreeOperandNu).element_type(), decay, /*check=*/rets == nullptr);
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
                           data[kTreeResultMu], data[kTreeResultNu], data[kTreeResultNuMax]});
    sizes.push_back(n);
  }
  return ffi::Error::Success();
}

// State as one buffer per leaf: TreeOperandIndex and TreeResultIndex give the order.
ffi::Error AmsgradStep(ffi::ThreadPool pool, int64_t decay, ffi::AnyBuffer scalars,
                       ffi::RemainingArgs args, ffi::RemainingRets rets) {
  auto made = NewWork(scalars);
  if (made.has_error()) return made.error();
  std::shared_ptr<Work> work = *made;
  std::vector<size_t> sizes;
  ffi::Error error = TreeLeaves(*work, args, &rets, decay, sizes);
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
  ffi::Error error = TreeLeaves(*work, args, nullptr, decay, sizes);
  if (error.failure()) return error;
  error = RunOnPool(pool, work, sizes);
  *finite->typed_data() = work->finite.load() ? 1 : 0;
  return error;
}

// Flat layout: the group's FlatStateIndex buffers, then per leaf FlatLeafOperandIndex;
// results: the state buffers, then per leaf FlatLeafResultIndex. Attribute `offsets`: each
// leaf's first element in the state buffers.
ffi::Error AmsgradStepFlat(ffi::ThreadPool pool, int64_t decay, ffi::Span<const int64_t> offsets,
                           ffi::AnyBuffer scalars, ffi::RemainingArgs args,
                           ffi::RemainingRets rets) {
  const size_t num_leaves = offsets.size();
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
    StepFn step = SelectStep(params.element_type(), mu.element_type(), nu.element_type(), decay);
    if (!AcceptStep(*work, i, step)) {
      return ffi::Error::InvalidArgument("amsgrad_jax_step_flat: one call takes one dtype group");
    }
    StartFrom(params, params_out);
    auto at = [&](int k) {
      return static_cast<void*>(static_cast<unsigned char*>(state_data[k]) +
                                width[k] * static_cast<size_t>(offset));
    };
    work->leaves.push_back({params_out.untyped_data(), grads.untyped_data(), at(kFlatStateMu),
                            at(kFlatStateNu), at(kFlatStateNuMax)});
    sizes.push_back(n);
  }
  return RunOnPool(pool, work, sizes);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradJaxStep, AmsgradStep,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("decay")
                                  .Arg<ffi::AnyBuffer>()
                                  .RemainingArgs()
                                  .RemainingRets());

XLA_FFI_DEFINE_HANDLER_SYMBOL(AmsgradJaxStepFlat, AmsgradStepFlat,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<int64_t>("decay")
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
