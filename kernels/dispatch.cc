// Run-time instruction-set detection (cpuid + xgetbv) and the KUN_ISA override.
#include <cpuid.h>

#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "common/check.h"
#include "common/log.h"
#include "kernels/internal.h"

namespace kun::kernels {
namespace {

std::uint64_t read_xcr0() {
  std::uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<std::uint64_t>(edx) << 32) | eax;
}

Isa detect() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(1, &a, &b, &c, &d) == 0) return Isa::kScalar;
  const bool osxsave = (c >> 27) & 1u;
  const bool avx = (c >> 28) & 1u;
  const bool fma = (c >> 12) & 1u;
  const bool f16c = (c >> 29) & 1u;
  if (!osxsave || !avx) return Isa::kScalar;
  const std::uint64_t xcr0 = read_xcr0();
  const bool os_ymm = (xcr0 & 0x6u) == 0x6u;            // XMM and YMM state
  const bool os_zmm = (xcr0 & 0xe6u) == 0xe6u;          // + opmask, ZMM_Hi256, Hi16_ZMM
  if (!os_ymm) return Isa::kScalar;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return Isa::kScalar;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = (b >> 5) & 1u;
  const bool avx512f = (b >> 16) & 1u;
  const bool avx512bw = (b >> 30) & 1u;
  const bool avx512vl = (b >> 31) & 1u;
  const unsigned leaf7_subleaves = a;
  if (!(avx2 && fma && f16c)) return Isa::kScalar;
  if (!(os_zmm && avx512f && avx512bw && avx512vl)) return Isa::kAvx2;
  bool bf16 = false;
  if (leaf7_subleaves >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    bf16 = (a >> 5) & 1u;
  }
  return bf16 ? Isa::kAvx512Bf16 : Isa::kAvx512;
}

bool parse_isa(std::string_view s, Isa* out) {
  if (s == "scalar") *out = Isa::kScalar;
  else if (s == "avx2") *out = Isa::kAvx2;
  else if (s == "avx512") *out = Isa::kAvx512;
  else if (s == "avx512bf16") *out = Isa::kAvx512Bf16;
  else return false;
  return true;
}

Isa choose_active() {
  const Isa best = detected_isa();
  const char* env = std::getenv("KUN_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa want;
  if (!parse_isa(env, &want)) {
    KUN_LOG(kWarn) << "KUN_ISA=" << env << " is not one of scalar|avx2|avx512|avx512bf16; using "
                   << isa_name(best);
    return best;
  }
  if (static_cast<int>(want) > static_cast<int>(best)) {
    KUN_LOG(kWarn) << "KUN_ISA=" << env << " is above what this CPU has; using " << isa_name(best);
    return best;
  }
  return want;
}

bool detect_amx() {
  if (detected_isa() != Isa::kAvx512Bf16) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  __cpuid_count(7, 0, a, b, c, d);
  const bool amx_bf16 = (d >> 22) & 1u;
  const bool amx_tile = (d >> 24) & 1u;
  if (!amx_bf16 || !amx_tile) return false;
  const std::uint64_t xcr0 = read_xcr0();
  if ((xcr0 & 0x60000u) != 0x60000u) return false;  // XTILECFG and XTILEDATA
  return detail::amx_request_permission();
}

// AMD's cores with AVX-512-BF16 (Zen 4 and later) issue vdpbf16ps at the rate of an FMA, so its
// 32 products per instruction are twice the f32 FMA's flops: on this project's Zen 5 host the
// probes read 1004 GFLOP/s bf16-dot against 545 FMA (2 threads). Intel's Sapphire Rapids issues
// it at a quarter of the FMA rate (half the FMA's flops, kernels/README.md), where f32
// activations are faster. A fixed vendor rule rather than a timing probe, so every process of a
// cluster on one kind of host picks the same arithmetic (serve --runtime mpi checks it anyway).
bool vdpbf16ps_is_fast() {
  if (active_isa() != Isa::kAvx512Bf16) return false;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (__get_cpuid(0, &a, &b, &c, &d) == 0) return false;
  // "AuthenticAMD": EBX "Auth", EDX "enti", ECX "cAMD".
  return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;
}

GemmActivations choose_gemm_activations() {
  const char* env = std::getenv("KUN_GEMM_ACTIVATIONS");
  // Default: the AMX GEMM where this process can run it (about 3x the prefill and 2x the batched
  // decode of f32 activations); else vdpbf16ps where it is fast (on the Zen 5 host, model_bench,
  // 2 alternated pairs: 1.70-1.91x the prefill tokens/s of f32 activations, 1.50-1.66x batch 32,
  // 1.10-1.13x batch 8, 0.96-1.00x batch 1); else exact f32.
  if (env == nullptr || *env == '\0') {
    if (gemm_activations_supported(GemmActivations::kAmx)) return GemmActivations::kAmx;
    return vdpbf16ps_is_fast() ? GemmActivations::kBf16 : GemmActivations::kF32;
  }
  const std::string_view v(env);
  if (v == "bf16") return GemmActivations::kBf16;
  if (v == "amx") {
    if (gemm_activations_supported(GemmActivations::kAmx)) return GemmActivations::kAmx;
    KUN_LOG(kWarn) << "KUN_GEMM_ACTIVATIONS=amx needs AMX-BF16 (and KUN_ISA at avx512bf16); using f32";
    return GemmActivations::kF32;
  }
  if (v != "f32") {
    KUN_LOG(kWarn) << "KUN_GEMM_ACTIVATIONS=" << env << " is not f32|bf16|amx; using f32";
  }
  return GemmActivations::kF32;
}

}  // namespace

GemmActivations active_gemm_activations() {
  static const GemmActivations a = choose_gemm_activations();
  return a;
}

std::string_view gemm_activations_name(GemmActivations a) {
  switch (a) {
    case GemmActivations::kF32: return "f32";
    case GemmActivations::kBf16: return "bf16";
    case GemmActivations::kAmx: return "amx";
  }
  return "unknown";
}

bool gemm_activations_supported(GemmActivations a) {
  if (a != GemmActivations::kAmx) return true;
  return active_isa() == Isa::kAvx512Bf16 && detail::amx_available();
}

std::string_view isa_name(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx512Bf16: return "avx512bf16";
  }
  return "unknown";
}

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() {
  static const Isa isa = choose_active();
  return isa;
}

bool isa_supported(Isa isa) { return static_cast<int>(isa) <= static_cast<int>(detected_isa()); }

namespace detail {

bool isa_supported(Isa isa) { return kernels::isa_supported(isa); }

bool amx_available() {
  static const bool ok = detect_amx();
  return ok;
}

const IsaKernels& amx_kernels() {
  KUN_CHECK(amx_available()) << "the AMX GEMM on a CPU (or OS) without AMX-BF16";
  static const IsaKernels table = [] {
    IsaKernels t = avx512bf16_kernels();
    const AmxGemm g = amx_gemm();
    t.linear_panels = g.linear_panels;
    t.pack_rows = g.pack_rows;
    t.linear_panels_silu_mul = g.linear_panels_silu_mul;
    t.widen_min_rows = 1;
    t.tile_rows = kAmxTileRows;
    t.direct_tile_rows = kAmxTileRows;
    return t;
  }();
  return table;
}

const IsaKernels& kernels_for(Isa isa) {
  KUN_CHECK(kernels::isa_supported(isa)) << "ISA " << isa_name(isa) << " not supported by this CPU";
  switch (isa) {
    case Isa::kScalar: return scalar_kernels();
    case Isa::kAvx2: return avx2_kernels();
    case Isa::kAvx512: return avx512_kernels();
    case Isa::kAvx512Bf16: return avx512bf16_kernels();
  }
  return scalar_kernels();
}

}  // namespace detail
}  // namespace kun::kernels
