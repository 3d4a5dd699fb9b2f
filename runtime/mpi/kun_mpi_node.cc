// kun_mpi_node: one process of the MPI runtime (runtime/README.md, "MPI"). Rank 0 is the front
// end, ranks 1..N each own one device and serve it through a DeviceAgent over MpiTransport.
//
//   mpirun -np 5 kun_mpi_node --preset tiny --scenario cluster
//
// Scenarios (what the front end does once every rank agreed on model, preset, dtype and build):
//   cluster  remote attention on every device at once, checked token for token against attention
//            computed locally; blocks sent around a ring of devices and read back; a layer drop
//            and its pull back from a peer; the idle CPU of every rank over --idle-s seconds.
//            Exit 0 when every check passes.
//   fault    polls every device until one fails (--fault-rank R --fault-mode kill|hang makes rank
//            R die or stop answering), then names it and ends the job (MPI_Abort).
//   burst    keeps --burst-window remote-attention requests in flight on every device until each
//            got --burst-requests; the fault rank fails after serving --fault-after-requests.
//            Checks that every request to it ended with an error naming it, that none waited past
//            the peer timeout (plus --hang-slack-ms), and that the other devices kept serving
//            (every request ok, and a second burst on them alone after the failure); then shuts
//            the survivors down and ends the job naming the lost rank (exit 3). Under plain
//            mpirun a rank that dies makes mpirun end the job at once; with `mpirun
//            --enable-recovery` the others live on and this runs to the end.
// This is the groundwork of `kunserve serve --runtime mpi`: serving itself still runs in-process.
#include <signal.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <iostream>
#include <random>
#include <sstream>
#include <thread>

#include <CLI/CLI.hpp>

#include "common/dtype.h"
#include "model/config.h"
#include "model/weight_source.h"
#include "runtime/device_agent.h"
#include "runtime/mpi/mpi_fleet.h"
#include "runtime/mpi/mpi_session.h"
#include "runtime/mpi/mpi_transport.h"

namespace kun::runtime::mpi {
namespace {

using Clock = std::chrono::steady_clock;

struct NodeOptions {
  std::string preset = "tiny";
  std::string model = "synthetic";
  std::string dtype = "bf16";
  std::uint64_t seed = 7;
  std::string scenario = "cluster";
  int fault_rank = -1;
  std::string fault_mode = "hang";
  int heartbeat_ms = 100;
  int peer_timeout_ms = 2000;
  double idle_s = 2.0;
  double max_idle_cpu_fraction = 0.05;
  std::int64_t kv_token_blocks = 64;
  int device_threads = 1;
  double fault_wait_s = 20.0;
  int fault_after_requests = 0;
  int burst_requests = 400;
  int burst_window = 4;
  int hang_slack_ms = 2000;
};

std::string prefix(int rank) { return "kun_mpi_node rank " + std::to_string(rank) + ": "; }

std::unique_ptr<model::WeightSource> make_weights(const NodeOptions& o) {
  auto config = model::preset_config(o.preset);
  KUN_CHECK(config.ok()) << config.status().to_string();
  DType dtype = DType::kBF16;
  KUN_CHECK(parse_dtype(o.dtype, &dtype)) << "dtype " << o.dtype;
  config->dtype = dtype;
  return model::synthetic_weights(*config, o.seed);
}

std::vector<std::int64_t> blocks_of(const DeviceSnapshot& s, std::int64_t n, std::int64_t skip) {
  std::vector<std::int64_t> ids;
  for (std::int64_t p : s.kv_page_ids) {
    for (std::int64_t slot = 0; slot < s.blocks_per_page && static_cast<std::int64_t>(ids.size()) < n; ++slot) {
      if (skip-- > 0) continue;
      ids.push_back(p * s.blocks_per_page + slot);
    }
  }
  return ids;
}

// The device ranks: serve until the front end says stop or a peer fails.
int run_device(MpiSession& session, MpiTransport& transport, const NodeOptions& o) {
  const int rank = session.rank();
  auto weights = make_weights(o);
  auto dev = create_full_device("rank" + std::to_string(rank), *weights, o.kv_token_blocks, 16, o.device_threads);
  if (!dev.ok()) {
    std::cerr << prefix(rank) << dev.status().to_string() << std::endl;
    session.abort(2);
  }
  DeviceAgent agent(**dev, transport);
  agent.start();
  if (rank == o.fault_rank) {
    if (o.fault_after_requests > 0) {  // mid-burst: after serving this many requests
      while (agent.counters().attention_requests_for_others < o.fault_after_requests) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
    }
    if (o.fault_mode == "kill") {
      std::cerr << prefix(rank) << "fault injection: killing myself" << std::endl;
      raise(SIGKILL);
    }
    std::cerr << prefix(rank) << "fault injection: no longer answering" << std::endl;
    transport.simulate_hang();
    std::this_thread::sleep_for(std::chrono::seconds(600));  // until MPI_Abort ends the job
  }
  serve_agent(session, transport, agent);
  return finish_device_rank(session, transport);
}

struct Checks {
  int failed = 0;
  void expect(bool ok, const std::string& what) {
    std::cout << (ok ? "ok   " : "FAIL ") << what << std::endl;
    if (!ok) ++failed;
  }
};

// A transport error (a peer gone) ends the job with the message; other errors fail the check.
template <class T>
T value_or_abort(MpiSession& session, StatusOr<T> v) {
  if (!v.ok()) {
    std::cerr << prefix(0) << v.status().to_string() << std::endl;
    session.abort(3);
  }
  return std::move(v).value();
}

int run_cluster(MpiSession& session, MpiTransport& transport, const NodeOptions& o) {
  const int n = session.size() - 1;
  if (n < 2) {
    std::cerr << prefix(0) << "the cluster scenario needs at least 2 device ranks" << std::endl;
    return 2;
  }
  AgentClient client(transport, std::chrono::milliseconds(o.peer_timeout_ms + 5000));
  Checks checks;
  auto weights = make_weights(o);
  auto ref_dev = value_or_abort(session, create_full_device("reference", *weights, o.kv_token_blocks * n, 16, o.device_threads));
  std::vector<DeviceSnapshot> snaps(static_cast<std::size_t>(n + 1));
  for (int d = 1; d <= n; ++d) {
    snaps[static_cast<std::size_t>(d)] = value_or_abort(session, client.snapshot(d));
    checks.expect(static_cast<std::int64_t>(snaps[static_cast<std::size_t>(d)].resident_layers.size()) ==
                      weights->config().num_layers,
                  "device " + std::to_string(d) + " holds every layer");
  }

  // Remote attention: one sequence per device, all devices at once, each step checked against
  // attention computed here over the same history.
  {
    model::ForwardPass& ref = ref_dev->forward();
    const std::int64_t row = ref.qkv_row();
    const std::int64_t qd = weights->config().q_dim();
    const auto ref_snap_blocks = [&](int d) {
      std::vector<std::int64_t> ids;
      const auto pages = ref_dev->arena().kv_pages();
      const std::int64_t per = ref_dev->kv_storage().blocks_per_page();
      for (std::int64_t k = 0; k < 3; ++k) {
        const std::int64_t idx = 3 * (d - 1) + k;
        ids.push_back(pages[static_cast<std::size_t>(idx / per)].value * per + idx % per);
      }
      return ids;
    };
    std::mt19937 rng(11);
    std::normal_distribution<float> nd;
    const std::vector<std::int64_t> steps = {19, 1, 1, 1, 1, 1};
    std::int64_t pos = 0;
    bool all_equal = true;
    for (std::int64_t t : steps) {
      std::vector<std::vector<float>> qkv(static_cast<std::size_t>(n + 1));
      std::vector<RecvHandle> pending(static_cast<std::size_t>(n + 1));
      const model::SequenceSlice slice{pos, t};
      for (int d = 1; d <= n; ++d) {
        auto& q = qkv[static_cast<std::size_t>(d)];
        q.resize(static_cast<std::size_t>(t * row));
        for (float& f : q) f = nd(rng);
        pending[static_cast<std::size_t>(d)] =
            client.append_attend_async(d, 100 + d, 0, slice, blocks_of(snaps[static_cast<std::size_t>(d)], 3, 0), q);
      }
      for (int d = 1; d <= n; ++d) {
        RecvHandle& h = pending[static_cast<std::size_t>(d)];
        if (!h.wait_for(std::chrono::milliseconds(o.peer_timeout_ms + 5000))) {
          std::cerr << prefix(0) << "device " << d << " did not answer remote attention" << std::endl;
          session.abort(3);
        }
        const Status s = h.wait();
        if (!s.ok()) {
          std::cerr << prefix(0) << s.to_string() << std::endl;
          session.abort(3);
        }
        Message m = h.take();
        std::vector<float> local(static_cast<std::size_t>(t * qd));
        std::vector<std::byte*> ptrs;
        for (std::int64_t b : ref_snap_blocks(d)) ptrs.push_back(ref_dev->kv_storage().key_block(kv::BlockId(b)));
        ref.attend_local(slice, qkv[static_cast<std::size_t>(d)].data(), model::LayerKv{ptrs.data(), 3}, local.data());
        const bool equal = m.header.error == 0 && m.payload.size() == local.size() * sizeof(float) &&
                           std::memcmp(m.payload.data(), local.data(), m.payload.size()) == 0;
        if (!equal) all_equal = false;
      }
      pos += t;
    }
    checks.expect(all_equal, "remote attention on " + std::to_string(n) + " holders equals local attention, " +
                                 std::to_string(steps.size()) + " steps");
    std::int64_t tokens = 0;
    for (std::int64_t t : steps) tokens += t;
    for (int d = 1; d <= n; ++d) {
      const DeviceSnapshot s = value_or_abort(session, client.snapshot(d));
      checks.expect(s.counters.attention_requests_for_others == static_cast<std::int64_t>(steps.size()) &&
                        s.counters.attention_tokens_for_others == tokens,
                    "device " + std::to_string(d) + " did the attention itself: " +
                        std::to_string(s.counters.attention_requests_for_others) + " requests, " +
                        std::to_string(s.counters.attention_tokens_for_others) + " tokens");
    }
  }

  // Blocks around a ring: written to device 1, sent 1 -> 2 -> ... -> n -> 1, read back.
  {
    const std::int64_t block_bytes = ref_dev->kv_storage().block_bytes();
    const std::int64_t nb = 4;
    std::vector<std::byte> data(static_cast<std::size_t>(nb * block_bytes));
    for (std::size_t i = 0; i < data.size(); ++i) data[i] = static_cast<std::byte>((i * 151 + 3) & 0xff);
    const auto blocks = [&](int d, std::int64_t skip) { return blocks_of(snaps[static_cast<std::size_t>(d)], nb, skip); };
    Status s = client.write_blocks(1, blocks(1, 8), data);
    checks.expect(s.ok(), "write blocks to device 1 " + s.to_string());
    for (int d = 1; d <= n; ++d) {
      const int next = d == n ? 1 : d + 1;
      s = client.send_blocks(d, blocks(d, 8), next, blocks(next, next == 1 ? 16 : 8));
      if (s.code() == StatusCode::kUnavailable) {
        std::cerr << prefix(0) << s.to_string() << std::endl;
        session.abort(3);
      }
      checks.expect(s.ok(), "device " + std::to_string(d) + " sent 4 blocks to device " + std::to_string(next) + " " +
                                (s.ok() ? "" : s.to_string()));
    }
    auto back = value_or_abort(session, client.read_blocks(1, blocks(1, 16)));
    checks.expect(back == data, "blocks came around the ring of " + std::to_string(n) + " devices intact");
  }

  // Drop a layer on the last device, then pull it back from device 1.
  {
    const DeviceSnapshot& before = snaps[static_cast<std::size_t>(n)];
    auto pages = client.drop_layer(n, 1);
    const DeviceSnapshot after = value_or_abort(session, client.snapshot(n));
    checks.expect(pages.ok() && after.kv_pages - before.kv_pages == ref_dev->pages_per_layer(),
                  "device " + std::to_string(n) + " dropped layer 1: +" + std::to_string(after.kv_pages - before.kv_pages) +
                      " KV pages");
    const Status pulled = pages.ok() ? client.pull_layer(n, 1, 1, *pages) : pages.status();
    const DeviceSnapshot restored = value_or_abort(session, client.snapshot(n));
    checks.expect(pulled.ok() && restored.resident_layers == before.resident_layers &&
                      restored.layer_checksums == before.layer_checksums && restored.kv_pages == before.kv_pages,
                  "device " + std::to_string(n) + " pulled layer 1 from device 1, weights identical " +
                      (pulled.ok() ? "" : pulled.to_string()));
  }

  // Idle CPU: every rank waits (heartbeats only) for idle_s. A device rank's CPU time comes in a
  // snapshot, which checksums every layer after reading it: the window holds one snapshot's own
  // work, so the cost of one (two taken back to back just before) is subtracted.
  {
    std::vector<double> before(static_cast<std::size_t>(n + 1)), after(static_cast<std::size_t>(n + 1));
    std::vector<double> snapshot_cost(static_cast<std::size_t>(n + 1), 0.0);
    before[0] = process_cpu_seconds();
    for (int d = 1; d <= n; ++d) {
      const double first = value_or_abort(session, client.snapshot(d)).process_cpu_s;
      before[static_cast<std::size_t>(d)] = value_or_abort(session, client.snapshot(d)).process_cpu_s;
      snapshot_cost[static_cast<std::size_t>(d)] = before[static_cast<std::size_t>(d)] - first;
    }
    std::this_thread::sleep_for(std::chrono::duration<double>(o.idle_s));
    after[0] = process_cpu_seconds();
    for (int d = 1; d <= n; ++d) after[static_cast<std::size_t>(d)] = value_or_abort(session, client.snapshot(d)).process_cpu_s;
    std::ostringstream os;
    bool ok = true;
    os << "idle CPU over " << o.idle_s << " s (limit " << o.max_idle_cpu_fraction * o.idle_s << " s):";
    for (int r = 0; r <= n; ++r) {
      const double used = std::max(0.0, after[static_cast<std::size_t>(r)] - before[static_cast<std::size_t>(r)] -
                                            snapshot_cost[static_cast<std::size_t>(r)]);
      os << " rank" << r << " " << used << " s";
      if (r > 0) os << " (less " << snapshot_cost[static_cast<std::size_t>(r)] << " s for a snapshot)";
      if (used > o.max_idle_cpu_fraction * o.idle_s) ok = false;
    }
    checks.expect(ok, os.str());
  }

  for (int d = 1; d <= n; ++d) {
    const Status s = client.shutdown_node(d);
    if (!s.ok()) std::cerr << prefix(0) << s.to_string() << std::endl;
  }
  const TransferStats st = transport.stats();
  std::cout << "rank 0 sent: " << st.bytes_of(TransferKind::kRemoteAttention) << " B remote attention, "
            << st.bytes_of(TransferKind::kKvExchange) << " B kv exchange" << std::endl;
  return checks.failed == 0 ? 0 : 1;
}

int run_fault_watch(MpiSession& session, MpiTransport& transport, const NodeOptions& o) {
  AgentClient client(transport, std::chrono::milliseconds(o.peer_timeout_ms + 5000));
  const auto t0 = Clock::now();
  while (Clock::now() - t0 < std::chrono::duration<double>(o.fault_wait_s)) {
    for (int d = 1; d < session.size(); ++d) {
      auto s = client.snapshot(d);
      if (!s.ok()) {
        const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
        std::cerr << prefix(0) << "device lost: " << s.status().message() << " (" << ms
                  << " ms after start); ending the job" << std::endl;
        session.abort(3);
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  std::cerr << prefix(0) << "no device failed within " << o.fault_wait_s << " s" << std::endl;
  for (int d = 1; d < session.size(); ++d) (void)client.shutdown_node(d);
  return 1;
}

// Remote-attention requests in flight on every device while one device fails.
int run_burst(MpiSession& session, MpiTransport& transport, const NodeOptions& o) {
  const int n = session.size() - 1;
  if (n < 2 || o.fault_rank < 1 || o.fault_rank > n) {
    std::cerr << prefix(0) << "the burst scenario needs at least 2 device ranks and --fault-rank in 1.." << n << std::endl;
    return 2;
  }
  const auto peer_timeout = std::chrono::milliseconds(o.peer_timeout_ms);
  const auto hang_limit = peer_timeout + std::chrono::milliseconds(o.hang_slack_ms);
  AgentClient client(transport, hang_limit);
  auto weights = make_weights(o);
  const std::int64_t row = weights->config().q_dim() + 2 * weights->config().kv_dim();  // one q/k/v row
  std::vector<std::vector<std::int64_t>> blocks(static_cast<std::size_t>(n + 1));
  for (int d = 1; d <= n; ++d) blocks[static_cast<std::size_t>(d)] = blocks_of(value_or_abort(session, client.snapshot(d)), 1, 0);
  std::vector<float> qkv(static_cast<std::size_t>(row), 0.25f);

  struct InFlight {
    RecvHandle handle;
    Clock::time_point issued;
  };
  struct PerDevice {
    std::deque<InFlight> in_flight;
    int issued = 0, ok = 0, failed = 0, misnamed = 0;
    bool lost = false;
  };
  double longest_ms = 0.0;
  std::string first_error;
  Checks checks;
  // Keeps `window` requests in flight on each device in `targets` until each got `total`; a device
  // whose request failed gets no more. Collects completions by polling (1 ms sleeps, no spinning).
  auto burst = [&](std::vector<PerDevice>& devs, const std::vector<int>& targets, int total) {
    while (true) {
      bool busy = false;
      for (int d : targets) {
        PerDevice& pd = devs[static_cast<std::size_t>(d)];
        while (!pd.lost && pd.issued < total && static_cast<int>(pd.in_flight.size()) < o.burst_window) {
          const model::SequenceSlice slice{0, 1};
          pd.in_flight.push_back({client.append_attend_async(d, 1000 * d + pd.issued, 0, slice,
                                                             blocks[static_cast<std::size_t>(d)], qkv),
                                  Clock::now()});
          ++pd.issued;
        }
        while (!pd.in_flight.empty() && pd.in_flight.front().handle.ready()) {
          InFlight f = std::move(pd.in_flight.front());
          pd.in_flight.pop_front();
          longest_ms = std::max(longest_ms, std::chrono::duration<double, std::milli>(Clock::now() - f.issued).count());
          Status st = f.handle.wait();
          if (st.ok()) {
            Message m = f.handle.take();
            if (m.header.error != 0) st = Status(static_cast<StatusCode>(m.header.error), "device error");
          }
          if (st.ok()) {
            ++pd.ok;
            continue;
          }
          ++pd.failed;
          pd.lost = true;
          if (first_error.empty()) first_error = st.to_string();
          if (st.code() != StatusCode::kUnavailable || st.message().find("rank " + std::to_string(d) + " ") == std::string::npos) {
            ++pd.misnamed;
            std::cerr << prefix(0) << "request to device " << d << " failed without naming it: " << st.to_string() << std::endl;
          }
        }
        if (!pd.in_flight.empty()) {
          busy = true;
          if (Clock::now() - pd.in_flight.front().issued > hang_limit + std::chrono::seconds(2)) {
            std::cerr << prefix(0) << "a request to device " << d << " hung past the peer timeout; ending the job" << std::endl;
            session.abort(1);
          }
        }
        if (!pd.lost && pd.issued < total) busy = true;
      }
      if (!busy) return;
      std::this_thread::sleep_for(std::chrono::microseconds(500));
    }
  };

  std::vector<PerDevice> first(static_cast<std::size_t>(n + 1));
  std::vector<int> all;
  for (int d = 1; d <= n; ++d) all.push_back(d);
  const auto t0 = Clock::now();
  burst(first, all, o.burst_requests);
  const double burst_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  const PerDevice& bad = first[static_cast<std::size_t>(o.fault_rank)];
  // The fault rank counts a request as served before its reply leaves, and fails once the count
  // reaches --fault-after-requests: the replies still unsent then (at most the window in flight)
  // never arrive (seen: 96 of 100 with a window of 4).
  checks.expect(bad.ok >= o.fault_after_requests - o.burst_window && bad.failed >= 1 && bad.misnamed == 0,
                "burst: device " + std::to_string(o.fault_rank) + " served " + std::to_string(bad.ok) +
                    " requests, then its pending ones ended with an error naming it (" + std::to_string(bad.failed) +
                    "): " + first_error);
  checks.expect(longest_ms <= static_cast<double>(hang_limit.count()),
                "burst: no request waited past the peer timeout: longest " + std::to_string(static_cast<int>(longest_ms)) +
                    " ms (timeout " + std::to_string(o.peer_timeout_ms) + " ms + slack " + std::to_string(o.hang_slack_ms) +
                    " ms), burst " + std::to_string(static_cast<int>(burst_ms)) + " ms");
  std::vector<int> survivors;
  std::string survivor_list;
  bool survivors_ok = true;
  for (int d : all) {
    if (d == o.fault_rank) continue;
    survivors.push_back(d);
    survivor_list += (survivor_list.empty() ? "" : ",") + std::to_string(d);
    const PerDevice& pd = first[static_cast<std::size_t>(d)];
    if (pd.ok != o.burst_requests) survivors_ok = false;
  }
  checks.expect(survivors_ok, "burst: devices " + survivor_list + " answered every request (" +
                                  std::to_string(o.burst_requests) + " each)");
  std::vector<PerDevice> second(static_cast<std::size_t>(n + 1));
  burst(second, survivors, o.burst_requests / 4);
  bool kept = true;
  for (int d : survivors) kept = kept && second[static_cast<std::size_t>(d)].ok == o.burst_requests / 4;
  checks.expect(kept, "burst: kept serving on devices " + survivor_list + " after the failure (" +
                          std::to_string(o.burst_requests / 4) + " more requests each)");
  const std::vector<int> failed = transport.failed_peers();
  checks.expect(failed == std::vector<int>{o.fault_rank},
                "burst: the transport lists exactly rank " + std::to_string(o.fault_rank) + " as failed");

  // The outcome line goes out before the survivors are told to shut down: a survivor that has
  // said goodbye leaves without MPI_Finalize (its peer is lost), and mpirun may then end the
  // whole job, this rank included, before anything written after that reaches its output (1 run
  // in 12 lost the line that way). One write: unbuffered std::cerr writes each << piece on its
  // own, and other ranks' lines, forwarded by mpirun into the same stream, could land between them.
  const std::string lost = transport.failure().message();
  if (checks.failed > 0) {
    std::cerr << (prefix(0) + "burst checks FAILED; ending the job (device rank " + std::to_string(o.fault_rank) +
                  " lost: " + lost + ")\n")
              << std::flush;
  } else {
    std::cerr << (prefix(0) + "burst checks passed; ending the job: device rank " + std::to_string(o.fault_rank) +
                  " lost: " + lost + "\n")
              << std::flush;
  }
  for (int d : survivors) {
    const Status s = client.shutdown_node(d);
    if (!s.ok()) std::cerr << prefix(0) << s.to_string() << std::endl;
  }
  // Goodbyes with the survivors, then the job ends (end_job_after_device_loss).
  end_job_after_device_loss(session, transport, checks.failed > 0 ? 1 : 3);
}

int node_main(int argc, char** argv) {
  auto session_or = MpiSession::init(&argc, &argv);
  if (!session_or.ok()) {
    std::cerr << "kun_mpi_node: " << session_or.status().to_string() << std::endl;
    return 1;
  }
  MpiSession& session = **session_or;
  NodeOptions o;
  CLI::App app{"KunServe MPI node: rank 0 front end, ranks 1..N devices"};
  app.add_option("--preset", o.preset, "model preset");
  app.add_option("--model", o.model, "model (synthetic weights)");
  app.add_option("--dtype", o.dtype, "weight dtype")->check(CLI::IsMember({"f32", "f16", "bf16"}));
  app.add_option("--seed", o.seed, "synthetic weight seed");
  app.add_option("--scenario", o.scenario, "cluster | fault | burst")->check(CLI::IsMember({"cluster", "fault", "burst"}));
  app.add_option("--fault-rank", o.fault_rank, "rank that fails (fault scenario)");
  app.add_option("--fault-mode", o.fault_mode, "kill | hang")->check(CLI::IsMember({"kill", "hang"}));
  app.add_option("--heartbeat-ms", o.heartbeat_ms, "heartbeat period")->check(CLI::PositiveNumber);
  app.add_option("--peer-timeout-ms", o.peer_timeout_ms, "a peer silent this long has failed")->check(CLI::PositiveNumber);
  app.add_option("--idle-s", o.idle_s, "idle CPU measurement window");
  app.add_option("--max-idle-cpu-fraction", o.max_idle_cpu_fraction, "idle CPU limit, fraction of one core");
  app.add_option("--kv-token-blocks", o.kv_token_blocks, "KV capacity per device in token blocks");
  app.add_option("--device-threads", o.device_threads, "kernel threads per device");
  app.add_option("--fault-wait-s", o.fault_wait_s, "fault scenario: how long to wait for a failure");
  app.add_option("--fault-after-requests", o.fault_after_requests, "the fault rank fails after serving this many requests");
  app.add_option("--burst-requests", o.burst_requests, "burst scenario: requests per device")->check(CLI::PositiveNumber);
  app.add_option("--burst-window", o.burst_window, "burst scenario: requests in flight per device")->check(CLI::PositiveNumber);
  app.add_option("--hang-slack-ms", o.hang_slack_ms, "burst scenario: a request may wait the peer timeout plus this");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int rc = app.exit(e);
    session.abort(rc == 0 ? 0 : 2);
  }
  if (!model::preset_config(o.preset).ok()) {
    std::cerr << prefix(session.rank()) << "unknown preset " << o.preset << std::endl;
    session.abort(2);
  }
  NodeIdentity id{o.model + ":" + std::to_string(o.seed), o.preset, o.dtype, this_build_id()};
  const Status agreed = check_identity(id);
  if (!agreed.ok()) {
    if (session.rank() == 0) std::cerr << "kun_mpi_node: " << agreed.message() << std::endl;
    return 2;  // every rank got the same verdict: all finalize and exit
  }
  MpiTransportOptions topt;
  topt.heartbeat_period = std::chrono::milliseconds(o.heartbeat_ms);
  topt.peer_timeout = std::chrono::milliseconds(o.peer_timeout_ms);
  auto transport = MpiTransport::create(topt);
  if (!transport.ok()) {
    std::cerr << prefix(session.rank()) << transport.status().to_string() << std::endl;
    session.abort(2);
  }
  int rc = 0;
  if (session.rank() != 0) {
    rc = run_device(session, **transport, o);
  } else {
    if (o.scenario == "fault") {
      rc = run_fault_watch(session, **transport, o);
    } else if (o.scenario == "burst") {
      rc = run_burst(session, **transport, o);
    } else {
      rc = run_cluster(session, **transport, o);
    }
    const Status s = (*transport)->shutdown();
    if (!s.ok()) {
      std::cerr << prefix(0) << s.message() << std::endl;
      session.abort(3);
    }
  }
  transport->reset();
  return rc;
}

}  // namespace
}  // namespace kun::runtime::mpi

int main(int argc, char** argv) { return kun::runtime::mpi::node_main(argc, argv); }
