#include "runtime/mpi/mpi_transport.h"

#include <mpi.h>
#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
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

// One posted piece of a message: its prefix and (unless empty) its payload bytes.
struct MpiTransport::Chunk {
  std::vector<std::byte> prefix;
  MPI_Request reqs[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
};

struct MpiTransport::OutMsg {
  MessageHeader header;
  std::vector<std::byte> header_bytes;
  std::span<const std::byte> source;
  std::vector<std::byte> owned;
  std::shared_ptr<detail::SharedState<detail::NoValue>> done;
  bool started = false;
  std::int64_t sent = 0;     // payload bytes posted so far
  std::deque<Chunk> chunks;  // posted, not yet completed, oldest first
  bool fully_posted() const { return started && sent == static_cast<std::int64_t>(source.size()); }
};

struct MpiTransport::PeerOut {
  // FIFO across bulk kinds: messages with chunks in flight or still to post, oldest first.
  std::deque<std::unique_ptr<OutMsg>> bulk;
  int chunks_in_flight = 0;
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
  if (options.bulk_window_chunks < 1) {
    return invalid_argument("bulk window of " + std::to_string(options.bulk_window_chunks) + " chunks");
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
  t->setup_doorbells();
  t->setup_process_watch();
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
  for (int k = 0; k < static_cast<int>(TransferKind::kCount); ++k) {
    if (!is_bulk_transfer(static_cast<TransferKind>(k))) latency_tags_.push_back(data_tag(static_cast<TransferKind>(k)));
  }
  peer_failures_.assign(static_cast<std::size_t>(size_), ok_status());
  can_ring_.assign(static_cast<std::size_t>(size_), 0);
  ring_.assign(static_cast<std::size_t>(size_), 0);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  KUN_CHECK_GE(wake_fd_, 0) << "eventfd: " << std::strerror(errno);
}

MpiTransport::~MpiTransport() {
  (void)shutdown();
  if (doorbell_fd_ >= 0) close(doorbell_fd_);
  if (wake_fd_ >= 0) close(wake_fd_);
  for (int fd : peer_pidfds_) {
    if (fd >= 0) close(fd);
  }
  for (int fd : failed_pidfds_) {
    if (fd >= 0) close(fd);
  }
  delete static_cast<MPI_Comm*>(comm_);
}

namespace {
sockaddr_un doorbell_address(const std::string& name, socklen_t* len) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  // Abstract namespace: a leading NUL, no file to clean up, gone when the socket closes.
  KUN_CHECK_LT(name.size() + 1, sizeof(a.sun_path)) << name;
  std::memcpy(a.sun_path + 1, name.data(), name.size());
  *len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size());
  return a;
}
}  // namespace

// Collective: every rank binds its doorbell under a name unique to this job (rank 0's pid and
// clock, broadcast), then rings every peer once; a ring that fails (a peer on another host, or
// sockets refused) leaves that peer on polling. Every rank learns who can ring it.
void MpiTransport::setup_doorbells() {
  MPI_Comm comm = comm_of(comm_);
  std::uint64_t job = 0;
  if (rank_ == 0) {
    job = static_cast<std::uint64_t>(getpid()) * 0x9e3779b97f4a7c15ull ^
          static_cast<std::uint64_t>(Clock::now().time_since_epoch().count());
  }
  MPI_Bcast(&job, 1, MPI_UINT64_T, 0, comm);
  for (int q = 0; q < size_; ++q) {
    doorbell_names_.push_back("kun-mpi-" + std::to_string(job) + "-" + std::to_string(q));
  }
  if (options_.doorbells) {
    doorbell_fd_ = socket(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (doorbell_fd_ >= 0) {
      socklen_t len = 0;
      const sockaddr_un a = doorbell_address(doorbell_names_[static_cast<std::size_t>(rank_)], &len);
      if (bind(doorbell_fd_, reinterpret_cast<const sockaddr*>(&a), len) != 0) {
        close(doorbell_fd_);
        doorbell_fd_ = -1;
      }
    }
  }
  MPI_Barrier(comm);  // every doorbell is bound (or failed) before anyone rings
  std::vector<int> reach(static_cast<std::size_t>(size_), 0);
  for (int q = 0; q < size_; ++q) {
    if (q == rank_ || doorbell_fd_ < 0) continue;
    socklen_t len = 0;
    const sockaddr_un a = doorbell_address(doorbell_names_[static_cast<std::size_t>(q)], &len);
    const char byte = 0;
    reach[static_cast<std::size_t>(q)] =
        sendto(doorbell_fd_, &byte, 1, MSG_DONTWAIT, reinterpret_cast<const sockaddr*>(&a), len) == 1 ? 1 : 0;
  }
  std::vector<int> all(static_cast<std::size_t>(size_) * static_cast<std::size_t>(size_), 0);
  MPI_Allgather(reach.data(), size_, MPI_INT, all.data(), size_, MPI_INT, comm);
  every_peer_rings_ = size_ > 1;
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    can_ring_[static_cast<std::size_t>(q)] = static_cast<char>(reach[static_cast<std::size_t>(q)]);
    if (!all[static_cast<std::size_t>(q * size_ + rank_)]) every_peer_rings_ = false;
  }
}

namespace {
// Processes on the same machine and in the same pid namespace share this key: only there does a
// peer's pid name its process.
std::uint64_t process_space_key() {
  std::string text;
  char host[256] = {};
  if (gethostname(host, sizeof(host) - 1) == 0) text += host;
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string boot_id;
  std::getline(boot, boot_id);
  text += "|" + boot_id;
  struct stat ns {};
  if (stat("/proc/self/ns/pid", &ns) == 0) text += "|" + std::to_string(ns.st_dev) + ":" + std::to_string(ns.st_ino);
  std::uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char c : text) h = (h ^ c) * 1099511628211ull;
  return h;
}
}  // namespace

// Collective: every rank learns each peer's pid and whether it shares this rank's process space;
// for those that do, a pidfd (Linux >= 5.3) becomes readable when the peer's process exits.
void MpiTransport::setup_process_watch() {
  MPI_Comm comm = comm_of(comm_);
  const std::uint64_t mine[2] = {static_cast<std::uint64_t>(getpid()), process_space_key()};
  std::vector<std::uint64_t> all(2 * static_cast<std::size_t>(size_), 0);
  MPI_Allgather(mine, 2, MPI_UINT64_T, all.data(), 2, MPI_UINT64_T, comm);
  peer_pidfds_.assign(static_cast<std::size_t>(size_), -1);
  failed_pidfds_.assign(static_cast<std::size_t>(size_), -1);
  peer_pids_.assign(static_cast<std::size_t>(size_), -1);
  for (int q = 0; q < size_; ++q) {
    const std::size_t i = static_cast<std::size_t>(q);
    peer_pids_[i] = static_cast<long>(all[2 * i]);
    if (q == rank_ || !options_.watch_peer_processes || all[2 * i + 1] != mine[1]) continue;
#ifdef SYS_pidfd_open
    const long fd = syscall(SYS_pidfd_open, static_cast<pid_t>(all[2 * i]), 0);
    if (fd >= 0) peer_pidfds_[i] = static_cast<int>(fd);  // else: heartbeats only (old kernel, no permission)
#endif
  }
}

void MpiTransport::check_peer_processes() {
  for (int q = 0; q < size_; ++q) {
    int& fd = peer_pidfds_[static_cast<std::size_t>(q)];
    if (fd < 0) continue;
    PeerOut& p = *peers_[static_cast<std::size_t>(q)];
    if (!p.failed && !p.goodbye_received) {
      pollfd pfd{fd, POLLIN, 0};
      if (poll(&pfd, 1, 0) <= 0) continue;
      // It exited. Whatever it sent before is already here: take it (its goodbye, if it said one).
      while (receive_messages()) {
      }
      if (!p.goodbye_received) {
        fail_peer(q, unavailable("rank " + std::to_string(q) + " died: its process (pid " +
                                 std::to_string(peer_pids_[static_cast<std::size_t>(q)]) + ") exited without saying goodbye"));
      }
    }
    // Failed or gone in order: nothing more to watch (a readable pidfd would wake us each time).
    if (p.failed) {
      failed_pidfds_[static_cast<std::size_t>(q)] = fd;  // kept for terminate_failed_peers
    } else {
      close(fd);
    }
    fd = -1;
  }
}

void MpiTransport::ring_doorbells() {
  for (int q = 0; q < size_; ++q) {
    if (!ring_[static_cast<std::size_t>(q)]) continue;
    ring_[static_cast<std::size_t>(q)] = 0;
    if (!can_ring_[static_cast<std::size_t>(q)]) continue;
    socklen_t len = 0;
    const sockaddr_un a = doorbell_address(doorbell_names_[static_cast<std::size_t>(q)], &len);
    const char byte = 1;
    // A full socket buffer (EAGAIN) means the peer has rings pending: it wakes anyway.
    (void)sendto(doorbell_fd_, &byte, 1, MSG_DONTWAIT, reinterpret_cast<const sockaddr*>(&a), len);
  }
}

bool MpiTransport::wait_for_wake(std::chrono::microseconds timeout, bool doorbell_too) {
  pollfd fds[64];
  fds[0] = {wake_fd_, POLLIN, 0};
  fds[1] = {doorbell_fd_, POLLIN, 0};
  nfds_t n = doorbell_too && doorbell_fd_ >= 0 ? 2 : 1;
  const nfds_t first_pidfd = n;
  if (doorbell_too) {  // a peer's exit wakes this rank too (past 62 peers: the 1 ms check only)
    for (int fd : peer_pidfds_) {
      if (fd >= 0 && n < 64) fds[n++] = {fd, POLLIN, 0};
    }
  }
  const auto us = std::max<std::int64_t>(0, timeout.count());
  timespec ts{static_cast<time_t>(us / 1000000), static_cast<long>((us % 1000000) * 1000)};
  const int rc = ppoll(fds, n, &ts, nullptr);
  if (rc <= 0) return false;
  for (nfds_t i = first_pidfd; i < n; ++i) {
    if (fds[i].revents != 0) next_process_check_ = Clock::time_point{};  // check at once
  }
  if (fds[0].revents & POLLIN) {
    std::uint64_t v = 0;
    (void)!read(wake_fd_, &v, sizeof(v));
  }
  if (first_pidfd == 2 && (fds[1].revents & POLLIN)) {
    char buf[64];
    while (::recv(doorbell_fd_, buf, sizeof(buf), MSG_DONTWAIT) > 0) {
    }
  }
  return true;
}

void MpiTransport::recycle(std::vector<std::byte> payload) {
  const auto bytes = static_cast<std::int64_t>(payload.capacity());
  if (bytes < options_.min_recycled_bytes || bytes > options_.receive_pool_bytes) return;
  std::lock_guard<std::mutex> lock(pool_mu_);
  // Make room by evicting the smallest buffers.
  while (pool_bytes_ + bytes > options_.receive_pool_bytes && !pool_.empty()) {
    auto smallest = std::min_element(pool_.begin(), pool_.end(),
                                     [](const auto& a, const auto& b) { return a.capacity() < b.capacity(); });
    pool_bytes_ -= static_cast<std::int64_t>(smallest->capacity());
    pool_.erase(smallest);
  }
  pool_bytes_ += bytes;
  pool_.push_back(std::move(payload));
}

std::vector<std::byte> MpiTransport::take_buffer(std::int64_t bytes) {
  const auto n = static_cast<std::size_t>(bytes);
  if (bytes >= options_.min_recycled_bytes) {
    std::lock_guard<std::mutex> lock(pool_mu_);
    auto best = pool_.end();
    for (auto it = pool_.begin(); it != pool_.end(); ++it) {
      if (it->size() >= n && (best == pool_.end() || it->size() < best->size())) best = it;
    }
    if (best == pool_.end()) {  // one with room: growing within capacity fills only the gap
      for (auto it = pool_.begin(); it != pool_.end(); ++it) {
        if (it->capacity() >= n && (best == pool_.end() || it->capacity() < best->capacity())) best = it;
      }
    }
    if (best != pool_.end()) {
      std::vector<std::byte> v = std::move(*best);
      pool_bytes_ -= static_cast<std::int64_t>(v.capacity());
      pool_.erase(best);
      v.resize(n);  // shrinking neither allocates nor fills; the receive overwrites every byte
      return v;
    }
  }
  return std::vector<std::byte>(n);
}

void MpiTransport::wake() {
  const std::uint64_t one = 1;
  (void)!write(wake_fd_, &one, sizeof(one));
}

RecvHandle MpiTransport::recv(RecvMatch match) {
  RecvHandle handle = mailbox_.recv(match);
  bool closed = false;
  {
    std::lock_guard<std::mutex> lock(mu_);
    closed = receives_closed_;
  }
  if (closed) {
    mailbox_.fail_all(unavailable("transport of rank " + std::to_string(rank_) + " shut down"));
    return handle;
  }
  if (match.src != kAnySource && match.src >= 0 && match.src < size_) {
    // fail_peer records the failure before it fails the waiting receives: a receive registered
    // after that sweep sees the record here.
    Status failed;
    {
      std::lock_guard<std::mutex> lock(mu_);
      failed = peer_failures_[static_cast<std::size_t>(match.src)];
    }
    if (!failed.ok()) mailbox_.fail_from(match.src, failed, /*fail_any_source=*/false);
  }
  return handle;
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
  wake();
  return handle;
}

Status MpiTransport::failure() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failure_;
}

bool MpiTransport::terminate_peer(int rank) {
  if (rank < 0 || rank >= size_ || rank == rank_) return false;
  const int fd = peer_pidfds_[static_cast<std::size_t>(rank)] >= 0 ? peer_pidfds_[static_cast<std::size_t>(rank)]
                                                                    : failed_pidfds_[static_cast<std::size_t>(rank)];
  if (fd < 0) return false;
  pollfd pfd{fd, POLLIN, 0};
  if (poll(&pfd, 1, 0) > 0) return false;  // already exited
#ifdef SYS_pidfd_send_signal
  return syscall(SYS_pidfd_send_signal, fd, SIGKILL, nullptr, 0) == 0;
#else
  return false;
#endif
}

std::vector<int> MpiTransport::terminate_failed_peers() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    KUN_CHECK(stopped_) << "terminate_failed_peers() before shutdown()";
  }
  std::vector<int> signalled;
  for (int q : failed_peers()) {
    if (terminate_peer(q)) signalled.push_back(q);
  }
  return signalled;
}

Status MpiTransport::peer_failure(int rank) const {
  KUN_CHECK(rank >= 0 && rank < size_) << "rank " << rank;
  std::lock_guard<std::mutex> lock(mu_);
  return peer_failures_[static_cast<std::size_t>(rank)];
}

std::vector<int> MpiTransport::failed_peers() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failed_peers_;
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
  wake();
  if (progress_.joinable()) progress_.join();
  {
    std::lock_guard<std::mutex> lock(mu_);
    receives_closed_ = true;  // a receive registered after the sweep below fails at once (recv())
  }
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
  if (options_.on_peer_failure) options_.on_peer_failure(peer, s);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (failure_.ok()) failure_ = s;
    peer_failures_[static_cast<std::size_t>(peer)] = s;
    failed_peers_.insert(std::upper_bound(failed_peers_.begin(), failed_peers_.end(), peer), peer);
  }
  failure_cv_.notify_all();
  mailbox_.fail_from(peer, s, /*fail_any_source=*/false);
  auto drop = [&](OutMsg& m) {
    for (Chunk& c : m.chunks) {
      for (MPI_Request& r : c.reqs) {
        if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
      }
    }
    m.chunks.clear();
    m.done->complete(s);
  };
  for (auto& m : p.bulk) drop(*m);
  p.bulk.clear();
  p.chunks_in_flight = 0;
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
  // Receives of its messages' bytes will not complete: set them aside (their buffers stay alive,
  // MPI may still hold them) so that nothing counts as in flight, and drop its partial messages.
  for (auto it = data_receives_.begin(); it != data_receives_.end();) {
    if ((*it)->src == peer) {
      abandoned_receives_.push_back(std::move(*it));
      it = data_receives_.erase(it);
    } else {
      ++it;
    }
  }
  for (int k = 0; k < static_cast<int>(TransferKind::kCount); ++k) {
    streams_[static_cast<std::size_t>(peer * static_cast<int>(TransferKind::kCount) + k)]->queue.clear();
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
  Chunk& c = m.chunks.emplace_back();
  c.prefix.resize(sizeof(WirePrefix) + wp.header_bytes);
  std::memcpy(c.prefix.data(), &wp, sizeof(WirePrefix));
  if (wp.header_bytes > 0) std::memcpy(c.prefix.data() + sizeof(WirePrefix), m.header_bytes.data(), wp.header_bytes);
  const int dst = m.header.dst;
  const int tag = data_tag(m.header.kind);
  int rc = MPI_Isend(c.prefix.data(), static_cast<int>(c.prefix.size()), MPI_BYTE, dst, tag, comm, &c.reqs[0]);
  if (rc == MPI_SUCCESS && n > 0) {
    rc = MPI_Isend(m.source.data() + m.sent, static_cast<int>(n), MPI_BYTE, dst, tag, comm, &c.reqs[1]);
  }
  m.started = true;
  m.sent += n;
  ring_[static_cast<std::size_t>(dst)] = 1;
  if (rc != MPI_SUCCESS) {
    const Status s = unavailable("MPI_Isend to rank " + std::to_string(dst) + " failed (error " + std::to_string(rc) + ")");
    for (Chunk& k : m.chunks) {
      for (MPI_Request& r : k.reqs) {
        if (r != MPI_REQUEST_NULL) MPI_Request_free(&r);
      }
    }
    m.chunks.clear();
    m.done->complete(s);
    fail_peer(dst, s);
    return false;
  }
  return true;
}

// Keeps up to bulk_window_chunks chunks in flight per destination, in FIFO order over messages.
bool MpiTransport::post_bulk_chunks() {
  bool progressed = false;
  for (auto& peer : peers_) {
    PeerOut& p = *peer;
    for (std::size_t i = 0; i < p.bulk.size() && !p.failed && p.chunks_in_flight < options_.bulk_window_chunks;) {
      OutMsg& m = *p.bulk[i];
      if (m.fully_posted()) {
        ++i;
        continue;
      }
      const std::int64_t n = std::min(options_.bulk_chunk_bytes, static_cast<std::int64_t>(m.source.size()) - m.sent);
      if (!post(m, n)) break;  // the peer failed: fail_peer dropped its queue
      ++p.chunks_in_flight;
      progressed = true;
    }
  }
  return progressed;
}

bool MpiTransport::test_sends() {
  bool progressed = false;
  for (auto it = latency_in_flight_.begin(); it != latency_in_flight_.end();) {
    int flag = 0;
    MPI_Testall(2, (*it)->chunks.front().reqs, &flag, MPI_STATUSES_IGNORE);
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
    if (p.chunks_in_flight == 0) continue;
    for (auto& mp : p.bulk) {
      OutMsg& m = *mp;
      if (m.chunks.empty()) break;  // later messages have nothing posted yet
      while (!m.chunks.empty()) {
        int flag = 0;
        MPI_Testall(2, m.chunks.front().reqs, &flag, MPI_STATUSES_IGNORE);
        if (!flag) break;
        m.chunks.pop_front();
        --p.chunks_in_flight;
        progressed = true;
      }
      if (!m.chunks.empty()) break;  // chunks complete in order: nothing later is done either
    }
    while (!p.bulk.empty() && p.bulk.front()->fully_posted() && p.bulk.front()->chunks.empty()) {
      p.bulk.front()->done->complete(ok_status());
      p.bulk.pop_front();
    }
  }
  return progressed;
}

bool MpiTransport::receive_messages() {
  MPI_Comm comm = comm_of(comm_);
  bool progressed = false;
  for (int i = 0; i < 256; ++i) {
    int flag = 0;
    MPI_Message msg = MPI_MESSAGE_NULL;
    MPI_Status st;
    // Latency-bound tags first: an activation that arrived behind bulk chunks is taken before
    // the next chunk's receive is posted (whose copy would otherwise run first).
    for (int tag : latency_tags_) {
      MPI_Improbe(MPI_ANY_SOURCE, tag, comm, &flag, &msg, &st);
      if (flag) break;
    }
    if (!flag) MPI_Improbe(MPI_ANY_SOURCE, MPI_ANY_TAG, comm, &flag, &msg, &st);
    if (!flag) break;
    if (i == 255) progressed = true;  // more may be waiting: come back at once
    const int src = st.MPI_SOURCE;
    const int tag = st.MPI_TAG;
    int count = 0;
    MPI_Get_count(&st, MPI_BYTE, &count);
    PeerOut& p = *peers_[static_cast<std::size_t>(src)];
    p.last_seen = Clock::now();
    std::vector<std::byte> buf(static_cast<std::size_t>(count));
    MPI_Mrecv(buf.data(), count, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
    if (tag == kTagHeartbeat) continue;  // not progress: an idle rank goes back to sleep
    if (tag == kTagGoodbye) {
      p.goodbye_received = true;
      continue;
    }
    if (p.failed) continue;  // declared failed: what it still had in flight is dropped with it
    progressed = true;
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
      partial->message.payload = take_buffer(wp.total_bytes);
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
  if (now >= next_process_check_) {  // one poll() per millisecond at most, or at once on a pidfd event
    check_peer_processes();
    next_process_check_ = now + std::chrono::milliseconds(1);
  }
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
    if (p->chunks_in_flight > 0 || !p->bulk.empty()) return true;
  }
  return false;
}

// How long an idle progress thread may sleep: until the next heartbeat is due or a peer's
// silence would exceed peer_timeout; at most max_idle_sleep (backing off) if a peer cannot ring.
std::chrono::microseconds MpiTransport::idle_timeout(Clock::time_point now) {
  Clock::time_point until = now + std::chrono::milliseconds(100);
  for (int q = 0; q < size_; ++q) {
    if (q == rank_) continue;
    const PeerOut& p = *peers_[static_cast<std::size_t>(q)];
    if (p.failed) continue;
    if (!p.goodbye_sent) until = std::min(until, p.next_heartbeat);
    if (!p.goodbye_received) until = std::min(until, p.last_seen + options_.peer_timeout + std::chrono::milliseconds(1));
  }
  return std::chrono::duration_cast<std::chrono::microseconds>(until - now) + std::chrono::microseconds(1);
}

void MpiTransport::progress_loop() {
  std::chrono::microseconds backoff{0};
  bool stopping = false;
  Clock::time_point deadline{};
  Clock::time_point last_progress = Clock::now();
  while (true) {
    if (hung_.load()) {
      // A hung rank: no MPI call at all until it is killed (or the transport is destroyed).
      (void)wait_for_wake(std::chrono::milliseconds(100), /*doorbell_too=*/false);
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      continue;
    }
    bool progressed = take_submitted();
    progressed |= post_bulk_chunks();
    progressed |= test_sends();
    progressed |= receive_messages();
    progressed |= test_data_receives();
    if (progressed) progressed |= post_bulk_chunks();  // refill the window freed just now
    heartbeats_and_timeouts();
    if (!stopping) {
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) {
        stopping = true;
        deadline = Clock::now() + options_.shutdown_timeout;
      }
    }
    const bool done = stopping && finish_shutdown(deadline);
    ring_doorbells();
    if (done) return;
    const auto now = Clock::now();
    if (progressed) {
      backoff = std::chrono::microseconds(0);
      last_progress = now;
      continue;
    }
    const bool recent = now - last_progress < options_.active_window;
    std::chrono::microseconds timeout;
    if (anything_in_flight() && recent) {
      // Requests in flight and moving: this thread does the copies, keep at it.
      if (options_.busy_poll_sleep.count() == 0) {
        std::this_thread::yield();
        continue;
      }
      timeout = options_.busy_poll_sleep;
    } else if (anything_in_flight() || recent) {
      timeout = options_.active_poll_sleep;  // a stalled peer, or a message likely to follow
    } else {
      timeout = idle_timeout(now);
      if (!every_peer_rings_ || stopping) {
        backoff = std::min(options_.max_idle_sleep, std::max(std::chrono::microseconds(10), backoff * 2));
        timeout = std::min(timeout, backoff);
      }
    }
    // Woken by a send or a doorbell: a message is probably waiting, stay active a while.
    if (wait_for_wake(timeout, /*doorbell_too=*/true)) last_progress = Clock::now();
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
      ring_[static_cast<std::size_t>(q)] = 1;
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
