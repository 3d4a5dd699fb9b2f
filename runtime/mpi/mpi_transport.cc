#include "runtime/mpi/mpi_transport.h"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <iostream>
#include <string>

#include "common/check.h"

namespace kun::runtime::mpi {

namespace {
using Clock = std::chrono::steady_clock;

constexpr int kTagHeartbeat = 64;
constexpr int kTagGoodbye = 65;
constexpr std::uint32_t kPrefixMagic = 0x4b554e50;  // "KUNP"
int data_tag(TransferKind k) { return 1 + static_cast<int>(k); }

// Starts every data message: the chunk's place in its message, then (first chunk only) the
// encoded header. The chunk's bytes follow as a second MPI message with the same tag.
struct WirePrefix {
  std::uint32_t magic = kPrefixMagic;
  std::uint32_t header_bytes = 0;
  std::int64_t total_bytes = 0;
  std::int64_t offset = 0;
  std::int64_t chunk_bytes = 0;
};

MPI_Comm& comm_of(void* p) { return *static_cast<MPI_Comm*>(p); }

double ms_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}
}  // namespace

struct MpiTransport::OutMsg {
  MessageHeader header;
  std::vector<std::byte> header_bytes;
  std::span<const std::byte> source;
  std::vector<std::byte> owned;
  std::shared_ptr<detail::SharedState<detail::NoValue>> done;
  bool started = false;
  std::int64_t sent = 0;           // payload bytes posted so far
  std::vector<std::byte> prefix;   // the prefix of the chunk in flight
  MPI_Request reqs[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
};

struct MpiTransport::PeerOut {
  std::deque<std::unique_ptr<OutMsg>> bulk;  // FIFO across bulk kinds; the front has a chunk in flight
  bool chunk_in_flight = false;
  Clock::time_point last_seen;
  Clock::time_point next_heartbeat;
  MPI_Request heartbeat = MPI_REQUEST_NULL;
  MPI_Request goodbye = MPI_REQUEST_NULL;
  bool failed = false;
  bool goodbye_sent = false;
  bool goodbye_received = false;
};

// A message being received: its chunks' bytes land in message.payload.
struct MpiTransport::Partial {
  Message message;
  std::int64_t posted = 0;    // bytes whose receive is posted
  std::int64_t received = 0;  // bytes received
  bool complete() const { return received == static_cast<std::int64_t>(message.payload.size()); }
};

struct MpiTransport::PendingData {
  int src = 0;
  int kind = 0;
  std::shared_ptr<Partial> partial;
  std::int64_t bytes = 0;
  MPI_Request req = MPI_REQUEST_NULL;
};

// Messages from one source of one kind, delivered in the order their first chunks arrived.
struct MpiTransport::Stream {
  std::deque<std::shared_ptr<Partial>> queue;
};

StatusOr<std::unique_ptr<MpiTransport>> MpiTransport::create(const MpiTransportOptions& options) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) return failed_precondition("MPI is not initialized (create an MpiSession first)");
  if (options.bulk_chunk_bytes <= 0 || options.bulk_chunk_bytes > INT_MAX) {
    return invalid_argument("bulk chunk of " + std::to_string(options.bulk_chunk_bytes) + " bytes");
  }
  if (options.peer_timeout <= options.heartbeat_period) {
    return invalid_argument("peer timeout must exceed the heartbeat period");
  }
  auto* comm = new MPI_Comm(MPI_COMM_NULL);
  if (MPI_Comm_dup(MPI_COMM_WORLD, comm) != MPI_SUCCESS) {
    delete comm;
    return unavailable("MPI_Comm_dup failed");
  }
  MPI_Comm_set_errhandler(*comm, MPI_ERRORS_RETURN);
  int rank = 0, size = 0;
  MPI_Comm_rank(*comm, &rank);
  MPI_Comm_size(*comm, &size);
  std::unique_ptr<MpiTransport> t(new MpiTransport(options, comm, rank, size));
  t->progress_ = std::thread([p = t.get()] { p->progress_loop(); });
  return t;
}

MpiTransport::MpiTransport(const MpiTransportOptions& options, void* comm, int rank, int size)
    : options_(options), comm_(comm), rank_(rank), size_(size) {
  const auto now = Clock::now();
  for (int p = 0; p < size_; ++p) {
    auto peer = std::make_unique<PeerOut>();
    peer->last_seen = now;
    peer->next_heartbeat = now;
    peers_.push_back(std::move(peer));
    for (int k = 0; k < static_cast<int>(TransferKind::kCount); ++k) streams_.push_back(std::make_unique<Stream>());
  }
}

MpiTransport::~MpiTransport() {
  (void)shutdown();
  delete static_cast<MPI_Comm*>(comm_);
}

SendHandle MpiTransport::send(MessageHeader header, std::span<const std::byte> payload) {
  auto out = std::make_unique<OutMsg>();
  out->header = std::move(header);
  out->source = payload;
  return submit(std::move(out));
}

SendHandle MpiTransport::send_owned(MessageHeader header, std::vector<std::byte> payload) {
  auto out = std::make_unique<OutMsg>();
  out->header = std::move(header);
  out->owned = std::move(payload);
  out->source = out->owned;
  return submit(std::move(out));
}

SendHandle MpiTransport::submit(std::unique_ptr<OutMsg> out) {
  MessageHeader& h = out->header;
  h.src = rank_;
  if (h.reply_to < 0) h.reply_to = rank_;
  KUN_CHECK(h.dst >= 0 && h.dst < size_) << "message to rank " << h.dst << " of " << size_;
  KUN_CHECK(h.kind != TransferKind::kSwapOut && h.kind != TransferKind::kSwapIn) << "swap copies go over the host link";
  KUN_CHECK_LE(static_cast<std::int64_t>(out->source.size()), std::int64_t{INT_MAX}) << "one MPI message";
  out->done = std::make_shared<detail::SharedState<detail::NoValue>>();
  SendHandle handle(out->done);
  if (h.dst == rank_) {
    // To itself (an agent's stop, a stage asking its own agent): no MPI involved.
    Message m{h, std::vector<std::byte>(out->source.begin(), out->source.end())};
    mailbox_.deliver(std::move(m));
    out->done->complete(ok_status());
    return handle;
  }
  counters_.count(h.kind, static_cast<std::int64_t>(out->source.size()));
  out->header_bytes = encode_header(h);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) {
      out->done->complete(unavailable("transport of rank " + std::to_string(rank_) + " is shut down"));
      return handle;
    }
    submitted_.push_back(std::move(out));
  }
  wake_cv_.notify_one();
  return handle;
}

Status MpiTransport::failure() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failure_;
}

Status MpiTransport::wait_for_failure(std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  failure_cv_.wait_for(lock, timeout, [&] { return !failure_.ok(); });
  return failure_;
}

void MpiTransport::simulate_hang() { hung_.store(true); }

Status MpiTransport::shutdown() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stopped_) return shutdown_status_;
    stopping_ = true;
  }
  wake_cv_.notify_all();
  if (progress_.joinable()) progress_.join();
  mailbox_.fail_all(unavailable("transport of rank " + std::to_string(rank_) + " shut down"));
  std::lock_guard<std::mutex> lock(mu_);
  stopped_ = true;
  for (auto& out : submitted_) out->done->complete(unavailable("transport shut down before the message was sent"));
  submitted_.clear();
  return shutdown_status_;
}

// ---- progress thread -------------------------------------------------------------------------

void MpiTransport::fail_peer(int peer, const Status& s) {
  PeerOut& p = *peers_[static_cast<std::size_t>(peer)];
  if (p.failed) return;
  p.failed = true;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (failure_.ok()) failure_ = s;
  }
  failure_cv_.notify_all();
  mailbox_.fail_from(peer, s, /*fail_any_source=*/false);
  auto drop = [&](OutMsg& m) {
    for (MPI_Request& r : m.reqs) {
      if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
    }
    m.done->complete(s);
  };
  for (auto& m : p.bulk) drop(*m);
  p.bulk.clear();
  p.chunk_in_flight = false;
  for (auto it = latency_in_flight_.begin(); it != latency_in_flight_.end();) {
    if ((*it)->header.dst == peer) {
      drop(**it);
      it = latency_in_flight_.erase(it);
    } else {
      ++it;
    }
  }
  for (MPI_Request* r : {&p.heartbeat, &p.goodbye}) {
    if (*r != MPI_REQUEST_NULL) MPI_Request_free(r);
  }
}

bool MpiTransport::take_submitted() {
  std::deque<std::unique_ptr<OutMsg>> batch;
  {
    std::lock_guard<std::mutex> lock(mu_);
    batch.swap(submitted_);
  }
  for (auto& out : batch) {
    PeerOut& p = *peers_[static_cast<std::size_t>(out->header.dst)];
    if (p.failed || p.goodbye_received) {
      out->done->complete(unavailable("rank " + std::to_string(out->header.dst) +
                                      (p.failed ? " stopped answering" : " has shut down")));
      continue;
    }
    if (is_bulk_transfer(out->header.kind)) {
      p.bulk.push_back(std::move(out));
      continue;
    }
    if (!post(*out, static_cast<std::int64_t>(out->source.size()))) continue;
    latency_in_flight_.push_back(std::move(out));
  }
  return !batch.empty();
}

bool MpiTransport::post(OutMsg& m, std::int64_t n) {
  MPI_Comm comm = comm_of(comm_);
  WirePrefix wp;
  wp.header_bytes = m.started ? 0u : static_cast<std::uint32_t>(m.header_bytes.size());
  wp.total_bytes = static_cast<std::int64_t>(m.source.size());
  wp.offset = m.sent;
  wp.chunk_bytes = n;
  m.prefix.resize(sizeof(WirePrefix) + wp.header_bytes);
  std::memcpy(m.prefix.data(), &wp, sizeof(WirePrefix));
  if (wp.header_bytes > 0) std::memcpy(m.prefix.data() + sizeof(WirePrefix), m.header_bytes.data(), wp.header_bytes);
  const int dst = m.header.dst;
  const int tag = data_tag(m.header.kind);
  int rc = MPI_Isend(m.prefix.data(), static_cast<int>(m.prefix.size()), MPI_BYTE, dst, tag, comm, &m.reqs[0]);
  if (rc == MPI_SUCCESS && n > 0) {
    rc = MPI_Isend(m.source.data() + m.sent, static_cast<int>(n), MPI_BYTE, dst, tag, comm, &m.reqs[1]);
  }
  m.started = true;
  m.sent += n;
  if (rc != MPI_SUCCESS) {
    const Status s = unavailable("MPI_Isend to rank " + std::to_string(dst) + " failed (error " + std::to_string(rc) + ")");
    m.done->complete(s);
    fail_peer(dst, s);
    return false;
  }
  return true;
}

bool MpiTransport::post_bulk_chunks() {
  bool progressed = false;
  for (auto& peer : peers_) {
    PeerOut& p = *peer;
    if (p.failed || p.chunk_in_flight || p.bulk.empty()) continue;
    OutMsg& m = *p.bulk.front();
    const std::int64_t n = std::min(options_.bulk_chunk_bytes, static_cast<std::int64_t>(m.source.size()) - m.sent);
    if (!post(m, n)) {
      p.bulk.pop_front();
      continue;
    }
    p.chunk_in_flight = true;
    progressed = true;
  }
  return progressed;
}

bool MpiTransport::test_sends() {
  bool progressed = false;
  for (auto it = latency_in_flight_.begin(); it != latency_in_flight_.end();) {
    int flag = 0;
    MPI_Testall(2, (*it)->reqs, &flag, MPI_STATUSES_IGNORE);
    if (flag) {
      (*it)->done->complete(ok_status());
      it = latency_in_flight_.erase(it);
      progressed = true;
    } else {
      ++it;
    }
  }
  for (auto& peer : peers_) {
    PeerOut& p = *peer;
    if (!p.chunk_in_flight) continue;
    OutMsg& m = *p.bulk.front();
    int flag = 0;
    MPI_Testall(2, m.reqs, &flag, MPI_STATUSES_IGNORE);
    if (!flag) continue;
    p.chunk_in_flight = false;
    progressed = true;
    if (m.sent == static_cast<std::int64_t>(m.source.size())) {
      m.done->complete(ok_status());
      p.bulk.pop_front();
    }
  }
  return progressed;
}

bool MpiTransport::receive_messages() {
  MPI_Comm comm = comm_of(comm_);
  bool progressed = false;
  for (int i = 0; i < 64; ++i) {
    int flag = 0;
    MPI_Message msg = MPI_MESSAGE_NULL;
    MPI_Status st;
    MPI_Improbe(MPI_ANY_SOURCE, MPI_ANY_TAG, comm, &flag, &msg, &st);
    if (!flag) break;
    progressed = true;
    const int src = st.MPI_SOURCE;
    const int tag = st.MPI_TAG;
    int count = 0;
    MPI_Get_count(&st, MPI_BYTE, &count);
    PeerOut& p = *peers_[static_cast<std::size_t>(src)];
    p.last_seen = Clock::now();
    std::vector<std::byte> buf(static_cast<std::size_t>(count));
    MPI_Mrecv(buf.data(), count, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
    if (tag == kTagHeartbeat) continue;
    if (tag == kTagGoodbye) {
      p.goodbye_received = true;
      continue;
    }
    KUN_CHECK(tag >= 1 && tag <= static_cast<int>(TransferKind::kCount)) << "rank " << src << " sent tag " << tag;
    WirePrefix wp;
    KUN_CHECK_GE(count, static_cast<int>(sizeof(WirePrefix))) << "short message from rank " << src;
    std::memcpy(&wp, buf.data(), sizeof(WirePrefix));
    KUN_CHECK(wp.magic == kPrefixMagic && count == static_cast<int>(sizeof(WirePrefix) + wp.header_bytes) &&
              wp.offset >= 0 && wp.chunk_bytes >= 0 && wp.offset + wp.chunk_bytes <= wp.total_bytes)
        << "malformed message prefix from rank " << src;
    const int kind = tag - 1;
    Stream& stream = *streams_[static_cast<std::size_t>(src * static_cast<int>(TransferKind::kCount) + kind)];
    if (wp.offset == 0 && wp.header_bytes > 0) {
      auto header = decode_header(std::span<const std::byte>(buf).subspan(sizeof(WirePrefix)));
      KUN_CHECK(header.ok()) << "rank " << src << ": " << header.status().to_string();
      auto partial = std::make_shared<Partial>();
      partial->message.header = std::move(header).value();
      partial->message.payload.resize(static_cast<std::size_t>(wp.total_bytes));
      stream.queue.push_back(std::move(partial));
    }
    KUN_CHECK(!stream.queue.empty()) << "a chunk from rank " << src << " without its message";
    const std::shared_ptr<Partial>& partial = stream.queue.back();
    KUN_CHECK_EQ(partial->posted, wp.offset) << "chunks out of order from rank " << src;
    if (wp.chunk_bytes > 0) {
      auto pd = std::make_unique<PendingData>();
      pd->src = src;
      pd->kind = kind;
      pd->partial = partial;
      pd->bytes = wp.chunk_bytes;
      MPI_Irecv(partial->message.payload.data() + wp.offset, static_cast<int>(wp.chunk_bytes), MPI_BYTE, src, tag, comm,
                &pd->req);
      partial->posted += wp.chunk_bytes;
      data_receives_.push_back(std::move(pd));
    } else {
      flush(stream);
    }
  }
  return progressed;
}

void MpiTransport::flush(Stream& stream) {
  while (!stream.queue.empty() && stream.queue.front()->complete()) {
    mailbox_.deliver(std::move(stream.queue.front()->message));
    stream.queue.pop_front();
  }
}

bool MpiTransport::test_data_receives() {
  bool progressed = false;
  for (auto it = data_receives_.begin(); it != data_receives_.end();) {
    int flag = 0;
    MPI_Test(&(*it)->req, &flag, MPI_STATUS_IGNORE);
    if (!flag) {
      ++it;
      continue;
    }
    PendingData& pd = **it;
    pd.partial->received += pd.bytes;
    peers_[static_cast<std::size_t>(pd.src)]->last_seen = Clock::now();
    Stream& stream = *streams_[static_cast<std::size_t>(pd.src * static_cast<int>(TransferKind::kCount) + pd.kind)];
    it = data_receives_.erase(it);
    flush(stream);
    progressed = true;
  }
  return progressed;
}

void MpiTransport::heartbeats_and_timeouts() {
  MPI_Comm comm = comm_of(comm_);
  const auto now = Clock::now();
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    PeerOut& p = *peers_[static_cast<std::size_t>(q)];
    if (p.failed) continue;
    if (p.heartbeat != MPI_REQUEST_NULL) {
      int flag = 0;
      MPI_Test(&p.heartbeat, &flag, MPI_STATUS_IGNORE);
    }
    // Heartbeats go on until this rank says goodbye, also to peers that already did: they wait
    // for our goodbye and must see that we are alive meanwhile.
    if (!p.goodbye_sent && p.heartbeat == MPI_REQUEST_NULL && now >= p.next_heartbeat) {
      MPI_Isend(nullptr, 0, MPI_BYTE, q, kTagHeartbeat, comm, &p.heartbeat);
      p.next_heartbeat = now + options_.heartbeat_period;
    }
    if (!p.goodbye_received && now - p.last_seen > options_.peer_timeout) {
      fail_peer(q, unavailable("rank " + std::to_string(q) + " stopped answering: nothing received for " +
                               std::to_string(static_cast<std::int64_t>(ms_between(p.last_seen, now))) +
                               " ms (peer timeout " + std::to_string(options_.peer_timeout.count()) + " ms)"));
    }
  }
}

bool MpiTransport::anything_in_flight() const {
  if (!latency_in_flight_.empty() || !data_receives_.empty()) return true;
  for (const auto& p : peers_) {
    if (p->chunk_in_flight || !p->bulk.empty()) return true;
  }
  return false;
}

void MpiTransport::progress_loop() {
  std::chrono::microseconds sleep{0};
  bool stopping = false;
  Clock::time_point deadline{};
  Clock::time_point last_progress = Clock::now();
  while (true) {
    if (hung_.load()) {
      // A hung rank: no MPI call at all until it is killed (or the transport is destroyed).
      std::unique_lock<std::mutex> lock(mu_);
      wake_cv_.wait_for(lock, std::chrono::milliseconds(100), [&] { return stopping_; });
      if (stopping_) return;
      continue;
    }
    bool progressed = take_submitted();
    progressed |= post_bulk_chunks();
    progressed |= test_sends();
    progressed |= receive_messages();
    progressed |= test_data_receives();
    heartbeats_and_timeouts();
    if (!stopping) {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) {
        stopping = true;
        deadline = Clock::now() + options_.shutdown_timeout;
      }
    }
    if (stopping && finish_shutdown(deadline)) return;
    const auto now = Clock::now();
    if (progressed) {
      sleep = std::chrono::microseconds(0);
      last_progress = now;
      continue;
    }
    // Poll briefly while anything is in flight, and for a moment after the last progress (the
    // next chunk of a bulk message is usually about to arrive); back off after that.
    if (anything_in_flight() || stopping || now - last_progress < options_.active_window) {
      sleep = options_.busy_poll_sleep;
    } else {
      sleep = std::min(options_.max_idle_sleep, std::max(std::chrono::microseconds(10), sleep * 2));
    }
    if (sleep.count() == 0) {
      std::this_thread::yield();  // busy_poll_sleep 0: poll without sleeping while busy
      continue;
    }
    std::unique_lock<std::mutex> lock(mu_);
    wake_cv_.wait_for(lock, sleep, [&] { return !submitted_.empty() || (stopping_ && !stopping); });
  }
}

// Shutdown phase: once every queued send is out, say goodbye to each live peer; done when each
// live peer said goodbye too and our goodbyes are sent (or at the deadline).
bool MpiTransport::finish_shutdown(Clock::time_point deadline) {
  MPI_Comm comm = comm_of(comm_);
  const bool timed_out = Clock::now() > deadline;
  bool sends_out = !anything_in_flight();
  {
    std::lock_guard<std::mutex> lock(mu_);
    sends_out = sends_out && submitted_.empty();
  }
  if (!sends_out && !timed_out) return false;
  bool done = true;
  std::string missing;
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    PeerOut& p = *peers_[static_cast<std::size_t>(q)];
    if (p.failed) continue;
    if (!p.goodbye_sent) {
      MPI_Isend(nullptr, 0, MPI_BYTE, q, kTagGoodbye, comm, &p.goodbye);
      p.goodbye_sent = true;
    }
    for (MPI_Request* r : {&p.goodbye, &p.heartbeat}) {
      if (*r == MPI_REQUEST_NULL) continue;
      int flag = 0;
      MPI_Test(r, &flag, MPI_STATUS_IGNORE);
      if (!flag) done = false;
    }
    if (!p.goodbye_received) {
      done = false;
      missing += (missing.empty() ? "" : ", ") + std::to_string(q);
    }
  }
  if (done) {
    std::lock_guard<std::mutex> lock(mu_);
    if (failure_.ok()) {
      MPI_Comm_free(static_cast<MPI_Comm*>(comm_));
    } else {
      shutdown_status_ = failure_;  // a peer failed: MPI_Finalize could wait for it forever
    }
    return true;
  }
  if (!timed_out) return false;
  std::lock_guard<std::mutex> lock(mu_);
  shutdown_status_ = unavailable("rank " + std::to_string(rank_) + ": shutdown timed out after " +
                                 std::to_string(options_.shutdown_timeout.count()) + " ms" +
                                 (missing.empty() ? std::string(" with sends in flight") : "; no goodbye from rank(s) " + missing));
  return true;
}

}  // namespace kun::runtime::mpi
