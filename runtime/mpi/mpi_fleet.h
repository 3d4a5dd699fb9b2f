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
  // Rank 0, after every rank created its transport; ranks 1..N run serve_device_rank. Asks each
  // device for its geometry (waiting at most `timeout` per device).
  static StatusOr<std::unique_ptr<MpiFleet>> create(MpiTransport& transport, std::chrono::milliseconds timeout);
  ~MpiFleet() override;

  int num_devices() const override { return static_cast<int>(geometry_.size()); }
  MessageTransport& front_end() override { return transport_; }
  const DeviceGeometry& geometry(int device) const override;
  StatusOr<AgentCounters> counters(int device) override;
  // The front end's own traffic (to and from devices); device-to-device bytes are counted by the
  // device ranks' transports.
  TransferStats transfer_stats() const override { return transport_.stats(); }
  // Tells every device rank still answering to end (idempotent); the devices are gone afterwards.
  void shutdown() override;

  // Devices (fleet indices) lost so far, and the first loss (ok while none).
  std::vector<int> lost_devices() const;
  Status failure() const { return transport_.failure(); }
  MpiTransport& transport() { return transport_; }

 private:
  MpiFleet(MpiTransport& transport, std::chrono::milliseconds timeout) : transport_(transport), timeout_(timeout) {}
  MpiTransport& transport_;
  std::chrono::milliseconds timeout_;
  std::vector<DeviceGeometry> geometry_;
  bool shut_down_ = false;
};

// Ranks 1..N: builds device rank-1 (options.device, named "dev<i>", layers [layer_begin,
// layer_end) of `weights`), serves it with a DeviceAgent until the front end sends kShutdownNode,
// then shuts the transport down. The front end lost ends the job (MPI_Abort, exit 3); another
// device lost does not (its requests fail, the front end decides). Returns the exit code.
int serve_device_rank(MpiSession& session, MpiTransport& transport, const FleetOptions& options,
                      const model::WeightSource& weights);

// A device rank's serve loop for an agent already started: until the front end sends
// kShutdownNode; then stops the agent and shuts the transport down. Failure handling as
// serve_device_rank. Returns the exit code.
int serve_until_shutdown(MpiSession& session, MpiTransport& transport, DeviceAgent& agent);

// Rank 0 after a device loss: shuts the transport down (goodbyes with the survivors), kills the
// processes of lost ranks that still run on this host (a rank that stopped answering), and ends
// the job with MPI_Abort(exit_code), so that no process is left behind.
[[noreturn]] void end_job_after_device_loss(MpiSession& session, MpiTransport& transport, int exit_code);

// True when mpirun was started with --enable-recovery (a dead rank does not end the job).
bool mpirun_recovery_enabled();

}  // namespace kun::runtime::mpi
