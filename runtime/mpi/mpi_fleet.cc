#include "runtime/mpi/mpi_fleet.h"

#include <cstdlib>
#include <iostream>
#include <thread>

#include "common/check.h"

namespace kun::runtime::mpi {

namespace {
std::string node_prefix(int rank) { return "kunserve rank " + std::to_string(rank) + ": "; }
}  // namespace

StatusOr<std::unique_ptr<MpiFleet>> MpiFleet::create(MpiTransport& transport, std::chrono::milliseconds timeout) {
  if (transport.device() != 0) return failed_precondition("the fleet lives on rank 0 (the front end)");
  if (transport.num_devices() < 2) {
    return failed_precondition("the MPI runtime needs at least 2 ranks (rank 0 front end, ranks 1..N devices); got " +
                               std::to_string(transport.num_devices()));
  }
  std::unique_ptr<MpiFleet> fleet(new MpiFleet(transport, timeout));
  AgentClient client(transport, timeout);
  for (int i = 0; i < transport.num_devices() - 1; ++i) {
    KUN_ASSIGN_OR_RETURN(DeviceGeometry g, query_geometry(client, fleet->endpoint_of(i)));
    fleet->geometry_.push_back(std::move(g));
  }
  return fleet;
}

MpiFleet::~MpiFleet() { shutdown(); }

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
  if (shut_down_) return;
  shut_down_ = true;
  AgentClient client(transport_, timeout_);
  const std::vector<int> failed = transport_.failed_peers();
  for (int i = 0; i < num_devices(); ++i) {
    const int rank = endpoint_of(i);
    if (std::find(failed.begin(), failed.end(), rank) != failed.end()) continue;
    const Status s = client.shutdown_node(rank);
    if (!s.ok()) std::cerr << node_prefix(0) << "device rank " << rank << ": " << s.to_string() << std::endl;
  }
}

std::vector<int> MpiFleet::lost_devices() const {
  std::vector<int> lost;
  for (int rank : transport_.failed_peers()) lost.push_back(device_at(rank));
  return lost;
}

int serve_device_rank(MpiSession& session, MpiTransport& transport, const FleetOptions& options,
                      const model::WeightSource& weights) {
  const int rank = session.rank();
  const int index = rank - 1;
  const model::ModelConfig& config = weights.config();
  const std::int64_t layer_end = options.layer_end < 0 ? config.num_layers : options.layer_end;
  DeviceOptions dev_opt = options.device;
  dev_opt.name = "dev" + std::to_string(index);
  auto dev = VirtualDevice::create(dev_opt, config);
  Status built = dev.ok() ? (*dev)->load_weights(weights, options.layer_begin, layer_end).with_context("device " + dev_opt.name)
                          : dev.status();
  if (!built.ok()) {
    // The front end waits for this device's geometry: end the job with the reason.
    std::cerr << node_prefix(rank) << built.to_string() << "; ending the job" << std::endl;
    session.abort(2);
  }
  (*dev)->give_free_pages_to_kv();
  AgentOptions agent_options;
  agent_options.host_swap_blocks = options.host_swap_blocks;
  agent_options.host_link = options.host_link;
  DeviceAgent agent(**dev, transport, agent_options);
  agent.start();
  return serve_until_shutdown(session, transport, agent);
}

int serve_until_shutdown(MpiSession& session, MpiTransport& transport, DeviceAgent& agent) {
  const int rank = session.rank();
  bool reported = false;
  while (!agent.wait_for_shutdown_request(std::chrono::milliseconds(200))) {
    const std::vector<int> failed = transport.failed_peers();
    if (!failed.empty() && failed.front() == 0) {
      std::cerr << node_prefix(rank) << transport.failure().message() << "; the front end is gone, ending the job"
                << std::endl;
      session.abort(3);
    }
    if (!failed.empty() && !reported) {
      std::cerr << node_prefix(rank) << transport.failure().message() << "; serving on" << std::endl;
      reported = true;
    }
  }
  agent.stop();
  const Status s = transport.shutdown();
  if (!s.ok()) {
    const std::vector<int> failed = transport.failed_peers();
    if (failed.empty() || failed.front() == 0) {
      std::cerr << node_prefix(rank) << s.message() << "; ending the job" << std::endl;
      session.abort(3);
    }
    // Only devices were lost: the front end ends the job (it knows why); MPI_Finalize waits for it.
  }
  return 0;
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
