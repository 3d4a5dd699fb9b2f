// DeviceAgent: the only code that reads or writes its device's arena once the device is handed to
// it (issue 12). Everything else addresses the device by handles in messages over a
// MessageTransport: append k/v and attend (remote attention, computed by the holder with its own
// kernel threads; the output goes back), write blocks, read blocks, send blocks to device d,
// drop a layer, report a snapshot. Requests go to Port::kAgent; replies go to the request's
// reply_to device on Port::kReply with the request's tag, so a requester waits on exactly its
// reply (AgentClient does this).
//
// The same agent serves over the in-process hub and over MPI: a requester never holds a pointer
// into the holder's memory, so under MPI cross-device access is impossible by construction and
// in-process it is ruled out by the API (the client only ever sees payload bytes) and caught by
// the device's owner check (VirtualDevice::set_owner_check, on in InProcessFleet).
//
// Pipeline stages (kRunStage, stage_message.h) run on a second agent thread, the stage thread, so
// the serve thread keeps answering remote attention for other stages while a stage of this
// device waits on a holder that is itself running a stage. The two threads take turns on the
// device: each holds `device_mu_` (and a DeviceOwnerScope) while it touches the arena, the forward
// pass or the kernel pool, and the stage thread lets go of it while it waits for a remote
// attention reply or its input, so the kernel pool never runs two callers at once and no wait
// between agents can close a cycle. The serve thread computes remote attention with the device's
// serve ForwardPass (VirtualDevice::serve_forward, its own part of the workspace) on the device's
// pool. Activations and every forward buffer live in the device's workspace segment (counted in
// its capacity); the agent keeps only indices and pointers.
//
// Threads: a serve thread and a stage thread per agent (start/stop from the owner thread).
// counters() may be read from any thread.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include "common/status.h"
#include "model/forward.h"
#include "runtime/message_transport.h"
#include "runtime/stage_message.h"
#include "runtime/virtual_device.h"

namespace kun::runtime {

enum class AgentOp : std::uint16_t {
  kAppendAttend = 1,  // payload: the slice's q/k/v rows (f32); reply payload: attention output
  kWriteBlocks,       // block_ids on the destination, payload: their bytes; reply: ack
  kReadBlocks,        // block_ids; reply payload: their bytes
  kSendBlocks,        // block_ids here go to `peer` as peer_block_ids; `peer` acks to reply_to
  kDropLayer,         // layer: its pages become KV pages; reply payload: their page ids (int64)
  kPullLayer,         // layer from `peer` into this device's KV pages block_ids (page ids, holding
                      // no live KV: the requester's promise); reply: ack once the weights are in
  kSendLayer,         // (agent to agent) send layer's bytes to `peer` as kLayerData
  kLayerData,         // (agent to agent) a pulled layer's bytes, or the holder's error
  kSnapshot,          // reply payload: an encoded DeviceSnapshot
  kShutdownNode,      // the process hosting the agent should end; reply: ack
  kStop,              // ends the serve loop (accepted from the agent's own endpoint only)
  kDescribe,          // reply payload: an encoded DeviceGeometry (static facts, asked once at start)
  kRunStage,          // (Port::kStage) payload: a StageRequest; the agent's stage thread runs it
  kStageInput,        // (Port::kUser, stage to stage) a stage's output activations, matched by tag
  kMoveBlocks,        // inside the device: block_ids[i] -> peer_block_ids[i] (restore's repack); ack
  kCheckIntegrity,    // the agent checks its arena's page accounting (aborts on a broken invariant);
                      // reply: a DeviceSnapshot without layer checksums
  kDropTables,        // (Port::kStage) the executor request_id of the sender is gone: drop its block
                      // tables (no reply)
  kCancelPull,        // request_id: the tag of this sender's kPullLayer that timed out. The pull is
                      // forgotten (its weights, if they come later, are not written); reply payload:
                      // one byte, 1 if it was still pending, 0 if it had ended (its reply went first)
  kReply = 100,       // every reply carries this op
};

struct AgentCounters {
  std::int64_t attention_requests_for_others = 0;  // remote attention done for another device's stage
  std::int64_t attention_tokens_for_others = 0;
  std::int64_t blocks_written = 0;   // blocks received and written into this arena
  std::int64_t blocks_read = 0;      // blocks read out of this arena (reads and sends)
  std::int64_t requests_refused = 0; // requests answered with an error
  std::int64_t stages_run = 0;       // pipeline stages run here (kRunStage)
  std::int64_t swap_out_bytes = 0;   // device -> this agent's host swap space
  std::int64_t swap_in_bytes = 0;
  std::int64_t swap_out_messages = 0;
  std::int64_t swap_in_messages = 0;
  std::int64_t table_executors = 0;  // executors whose block tables the agent keeps now (kRunStage mirrors)
};

// Memory accounting: every page of the device is free, KV, weights (param_pages) or workspace
// (activations and forward buffers), so param + workspace + KV + free pages = num_pages and
// weight_bytes() + workspace_bytes() + kv_bytes() + free bytes = capacity_bytes().
struct DeviceSnapshot {
  int device = -1;
  std::int64_t page_bytes = 0;
  std::int64_t num_pages = 0;
  std::int64_t free_pages = 0;
  std::int64_t kv_pages = 0;
  std::int64_t param_pages = 0;      // weights (parameter segments)
  std::int64_t workspace_pages = 0;  // activations and workspace, reserved at start
  std::int64_t blocks_per_page = 0;
  std::vector<std::int64_t> resident_layers;
  std::vector<std::int64_t> layer_checksums;  // FNV-1a of each resident layer's bytes, same order
  std::vector<std::int64_t> kv_page_ids;
  AgentCounters counters;
  double process_cpu_s = 0.0;  // user + system CPU of the hosting process so far

  std::int64_t capacity_bytes() const { return num_pages * page_bytes; }
  std::int64_t weight_bytes() const { return param_pages * page_bytes; }
  std::int64_t workspace_bytes() const { return workspace_pages * page_bytes; }
  std::int64_t kv_bytes() const { return kv_pages * page_bytes; }
  std::int64_t used_bytes() const { return weight_bytes() + workspace_bytes() + kv_bytes(); }
};
std::vector<std::byte> encode_snapshot(const DeviceSnapshot& s);

// What a front end needs to know of a device to plan for it, reported once at start (kDescribe).
struct DeviceGeometry {
  int device = -1;  // the agent's endpoint id
  std::int64_t num_layers = 0;
  std::int64_t page_bytes = 0;
  std::int64_t num_pages = 0;
  std::int64_t blocks_per_page = 0;
  std::int64_t block_bytes = 0;          // one layer block (KvStorage::block_bytes)
  std::int64_t block_stride_bytes = 0;   // kv::KvGeometry::block_stride_bytes
  std::int64_t kv_block_size = 0;        // tokens per block
  std::int64_t pages_per_layer = 0;
  std::int64_t layer_segment_bytes = 0;
  std::int64_t host_swap_blocks = 0;     // layer blocks of host swap space the agent owns
  std::int64_t workspace_bytes = 0;      // activations and workspace, in the capacity (whole pages)
  std::int64_t max_batched_tokens = 0;   // the step limits the workspace is sized for (DeviceOptions)
  std::int64_t max_sequences = 0;
  std::int64_t max_context_tokens = 0;
  std::int32_t kv_dtype = 0;             // DType
  std::vector<std::int64_t> resident_layers;
  std::vector<std::int64_t> kv_page_ids;  // KV pages at the time of the query
};
std::vector<std::byte> encode_geometry(const DeviceGeometry& g);
StatusOr<DeviceGeometry> decode_geometry(std::span<const std::byte> bytes);
StatusOr<DeviceSnapshot> decode_snapshot(std::span<const std::byte> bytes);

// User + system CPU seconds of this process (all threads).
double process_cpu_seconds();

struct AgentOptions {
  std::int64_t host_swap_blocks = 0;  // layer blocks of host swap space this agent owns
  LinkModel host_link;                // paces swap copies (off by default)
  // Tests only (fault injection; empty in production, and then costs one branch per op): called
  // with each kWriteBlocks (the receiving end of a send_blocks), kDropLayer, kPullLayer (the
  // puller), kSendLayer (the holder of a pulled layer) and kMoveBlocks before the agent acts on
  // it; a non-OK status makes the op fail with it and change nothing, as a transfer error would.
  std::function<Status(AgentOp op, std::int64_t layer)> fault;
};

class DeviceAgent {
 public:
  // The agent takes over `device` (its arena, KV storage and forward pass); the caller must not
  // touch them while the agent runs.
  DeviceAgent(VirtualDevice& device, MessageTransport& endpoint, AgentOptions options = {});
  ~DeviceAgent();
  DeviceAgent(const DeviceAgent&) = delete;
  DeviceAgent& operator=(const DeviceAgent&) = delete;

  void start();
  void stop();  // idempotent
  int device_id() const { return endpoint_.device(); }
  AgentCounters counters() const;
  // Blocks until a kShutdownNode request arrived or `timeout` passed; true if it arrived.
  bool wait_for_shutdown_request(std::chrono::milliseconds timeout);

 private:
  void serve_loop();
  void stage_loop();
  // False when the loop should end.
  bool handle(Message& m);
  void run_stage(Message& m);
  // Runs the decoded stage with the device held by `lock` (released while waiting on holders):
  // `input` (the previous stage's activations; empty for the first stage) goes into the
  // device's workspace, the layers run there, and the output stays there (`out_floats` floats of
  // VirtualDevice::stage_activations()) or, for the last stage, the sampled tokens go to
  // stage_sampled_.
  Status compute_stage(const StageRequest& req, const StageKvTables& tables, std::span<const std::byte> input,
                       std::unique_ptr<DeviceOwnerScope>& scope, std::unique_lock<std::mutex>& lock, std::int64_t* out_floats);
  // Applies a stage request's block-table changes to the sender's executor's mirror (created by
  // a resync); returns the mirror.
  StatusOr<const StageKvTables*> apply_tables(int sender, const StageRequest& req);
  Status do_swaps(const StageRequest& req);
  Status append_attend(const Message& m, std::vector<std::byte>* out);
  Status check_blocks(std::span<const std::int64_t> ids) const;
  void reply(const MessageHeader& request, const Status& status, std::vector<std::byte> payload,
             TransferKind kind = TransferKind::kControl);
  DeviceSnapshot snapshot(bool with_checksums = true) const;
  DeviceGeometry describe() const;
  void pull_layer(const Message& m);
  void send_layer(const Message& m);
  void layer_data(Message& m);

  VirtualDevice& device_;
  MessageTransport& endpoint_;
  AgentOptions options_;
  std::thread thread_;
  std::thread stage_thread_;
  // Held by whichever agent thread touches the device (see the header comment).
  std::mutex device_mu_;
  std::vector<std::byte> host_swap_;                   // stage thread only, under device_mu_
  // Stage thread bookkeeping (activations, logits and the forward pass's buffers are in the
  // device's workspace segment; these hold indices and pointers, reused step to step).
  // Block tables of the stage's layers, per executor (sender endpoint, executor id), kept from the
  // stage messages' changes (stage_message.h); host-side bookkeeping, as a GPU worker keeps its
  // block tables in host memory and copies the step's into device memory.
  std::map<std::pair<int, std::uint64_t>, StageKvTables> stage_tables_;
  std::vector<const StageKvTables::Layer*> stage_cells_;  // per (sequence, layer) of the running stage
  std::vector<std::vector<std::byte*>> stage_block_ptrs_;
  std::vector<model::SequenceSlice> stage_slices_;
  std::vector<std::int64_t> stage_rows_;
  std::vector<std::int32_t> stage_sampled_;
  std::vector<float> stage_sample_scratch_;
  std::vector<std::byte*> block_ptrs_;  // serve thread only
  struct PendingPull {
    MessageHeader request;  // the kPullLayer as received
  };
  std::map<std::pair<int, std::uint64_t>, PendingPull> pulls_;  // serve thread only; by (requester, tag)
  std::atomic<std::int64_t> attention_requests_for_others_{0};
  std::atomic<std::int64_t> attention_tokens_for_others_{0};
  std::atomic<std::int64_t> blocks_written_{0};
  std::atomic<std::int64_t> blocks_read_{0};
  std::atomic<std::int64_t> requests_refused_{0};
  std::atomic<bool> stopping_{false};  // stop() was called: a stage waiting for input gives up
  std::atomic<std::int64_t> stages_run_{0};
  std::atomic<std::int64_t> swap_out_bytes_{0};
  std::atomic<std::int64_t> swap_in_bytes_{0};
  std::atomic<std::int64_t> swap_out_messages_{0};
  std::atomic<std::int64_t> swap_in_messages_{0};
  std::atomic<std::int64_t> table_executors_{0};  // stage_tables_.size(), for counters()
  std::mutex shutdown_mu_;
  std::condition_variable shutdown_cv_;
  bool shutdown_requested_ = false;  // guarded by shutdown_mu_
};

// What a stage, a coordinator or a test calls to use agents (any device, including its own).
// Every call waits at most `timeout` for the reply: deadline_exceeded after it, or the
// transport's error (a peer that stopped answering) as soon as it is known.
class AgentClient {
 public:
  explicit AgentClient(MessageTransport& endpoint, std::chrono::milliseconds timeout = std::chrono::seconds(10))
      : endpoint_(endpoint), timeout_(timeout) {}

  // Remote attention: `holder` appends this slice's k/v to `blocks` (its blocks for this
  // sequence and layer) and attends; returns the [num_tokens][q_dim] output.
  RecvHandle append_attend_async(int holder, std::int64_t request_id, std::int64_t layer,
                                 const model::SequenceSlice& slice, std::span<const std::int64_t> blocks,
                                 std::span<const float> qkv);
  StatusOr<std::vector<float>> append_attend(int holder, std::int64_t request_id, std::int64_t layer,
                                             const model::SequenceSlice& slice, std::span<const std::int64_t> blocks,
                                             std::span<const float> qkv);
  Status write_blocks(int device, std::span<const std::int64_t> blocks, std::span<const std::byte> bytes,
                      TransferKind kind = TransferKind::kKvExchange);
  StatusOr<std::vector<std::byte>> read_blocks(int device, std::span<const std::int64_t> blocks);
  // Device `from` sends its `blocks` to device `to`, which writes them as `to_blocks` and acks.
  Status send_blocks(int from, std::span<const std::int64_t> blocks, int to, std::span<const std::int64_t> to_blocks,
                     TransferKind kind = TransferKind::kKvExchange);
  // Returns the dropped layer's pages (now KV pages) on `device`.
  StatusOr<std::vector<std::int64_t>> drop_layer(int device, std::int64_t layer);
  // `device` pulls `layer` from device `from` into its KV pages `pages` (holding no live blocks).
  // A pull that gets no answer in time is cancelled on `device`; if the cancel gets none either,
  // *pages_may_be_written (when given) is set: the weights may still land in `pages` later, so
  // the caller must not give them to anything else.
  Status pull_layer(int device, std::int64_t layer, int from, std::span<const std::int64_t> pages,
                    bool* pages_may_be_written = nullptr);
  StatusOr<DeviceSnapshot> snapshot(int device);
  StatusOr<DeviceGeometry> describe(int device);
  // The device checks its arena and reports its pages and resident layers (no checksums).
  StatusOr<DeviceSnapshot> check_integrity(int device);
  // Inside `device`: copies block from[i] to to[i] (both live in its KV pages), in order.
  Status move_blocks(int device, std::span<const std::int64_t> from, std::span<const std::int64_t> to);
  Status shutdown_node(int device);

 private:
  RecvHandle request(MessageHeader h, std::vector<std::byte> payload, std::uint64_t* tag = nullptr);
  StatusOr<Message> wait_reply(RecvHandle& handle, const char* what, int device);

  MessageTransport& endpoint_;
  std::chrono::milliseconds timeout_;
};

}  // namespace kun::runtime
