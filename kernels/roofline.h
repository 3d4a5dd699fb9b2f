// Physical limits of this machine, measured at run time, for roofline ratios in benchmarks.
// Each probe runs on every thread of `pool` (null: the calling thread only), repeats a few times
// and returns the best rate seen. They allocate and take tens to hundreds of milliseconds: never
// call them on a hot path.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"

namespace kun::kernels {

// Streaming read bandwidth: all threads sum disjoint slices of a `bytes`-sized buffer (choose it
// much larger than the last-level cache, e.g. 1 GiB) with the active ISA's widest loads.
double measure_read_bandwidth_bytes_per_s(ThreadPool* pool, std::int64_t bytes);

// Peak f32 FMA throughput (flop/s, 2 per lane per FMA): independent register-resident FMA chains
// on the active ISA on all threads.
double measure_peak_fma_flops_per_s(ThreadPool* pool);

// Peak vdpbf16ps throughput (flop/s, 64 per 512-bit instruction) on all threads; 0 when the CPU
// has no AVX-512-BF16.
double measure_peak_bf16_dot_flops_per_s(ThreadPool* pool);

// How a probe turns work into a rate. kWall: total work / wall time of the parallel run.
// kThreadCpu: each thread divides its work by its own CPU time (CLOCK_THREAD_CPUTIME_ID) and the
// rates are summed; immune to time-slicing by other processes on a shared machine.
enum class ProbeClock { kWall, kThreadCpu };

// The same probes for an explicit ISA (must be supported) and clock.
double measure_read_bandwidth_bytes_per_s(Isa isa, ThreadPool* pool, std::int64_t bytes,
                                          ProbeClock clock = ProbeClock::kWall);
double measure_peak_fma_flops_per_s(Isa isa, ThreadPool* pool,
                                    ProbeClock clock = ProbeClock::kWall);
double measure_peak_bf16_dot_flops_per_s(ThreadPool* pool, ProbeClock clock);

// Peak AMX TDPBF16PS throughput (flop/s, 16 x 16 x 32 x 2 per instruction) on all threads; 0
// when this process cannot run GemmActivations::kAmx.
double measure_peak_amx_flops_per_s(ThreadPool* pool, ProbeClock clock = ProbeClock::kWall);

// CPU time of the calling thread in seconds (CLOCK_THREAD_CPUTIME_ID).
double thread_cpu_seconds();

}  // namespace kun::kernels
