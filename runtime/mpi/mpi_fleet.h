// MpiFleet: the DeviceFleet of the MPI runtime (runtime/README.md, "MPI"). Rank 0 (the front end)
// holds the MpiFleet; ranks 1..N each run serve_device_rank: they build their own VirtualDevice
// (their own memory) and serve it with a DeviceAgent over the MpiTransport until the front end
// says stop. Device i of the fleet is rank i + 1, as endpoint i + 1 of InProcessFleet.
//
// Faults: a device rank that dies (same host: at once, through its pidfd) or stops answering
// (peer_timeout) is lost: every request waiting on it ends with kUnavailable naming the rank, new
// requests to it fail at once, the other devices keep serving. The front end ends the job with
// end_job_after_device_loss: survivors shut down in order, a lost rank still running on this
// host is killed, and MPI_Abort ends what is left (mpirun then exits non-zero; under `mpirun
// --enable-recovery`, Open MPI 4.1 keeps the job alive after a rank dies and reports exit 0).
//
// Threads: as DeviceFleet; lost_devices() and failure() from any thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "model/weight_source.h"
#include "runtime/device_fleet.h"
#include "runtime/mpi/mpi_session.h"
#include "runtime/mpi/mpi_transport.h"

namespace kun::runtime::mpi {

class MpiFleet final : public DeviceFleet {
 public:
  // Rank 0, while ranks 1..N run serve_device_rank: each device rank builds device rank-1 from
  // `options` (named "dev<i>") with the weights `weights_key` names on its side (serve: "", the
  // model of the command line), starts its agent and answers; then each is asked for its
  // geometry. Waits at most `timeout` per device.
  static StatusOr<std::unique_ptr<MpiFleet>> create(MpiTransport& transport, const FleetOptions& options,
                                                    const std::string& weights_key, std::chrono::milliseconds timeout);
  ~MpiFleet() override;

  int num_devices() const override { return static_cast<int>(geometry_.size()); }
  MessageTransport& front_end() override { return transport_; }
  const DeviceGeometry& geometry(int device) const override;
  StatusOr<AgentCounters> counters(int device) override;
  // What every rank sent since this fleet was created (the front end's transport, each device
  // rank's, asked by message, and their agents' host swap traffic), as InProcessFleet counts it.
  TransferStats transfer_stats() const override;
  // Tells every device rank still answering to stop its agent and free its device (idempotent);
  // the ranks then wait for the next fleet or for release_device_ranks.
  void shutdown() override;

  // Devices (fleet indices) lost so far, and the first loss (ok while none).
  std::vector<int> lost_devices() const;
  Status failure() const { return transport_.failure(); }
  MpiTransport& transport() { return transport_; }

 private:
  MpiFleet(MpiTransport& transport, std::chrono::milliseconds timeout) : transport_(transport), timeout_(timeout) {}
  MpiTransport& transport_;
  std::chrono::milliseconds timeout_;
  // Every rank's counts since the start of the job.
  StatusOr<TransferStats> job_stats() const;
  std::vector<DeviceGeometry> geometry_;
  TransferStats baseline_;  // job_stats() when the fleet was created
  bool built_ = false;  // device ranks hold devices for this fleet
};

// ClusterOptions::make_fleet for the MPI runtime: each ClusterRuntime gets an MpiFleet over the
// device ranks (one fleet at a time).
std::function<StatusOr<std::unique_ptr<DeviceFleet>>(const FleetOptions&, const model::WeightSource&)> mpi_fleet_factory(
    MpiTransport& transport, std::string weights_key, std::chrono::milliseconds timeout);

// Rank 0 at the end: every device rank still answering leaves serve_device_rank.
Status release_device_ranks(MpiTransport& transport, std::chrono::milliseconds timeout);

// The weights a device rank builds its device from, by the key the front end names.
using WeightsByKey = std::function<StatusOr<const model::WeightSource*>(const std::string& key)>;

// Ranks 1..N: serves one device after another, as MpiFleet::create asks (building device
// rank-1 with its own memory, serving it with a DeviceAgent until the fleet shuts down, freeing
// it), until release_device_ranks; then shuts the transport down. The front end lost ends the
// job (MPI_Abort, exit 3); another device lost does not (requests naming it fail, the front end
// decides). Returns the exit code.
int serve_device_rank(MpiSession& session, MpiTransport& transport, const WeightsByKey& weights);

// A device rank's serve loop for an agent already started: until the front end sends
// kShutdownNode; then stops the agent. Ends the job if the front end is lost.
void serve_agent(MpiSession& session, MpiTransport& transport, DeviceAgent& agent);
// A device rank's orderly end: transport shutdown; ends the job if that fails for any reason but
// lost devices (the front end ends the job then).
int finish_device_rank(MpiSession& session, MpiTransport& transport);

// Rank 0 after a device loss: shuts the transport down (goodbyes with the survivors), kills the
// processes of lost ranks that still run on this host (a rank that stopped answering), and ends
// the job with MPI_Abort(exit_code), so that no process is left behind.
[[noreturn]] void end_job_after_device_loss(MpiSession& session, MpiTransport& transport, int exit_code);

// True when mpirun was started with --enable-recovery (a dead rank does not end the job).
bool mpirun_recovery_enabled();

}  // namespace kun::runtime::mpi
