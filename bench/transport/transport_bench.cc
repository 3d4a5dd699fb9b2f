// transport_bench: the handle-addressed transport on one host, run under MPI with 2 ranks:
//
//   mpirun -np 2 --oversubscribe --bind-to none build/release/bench/transport/transport_bench
//
// Reports, each measured in this run:
//   - KV-exchange throughput (bulk kKvExchange messages, rank 0 -> rank 1) over MPI for several
//     chunk sizes, and over the in-process hub, against memcpy bandwidth (ratio);
//   - activation latency (one way = round trip / 2 of a small kActivation message) idle and
//     while a bulk KV transfer crosses the same link, MPI vs in-process (paced link model), as
//     p50 / p99 and the under-bulk / idle ratio;
//   - idle CPU of each rank (fraction of one core while both ranks wait with a transport open,
//     heartbeats only), with doorbells (the default) and with the polling backoff alone.
// Each figure is the median of --repeats runs (3).
#include <mpi.h>
#include <time.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>

#include "runtime/message_transport.h"
#include "runtime/mpi/mpi_session.h"
#include "runtime/mpi/mpi_transport.h"

namespace kun::runtime {
namespace {

using Clock = std::chrono::steady_clock;

struct BenchOptions {
  std::int64_t bulk_mib = 256;
  std::int64_t messages = 4;
  std::vector<std::int64_t> chunk_kib = {64, 256, 1024};
  std::int64_t activation_bytes = 16 * 1024;
  int pings = 200;
  double link_gbps = 10.0;
  std::int64_t busy_poll_us = 0;
  int bulk_window = 2;
  std::int64_t receive_pool_mib = 1024;
  int repeats = 3;
  double idle_s = 2.0;
  bool compare_previous = true;
};

double process_cpu_s() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

double seconds(Clock::duration d) { return std::chrono::duration<double>(d).count(); }

double memcpy_gbps(std::int64_t bytes) {
  std::vector<std::byte> a(static_cast<std::size_t>(bytes), std::byte{1}), b(static_cast<std::size_t>(bytes), std::byte{2});
  double best = 1e30;
  for (int i = 0; i < 3; ++i) {
    const auto t0 = Clock::now();
    std::memcpy(b.data(), a.data(), a.size());
    best = std::min(best, seconds(Clock::now() - t0));
    a[static_cast<std::size_t>(i)] = b[static_cast<std::size_t>(bytes - 1 - i)];
  }
  return static_cast<double>(bytes) / best / 1e9;
}

MessageHeader header(int dst, TransferKind kind, std::uint64_t tag) {
  MessageHeader h;
  h.dst = dst;
  h.kind = kind;
  h.port = Port::kUser;
  h.tag = tag;
  return h;
}

Message receive(MessageTransport& t, int src, std::uint64_t tag) {
  RecvMatch m;
  m.port = Port::kUser;
  m.src = src;
  m.tag = tag;
  RecvHandle h = t.recv(m);
  const Status s = h.wait();
  KUN_CHECK(s.ok()) << s.to_string();
  return h.take();
}

enum Tags : std::uint64_t { kBulk = 1, kAck = 2, kPing = 3, kPong = 4, kBulkUnderPings = 5 };

struct Figures {
  double kv_gbps = 0;
  double memcpy_gbps = 0;
  double kv_ratio = 0;  // kv_gbps / memcpy_gbps of the same run
  double idle_p50_us = 0, idle_p99_us = 0;
  double busy_p50_us = 0, busy_p99_us = 0;
  int busy_samples = 0;
};

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[std::min(v.size() - 1, static_cast<std::size_t>(p * static_cast<double>(v.size())))];
}

// The sender side (device 0 of `t`); the receiver runs receiver_side on device 1.
Figures sender_side(MessageTransport& t, const BenchOptions& o, const std::vector<std::byte>& bulk,
                    const std::vector<std::byte>& act) {
  Figures f;
  // The memcpy bandwidth right before each throughput run: the ratio of the two is robust to the
  // host's load drifting between runs.
  f.memcpy_gbps = memcpy_gbps(static_cast<std::int64_t>(bulk.size()));
  // Throughput: `messages` bulk messages, then the receiver's ack.
  const auto t0 = Clock::now();
  std::vector<SendHandle> sent;
  for (std::int64_t i = 0; i < o.messages; ++i) sent.push_back(t.send(header(1, TransferKind::kKvExchange, kBulk), bulk));
  (void)receive(t, 1, kAck);
  f.kv_gbps = static_cast<double>(bulk.size()) * static_cast<double>(o.messages) / seconds(Clock::now() - t0) / 1e9;
  f.kv_ratio = f.kv_gbps / f.memcpy_gbps;
  for (auto& s : sent) KUN_CHECK(s.wait().ok());
  // Idle ping-pong.
  std::vector<double> idle, busy;
  for (int i = 0; i < o.pings; ++i) {
    const auto p0 = Clock::now();
    t.send(header(1, TransferKind::kActivation, kPing), act);
    (void)receive(t, 1, kPong);
    idle.push_back(seconds(Clock::now() - p0) * 1e6 / 2);
  }
  // Ping-pong while a bulk message crosses the same link.
  SendHandle bulk_sent = t.send(header(1, TransferKind::kKvExchange, kBulkUnderPings), bulk);
  for (int i = 0; i < o.pings; ++i) {
    const auto p0 = Clock::now();
    t.send(header(1, TransferKind::kActivation, kPing), act);
    (void)receive(t, 1, kPong);
    if (!bulk_sent.ready()) busy.push_back(seconds(Clock::now() - p0) * 1e6 / 2);
  }
  KUN_CHECK(bulk_sent.wait().ok());
  (void)receive(t, 1, kAck);
  f.idle_p50_us = percentile(idle, 0.5);
  f.idle_p99_us = percentile(idle, 0.99);
  f.busy_p50_us = percentile(busy, 0.5);
  f.busy_p99_us = percentile(busy, 0.99);
  f.busy_samples = static_cast<int>(busy.size());
  return f;
}

void receiver_side(MessageTransport& t, const BenchOptions& o, const std::vector<std::byte>& act) {
  // As a device agent does once the bytes are in its arena: the buffers go back to the transport.
  for (std::int64_t i = 0; i < o.messages; ++i) t.recycle(receive(t, 0, kBulk).payload);
  t.send_owned(header(0, TransferKind::kActivation, kAck), {});
  for (int round = 0; round < 2; ++round) {
    for (int i = 0; i < o.pings; ++i) {
      (void)receive(t, 0, kPing);
      KUN_CHECK(t.send(header(0, TransferKind::kActivation, kPong), act).wait().ok());
    }
  }
  t.recycle(receive(t, 0, kBulkUnderPings).payload);
  t.send_owned(header(0, TransferKind::kActivation, kAck), {});
}

// A barrier that sleeps while it waits (a blocking MPI_Barrier spins a core).
void sleepy_barrier() {
  MPI_Request r;
  MPI_Ibarrier(MPI_COMM_WORLD, &r);
  int done = 0;
  while (true) {
    MPI_Test(&r, &done, MPI_STATUS_IGNORE);
    if (done) return;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

Figures median(std::vector<Figures> runs) {
  auto med = [&](auto field) {
    std::vector<double> v;
    for (const Figures& f : runs) v.push_back(static_cast<double>(f.*field));
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  Figures m;
  m.kv_gbps = med(&Figures::kv_gbps);
  m.memcpy_gbps = med(&Figures::memcpy_gbps);
  m.kv_ratio = med(&Figures::kv_ratio);
  m.idle_p50_us = med(&Figures::idle_p50_us);
  m.idle_p99_us = med(&Figures::idle_p99_us);
  m.busy_p50_us = med(&Figures::busy_p50_us);
  m.busy_p99_us = med(&Figures::busy_p99_us);
  m.busy_samples = static_cast<int>(med(&Figures::busy_samples));
  return m;
}

void print(const char* name, const Figures& f) {
  std::printf("%-28s %8.2f %8.2f %6.3f %9.1f %9.1f %9.1f %9.1f %6d %7.1f\n", name, f.kv_gbps, f.memcpy_gbps, f.kv_ratio, f.idle_p50_us,
              f.idle_p99_us, f.busy_p50_us, f.busy_p99_us, f.busy_samples,
              f.idle_p50_us > 0 ? f.busy_p50_us / f.idle_p50_us : 0.0);
}

int bench_main(int argc, char** argv) {
  auto session = mpi::MpiSession::init(&argc, &argv);
  KUN_CHECK(session.ok()) << session.status().to_string();
  BenchOptions o;
  CLI::App app{"transport bench: KV throughput vs memcpy, activation latency under bulk (MPI vs in-process)"};
  app.add_option("--bulk-mib", o.bulk_mib, "size of one bulk KV message");
  app.add_option("--messages", o.messages, "bulk messages in the throughput run");
  app.add_option("--chunk-kib", o.chunk_kib, "MPI bulk chunk sizes to compare");
  app.add_option("--activation-bytes", o.activation_bytes, "activation message size");
  app.add_option("--pings", o.pings, "ping-pongs per latency run");
  app.add_option("--link-gbps", o.link_gbps, "in-process paced link bandwidth (GB/s)");
  app.add_option("--busy-poll-us", o.busy_poll_us, "MPI progress thread poll period while busy (0: yield)");
  app.add_option("--bulk-window", o.bulk_window, "MPI bulk chunks in flight per destination");
  app.add_option("--receive-pool-mib", o.receive_pool_mib, "MPI receive buffer pool (recycled payloads)");
  app.add_option("--repeats", o.repeats, "runs per figure (the median is printed)");
  app.add_option("--idle-s", o.idle_s, "idle CPU measurement window");
  app.add_option("--compare-previous", o.compare_previous,
                 "also run 256 KiB chunks with the previous settings (window 1, 20 us polls, no pool, no doorbells)");
  CLI11_PARSE(app, argc, argv);
  int thread_level = 0;
  MPI_Query_thread(&thread_level);
  // The main thread makes MPI calls (barrier, gather) while a transport's progress thread runs.
  KUN_CHECK_EQ(thread_level, MPI_THREAD_MULTIPLE) << "the bench needs MPI_THREAD_MULTIPLE";
  const int rank = (*session)->rank();
  KUN_CHECK_EQ((*session)->size(), 2) << "run with mpirun -np 2";
  std::vector<std::byte> bulk(static_cast<std::size_t>(o.bulk_mib << 20), std::byte{7});
  std::vector<std::byte> act(static_cast<std::size_t>(o.activation_bytes), std::byte{3});

  if (rank == 0) {
    std::printf("bulk %lld x %lld MiB; activation %lld B; %d pings; medians of %d runs; memcpy = best of 3 copies of %lld MiB"
                " right before each throughput run\n",
                static_cast<long long>(o.messages), static_cast<long long>(o.bulk_mib),
                static_cast<long long>(o.activation_bytes), o.pings, o.repeats, static_cast<long long>(o.bulk_mib));
    std::printf("%-28s %8s %8s %6s %9s %9s %9s %9s %6s %7s\n", "transport", "KV GB/s", "memcpy", "ratio", "idle p50",
                "idle p99", "bulk p50", "bulk p99", "n", "p50 x");
    // In-process first, while rank 1 sleeps in the barrier below.
    for (bool paced : {false, true}) {
      LinkModel link;
      if (paced) link.bandwidth_bytes_per_s = o.link_gbps * 1e9;
      InProcessMessageHub hub(2, link);
      std::vector<Figures> runs;
      for (int r = 0; r < o.repeats; ++r) {
        std::thread receiver([&] { receiver_side(hub.endpoint(1), o, act); });
        runs.push_back(sender_side(hub.endpoint(0), o, bulk, act));
        receiver.join();
      }
      const Figures f = median(runs);
      char name[64];
      std::snprintf(name, sizeof(name), paced ? "in-process %.0f GB/s link" : "in-process unpaced", o.link_gbps);
      print(name, f);
    }
  }
  sleepy_barrier();
  auto options_for = [&](std::int64_t chunk_kib) {
    mpi::MpiTransportOptions topt;
    topt.bulk_chunk_bytes = chunk_kib * 1024;
    topt.busy_poll_sleep = std::chrono::microseconds(o.busy_poll_us);
    topt.bulk_window_chunks = o.bulk_window;
    topt.receive_pool_bytes = o.receive_pool_mib << 20;
    return topt;
  };
  // The settings before doorbells, the window and the pool (one 256 KiB chunk in flight, 20 us
  // polls while busy, a new buffer per receive, 1 ms idle polling), as a baseline in this run.
  std::vector<std::pair<std::int64_t, bool>> configs;
  for (std::int64_t kib : o.chunk_kib) configs.emplace_back(kib, false);
  if (o.compare_previous) configs.emplace_back(256, true);
  for (const auto& [kib, previous] : configs) {
    auto topt = options_for(kib);
    if (previous) {
      topt.bulk_window_chunks = 1;
      topt.busy_poll_sleep = std::chrono::microseconds(20);
      topt.receive_pool_bytes = 0;
      topt.doorbells = false;
    }
    auto t = mpi::MpiTransport::create(topt);
    KUN_CHECK(t.ok()) << t.status().to_string();
    std::vector<Figures> runs;
    for (int r = 0; r < o.repeats; ++r) {
      if (rank == 0) {
        runs.push_back(sender_side(**t, o, bulk, act));
      } else {
        receiver_side(**t, o, act);
      }
    }
    if (rank == 0) {
      char name[64];
      std::snprintf(name, sizeof(name), previous ? "MPI, %lld KiB, previous" : "MPI, %lld KiB chunks",
                    static_cast<long long>(kib));
      print(name, median(runs));
    }
    KUN_CHECK((*t)->shutdown().ok());
  }
  // Idle CPU: both ranks wait with a transport open (heartbeats only); the main thread sleeps.
  for (bool doorbells : {true, false}) {
    auto topt = options_for(o.chunk_kib.front());
    topt.doorbells = doorbells;
    auto t = mpi::MpiTransport::create(topt);
    KUN_CHECK(t.ok()) << t.status().to_string();
    std::vector<double> fractions;
    for (int r = 0; r < o.repeats; ++r) {
      sleepy_barrier();
      const double c0 = process_cpu_s();
      const auto w0 = Clock::now();
      std::this_thread::sleep_for(std::chrono::duration<double>(o.idle_s));
      fractions.push_back((process_cpu_s() - c0) / seconds(Clock::now() - w0));
    }
    std::sort(fractions.begin(), fractions.end());
    double mine = fractions[fractions.size() / 2];
    double both[2] = {0, 0};
    MPI_Gather(&mine, 1, MPI_DOUBLE, both, 1, MPI_DOUBLE, 0, MPI_COMM_WORLD);
    if (rank == 0) {
      std::printf("idle CPU per rank, %s: rank 0 %.3f %%, rank 1 %.3f %% of a core (median of %d x %.1f s)\n",
                  doorbells ? "doorbells (default)" : "polling backoff to 1 ms (no doorbells)", both[0] * 100,
                  both[1] * 100, o.repeats, o.idle_s);
    }
    KUN_CHECK((*t)->shutdown().ok());
  }
  if (rank == 0) {
    std::printf("latencies are one way (round trip / 2) in us; 'bulk' = while a %lld MiB KV message crosses the same link;"
                " n = pings that overlapped it; p50 x = bulk p50 / idle p50\n",
                static_cast<long long>(o.bulk_mib));
  }
  return 0;
}

}  // namespace
}  // namespace kun::runtime

int main(int argc, char** argv) { return kun::runtime::bench_main(argc, argv); }
