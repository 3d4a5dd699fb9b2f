#include "runtime/message_transport.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "common/check.h"
#include "runtime/wire_format.h"

namespace kun::runtime {

// ---- header encoding -------------------------------------------------------------------------

namespace {
constexpr std::uint32_t kHeaderMagic = 0x4b554e4d;  // "KUNM"
constexpr std::int64_t kMaxBlockIds = std::int64_t{1} << 24;

using wire::put;
using wire::put_ids;
}  // namespace

std::vector<std::byte> encode_header(const MessageHeader& h) {
  std::vector<std::byte> out;
  out.reserve(96 + 8 * (h.block_ids.size() + h.peer_block_ids.size()));
  put(out, kHeaderMagic);
  put(out, static_cast<std::int32_t>(h.src));
  put(out, static_cast<std::int32_t>(h.dst));
  put(out, static_cast<std::uint8_t>(h.kind));
  put(out, static_cast<std::uint8_t>(h.port));
  put(out, h.op);
  put(out, h.error);
  put(out, h.tag);
  put(out, static_cast<std::int32_t>(h.reply_to));
  put(out, static_cast<std::int32_t>(h.peer));
  put(out, h.request_id);
  put(out, h.layer);
  put(out, h.start_pos);
  put(out, h.num_tokens);
  put_ids(out, h.block_ids);
  put_ids(out, h.peer_block_ids);
  return out;
}

StatusOr<MessageHeader> decode_header(std::span<const std::byte> bytes) {
  wire::Reader r(bytes, kMaxBlockIds);
  MessageHeader h;
  std::uint32_t magic = 0;
  std::int32_t src = 0, dst = 0, reply_to = 0, peer = 0;
  std::uint8_t kind = 0, port = 0;
  bool ok = r.get(&magic) && r.get(&src) && r.get(&dst) && r.get(&kind) && r.get(&port) && r.get(&h.op) &&
            r.get(&h.error) && r.get(&h.tag) && r.get(&reply_to) && r.get(&peer) && r.get(&h.request_id) &&
            r.get(&h.layer) && r.get(&h.start_pos) && r.get(&h.num_tokens) && r.get_ids(&h.block_ids) &&
            r.get_ids(&h.peer_block_ids) && r.at_end();
  if (!ok || magic != kHeaderMagic) {
    return data_loss("malformed message header (" + std::to_string(bytes.size()) + " bytes)");
  }
  if (kind >= static_cast<std::uint8_t>(TransferKind::kCount) || port > static_cast<std::uint8_t>(Port::kStage)) {
    return data_loss("message header names kind " + std::to_string(kind) + " port " + std::to_string(port));
  }
  h.src = src;
  h.dst = dst;
  h.reply_to = reply_to;
  h.peer = peer;
  h.kind = static_cast<TransferKind>(kind);
  h.port = static_cast<Port>(port);
  return h;
}

// ---- Mailbox ---------------------------------------------------------------------------------

void Mailbox::deliver(Message m) {
  std::shared_ptr<detail::SharedState<Message>> state;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = waiters_.begin(); it != waiters_.end(); ++it) {
      if (it->match.matches(m.header)) {
        state = std::move(it->state);
        waiters_.erase(it);
        break;
      }
    }
    if (!state) {
      arrived_.push_back(std::move(m));
      return;
    }
  }
  state->complete(ok_status(), std::move(m));
}

RecvHandle Mailbox::recv(const RecvMatch& match) {
  auto state = std::make_shared<detail::SharedState<Message>>();
  std::unique_lock<std::mutex> lock(mu_);
  for (auto it = arrived_.begin(); it != arrived_.end(); ++it) {
    if (match.matches(it->header)) {
      Message m = std::move(*it);
      arrived_.erase(it);
      lock.unlock();
      state->complete(ok_status(), std::move(m));
      return RecvHandle(state);
    }
  }
  waiters_.push_back(Waiter{match, state});
  return RecvHandle(state);
}

void Mailbox::fail_from(int src, const Status& s, bool fail_any_source) {
  std::vector<std::shared_ptr<detail::SharedState<Message>>> failed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = waiters_.begin(); it != waiters_.end();) {
      if (it->match.src == src || (fail_any_source && it->match.src == kAnySource)) {
        failed.push_back(std::move(it->state));
        it = waiters_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (auto& f : failed) f->complete(s);
}

void Mailbox::fail_all(const Status& s) {
  std::list<Waiter> failed;
  {
    std::lock_guard<std::mutex> lock(mu_);
    failed.swap(waiters_);
  }
  for (auto& w : failed) w.state->complete(s);
}

std::int64_t Mailbox::num_waiting_receives() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<std::int64_t>(waiters_.size());
}

// ---- TransferCounters ------------------------------------------------------------------------

void TransferCounters::count(TransferKind kind, std::int64_t bytes) {
  bytes_[static_cast<std::size_t>(kind)].fetch_add(bytes, std::memory_order_relaxed);
  messages_[static_cast<std::size_t>(kind)].fetch_add(1, std::memory_order_relaxed);
}

TransferStats TransferCounters::stats() const {
  TransferStats s;
  for (std::size_t i = 0; i < s.bytes.size(); ++i) {
    s.bytes[i] = bytes_[i].load(std::memory_order_relaxed);
    s.messages[i] = messages_[i].load(std::memory_order_relaxed);
  }
  s.bulk_chunks_deferred = deferred_.load(std::memory_order_relaxed);
  return s;
}

// ---- InProcessMessageHub ---------------------------------------------------------------------

class InProcessMessageHub::Endpoint final : public MessageTransport {
 public:
  Endpoint(InProcessMessageHub* hub, int device) : hub_(hub), device_(device) {}
  int device() const override { return device_; }
  int num_devices() const override { return hub_->num_devices(); }
  SendHandle send(MessageHeader header, std::span<const std::byte> payload) override {
    auto out = std::make_unique<Outgoing>();
    out->message.header = std::move(header);
    out->source = payload;
    return hub_->submit(device_, std::move(out));
  }
  SendHandle send_owned(MessageHeader header, std::vector<std::byte> payload) override {
    auto out = std::make_unique<Outgoing>();
    out->message.header = std::move(header);
    out->owned = std::move(payload);
    out->source = out->owned;
    return hub_->submit(device_, std::move(out));
  }
  RecvHandle recv(RecvMatch match) override { return mailbox_.recv(match); }
  std::uint64_t next_tag() override { return next_tag_.fetch_add(1, std::memory_order_relaxed); }
  TransferStats stats() const override { return hub_->stats(); }
  Mailbox& mailbox() { return mailbox_; }

 private:
  InProcessMessageHub* hub_;
  int device_;
  Mailbox mailbox_;
  std::atomic<std::uint64_t> next_tag_{1};
};

namespace {
using Clock = std::chrono::steady_clock;
Clock::duration link_duration(const LinkModel& link, std::int64_t bytes, bool with_latency) {
  double seconds = with_latency ? static_cast<double>(link.latency_us) * 1e-6 : 0.0;
  if (link.bandwidth_bytes_per_s > 0) seconds += static_cast<double>(bytes) / link.bandwidth_bytes_per_s;
  return std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}
}  // namespace

InProcessMessageHub::InProcessMessageHub(int num_devices, LinkModel link, int unpaced_endpoint)
    : link_(link), unpaced_endpoint_(unpaced_endpoint) {
  KUN_CHECK_GT(num_devices, 0);
  for (int d = 0; d < num_devices; ++d) endpoints_.push_back(std::make_unique<Endpoint>(this, d));
}

InProcessMessageHub::~InProcessMessageHub() {
  std::vector<Link*> links;
  {
    std::lock_guard<std::mutex> lock(links_mu_);
    for (auto& [key, l] : links_) links.push_back(l.get());
  }
  for (Link* l : links) {
    {
      std::lock_guard<std::mutex> lock(l->mu);
      l->stopping = true;
    }
    l->cv.notify_all();
    l->thread.join();
  }
  for (auto& e : endpoints_) e->mailbox().fail_all(unavailable("transport shut down"));
}

MessageTransport& InProcessMessageHub::endpoint(int device) {
  KUN_CHECK(device >= 0 && device < num_devices()) << "device " << device << " of " << num_devices();
  return *endpoints_[static_cast<std::size_t>(device)];
}

SendHandle InProcessMessageHub::submit(int src, std::unique_ptr<Outgoing> out) {
  MessageHeader& h = out->message.header;
  h.src = src;
  if (h.reply_to < 0) h.reply_to = src;
  KUN_CHECK(h.dst >= 0 && h.dst < num_devices()) << "message to device " << h.dst << " of " << num_devices();
  KUN_CHECK(h.kind != TransferKind::kSwapOut && h.kind != TransferKind::kSwapIn) << "swap copies go over the host link";
  out->done = std::make_shared<detail::SharedState<detail::NoValue>>();
  SendHandle handle(out->done);
  const auto bytes = static_cast<std::int64_t>(out->source.size());
  out->message.payload.resize(static_cast<std::size_t>(bytes));
  if (h.dst != src) counters_.count(h.kind, bytes);
  if (h.dst == src || !link_.enabled() || src == unpaced_endpoint_ || h.dst == unpaced_endpoint_) {
    if (bytes > 0) std::memcpy(out->message.payload.data(), out->source.data(), static_cast<std::size_t>(bytes));
    deliver(std::move(out));
    return handle;
  }
  Link& l = link_for(src, h.dst);
  {
    std::lock_guard<std::mutex> lock(l.mu);
    (is_bulk_transfer(h.kind) ? l.bulk : l.latency).push_back(std::move(out));
  }
  l.cv.notify_one();
  return handle;
}

void InProcessMessageHub::deliver(std::unique_ptr<Outgoing> out) {
  auto done = std::move(out->done);
  const int dst = out->message.header.dst;
  endpoints_[static_cast<std::size_t>(dst)]->mailbox().deliver(std::move(out->message));
  done->complete(ok_status());
}

InProcessMessageHub::Link& InProcessMessageHub::link_for(int src, int dst) {
  std::lock_guard<std::mutex> lock(links_mu_);
  auto& slot = links_[{src, dst}];
  if (!slot) {
    slot = std::make_unique<Link>();
    Link* l = slot.get();
    l->thread = std::thread([this, l] { link_loop(*l); });
  }
  return *slot;
}

void InProcessMessageHub::link_loop(Link& l) {
  const std::int64_t chunk = std::max<std::int64_t>(1, link_.bulk_chunk_bytes);
  // The link's own clock: when the message or chunk in progress ends. A sleep overshoots its
  // deadline by tens of microseconds, more than a 64 KiB chunk takes on a fast link; starting the
  // next transfer at the previous deadline (not at the late wake-up) while the link stays busy
  // keeps the modelled bandwidth. After an idle gap longer than kSlack the clock restarts at now.
  constexpr auto kSlack = std::chrono::microseconds(500);
  Clock::time_point link_clock{};
  const auto occupy = [&](std::int64_t bytes, bool with_latency) {
    link_clock = std::max(link_clock, Clock::now() - kSlack) + link_duration(link_, bytes, with_latency);
    return link_clock;
  };
  std::unique_lock<std::mutex> lock(l.mu);
  while (true) {
    l.cv.wait(lock, [&] { return l.stopping || !l.latency.empty() || !l.bulk.empty(); });
    if (l.stopping) break;
    if (!l.latency.empty()) {
      // A latency-bound message takes the link whole, in arrival order.
      std::unique_ptr<Outgoing> out = std::move(l.latency.front());
      l.latency.pop_front();
      lock.unlock();
      const auto bytes = static_cast<std::int64_t>(out->source.size());
      const auto end = occupy(bytes, true);
      if (bytes > 0) std::memcpy(out->message.payload.data(), out->source.data(), static_cast<std::size_t>(bytes));
      std::this_thread::sleep_until(end);
      deliver(std::move(out));
      lock.lock();
      continue;
    }
    // One chunk of the oldest bulk message; only the link thread pops, so `out` stays valid.
    Outgoing* out = l.bulk.front().get();
    lock.unlock();
    const auto total = static_cast<std::int64_t>(out->source.size());
    const std::int64_t n = std::min(chunk, total - out->copied);
    const auto end = occupy(n, out->copied == 0);
    if (n > 0) {
      std::memcpy(out->message.payload.data() + out->copied, out->source.data() + out->copied, static_cast<std::size_t>(n));
    }
    std::this_thread::sleep_until(end);
    out->copied += n;
    lock.lock();
    if (out->copied >= total) {
      std::unique_ptr<Outgoing> finished = std::move(l.bulk.front());
      l.bulk.pop_front();
      lock.unlock();
      deliver(std::move(finished));
      lock.lock();
    } else if (!l.latency.empty()) {
      counters_.count_deferred_chunk();  // the rest of this bulk message waits for the pipeline's
    }
  }
  // Shutting down: whatever is still queued never arrives.
  for (auto* q : {&l.latency, &l.bulk}) {
    for (auto& out : *q) out->done->complete(unavailable("transport shut down before the message was sent"));
    q->clear();
  }
}

}  // namespace kun::runtime
