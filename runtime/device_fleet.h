// DeviceFleet: what the front end (executors, cluster runtime) sees of the N devices it drives
// (issue 12). Devices are addressed by index 0..N-1; each one is served by a DeviceAgent at a
// transport endpoint (`endpoint_of(i)`), and the front end has its own endpoint
// (`front_end()`, id `front_end_id()`) from which it sends agent ops (AgentClient) and gets
// replies. The front end never holds a pointer into a device: everything it knows of a device
// is the static geometry gathered by message at start (`geometry(i)`) and what replies tell it.
//
// Endpoint ids: the front end is 0, device i is i + 1, in-process as under MPI (rank 0 front
// end, ranks 1..N devices), so tests and logs read the same in both runtimes.
// In-process, the front end's messages skip the link model (they stand for a host issuing
// commands, not device-link traffic); device-to-device messages are paced as configured.
//
// Backends: InProcessFleet (here) creates the VirtualDevices, one DeviceAgent each over an
// InProcessMessageHub, and owns them; MpiFleet (runtime/mpi/) talks to device ranks.
//
// Threads: geometry() and num_devices() are immutable after create and may be read from any
// thread; front_end() may be used by any thread (the transport is thread-safe).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "model/weight_source.h"
#include "runtime/device_agent.h"
#include "runtime/message_transport.h"
#include "runtime/virtual_device.h"

namespace kun::runtime {

class DeviceFleet {
 public:
  virtual ~DeviceFleet() = default;
  virtual int num_devices() const = 0;
  // The front end's endpoint and its id on the transport.
  virtual MessageTransport& front_end() = 0;
  int front_end_id() const { return 0; }
  // Transport id of device `device` (0..N-1).
  int endpoint_of(int device) const { return device + 1; }
  // Index of the device at transport id `endpoint`.
  int device_at(int endpoint) const { return endpoint - 1; }
  // As the device reported it at start.
  virtual const DeviceGeometry& geometry(int device) const = 0;
  // Every device's agent counters (remote attention done for others, blocks, swaps, ...).
  virtual StatusOr<AgentCounters> counters(int device) = 0;
  // Bytes and messages by kind over the whole fleet (links and host swap links).
  virtual TransferStats transfer_stats() const = 0;
  // Stops every agent (idempotent). Devices are gone afterwards.
  virtual void shutdown() = 0;
};

struct FleetOptions {
  std::int64_t num_devices = 1;
  DeviceOptions device;          // per device (capacity, threads, block size, dtypes); name gets the index
  LinkModel link;                // device <-> device (and front end) links; off by default
  LinkModel host_link;           // device <-> its host swap space; off by default
  std::int64_t host_swap_blocks = 0;  // per device, layer blocks of host swap space
  // Every device loads every layer (a data-parallel deployment at start).
  std::int64_t layer_begin = 0;
  std::int64_t layer_end = -1;  // -1: the model's last layer
  // Tests only: fault injection in every device's agent (AgentOptions::fault), told the device
  // index. In-process fleets only (a function does not cross to device ranks); empty: no cost.
  std::function<Status(AgentOp op, int device, std::int64_t layer)> agent_fault;
};

// Asks device `endpoint`'s agent for its geometry (the front end's start-up query; also MpiFleet's).
StatusOr<DeviceGeometry> query_geometry(AgentClient& client, int endpoint);

class InProcessFleet final : public DeviceFleet {
 public:
  static StatusOr<std::unique_ptr<InProcessFleet>> create(const FleetOptions& options, const model::WeightSource& weights);
  ~InProcessFleet() override;

  int num_devices() const override { return static_cast<int>(devices_.size()); }
  MessageTransport& front_end() override { return hub_->endpoint(0); }
  const DeviceGeometry& geometry(int device) const override;
  StatusOr<AgentCounters> counters(int device) override;
  TransferStats transfer_stats() const override;
  void shutdown() override;

 private:
  InProcessFleet() = default;
  std::unique_ptr<InProcessMessageHub> hub_;
  std::vector<std::unique_ptr<VirtualDevice>> devices_;
  std::vector<std::unique_ptr<DeviceAgent>> agents_;
  std::vector<DeviceGeometry> geometry_;
};

}  // namespace kun::runtime
