#include "tools/kunserve/in_process_replay.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common/check.h"

namespace kun::tools {
namespace {

std::uint64_t mix(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

}  // namespace

std::vector<std::int32_t> replay_prompt(std::uint64_t seed, std::size_t index, std::int32_t length,
                                        std::int32_t first_token_id, std::int64_t vocab_size) {
  std::vector<std::int32_t> out;
  out.reserve(static_cast<std::size_t>(length));
  const auto span = static_cast<std::uint64_t>(vocab_size - first_token_id);
  std::uint64_t state = mix(seed ^ mix(index));
  for (std::int32_t i = 0; i < length; ++i) {
    state = mix(state);
    out.push_back(first_token_id + static_cast<std::int32_t>(state % span));
  }
  return out;
}

ReplayResult replay_in_process(engine::FrontDoor& front, const workload::Trace& trace, const ReplayOptions& options) {
  KUN_CHECK_GT(options.vocab_size, options.first_token_id);
  // Token callbacks may outlive this call (a straggler after the timeout), so what they touch is
  // shared with them.
  struct Shared {
    std::mutex mu;
    std::condition_variable cv;
    std::int64_t open = 0;
    ReplayResult result;
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
    std::int64_t now_us() const {
      return std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - start).count();
    }
  };
  auto shared = std::make_shared<Shared>();
  std::mutex& mu = shared->mu;
  std::condition_variable& cv = shared->cv;
  std::int64_t& open = shared->open;
  ReplayResult& result = shared->result;
  result.records.resize(trace.size());
  const auto start = shared->start;
  const auto now_us = [&] { return shared->now_us(); };
  std::atomic<bool> sampling{true};
  std::thread sampler([&] {
    while (sampling.load()) {
      const engine::ServingStats st = front.stats();
      const std::int64_t t = now_us();
      {
        std::lock_guard<std::mutex> lock(mu);
        for (const auto& inst : st.instances) {
          const std::string label = "{instance=\"" + std::to_string(inst.instance) + "\"}";
          result.gauges.push_back({t, "kunserve_instance_memory_demand" + label, inst.demand});
          result.gauges.push_back({t, "kunserve_group_dropped" + label, inst.group >= 0 ? 1.0 : 0.0});
          result.gauges.push_back({t, "kunserve_queued" + label, static_cast<double>(inst.num_waiting)});
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(options.gauge_period_ms));
    }
  });
  const bool tty = options.progress && ::isatty(STDERR_FILENO);
  for (std::size_t i = 0; i < trace.size(); ++i) {
    const workload::TraceRequest& tr = trace.requests[i];
    std::this_thread::sleep_until(start + std::chrono::microseconds(tr.arrival_us));
    workload::RequestRecord& rec = result.records[i];
    rec.index = static_cast<std::int64_t>(i);
    rec.prompt_tokens = tr.prompt_tokens;
    rec.expected_output_tokens = tr.output_tokens;
    engine::RequestSpec spec;
    spec.prompt_tokens = replay_prompt(options.seed, i, tr.prompt_tokens, options.first_token_id, options.vocab_size);
    spec.max_tokens = std::max<std::int32_t>(1, tr.output_tokens);
    spec.ignore_eos = true;
    {
      std::lock_guard<std::mutex> lock(mu);
      rec.arrival_us = now_us();
      ++open;
    }
    auto submitted = front.submit(std::move(spec), [shared, i](const engine::TokenEvent& ev) {
      std::lock_guard<std::mutex> lock(shared->mu);
      workload::RequestRecord& r = shared->result.records[i];
      const std::int64_t t = shared->now_us();
      if (ev.token >= 0) {
        if (r.first_token_us < 0) r.first_token_us = t;
        r.token_times_us.push_back(t);
        ++r.output_tokens;
      }
      if (ev.finished) {
        r.finish_us = t;
        r.recomputed_tokens = ev.num_recomputed_tokens;
        r.transition_recomputed_tokens = ev.num_transition_recomputed_tokens;
        if (ev.timings.first_scheduled_us >= 0 && ev.timings.arrival_us >= 0) {
          r.queue_us = ev.timings.first_scheduled_us - ev.timings.arrival_us;
        }
        if (ev.reason == engine::FinishReason::kError || ev.reason == engine::FinishReason::kCancelled) {
          r.outcome = workload::RequestOutcome::kFailed;
          r.error = ev.error.to_string();
        }
        --shared->open;
        shared->cv.notify_all();
      }
    });
    if (submitted.ok()) {
      std::lock_guard<std::mutex> lock(mu);
      rec.front_door_id = submitted->value;
    } else {
      std::lock_guard<std::mutex> lock(mu);
      rec.outcome = submitted.status().code() == StatusCode::kOverloaded ? workload::RequestOutcome::kRejected
                                                                         : workload::RequestOutcome::kFailed;
      rec.error = submitted.status().to_string();
      rec.finish_us = now_us();
      --open;
    }
    if (tty && (i % 16 == 0 || i + 1 == trace.size())) {
      std::fprintf(stderr, "\r  submitted %zu/%zu", i + 1, trace.size());
    }
  }
  {
    std::unique_lock<std::mutex> lock(mu);
    const bool done = cv.wait_for(lock, std::chrono::seconds(options.timeout_s), [&] { return open == 0; });
    if (!done) {
      for (auto& r : result.records) {
        if (r.finish_us < 0) {
          r.outcome = workload::RequestOutcome::kTimedOut;
          r.finish_us = now_us();
        }
      }
    }
  }
  if (tty) std::fprintf(stderr, "\r  all %zu requests done              \n", trace.size());
  sampling.store(false);
  sampler.join();
  std::lock_guard<std::mutex> lock(mu);
  result.wall_s = static_cast<double>(now_us()) / 1e6;
  return result;
}

}  // namespace kun::tools
