// The messages of a pipeline stage run by a device agent (issue 12): the front end turns one
// engine::StepPlan into one StageRequest per stage (encode_stage_request: the one place that
// knows StepPlan's layout), each agent runs its layers, asks the holders of remote KV for
// attention, and hands the activations to the next stage's agent directly (kStageInput); the last
// stage samples and answers the front end (StageResult). Stage timings ride along so the front
// end can count pipeline busy and idle time.
//
// Block tables travel as changes (issue 14): each agent keeps, per executor (the sending
// endpoint and StageRequest::executor), a mirror of the block tables of its stage's layers, and a
// stage request carries only what changed since the executor's previous one: requests released,
// tables replaced (a request's first plan on the executor, a swap-in, a layer moved, a repack) and
// blocks appended. So a decode step's message grows with the new blocks, not with
// sequences x layers x context. A resync (the first request an executor sends a stage, or after
// PipelineExecutor::resync) replaces the agent's mirror with the front end's whole one. The
// executor drops its mirrors on the agents when it goes (kDropTables).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "common/status.h"
#include "engine/kv_table_mirror.h"
#include "engine/step.h"
#include "model/sampling.h"

namespace kun::runtime {

struct StageSequence {
  std::int64_t request_id = 0;  // its block table in the agent's mirror
  std::int64_t start_pos = 0;
  std::int64_t num_tokens = 0;
  std::uint8_t sample = 0;
  model::SamplingParams sampling;
  std::uint64_t sample_index = 0;
};

// A block copy between this device's KV blocks and its host swap space: swap-outs copy block
// `src` to host slot `dst`, swap-ins host slot `src` to block `dst`.
struct SwapCopy {
  std::int64_t src = 0;
  std::int64_t dst = 0;
};

// A change to one request's block table on the stage's layers: `num_lists` StageLayerLists follow
// (in StageRequest::lists, in update order).
struct StageTableUpdate {
  std::int64_t request_id = 0;
  std::uint8_t replace = 0;  // 1: the request's whole table on the stage's layers; 0: blocks appended
  std::int32_t num_lists = 0;
};
struct StageLayerList {
  std::int32_t layer = 0;
  std::int32_t holder = -1;  // endpoint holding the layer's KV
  std::int64_t num_blocks = 0;  // its next num_blocks ids in StageRequest::blocks
};

struct StageRequest {
  std::uint64_t executor = 0;  // whose block tables (with the sender's endpoint) the agent keeps
  std::uint8_t reset_tables = 0;  // resync: forget every table of the executor before the updates
  std::int64_t layer_begin = 0;
  std::int64_t layer_end = 0;
  std::uint8_t first = 0;      // embeds `tokens`; otherwise waits for kStageInput from prev_endpoint
  std::uint8_t last = 0;       // samples and replies to reply_endpoint; otherwise sends to next_endpoint
  std::int32_t prev_endpoint = -1;
  std::int32_t next_endpoint = -1;
  std::int32_t reply_endpoint = -1;
  std::vector<StageSequence> sequences;
  std::vector<std::int32_t> tokens;  // first stage only: every sequence's tokens back to back
  // Table changes, applied in this order before the stage runs: released requests, then updates.
  std::vector<std::int64_t> released;
  std::vector<StageTableUpdate> updates;
  std::vector<StageLayerList> lists;
  std::vector<std::int64_t> blocks;
  std::vector<SwapCopy> swap_out;  // run before the stage, swap-outs first
  std::vector<SwapCopy> swap_in;

  std::int64_t num_layers() const { return layer_end - layer_begin; }
  std::int64_t num_tokens() const;
};

struct StageSpec {
  int endpoint = -1;
  std::int64_t layer_begin = 0;
  std::int64_t layer_end = 0;
};

// The front end's copy of each request's block table (block ids, every layer), kept from the
// plans' table changes (engine/step.h KvListKind): the scheduler sends a table once and then only
// appended blocks, so planning costs nothing per context token.
using StageKvTables = engine::KvTableMirror<std::int64_t>;

// Stage `stage` of `stages` for `plan` of executor `executor`, whose table changes `tables` (the
// front end's mirror) has already applied. The plan's table changes on the stage's layers go
// along; with `resync`, every table of `tables` instead (and the agent forgets what it had). A
// table's device is a stage index; it becomes that stage's endpoint. Swap copies naming stage
// `stage` go with it. KUN_CHECKs a plan naming a device outside the stages or a request without a
// table.
std::vector<std::byte> encode_stage_request(const engine::StepPlan& plan, const StageKvTables& tables, std::size_t stage,
                                            std::span<const StageSpec> stages, int reply_endpoint, std::uint64_t executor,
                                            bool resync);
StatusOr<StageRequest> decode_stage_request(std::span<const std::byte> bytes);

// What goes with a stage's output: every earlier stage's [start_ns, end_ns) (steady clock of the
// host that ran it), then the payload proper (activations, or the last stage's sampled tokens).
struct StageTrailer {
  std::vector<std::int64_t> stage_times_ns;
};
std::vector<std::byte> encode_stage_output(const StageTrailer& t, std::span<const std::byte> body);
// Returns the body's offset in `bytes`.
StatusOr<std::size_t> decode_stage_output(std::span<const std::byte> bytes, StageTrailer* t);

}  // namespace kun::runtime
