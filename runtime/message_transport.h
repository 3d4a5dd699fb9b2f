// MessageTransport: the transport addressed by handles, asynchronous (issue 12). A message names
// what it is about (source and destination device, kind, request, layer, block ids, an op for the
// receiver and a tag for matching its reply) and carries a payload; no caller ever holds a
// pointer into another device's memory. send() and recv() return completion handles a waiter
// blocks on (condition variable, no spinning).
//
// Each device has one endpoint. Two backends implement it:
//   - InProcessMessageHub (here): every endpoint lives in this process. Unpaced, a send is
//     delivered on the caller's thread. With a LinkModel, each directed link has one thread that
//     carries one message at a time: latency-bound messages (activation, remote attention) go
//     first, in arrival order; a bulk message (KV, weights) crosses in bulk_chunk_bytes chunks,
//     each taken only when no latency-bound message waits, so those wait behind at most one chunk.
//   - MpiTransport (runtime/mpi/): one process per device, MPI point-to-point.
//
// Ordering: messages from one source to one destination with the same kind are delivered in the
// order they were sent (latency-bound kinds may overtake bulk ones). Matching: recv() names a
// port, optionally a source and a tag; the oldest delivered message that matches completes it.
//
// Threads: any thread may call send / recv on an endpoint; handles may be waited on by any thread.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <list>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/check.h"
#include "common/status.h"
#include "runtime/transport.h"

namespace kun::runtime {

inline constexpr int kAnySource = -1;
inline constexpr std::uint64_t kAnyTag = ~std::uint64_t{0};

// Who consumes a message at the destination: the device agent's serve loop, a requester
// waiting for a reply (matched by tag), the agent's stage thread (kStage: stage requests), or
// anything else (kUser: e.g. a stage's input activations, matched by source and tag).
enum class Port : std::uint8_t { kAgent = 0, kReply = 1, kUser = 2, kStage = 3 };

struct MessageHeader {
  int src = -1;  // device (rank) ids; src is filled in by send()
  int dst = -1;
  TransferKind kind = TransferKind::kActivation;  // accounting and priority (bulk or latency-bound)
  Port port = Port::kAgent;
  std::uint16_t op = 0;       // what the receiver does (device agent ops)
  std::int32_t error = 0;     // a reply's StatusCode (0: ok); the payload then holds the message
  std::uint64_t tag = 0;      // matches a reply to its request
  int reply_to = -1;          // device that gets the reply (default: src)
  int peer = -1;              // a third device the op names ("send these blocks to device d")
  std::int64_t request_id = -1;
  std::int64_t layer = -1;
  std::int64_t start_pos = 0;  // remote attention: the slice's first position and length
  std::int64_t num_tokens = 0;
  std::vector<std::int64_t> block_ids;       // blocks on the destination (or on the op's source)
  std::vector<std::int64_t> peer_block_ids;  // blocks on `peer`
};

struct Message {
  MessageHeader header;
  std::vector<std::byte> payload;
};

// Serialized header (for transports that cross processes); parse returns an error on bad input.
std::vector<std::byte> encode_header(const MessageHeader& h);
StatusOr<MessageHeader> decode_header(std::span<const std::byte> bytes);

namespace detail {
template <class T>
struct SharedState {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;  // guarded by mu
  Status status;      // guarded by mu
  T value{};          // guarded by mu; written once before done
  void complete(Status s, T v = T{}) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (done) return;
      status = std::move(s);
      value = std::move(v);
      done = true;
    }
    cv.notify_all();
  }
};
struct NoValue {};
}  // namespace detail

// A completion handle. wait() blocks the calling thread (no spinning) until the operation ends.
template <class T>
class Pending {
 public:
  Pending() = default;
  explicit Pending(std::shared_ptr<detail::SharedState<T>> state) : state_(std::move(state)) {}
  bool valid() const { return state_ != nullptr; }
  bool ready() const {
    std::lock_guard<std::mutex> lock(state_->mu);
    return state_->done;
  }
  Status wait() const {
    std::unique_lock<std::mutex> lock(state_->mu);
    state_->cv.wait(lock, [&] { return state_->done; });
    return state_->status;
  }
  // False if it did not end within `timeout`.
  template <class Rep, class Period>
  bool wait_for(std::chrono::duration<Rep, Period> timeout) const {
    std::unique_lock<std::mutex> lock(state_->mu);
    return state_->cv.wait_for(lock, timeout, [&] { return state_->done; });
  }
  // After wait() returned ok: the value (moved out once).
  T take() {
    std::lock_guard<std::mutex> lock(state_->mu);
    KUN_CHECK(state_->done) << "take() before the operation ended";
    return std::move(state_->value);
  }

 private:
  std::shared_ptr<detail::SharedState<T>> state_;
};
using SendHandle = Pending<detail::NoValue>;
using RecvHandle = Pending<Message>;

struct RecvMatch {
  Port port = Port::kAgent;
  int src = kAnySource;
  std::uint64_t tag = kAnyTag;
  bool matches(const MessageHeader& h) const {
    return h.port == port && (src == kAnySource || h.src == src) && (tag == kAnyTag || h.tag == tag);
  }
};

class MessageTransport {
 public:
  virtual ~MessageTransport() = default;
  virtual int device() const = 0;
  virtual int num_devices() const = 0;
  // Sends `header` (src is set to device()) with `payload`, which the caller keeps alive and
  // unchanged until the handle completes (as MPI_Isend's buffer).
  virtual SendHandle send(MessageHeader header, std::span<const std::byte> payload) = 0;
  // As send(), owning the payload.
  virtual SendHandle send_owned(MessageHeader header, std::vector<std::byte> payload) = 0;
  virtual RecvHandle recv(RecvMatch match) = 0;
  // Unique tags for request/reply matching on this endpoint.
  virtual std::uint64_t next_tag() = 0;
  virtual TransferStats stats() const = 0;
  // Hands a received payload's buffer back once its bytes are consumed. A backend may keep a few
  // large ones and receive later messages into them without allocating, faulting pages in and
  // zero-filling (MpiTransport does); by default the buffer is freed.
  virtual void recycle(std::vector<std::byte> payload) { (void)payload; }
};

// Delivered messages and waiting receives of one endpoint (shared by both backends).
class Mailbox {
 public:
  void deliver(Message m);
  RecvHandle recv(const RecvMatch& match);
  // Ends every waiting receive that names `src` (or any source when fail_any_source) with `s`.
  void fail_from(int src, const Status& s, bool fail_any_source);
  // Ends every waiting receive with `s` (the transport is going away).
  void fail_all(const Status& s);
  std::int64_t num_waiting_receives() const;

 private:
  struct Waiter {
    RecvMatch match;
    std::shared_ptr<detail::SharedState<Message>> state;
  };
  mutable std::mutex mu_;
  std::deque<Message> arrived_;  // guarded by mu_
  std::list<Waiter> waiters_;    // guarded by mu_, oldest first
};

// Counts bytes and messages by kind.
class TransferCounters {
 public:
  void count(TransferKind kind, std::int64_t bytes);
  void count_deferred_chunk() { deferred_.fetch_add(1, std::memory_order_relaxed); }
  TransferStats stats() const;

 private:
  std::array<std::atomic<std::int64_t>, static_cast<int>(TransferKind::kCount)> bytes_{};
  std::array<std::atomic<std::int64_t>, static_cast<int>(TransferKind::kCount)> messages_{};
  std::atomic<std::int64_t> deferred_{0};
};

// All endpoints of an in-process cluster of `num_devices` devices.
class InProcessMessageHub {
 public:
  // Messages from or to `unpaced_endpoint` (a front end's: its requests stand for a host issuing
  // commands to its accelerators, not for traffic on a device link) skip the link model.
  explicit InProcessMessageHub(int num_devices, LinkModel link = {}, int unpaced_endpoint = -1);
  ~InProcessMessageHub();
  InProcessMessageHub(const InProcessMessageHub&) = delete;
  InProcessMessageHub& operator=(const InProcessMessageHub&) = delete;

  MessageTransport& endpoint(int device);
  int num_devices() const { return static_cast<int>(endpoints_.size()); }
  const LinkModel& link() const { return link_; }
  // Summed over every endpoint.
  TransferStats stats() const { return counters_.stats(); }

 private:
  class Endpoint;
  struct Outgoing {
    Message message;                          // header, and the payload buffer it arrives in
    std::span<const std::byte> source;        // bytes still to copy in (borrowed or owned)
    std::vector<std::byte> owned;             // the source when send_owned
    std::shared_ptr<detail::SharedState<detail::NoValue>> done;
    std::int64_t copied = 0;
  };
  struct Link {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::unique_ptr<Outgoing>> latency;  // guarded by mu
    std::deque<std::unique_ptr<Outgoing>> bulk;     // guarded by mu
    bool stopping = false;                          // guarded by mu
    std::thread thread;
  };
  SendHandle submit(int src, std::unique_ptr<Outgoing> out);
  void deliver(std::unique_ptr<Outgoing> out);
  void link_loop(Link& link);
  Link& link_for(int src, int dst);

  LinkModel link_;
  int unpaced_endpoint_;
  TransferCounters counters_;
  std::vector<std::unique_ptr<Endpoint>> endpoints_;
  std::mutex links_mu_;
  std::map<std::pair<int, int>, std::unique_ptr<Link>> links_;  // guarded by links_mu_
};

}  // namespace kun::runtime
