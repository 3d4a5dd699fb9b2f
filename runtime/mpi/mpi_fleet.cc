#include "runtime/mpi/mpi_fleet.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <map>
#include <thread>

#include "common/check.h"

namespace kun::runtime::mpi {

namespace {
std::string node_prefix(int rank) { return "kunserve rank " + std::to_string(rank) + ": "; }

// Fleet control, front end -> device rank main thread (Port::kUser with this tag, so that no
// stage input, which is matched by its step's tag, can be taken for it). The reply goes to
// Port::kReply with the tag the request carries in request_id.
constexpr std::uint64_t kFleetControlTag = 0x4b554e464c454554ull;  // "KUNFLEET"
enum class FleetOp : std::uint16_t { kBuildDevice = 1, kRelease = 2 };
// Transfer statistics, front end -> a device rank's stats thread (Port::kUser, this tag).
constexpr std::uint64_t kFleetStatsTag = 0x4b554e5354415453ull;  // "KUNSTATS"

void add_stats(TransferStats* into, const TransferStats& s, int sign) {
  for (std::size_t k = 0; k < into->bytes.size(); ++k) {
    into->bytes[k] += sign * s.bytes[k];
    into->messages[k] += sign * s.messages[k];
  }
  into->bulk_chunks_deferred += sign * s.bulk_chunks_deferred;
}

// What a device rank sent over the transport so far, plus its agent's host swap traffic.
TransferStats device_rank_stats(const MpiTransport& transport, const DeviceAgent* agent) {
  TransferStats s = transport.stats();
  if (agent != nullptr) {
    const AgentCounters c = agent->counters();
    s.bytes[static_cast<int>(TransferKind::kSwapOut)] += c.swap_out_bytes;
    s.bytes[static_cast<int>(TransferKind::kSwapIn)] += c.swap_in_bytes;
    s.messages[static_cast<int>(TransferKind::kSwapOut)] += c.swap_out_messages;
    s.messages[static_cast<int>(TransferKind::kSwapIn)] += c.swap_in_messages;
  }
  return s;
}

// FleetOptions on the wire (fixed-width fields, then the weights key).
class Writer {
 public:
  template <class T>
  void put(T v) {
    const auto* p = reinterpret_cast<const std::byte*>(&v);
    bytes.insert(bytes.end(), p, p + sizeof(T));
  }
  void put_string(const std::string& s) {
    put<std::int64_t>(static_cast<std::int64_t>(s.size()));
    const auto* p = reinterpret_cast<const std::byte*>(s.data());
    bytes.insert(bytes.end(), p, p + s.size());
  }
  std::vector<std::byte> bytes;
};
class Reader {
 public:
  explicit Reader(std::span<const std::byte> b) : b_(b) {}
  template <class T>
  bool get(T* v) {
    if (at_ + sizeof(T) > b_.size()) return false;
    std::memcpy(v, b_.data() + at_, sizeof(T));
    at_ += sizeof(T);
    return true;
  }
  bool get_string(std::string* s) {
    std::int64_t n = 0;
    if (!get(&n) || n < 0 || at_ + static_cast<std::size_t>(n) > b_.size()) return false;
    s->assign(reinterpret_cast<const char*>(b_.data() + at_), static_cast<std::size_t>(n));
    at_ += static_cast<std::size_t>(n);
    return true;
  }
  bool done() const { return at_ == b_.size(); }

 private:
  std::span<const std::byte> b_;
  std::size_t at_ = 0;
};

void put_link(Writer& w, const LinkModel& l) {
  w.put(l.bandwidth_bytes_per_s);
  w.put(l.latency_us);
  w.put(l.bulk_chunk_bytes);
}
bool get_link(Reader& r, LinkModel* l) {
  return r.get(&l->bandwidth_bytes_per_s) && r.get(&l->latency_us) && r.get(&l->bulk_chunk_bytes);
}

std::vector<std::byte> encode_build(const FleetOptions& o, const std::string& weights_key) {
  Writer w;
  w.put(o.num_devices);
  w.put(o.device.capacity_bytes);
  w.put(o.device.page_bytes);
  w.put(static_cast<std::int64_t>(o.device.num_threads));
  w.put(o.device.kv_block_size);
  w.put(static_cast<std::int32_t>(o.device.weight_dtype));
  w.put(static_cast<std::int32_t>(o.device.kv_dtype));
  w.put(o.device.max_batched_tokens);
  w.put(o.device.max_sequences);
  w.put(o.device.max_context_tokens);
  put_link(w, o.link);
  put_link(w, o.host_link);
  w.put(o.host_swap_blocks);
  w.put(o.layer_begin);
  w.put(o.layer_end);
  w.put_string(weights_key);
  return std::move(w.bytes);
}

StatusOr<FleetOptions> decode_build(std::span<const std::byte> bytes, std::string* weights_key) {
  Reader r(bytes);
  FleetOptions o;
  std::int64_t threads = 0;
  std::int32_t weight_dtype = 0, kv_dtype = 0;
  const bool ok = r.get(&o.num_devices) && r.get(&o.device.capacity_bytes) && r.get(&o.device.page_bytes) &&
                  r.get(&threads) && r.get(&o.device.kv_block_size) && r.get(&weight_dtype) && r.get(&kv_dtype) &&
                  r.get(&o.device.max_batched_tokens) && r.get(&o.device.max_sequences) &&
                  r.get(&o.device.max_context_tokens) && get_link(r, &o.link) && get_link(r, &o.host_link) && r.get(&o.host_swap_blocks) &&
                  r.get(&o.layer_begin) && r.get(&o.layer_end) && r.get_string(weights_key) && r.done();
  if (!ok) return invalid_argument("malformed build-device message");
  o.device.num_threads = static_cast<int>(threads);
  o.device.weight_dtype = static_cast<DType>(weight_dtype);
  o.device.kv_dtype = static_cast<DType>(kv_dtype);
  return o;
}

// Sends a fleet control op to every device rank in `ranks` and waits for each answer.
Status control_all(MpiTransport& transport, const std::vector<int>& ranks, FleetOp op, const std::vector<std::byte>& payload,
                   std::chrono::milliseconds timeout) {
  std::vector<RecvHandle> replies;
  for (int rank : ranks) {
    const std::uint64_t reply_tag = transport.next_tag();
    RecvMatch match;
    match.port = Port::kReply;
    match.src = rank;
    match.tag = reply_tag;
    replies.push_back(transport.recv(match));
    MessageHeader h;
    h.dst = rank;
    h.port = Port::kUser;
    h.kind = TransferKind::kControl;
    h.op = static_cast<std::uint16_t>(op);
    h.tag = kFleetControlTag;
    h.request_id = static_cast<std::int64_t>(reply_tag);
    transport.send_owned(std::move(h), payload);
  }
  Status first;
  for (std::size_t i = 0; i < replies.size(); ++i) {
    Status s;
    if (!replies[i].wait_for(timeout)) {
      s = deadline_exceeded("device rank " + std::to_string(ranks[i]) + " did not answer within " +
                            std::to_string(timeout.count()) + " ms");
    } else {
      s = replies[i].wait();
      if (s.ok()) {
        Message m = replies[i].take();
        if (m.header.error != 0) {
          s = Status(static_cast<StatusCode>(m.header.error),
                     "device rank " + std::to_string(ranks[i]) + ": " +
                         std::string(reinterpret_cast<const char*>(m.payload.data()), m.payload.size()));
        }
      }
    }
    if (first.ok() && !s.ok()) first = s;
  }
  return first;
}

void answer(MpiTransport& transport, const MessageHeader& request, const Status& s) {
  MessageHeader h;
  h.dst = request.src;
  h.port = Port::kReply;
  h.kind = TransferKind::kControl;
  h.tag = static_cast<std::uint64_t>(request.request_id);
  h.error = static_cast<std::int32_t>(s.code());
  std::vector<std::byte> payload;
  if (!s.ok()) {
    const std::string text = s.message();
    payload.resize(text.size());
    std::memcpy(payload.data(), text.data(), text.size());
  }
  (void)transport.send_owned(std::move(h), std::move(payload)).wait();
}

std::vector<int> live_device_ranks(MpiTransport& transport) {
  const std::vector<int> failed = transport.failed_peers();
  std::vector<int> ranks;
  for (int r = 1; r < transport.num_devices(); ++r) {
    if (std::find(failed.begin(), failed.end(), r) == failed.end()) ranks.push_back(r);
  }
  return ranks;
}
}  // namespace

StatusOr<std::unique_ptr<MpiFleet>> MpiFleet::create(MpiTransport& transport, const FleetOptions& options,
                                                     const std::string& weights_key, std::chrono::milliseconds timeout) {
  if (transport.device() != 0) return failed_precondition("the fleet lives on rank 0 (the front end)");
  if (transport.num_devices() < 2) {
    return failed_precondition("the MPI runtime needs at least 2 ranks (rank 0 front end, ranks 1..N devices); got " +
                               std::to_string(transport.num_devices()));
  }
  if (options.num_devices != transport.num_devices() - 1) {
    return invalid_argument(std::to_string(options.num_devices) + " devices asked for, but the job has " +
                            std::to_string(transport.num_devices() - 1) + " device ranks (mpirun -np " +
                            std::to_string(options.num_devices + 1) + " for " + std::to_string(options.num_devices) + ")");
  }
  KUN_RETURN_IF_ERROR(transport.failure());
  std::vector<int> ranks;
  for (int r = 1; r < transport.num_devices(); ++r) ranks.push_back(r);
  std::unique_ptr<MpiFleet> fleet(new MpiFleet(transport, timeout));
  const Status built = control_all(transport, ranks, FleetOp::kBuildDevice, encode_build(options, weights_key), timeout);
  fleet->built_ = true;  // whatever was built is freed by shutdown()
  KUN_RETURN_IF_ERROR(built);
  AgentClient client(transport, timeout);
  for (int i = 0; i < transport.num_devices() - 1; ++i) {
    KUN_ASSIGN_OR_RETURN(DeviceGeometry g, query_geometry(client, fleet->endpoint_of(i)));
    fleet->geometry_.push_back(std::move(g));
  }
  // The ranks' transports count from the start of the job; this fleet's figures start here.
  KUN_ASSIGN_OR_RETURN(fleet->baseline_, fleet->job_stats());
  return fleet;
}

MpiFleet::~MpiFleet() { shutdown(); }

StatusOr<TransferStats> MpiFleet::job_stats() const {
  TransferStats total = transport_.stats();
  std::vector<int> ranks = live_device_ranks(transport_);
  std::vector<RecvHandle> replies;
  for (int rank : ranks) {
    const std::uint64_t reply_tag = transport_.next_tag();
    RecvMatch match;
    match.port = Port::kReply;
    match.src = rank;
    match.tag = reply_tag;
    replies.push_back(transport_.recv(match));
    MessageHeader h;
    h.dst = rank;
    h.port = Port::kUser;
    h.kind = TransferKind::kControl;
    h.tag = kFleetStatsTag;
    h.request_id = static_cast<std::int64_t>(reply_tag);
    transport_.send_owned(std::move(h), {});
  }
  for (std::size_t i = 0; i < replies.size(); ++i) {
    if (!replies[i].wait_for(timeout_)) return deadline_exceeded("device rank " + std::to_string(ranks[i]) + ": no statistics");
    KUN_RETURN_IF_ERROR(replies[i].wait());
    Message m = replies[i].take();
    if (m.payload.size() != sizeof(TransferStats)) return internal_error("device rank " + std::to_string(ranks[i]) + ": bad statistics");
    TransferStats s;
    std::memcpy(&s, m.payload.data(), sizeof(TransferStats));  // same build on every rank (identity check)
    add_stats(&total, s, +1);
  }
  return total;
}

TransferStats MpiFleet::transfer_stats() const {
  StatusOr<TransferStats> now = job_stats();
  if (!now.ok()) {
    std::cerr << node_prefix(0) << "transfer statistics: " << now.status().to_string() << std::endl;
    return TransferStats{};
  }
  add_stats(&*now, baseline_, -1);
  return *now;
}

const DeviceGeometry& MpiFleet::geometry(int device) const {
  KUN_CHECK(device >= 0 && device < num_devices()) << "no device " << device << " of " << num_devices();
  return geometry_[static_cast<std::size_t>(device)];
}

StatusOr<AgentCounters> MpiFleet::counters(int device) {
  if (device < 0 || device >= num_devices()) return not_found("no device " + std::to_string(device));
  AgentClient client(transport_, timeout_);
  KUN_ASSIGN_OR_RETURN(DeviceSnapshot s, client.snapshot(endpoint_of(device)));
  return s.counters;
}

void MpiFleet::shutdown() {
  if (!built_) return;
  built_ = false;
  AgentClient client(transport_, timeout_);
  for (int rank : live_device_ranks(transport_)) {
    const Status s = client.shutdown_node(rank);
    if (!s.ok()) std::cerr << node_prefix(0) << "device rank " << rank << ": " << s.to_string() << std::endl;
  }
}

std::vector<int> MpiFleet::lost_devices() const {
  std::vector<int> lost;
  for (int rank : transport_.failed_peers()) {
    if (rank > 0) lost.push_back(device_at(rank));
  }
  return lost;
}

std::function<StatusOr<std::unique_ptr<DeviceFleet>>(const FleetOptions&, const model::WeightSource&)> mpi_fleet_factory(
    MpiTransport& transport, std::string weights_key, std::chrono::milliseconds timeout) {
  return [&transport, key = std::move(weights_key), timeout](const FleetOptions& options,
                                                            const model::WeightSource&) -> StatusOr<std::unique_ptr<DeviceFleet>> {
    KUN_ASSIGN_OR_RETURN(auto fleet, MpiFleet::create(transport, options, key, timeout));
    return std::unique_ptr<DeviceFleet>(std::move(fleet));
  };
}

Status release_device_ranks(MpiTransport& transport, std::chrono::milliseconds timeout) {
  return control_all(transport, live_device_ranks(transport), FleetOp::kRelease, {}, timeout);
}

void serve_agent(MpiSession& session, MpiTransport& transport, DeviceAgent& agent) {
  const int rank = session.rank();
  bool reported = false;
  while (!agent.wait_for_shutdown_request(std::chrono::milliseconds(200))) {
    const std::vector<int> failed = transport.failed_peers();
    if (!failed.empty() && failed.front() == 0) {
      std::cerr << node_prefix(rank) << transport.peer_failure(0).message() << "; the front end is gone, ending the job"
                << std::endl;
      session.abort(3);
    }
    if (!failed.empty() && !reported) {
      std::cerr << node_prefix(rank) << transport.failure().message() << "; serving on" << std::endl;
      reported = true;
    }
  }
  agent.stop();
}

int finish_device_rank(MpiSession& session, MpiTransport& transport) {
  const Status s = transport.shutdown();
  const std::vector<int> failed = transport.failed_peers();
  if ((!s.ok() && failed.empty()) || (!failed.empty() && failed.front() == 0)) {
    std::cerr << node_prefix(session.rank()) << (s.ok() ? transport.failure().message() : s.message()) << "; ending the job"
              << std::endl;
    session.abort(3);
  }
  if (!failed.empty()) {
    // Only devices were lost: the front end ends the job (it knows why). This rank has said
    // goodbye to every live peer; MPI_Finalize would wait for the dead one forever under
    // --enable-recovery, so it leaves without it.
    session.exit_without_finalize(0);
  }
  return 0;
}

int serve_device_rank(MpiSession& session, MpiTransport& transport, const WeightsByKey& weights_by_key) {
  const int rank = session.rank();
  const int index = rank - 1;
  // Answers the front end's statistics requests while the rank lives (ends when the transport
  // shuts down and its receive fails).
  std::mutex agent_mu;
  const DeviceAgent* current_agent = nullptr;  // guarded by agent_mu
  std::thread stats_thread([&] {
    while (true) {
      RecvMatch match;
      match.port = Port::kUser;
      match.src = 0;
      match.tag = kFleetStatsTag;
      RecvHandle h = transport.recv(match);
      if (!h.wait().ok()) return;
      Message m = h.take();
      TransferStats s;
      {
        std::lock_guard<std::mutex> lock(agent_mu);
        s = device_rank_stats(transport, current_agent);
      }
      MessageHeader out;
      out.dst = 0;
      out.port = Port::kReply;
      out.kind = TransferKind::kControl;
      out.tag = static_cast<std::uint64_t>(m.header.request_id);
      std::vector<std::byte> payload(sizeof(TransferStats));
      std::memcpy(payload.data(), &s, sizeof(TransferStats));
      (void)transport.send_owned(std::move(out), std::move(payload));
    }
  });
  while (true) {
    RecvMatch match;
    match.port = Port::kUser;
    match.src = 0;
    match.tag = kFleetControlTag;
    RecvHandle h = transport.recv(match);
    while (!h.wait_for(std::chrono::milliseconds(200))) {
      const std::vector<int> failed = transport.failed_peers();
      if (!failed.empty() && failed.front() == 0) {
        std::cerr << node_prefix(rank) << transport.peer_failure(0).message() << "; the front end is gone, ending the job"
                  << std::endl;
        session.abort(3);
      }
    }
    const Status received = h.wait();
    if (!received.ok()) {
      std::cerr << node_prefix(rank) << received.to_string() << "; ending the job" << std::endl;
      session.abort(3);
    }
    Message m = h.take();
    if (static_cast<FleetOp>(m.header.op) == FleetOp::kRelease) {
      answer(transport, m.header, ok_status());
      break;
    }
    std::string key;
    StatusOr<FleetOptions> options = decode_build(m.payload, &key);
    StatusOr<const model::WeightSource*> weights = options.ok() ? weights_by_key(key) : options.status();
    std::unique_ptr<VirtualDevice> dev;
    Status built = weights.status();
    if (built.ok()) {
      const model::ModelConfig& config = (*weights)->config();
      const std::int64_t layer_end = options->layer_end < 0 ? config.num_layers : options->layer_end;
      DeviceOptions dev_opt = options->device;
      dev_opt.name = "dev" + std::to_string(index);
      auto created = VirtualDevice::create(dev_opt, config);
      built = created.status();
      if (built.ok()) {
        dev = std::move(created).value();
        built = dev->load_weights(**weights, options->layer_begin, layer_end).with_context("device " + dev_opt.name);
      }
    }
    if (!built.ok()) {
      answer(transport, m.header, built.with_context("rank " + std::to_string(rank)));
      continue;  // the front end gives up on this fleet: it frees the others and may try again
    }
    dev->give_free_pages_to_kv();
    AgentOptions agent_options;
    agent_options.host_swap_blocks = options->host_swap_blocks;
    agent_options.host_link = options->host_link;
    DeviceAgent agent(*dev, transport, agent_options);
    agent.start();
    {
      std::lock_guard<std::mutex> lock(agent_mu);
      current_agent = &agent;
    }
    answer(transport, m.header, ok_status());
    serve_agent(session, transport, agent);
    std::lock_guard<std::mutex> lock(agent_mu);
    current_agent = nullptr;
  }
  const int rc = finish_device_rank(session, transport);
  stats_thread.join();
  return rc;
}

void end_job_after_device_loss(MpiSession& session, MpiTransport& transport, int exit_code) {
  (void)transport.shutdown();
  // Under plain mpirun, MPI_Abort ends every rank (and mpirun does not take a rank killed under
  // it as well: it crashed in a try). With --enable-recovery it ends only this one: a lost rank
  // still running here is killed first, and the survivors finalize.
  if (mpirun_recovery_enabled()) {
    for (int rank : transport.terminate_failed_peers()) {
      std::cerr << node_prefix(0) << "killed rank " << rank << ", which no longer answered" << std::endl;
    }
  }
  session.abort(exit_code);
}

bool mpirun_recovery_enabled() {
  const char* v = std::getenv("OMPI_MCA_orte_enable_recovery");
  return v != nullptr && (std::string(v) == "1" || std::string(v) == "true");
}

}  // namespace kun::runtime::mpi
