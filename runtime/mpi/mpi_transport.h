// MpiTransport: the MessageTransport backend with one process (MPI rank) per device. Point-to-point
// non-blocking MPI (MPI_Isend / MPI_Irecv / MPI_Improbe + MPI_Mrecv) on a duplicate of
// MPI_COMM_WORLD; device id == rank.
//
// One progress thread per process makes every MPI call after construction (so MPI needs only
// MPI_THREAD_SERIALIZED, see MpiSession): callers queue sends and post receives into a Mailbox
// and block on completion handles (condition variables). Blocking MPI calls spin in Open MPI, so
// the progress thread never waits inside MPI. It runs flat out (yielding) only while requests are
// in flight and making progress; with nothing in flight it blocks in ppoll() on two descriptors:
// an eventfd that send() and shutdown() write, and a doorbell, a datagram socket (abstract Unix
// name, unique per job) that a peer on the same host writes one byte to after posting a message
// to this rank. So an idle rank wakes only to send heartbeats (each heartbeat_period) and costs
// close to no CPU, and still reacts at once to a message. A peer that cannot ring (another host:
// the names are found unreachable at create()) is covered by polling with exponential backoff up
// to max_idle_sleep instead.
//
// Wire: a message is a prefix (magic, sizes, offset; the encoded MessageHeader on its first
// chunk) followed by its payload bytes as a second MPI message received straight into the
// destination buffer. The MPI tag is the TransferKind, so MPI's non-overtaking rule gives the
// in-process ordering guarantee per (source, destination, kind). Latency-bound kinds (activation,
// remote attention) are posted as soon as they are queued, and the receiver probes their tags
// before any other, so of the bulk traffic they only wait for the chunk whose copy is under way.
// Bulk kinds (KV, weights) go in bulk_chunk_bytes chunks with bulk_window_chunks chunks per
// destination in flight, so the next chunk is already posted when one completes. Payloads handed
// back with recycle() are kept (up to receive_pool_bytes) and later messages are received into
// them: no allocation, page faults or zero-fill on a steady exchange.
//
// Faults: every rank sends a heartbeat to every peer each heartbeat_period; a peer from which
// nothing arrived for peer_timeout is declared failed: receives waiting on it and sends to it end
// with kUnavailable naming the rank, and failure() reports it. A peer on the same host (same
// hostname, boot and pid namespace) is also watched through a pidfd: when its process exits
// without having said goodbye it has failed at once ("rank 3 died"), without waiting out the
// timeout. shutdown() says goodbye to every peer and waits for theirs, so no rank mistakes a
// peer's orderly exit for a failure, and MPI can be finalized with nothing in flight.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "runtime/message_transport.h"

namespace kun::runtime::mpi {

struct MpiTransportOptions {
  std::int64_t bulk_chunk_bytes = 256 * 1024;
  // Bulk chunks in flight per destination (>= 1). 2 keeps the link busy across a chunk's
  // completion; a latency-bound message is not queued behind them (own tag, probed first).
  int bulk_window_chunks = 2;
  std::chrono::milliseconds heartbeat_period{100};
  std::chrono::milliseconds peer_timeout{2000};
  // Idle poll period cap, used only when some peer cannot ring this rank's doorbell.
  std::chrono::microseconds max_idle_sleep{1000};
  // While requests are in flight and progressing: 0 yields between polls (the progress thread
  // is doing the copies then); > 0 sleeps this long.
  std::chrono::microseconds busy_poll_sleep{0};
  // Requests in flight but no progress for active_window (a slow or busy peer), or nothing in
  // flight within active_window of the last progress: wait this long between polls (a doorbell
  // or a send still wakes the thread at once).
  std::chrono::microseconds active_poll_sleep{50};
  std::chrono::microseconds active_window{2000};
  // false: no doorbells, idle ranks poll with backoff up to max_idle_sleep (the old behaviour,
  // for comparison in bench/transport).
  bool doorbells = true;
  // Payload buffers handed back by recycle() kept for later receives (bytes of capacity); only
  // buffers of at least min_recycled_bytes are kept.
  std::int64_t receive_pool_bytes = std::int64_t{256} << 20;
  std::int64_t min_recycled_bytes = 64 * 1024;
  // shutdown() waits this long at most for peers still working (they keep sending heartbeats;
  // one that goes silent fails after peer_timeout as usual).
  std::chrono::milliseconds shutdown_timeout{60000};
  // Watch same-host peers' processes (pidfd): a peer that exits without a goodbye has failed at
  // once instead of after peer_timeout. false: heartbeats only.
  bool watch_peer_processes = true;
  // Called on the progress thread when a peer is found failed, before the failure is recorded
  // and before any request waiting on it is failed; it may block (the transport stalls
  // meanwhile) or end the process. `kun serve` on rank 0 uses it to end the job cleanly before
  // the executor sees a step fail.
  std::function<void(int rank, const Status& why)> on_peer_failure;
};

class MpiTransport final : public MessageTransport {
 public:
  // MPI must be initialized (MpiSession). Collective over MPI_COMM_WORLD (duplicates it).
  static StatusOr<std::unique_ptr<MpiTransport>> create(const MpiTransportOptions& options);
  ~MpiTransport() override;  // shutdown() if not done
  MpiTransport(const MpiTransport&) = delete;
  MpiTransport& operator=(const MpiTransport&) = delete;

  int device() const override { return rank_; }
  int num_devices() const override { return size_; }
  SendHandle send(MessageHeader header, std::span<const std::byte> payload) override;
  SendHandle send_owned(MessageHeader header, std::vector<std::byte> payload) override;
  // A receive naming a peer already failed ends at once with that peer's failure.
  RecvHandle recv(RecvMatch match) override;
  std::uint64_t next_tag() override { return next_tag_.fetch_add(1, std::memory_order_relaxed); }
  TransferStats stats() const override { return counters_.stats(); }
  void recycle(std::vector<std::byte> payload) override;

  // The first peer failure (kUnavailable naming the rank), or ok while every peer answers.
  Status failure() const;
  // Why `rank` failed (ok while it answers).
  Status peer_failure(int rank) const;
  // Every peer found failed so far, ascending.
  std::vector<int> failed_peers() const;
  // SIGKILLs the processes of failed peers on this host that still run (a rank that stopped
  // answering), so that the job can end without them; returns the ranks signalled. Call after
  // shutdown(). Peers on other hosts are left to MPI_Abort / mpirun.
  std::vector<int> terminate_failed_peers();
  // SIGKILLs `rank`'s process if it runs on this host (pidfd); true if signalled. For
  // on_peer_failure, which runs before the failure is recorded.
  bool terminate_peer(int rank);
  // Blocks until a peer fails or `timeout` passes; returns failure().
  Status wait_for_failure(std::chrono::milliseconds timeout) const;
  // Orderly end: sends what is queued, says goodbye to every live peer, waits for their goodbyes
  // (while they keep answering, at most shutdown_timeout), stops the progress thread. An error
  // (a peer failed, or no goodbye in time) names the ranks; the caller should then MPI_Abort
  // rather than MPI_Finalize.
  Status shutdown();
  // Fault injection for tests: this rank stops answering (no heartbeats, nothing received), as a
  // hung process would.
  void simulate_hang();

 private:
  using Clock = std::chrono::steady_clock;
  struct Chunk;
  struct OutMsg;
  struct PeerOut;
  struct PendingData;
  struct Partial;
  struct Stream;
  MpiTransport(const MpiTransportOptions& options, void* comm, int rank, int size);
  SendHandle submit(std::unique_ptr<OutMsg> out);
  void progress_loop();
  // Each returns true if it made progress.
  bool take_submitted();
  // Posts the next n payload bytes of `m` (with its prefix) as a chunk; false (and `m` failed)
  // on an MPI error.
  bool post(OutMsg& m, std::int64_t n);
  void setup_doorbells();  // collective, before the progress thread starts
  void setup_process_watch();  // collective, before the progress thread starts
  // Fails every peer whose process has exited without a goodbye (pidfds readable).
  void check_peer_processes();
  void ring_doorbells();   // one byte to each peer marked in ring_
  void wake();             // wakes the progress thread (any thread)
  // Blocks in ppoll on the wake eventfd and the doorbell for at most `timeout`; true if woken.
  bool wait_for_wake(std::chrono::microseconds timeout, bool doorbell_too);
  std::chrono::microseconds idle_timeout(Clock::time_point now);
  // A payload buffer of `bytes` bytes: a recycled one (the best fit, no zero-fill) or a new one.
  std::vector<std::byte> take_buffer(std::int64_t bytes);
  void flush(Stream& stream);
  bool post_bulk_chunks();
  bool test_sends();
  bool receive_messages();
  bool test_data_receives();
  void heartbeats_and_timeouts();
  void fail_peer(int peer, const Status& s);
  bool anything_in_flight() const;
  // True when the progress thread may end.
  bool finish_shutdown(std::chrono::steady_clock::time_point deadline);

  MpiTransportOptions options_;
  void* comm_;  // MPI_Comm, kept opaque so this header does not need mpi.h
  int rank_;
  int size_;
  Mailbox mailbox_;
  TransferCounters counters_;
  std::atomic<std::uint64_t> next_tag_{1};
  std::atomic<bool> hung_{false};

  int wake_fd_ = -1;      // eventfd: send() / shutdown() wake the progress thread
  int doorbell_fd_ = -1;  // datagram socket peers ring after posting a message to this rank
  std::vector<std::string> doorbell_names_;  // per rank (abstract socket names)
  std::vector<char> can_ring_;               // per peer: its doorbell is reachable from here
  std::vector<char> ring_;                   // progress thread: peers to ring after this round
  bool every_peer_rings_ = false;            // every peer can ring this rank: sleep until needed
  std::vector<int> peer_pidfds_;             // per peer: a pidfd of its process, or -1 (another host)
  std::vector<int> failed_pidfds_;           // per peer: its pidfd once it failed (not polled), or -1
  std::vector<long> peer_pids_;              // per peer: its pid (for messages)
  std::chrono::steady_clock::time_point next_process_check_{};  // progress thread

  std::mutex pool_mu_;
  std::vector<std::vector<std::byte>> pool_;  // guarded by pool_mu_
  std::int64_t pool_bytes_ = 0;               // guarded by pool_mu_: sum of capacities

  mutable std::mutex mu_;
  mutable std::condition_variable failure_cv_;   // wakes wait_for_failure
  std::deque<std::unique_ptr<OutMsg>> submitted_;  // guarded by mu_
  bool stopping_ = false;                          // guarded by mu_
  bool stopped_ = false;                           // guarded by mu_
  bool receives_closed_ = false;                   // guarded by mu_: shutdown() failed every receive
  Status failure_;                                 // guarded by mu_: first peer failure
  std::vector<int> failed_peers_;                  // guarded by mu_
  std::vector<Status> peer_failures_;              // guarded by mu_: per peer, ok while it answers
  Status shutdown_status_;                         // guarded by mu_

  // Progress thread only.
  std::vector<std::unique_ptr<PeerOut>> peers_;
  std::vector<std::unique_ptr<OutMsg>> latency_in_flight_;
  std::vector<int> latency_tags_;  // probed before any other tag
  std::vector<std::unique_ptr<PendingData>> data_receives_;
  std::vector<std::unique_ptr<PendingData>> abandoned_receives_;  // from failed peers, never tested
  std::vector<std::unique_ptr<Stream>> streams_;  // per (source, kind)
  std::thread progress_;
};

}  // namespace kun::runtime::mpi
