// The transitions' executors (DESIGN.md 3, issue 12): how ClusterRuntime carries out a drop (and
// a growth, which is the same path: runtime/cluster_regroup.cc), a restore's gather phase, a
// split and a live migration with messages to the device agents. Each takes transition_mu_ held with its units free, reserves them (Unit::in_transition, gates
// closed), releases the lock while it pauses their engines, plans (cluster/transition_plan.h) and
// moves pages, KV and weights, and re-takes it to publish the new units or roll back. A transfer
// that fails past the commit point completes the transition without it or rolls it back; see
// runtime/README.md, "Failures". The entry points (drop, restore, migrate, the policy loop) and
// the reservation bookkeeping are in cluster_runtime.cc.
#include <algorithm>
#include <chrono>
#include <set>

#include "common/check.h"
#include "common/log.h"
#include "engine/restore_homes.h"
#include "runtime/cluster_runtime.h"

namespace kun::runtime {
namespace {

std::vector<std::int64_t> raw_ids(std::span<const kv::BlockId> ids) {
  std::vector<std::int64_t> out;
  out.reserve(ids.size());
  for (kv::BlockId b : ids) out.push_back(b.value);
  return out;
}

}  // namespace

Status ClusterRuntime::move_kv(std::int64_t src, std::span<const kv::BlockId> from, std::int64_t dst,
                               std::span<const kv::BlockId> to, TransferKind kind, std::int64_t* bytes) const {
  KUN_CHECK_EQ(from.size(), to.size());
  if (from.empty()) return ok_status();
  // One message: the source's agent reads the blocks and sends them to the destination's agent,
  // which writes them and acks here.
  const Status s = client().send_blocks(endpoint(src), raw_ids(from), endpoint(dst), raw_ids(to), kind);
  if (!s.ok()) {
    return s.with_context("KV move of " + std::to_string(from.size()) + " blocks from device " + std::to_string(src) + " to " +
                          std::to_string(dst));
  }
  if (bytes != nullptr) *bytes += static_cast<std::int64_t>(from.size()) * fleet_->geometry(static_cast<int>(src)).block_bytes;
  return ok_status();
}

Status ClusterRuntime::pull_layer_from_any(std::int64_t instance, std::int64_t layer, std::int64_t preferred,
                                           std::span<const std::int64_t> pages, std::int64_t* source,
                                           bool* pages_may_be_written) {
  // The planned holder first, then every other device the mirror says holds the layer: the
  // group's members that pulled it already, devices outside the group (all weights are the same
  // everywhere). A failed pull changes nothing on the puller: its pages stay KV pages holding no
  // live blocks. (A mirror entry that went stale meanwhile only costs a refused attempt.)
  std::vector<std::int64_t> order = {preferred};
  for (std::int64_t c = 0; c < options_.num_instances; ++c) {
    if (c != preferred && c != instance && mirror_has_layer(c, layer)) order.push_back(c);
  }
  Status last;
  for (std::int64_t from : order) {
    bool unanswered = false;
    last = client().pull_layer(endpoint(instance), layer, endpoint(from), pages, &unanswered);
    if (unanswered) {
      if (pages_may_be_written != nullptr) *pages_may_be_written = true;
      return last.with_context("pull of layer " + std::to_string(layer) + " by device " + std::to_string(instance));
    }
    if (last.ok()) {
      mirror_set_layer(instance, layer, true);
      *source = from;
      return ok_status();
    }
    KUN_LOG(kWarn) << "pull of layer " << layer << " by device " << instance << " from device " << from
                   << " failed: " << last.to_string();
  }
  return last.with_context("pull of layer " + std::to_string(layer) + " by device " + std::to_string(instance) + " from " +
                           std::to_string(order.size()) + " holder(s)");
}

ClusterEvent ClusterRuntime::transition_event(const std::string& kind, std::int64_t group, std::vector<std::int64_t> instances,
                                              std::chrono::steady_clock::time_point began, std::int64_t bytes,
                                              std::int64_t moved) const {
  ClusterEvent ev;
  ev.time_us = clock_->now_us();
  ev.kind = kind;
  ev.group = group;
  ev.instances = std::move(instances);
  ev.bytes = bytes;
  ev.latency_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - began).count();
  ev.requests_moved = moved;
  return ev;
}

ClusterEvent ClusterRuntime::split_event(const std::string& kind, std::int64_t group, const std::vector<std::int64_t>& instances,
                                         std::chrono::steady_clock::time_point began, std::int64_t pulled_bytes,
                                         std::int64_t moved, std::int64_t exchanged_blocks, std::int64_t recomputed,
                                         std::int64_t repacked_blocks) {
  {
    std::lock_guard<std::mutex> el(events_mu_);
    kv_blocks_moved_ += exchanged_blocks;
  }
  ClusterEvent ev = transition_event(kind, group, instances, began, pulled_bytes, moved);
  ev.kv_blocks_exchanged = exchanged_blocks;
  ev.requests_recomputed = recomputed;
  ev.blocks_repacked = repacked_blocks;
  return ev;
}

StatusOr<std::vector<memory::PageId>> ClusterRuntime::reclaim_layer_pages(
    std::int64_t inst, const std::function<std::int64_t(std::span<const kv::BlockMove>)>& remap, std::int64_t* repacked) {
  kv::KvBlockAllocator& alloc = *allocators_[static_cast<std::size_t>(inst)];
  while (true) {
    KUN_ASSIGN_OR_RETURN(kv::ReclaimResult reclaimed, alloc.reclaim_pages(fleet_->geometry(static_cast<int>(inst)).pages_per_layer));
    if (reclaimed.moves.empty()) return std::move(reclaimed.pages);
    // The copies happen inside the device, by its agent (the group is paused).
    std::vector<std::int64_t> from, to;
    for (const kv::BlockMove& m : reclaimed.moves) {
      from.push_back(m.from.value);
      to.push_back(m.to.value);
    }
    const Status moved = client().move_blocks(endpoint(inst), from, to);
    if (!moved.ok()) {
      // Nothing was remapped: the tables keep the old blocks (their bytes are intact), the
      // planned destinations go back to the pool and the victim pages back into service.
      for (const kv::BlockMove& m : reclaimed.moves) alloc.free(m.to);
      alloc.cancel_reclaim();
      return moved.with_context("repack on device " + std::to_string(inst));
    }
    const std::int64_t remapped = remap(reclaimed.moves);
    KUN_CHECK_EQ(remapped, static_cast<std::int64_t>(reclaimed.moves.size())) << "repack on device " << inst;
    for (const kv::BlockMove& m : reclaimed.moves) alloc.free(m.from);
    *repacked += remapped;
  }
}

std::vector<ClusterRuntime::LayerPull> ClusterRuntime::reclaim_pages_for_pulls(Unit& unit, const std::vector<cluster::WeightPull>& pulls) {
  std::vector<LayerPull> out;
  std::int32_t short_member = -1;  // its pool could not spare the next layer: the rest wait for the switch
  for (const cluster::WeightPull& p : pulls) {
    if (p.member == short_member) continue;
    const std::int64_t inst = unit.instances[static_cast<std::size_t>(p.member)];
    if (mirror_has_layer(inst, p.layer)) continue;  // kept at a drop, or pulled by an earlier attempt
    auto pages = reclaim_layer_pages(
        inst, [&](std::span<const kv::BlockMove> moves) { return unit.kv->remap_blocks(p.member, moves); },
        &unit.restore_repacked_blocks);
    if (!pages.ok()) {
      if (pages.status().code() != StatusCode::kResourceExhausted) {
        record_failure("repack", unit.group, unit.instances, pages.status(),
                       "layer " + std::to_string(p.layer) + " of device " + std::to_string(inst) + " waits for the switch");
      }
      short_member = p.member;
      continue;
    }
    out.push_back(LayerPull{unit.instances[static_cast<std::size_t>(p.from)], inst, p.layer, {}});
    for (memory::PageId page : *pages) out.back().pages.push_back(page.value);
  }
  return out;
}

void ClusterRuntime::start_weight_pull_locked(Unit& unit, std::vector<LayerPull> pulls, const std::string& switch_kind) {
  if (unit.weight_pull.joinable()) unit.weight_pull.join();  // an earlier phase's, finished (its switch joined it)
  unit.restore_pulled_bytes = 0;
  if (pulls.empty()) {
    unit.weights_back.store(true);
    return;
  }
  unit.weights_back.store(false);
  // Each puller's agent asks the owner's agent for the layer (a bulk kWeights message that yields
  // its links to activations) and maps it into the reclaimed pages; the acks come here. A pull
  // that fails is retried from every other holder; if none can send it, its pages wait for the
  // switch (which returns them to the pool and pulls the layer again, paused).
  unit.weight_pull = std::thread([this, &unit, switch_kind, pulls = std::move(pulls)] {
    for (const LayerPull& p : pulls) {
      std::int64_t source = -1;
      bool unanswered = false;
      const Status s = pull_layer_from_any(p.to, p.layer, p.from, p.pages, &source, &unanswered);
      if (s.ok()) {
        unit.restore_pulled_bytes += fleet_->geometry(static_cast<int>(source)).layer_segment_bytes;
        continue;
      }
      Unit::FailedPull failed{p.to, p.layer, {}, unanswered};
      for (std::int64_t page : p.pages) failed.pages.push_back(memory::PageId(page));
      unit.failed_pulls.push_back(std::move(failed));
      record_failure("weight_pull", unit.group, unit.instances, s, "retried at the " + switch_kind);
    }
    unit.weights_back.store(true, std::memory_order_release);
    notify_restore_progress();
  });
}

std::map<std::pair<std::int64_t, std::int64_t>, std::vector<memory::PageId>> ClusterRuntime::take_failed_pulls(Unit& unit) {
  std::map<std::pair<std::int64_t, std::int64_t>, std::vector<memory::PageId>> reserved;  // (instance, layer)
  for (Unit::FailedPull& f : unit.failed_pulls) {
    if (f.pages_may_be_written) {
      reserved[{f.instance, f.layer}] = std::move(f.pages);
    } else {
      KUN_CHECK_OK(allocators_[static_cast<std::size_t>(f.instance)]->add_pages(f.pages));
    }
  }
  unit.failed_pulls.clear();
  return reserved;
}

Status ClusterRuntime::pull_missing_layers(const std::vector<std::int64_t>& instances, const std::vector<cluster::WeightPull>& pulls,
                                           const std::function<std::int64_t(std::int32_t, std::span<const kv::BlockMove>)>& remap,
                                           std::map<std::pair<std::int64_t, std::int64_t>, std::vector<memory::PageId>>& reserved_pages,
                                           std::vector<Unit::FailedPull>* unanswered, std::int64_t* repacked, std::int64_t* pulled_bytes) {
  for (const cluster::WeightPull& wp : pulls) {
    const std::int64_t inst = instances[static_cast<std::size_t>(wp.member)];
    if (mirror_has_layer(inst, wp.layer)) continue;  // pulled during the gather (or kept at a drop)
    const auto reserved = reserved_pages.find({inst, wp.layer});
    if (reserved != reserved_pages.end()) {
      // An unanswered pull may have landed since: then the device holds the layer in those pages.
      StatusOr<DeviceSnapshot> snap = client().snapshot(endpoint(inst));
      if (snap.ok() && std::find(snap->resident_layers.begin(), snap->resident_layers.end(), wp.layer) != snap->resident_layers.end()) {
        mirror_set_layer(inst, wp.layer, true);
        reserved_pages.erase(reserved);
        continue;
      }
    }
    StatusOr<std::vector<memory::PageId>> pages_or =
        reserved != reserved_pages.end()
            ? StatusOr<std::vector<memory::PageId>>(reserved->second)
            : reclaim_layer_pages(
                  inst, [&](std::span<const kv::BlockMove> moves) { return remap(wp.member, moves); }, repacked);
    if (reserved != reserved_pages.end()) reserved_pages.erase(reserved);
    if (!pages_or.ok()) return pages_or.status().with_context("layer " + std::to_string(wp.layer) + " on device " + std::to_string(inst));
    std::vector<std::int64_t> pages;
    for (memory::PageId page : *pages_or) pages.push_back(page.value);
    std::int64_t source = -1;
    bool pages_may_be_written = false;
    if (Status s = pull_layer_from_any(inst, wp.layer, instances[static_cast<std::size_t>(wp.from)], pages, &source, &pages_may_be_written);
        !s.ok()) {
      if (pages_may_be_written) {
        // Never answered: a late landing may still write them, so they stay reserved for the layer.
        unanswered->push_back(Unit::FailedPull{inst, wp.layer, std::move(*pages_or), true});
      } else {
        KUN_CHECK_OK(allocators_[static_cast<std::size_t>(inst)]->add_pages(*pages_or));  // still KV pages on the device
      }
      return s;
    }
    *pulled_bytes += fleet_->geometry(static_cast<int>(source)).layer_segment_bytes;
  }
  return ok_status();
}

void ClusterRuntime::publish_successors_locked(TransitionLock& lock, std::vector<std::shared_ptr<Unit>> old_units,
                                               const std::vector<std::shared_ptr<Unit>>& successors) {
  for (const auto& u : successors) launch(*u);
  // The successors replace the old units. Their gates retire first, handing what queued to the
  // successors; a caller that meets a retired gate reloads the snapshot published just after.
  // (Gate-to-gate hand-overs happen only here, under transition_mu_: never two at once.)
  units_.erase(std::remove_if(units_.begin(), units_.end(),
                              [&](const auto& u) { return std::find(old_units.begin(), old_units.end(), u) != old_units.end(); }),
               units_.end());
  for (const auto& u : successors) units_.push_back(u);
  std::shared_ptr<const Routing> next = build_routing_locked();
  for (auto& u : old_units) retire_gate(*u, *next);
  publish_routing(std::move(next));
  release_locked(old_units);
  lock.unlock();
  for (auto& u : old_units) retire(u);  // joins their engine threads: not under transition_mu_
}

Status ClusterRuntime::begin_restore_locked(TransitionLock& lock, std::int64_t group, const std::string& reason) {
  std::shared_ptr<Unit> unit_ptr = group_unit_locked(group);
  if (unit_ptr == nullptr) return not_found("no fused group " + std::to_string(group));
  Unit& unit = *unit_ptr;
  KUN_CHECK(!unit.in_transition) << "group " << group << " is in another transition";
  KUN_CHECK(!unit.restoring.load() && !unit.gathered.load()) << "group " << group << " is already restoring";
  unit.in_transition = true;  // released below; the rest runs without transition_mu_
  lock.unlock();
  unit.restore_began = std::chrono::steady_clock::now();
  unit.restore_reason = reason;
  unit.engine->pause();
  unit.engine->quiesce();
  // Weights first, as in the artifact: each member takes its dropped layers' pages back from its
  // KV pool now (repacking live blocks inside the device), and the bytes cross the link on a
  // background thread as bulk transfers, yielding to the activations of the group, which keeps
  // decoding on its stage layers. A layer whose pages the pool cannot spare yet (or whose repack
  // copy failed) waits for the split.
  cluster::RestoreInput input;
  input.group = group;
  input.members = unit.instances;
  input.strategy = options_.stale_kv;
  for (std::int64_t inst : unit.instances) input.kv_blocks_total.push_back(allocators_[static_cast<std::size_t>(inst)]->num_total());
  if (!unit.kept_layers.empty()) {
    input.layers_kept.resize(unit.instances.size());
    for (const auto& [inst, l] : unit.kept_layers) {
      const auto k = std::find(unit.instances.begin(), unit.instances.end(), inst) - unit.instances.begin();
      input.layers_kept[static_cast<std::size_t>(k)].push_back(l);
    }
  }
  unit.restore_plan = cluster::plan_restore(input, transition_geometry());
  record_plan("restore", group, unit.restore_plan.to_string());
  unit.restore_repacked_blocks = 0;
  unit.live_gathered_blocks = 0;
  std::vector<LayerPull> pulls = reclaim_pages_for_pulls(unit, unit.restore_plan.pulls);
  lock.lock();
  start_weight_pull_locked(unit, std::move(pulls), "split");
  if (options_.stale_kv == cluster::StaleKvStrategy::kRecompute) {
    unit.gathered.store(true);  // nothing to gather: the split recomputes the running requests
  } else {
    unit.split_room = unit.restore_plan.split_room_blocks;
    unit.restoring.store(true, std::memory_order_release);
    const bool all_homed = engine::assign_restore_homes(unit.engine->scheduler(), *unit.kv, unit.split_room).all_homed;
    if (all_homed && unit.kv->requests_with_misplaced_layers().empty()) unit.gathered.store(true);
  }
  unit.begin_pause_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - unit.restore_began).count();
  unit.engine->resume();
  release_locked({unit_ptr});
  return ok_status();
}

StatusOr<std::int64_t> ClusterRuntime::drop_locked(TransitionLock& lock, const cluster::DropAction& action) {
  // A drop fuses independent instances; a growth (action.absorbs set) also takes in fused groups,
  // whose members hold only their stage. Both are plan_drop over the layers each member holds now:
  // every member drops what its new stage does not keep, so one path carries out both.
  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<std::int64_t> instances = action.instances;
  const std::int64_t group = action.group;
  const bool growth = !action.absorbs.empty();
  const std::string kind = growth ? "grow" : "drop";
  const auto g = static_cast<std::int64_t>(instances.size());
  const std::int64_t L = config_.num_layers;
  // The units giving their members, in order of first appearance: independent instances and,
  // in a growth, the absorbed groups, each whole.
  std::vector<std::shared_ptr<Unit>> sources;
  for (std::int64_t inst : instances) {
    Unit* u = unit_of_instance(inst);
    if (u == nullptr) return failed_precondition("instance " + std::to_string(inst) + " has no unit");
    if (u->group >= 0 && std::find(action.absorbs.begin(), action.absorbs.end(), u->group) == action.absorbs.end()) {
      if (!growth) return failed_precondition("instance " + std::to_string(inst) + " is not independent");
      return failed_precondition("instance " + std::to_string(inst) + " is in group " + std::to_string(u->group) +
                                 ", which the growth does not absorb");
    }
    if (u->in_restore() || u->shrinking.load()) return failed_precondition("group " + std::to_string(u->group) + " is restoring or shrinking");
    KUN_CHECK(!u->in_transition) << "instance " << inst << " is in another transition";
    auto it = std::find_if(units_.begin(), units_.end(), [&](const auto& p) { return p.get() == u; });
    if (std::find(sources.begin(), sources.end(), *it) == sources.end()) sources.push_back(*it);
  }
  for (const auto& s : sources) {
    for (std::int64_t inst : s->instances) {
      if (std::find(instances.begin(), instances.end(), inst) == instances.end()) {
        return failed_precondition("group " + std::to_string(s->group) + " is absorbed without its member " + std::to_string(inst));
      }
    }
  }
  const auto member_index = [&](std::int64_t inst) {
    return static_cast<std::int32_t>(std::find(instances.begin(), instances.end(), inst) - instances.begin());
  };
  // Reserve the sources (other transitions leave them alone), then work without transition_mu_.
  // Only the sources stop: their gates close (submits and cancels routed to them queue there and
  // are handed to the group at the end) and their engines park at a step boundary. The sources
  // stay published until the group replaces them, so routing always covers every instance;
  // other units keep serving (and other transitions run) throughout.
  for (auto& s : sources) {
    s->in_transition = true;
    close_gate(*s);
  }
  lock.unlock();
  // The plan, from every source's requests at a step boundary (cluster/transition_plan.h); a
  // member holds the layers of its stage in its source (all of them when it was independent).
  cluster::DropInput input;
  input.group = group;
  input.members = instances;
  input.strategy = options_.stale_kv;
  std::vector<std::vector<std::int32_t>> member_of_device;  // [source][its device index] -> member
  for (auto& s : sources) {
    s->engine->pause();
    s->engine->quiesce();
    std::vector<std::int32_t> m;
    for (std::int64_t inst : s->instances) m.push_back(member_index(inst));
    member_of_device.push_back(std::move(m));
  }
  const double quiesce_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  for (std::int64_t inst : instances) {
    const auto& source = *std::find_if(sources.begin(), sources.end(), [&](const auto& s) {
      return std::find(s->instances.begin(), s->instances.end(), inst) != s->instances.end();
    });
    const auto src_g = static_cast<std::int64_t>(source->instances.size());
    const auto stage =
        static_cast<std::int64_t>(std::find(source->instances.begin(), source->instances.end(), inst) - source->instances.begin());
    input.held_begin.push_back(cluster::stage_layer_begin(stage, src_g, L));
    input.held_end.push_back(cluster::stage_layer_begin(stage + 1, src_g, L));
  }
  for (std::size_t k = 0; k < sources.size(); ++k) {
    for (cluster::TransitionRequest& r :
         cluster::transition_requests(sources[k]->engine->scheduler(), *sources[k]->kv, member_of_device[k])) {
      input.requests.push_back(std::move(r));
    }
  }
  const cluster::DropPlan plan = cluster::plan_drop(input, transition_geometry());
  // Commit point: nothing has moved yet, so a failure here rolls back by reopening the sources.
  Status commit = options_.transition_fault ? options_.transition_fault(kind, group) : ok_status();
  for (std::size_t k = 0; commit.ok() && k < plan.members.size(); ++k) {
    for (std::int64_t l : plan.members[k].layers_dropped) {
      if (!mirror_has_layer(plan.members[k].instance, l)) {
        commit = failed_precondition("device " + std::to_string(plan.members[k].instance) + " does not hold layer " + std::to_string(l));
      }
    }
  }
  if (!commit.ok()) {
    lock.lock();
    const std::shared_ptr<const Routing> r = routing();
    for (auto& s : sources) {
      reopen_gate(*s, *r);
      s->engine->resume();
    }
    release_locked(sources);
    return commit;
  }
  record_plan(kind, group, plan.to_string());
  // The sources' admission histories (recent prompt lengths, for the lookahead's chunk cap) go
  // with their requests into the group rather than starting it cold.
  std::vector<std::vector<std::int64_t>> histories;
  for (auto& s : sources) histories.push_back(s->engine->scheduler().admission_history());
  const std::vector<std::int64_t> history = merged_admission_history(histories);
  // The layers go first, before any request moves. A member whose drop_layer fails (a transfer
  // or device error) keeps that layer: the group still has every layer on its stage owner, that
  // member just has less KV room (the plan shrinks), and its restore will not pull it back.
  std::int64_t dropped_bytes = 0;
  std::int64_t layers_dropped = 0;
  std::vector<std::pair<std::int64_t, std::int64_t>> failed_drops;
  Status drop_error;
  for (const cluster::MemberLayout& layout : plan.members) {
    kv::KvBlockAllocator& alloc = *allocators_[static_cast<std::size_t>(layout.instance)];
    for (std::int64_t l : layout.layers_dropped) {
      StatusOr<std::vector<std::int64_t>> pages_or = client().drop_layer(endpoint(layout.instance), l);
      if (!pages_or.ok()) {
        failed_drops.emplace_back(layout.instance, l);
        drop_error = pages_or.status();
        continue;
      }
      std::vector<memory::PageId> pages;
      for (std::int64_t p : *pages_or) pages.push_back(memory::PageId(p));
      KUN_CHECK_OK(alloc.add_pages(pages));
      mirror_set_layer(layout.instance, l, false);
      ++layers_dropped;
      dropped_bytes += static_cast<std::int64_t>(pages.size()) * fleet_->geometry(static_cast<int>(layout.instance)).page_bytes;
    }
  }
  // Carry it out: every request leaves its source; those the plan keeps with KV take their
  // tables, re-keyed from the source's device index to the new member index.
  std::set<RequestId> keep;
  for (const cluster::StaleKvPlan& s : plan.keep_kv) keep.insert(s.id);
  std::map<RequestId, engine::Engine::Detached> detached;
  std::map<RequestId, std::map<std::int32_t, kv::BlockTable>> tables_of;
  std::vector<RequestId> stale_ids;  // running at the drop: the requests the strategy is about
  for (const cluster::TransitionRequest& r : input.requests) {
    if (r.running) stale_ids.push_back(r.id);
  }
  for (std::size_t k = 0; k < sources.size(); ++k) {
    Unit& s = *sources[k];
    for (RequestId id : s.engine->scheduler().request_ids_in_order()) {
      const bool with_kv = keep.count(id) != 0;
      auto d = s.engine->detach(id, /*keep_kv=*/with_kv);
      KUN_CHECK(d.has_value());
      if (with_kv) {
        std::map<std::int32_t, kv::BlockTable> rekeyed;
        for (auto& [device, table] : s.kv->export_tables(id)) {
          rekeyed.emplace(member_of_device[k][static_cast<std::size_t>(device)], std::move(table));
        }
        tables_of.emplace(id, std::move(rekeyed));
      }
      detached.emplace(id, std::move(*d));
    }
  }
  auto unit = make_unit(instances, group);
  // Layers a member holds outside its new stage: its failed drop_layers, and those a source's
  // member kept already (the mirror says which).
  unit->kept_layers = layers_outside_stages(instances);
  unit->engine->mutable_scheduler().set_admission_history(history);
  // Running requests keep their KV where it is; the group's KvManager knows which layers are away
  // from the stage that now runs them (the plan's moves): remote attention reaches them, and
  // under `exchange` the unit moves them home layer by layer between steps.
  const std::int64_t bs = options_.device.kv_block_size;
  {
    std::lock_guard<std::mutex> rl(requests_mu_);
    for (const cluster::StaleKvPlan& s : plan.keep_kv) {
      std::map<std::int32_t, kv::BlockTable> tables = std::move(tables_of.at(s.id));
      for (std::int64_t j = 0; j < g; ++j) {
        if (tables.count(static_cast<std::int32_t>(j)) != 0) continue;
        kv::BlockTable none(bs, 0, 0);  // no layers yet; the exchange adds them
        KUN_CHECK_OK(none.append_tokens(s.tokens, *allocators_[static_cast<std::size_t>(instances[static_cast<std::size_t>(j)])]));
        tables.emplace(static_cast<std::int32_t>(j), std::move(none));
      }
      for (const auto& [j, t] : tables) KUN_CHECK_EQ(t.num_tokens(), s.tokens) << "request " << s.id << " on member " << j;
      unit->kv->import_tables(s.id, s.tokens, std::move(tables));
      KUN_CHECK_EQ(unit->kv->misplaced_layers(s.id).size(), s.moves.size()) << "request " << s.id << " against its plan";
      request_instance_[s.id] = instances.front();
      unit->engine->adopt_with_imported_kv(std::move(detached.at(s.id)));
    }
    for (RequestId id : plan.queue) {
      request_instance_[id] = instances.front();
      KUN_CHECK_OK(unit->engine->adopt(std::move(detached.at(id)), /*with_kv=*/false));
    }
  }
  const auto moved = static_cast<std::int64_t>(plan.keep_kv.size() + plan.queue.size());
  KUN_CHECK_EQ(moved, static_cast<std::int64_t>(detached.size())) << kind << " into group " << group << " lost a request";
  lock.lock();
  publish_successors_locked(lock, std::move(sources), {std::move(unit)});  // returns with the lock released
  ClusterEvent ev = transition_event(kind, group, instances, t0, dropped_bytes, moved);
  ev.quiesce_ms = quiesce_ms;
  ev.layers_dropped = layers_dropped;
  const auto lost_kv = static_cast<std::int64_t>(plan.lose_kv.size());
  ev.requests_recomputed = lost_kv;  // running at the drop, no KV now (queued preempted ones recompute anyway)
  ev.stale_requests = std::move(stale_ids);
  ev.reason = action.reason + "; ";
  if (growth) {
    std::string absorbed;
    for (std::int64_t a : action.absorbs) absorbed += (absorbed.empty() ? "" : ",") + std::to_string(a);
    ev.reason += "grew from group(s) " + absorbed + " to degree " + std::to_string(g) + "; ";
  }
  ev.reason += std::to_string(plan.keep_kv.size()) + " running requests keep their KV (" +
               cluster::stale_kv_strategy_name(options_.stale_kv) + "), " + std::to_string(lost_kv) + " recompute";
  if (!failed_drops.empty()) ev.reason += "; " + std::to_string(failed_drops.size()) + " layer(s) kept (drop_layer failed)";
  record(std::move(ev));
  if (!failed_drops.empty()) {
    std::string which;
    for (const auto& [inst, l] : failed_drops) which += " device " + std::to_string(inst) + " layer " + std::to_string(l) + ";";
    record_failure("drop_layer", group, instances, drop_error, "the " + kind + " completed, keeping" + which);
  }
  lock.lock();
  return group;
}

Status ClusterRuntime::restore_locked(TransitionLock& lock, std::int64_t group) {
  const auto t0 = std::chrono::steady_clock::now();
  std::shared_ptr<Unit> unit = group_unit_locked(group);
  if (unit == nullptr) return not_found("no fused group " + std::to_string(group));
  KUN_CHECK(!unit->in_transition) << "group " << group << " is in another transition";
  KUN_CHECK(unit->in_restore()) << "group " << group << " splits before its gather phase";
  // The weights pulled since begin_restore have arrived (callers wait for weights_back before
  // they split), so the join below returns at once.
  KUN_CHECK(unit->weights_back.load(std::memory_order_acquire)) << "group " << group << " splits before its weights are back";
  // Reserve the group, then work without transition_mu_. Only the group stops: its gate closes
  // (what is routed to it meanwhile is handed to the instances it splits into) and its engine
  // parks at a step boundary.
  unit->in_transition = true;
  close_gate(*unit);
  lock.unlock();
  if (unit->weight_pull.joinable()) unit->weight_pull.join();
  const double gather_ms = std::chrono::duration<double, std::milli>(t0 - unit->restore_began).count();
  const double begin_pause_ms = unit->begin_pause_ms;
  const std::string reason = unit->restore_reason;
  const std::vector<std::int64_t> instances = unit->instances;
  const auto g = static_cast<std::int64_t>(instances.size());
  const std::int64_t L = config_.num_layers;
  const auto member_alloc = [&](std::int64_t k) -> kv::KvBlockAllocator& {
    return *allocators_[static_cast<std::size_t>(instances[static_cast<std::size_t>(k)])];
  };
  unit->engine->pause();
  unit->engine->quiesce();
  // Commit point: nothing has moved yet; a failure leaves the group fused and restoring (the
  // policy thread retries the split later).
  if (Status commit = options_.transition_fault ? options_.transition_fault("split", group) : ok_status(); !commit.ok()) {
    lock.lock();
    reopen_gate(*unit, *routing());
    unit->engine->resume();
    release_locked({unit});
    return commit;
  }
  // Pages of weight pulls that failed during the gather go back to the KV pool: those layers are
  // pulled again below, like the ones whose pages could not be spared then. Pages of a pull that
  // was never answered stay reserved: the layer is pulled again into the same pages.
  auto reserved_pages = take_failed_pulls(*unit);
  // The group's admission history goes to every instance it splits into.
  const std::vector<std::int64_t> history = unit->engine->scheduler().admission_history();
  cluster::SplitInput input;
  input.group = group;
  input.members = instances;
  input.strategy = options_.stale_kv;
  input.split_room_blocks = unit->restore_plan.split_room_blocks;
  std::vector<std::int32_t> stages(static_cast<std::size_t>(g));
  for (std::int64_t k = 0; k < g; ++k) stages[static_cast<std::size_t>(k)] = static_cast<std::int32_t>(k);
  input.requests = cluster::transition_requests(unit->engine->scheduler(), *unit->kv, stages);
  // Every request leaves the group; those the rule may keep take their tables along.
  std::map<RequestId, engine::Engine::Detached> detached;
  std::map<RequestId, std::map<std::int32_t, kv::BlockTable>> tables_of;
  std::vector<RequestId> order;  // the group's order, for a rollback
  for (const cluster::TransitionRequest& r : input.requests) {
    const bool keep = options_.stale_kv != cluster::StaleKvStrategy::kRecompute && r.running;
    auto d = unit->engine->detach(r.id, keep);
    KUN_CHECK(d.has_value());
    if (keep) tables_of.emplace(r.id, unit->kv->export_tables(r.id));
    detached.emplace(r.id, std::move(*d));
    order.push_back(r.id);
  }
  for (std::int64_t k = 0; k < g; ++k) input.free_blocks_now.push_back(member_alloc(k).num_free());
  const cluster::SplitPlan plan = cluster::plan_split(input, transition_geometry());
  record_plan("split", group, plan.to_string());
  const std::int64_t live_blocks = unit->live_gathered_blocks.load();
  std::int64_t pulled_bytes = unit->restore_pulled_bytes, repacked_blocks = unit->restore_repacked_blocks;
  const cluster::RestorePlan restore_plan = unit->restore_plan;
  const auto free_tables = [&](std::map<std::int32_t, kv::BlockTable>& tables) {
    for (auto& [k, t] : tables) t.free_all(member_alloc(k));
    tables.clear();
  };
  std::int64_t recomputed = 0;  // running requests that lose their KV here
  for (const cluster::Landing& l : plan.queued) {
    if (!l.lost_kv) continue;
    ++recomputed;
    auto tit = tables_of.find(l.id);
    if (tit != tables_of.end()) free_tables(tit->second);
  }
  // Each placed request's layers held elsewhere are copied to its member (stop-and-copy). A
  // request whose copy fails recomputes on its member: its blocks are freed on every member.
  std::int64_t exchanged_blocks = 0, exchanged_bytes = 0;
  std::map<RequestId, kv::BlockTable> placed;
  std::set<RequestId> move_failed;
  for (const cluster::Placement& p : plan.keep_kv) {
    auto& tables = tables_of.at(p.id);
    KUN_CHECK(tables.count(p.member) != 0) << "request " << p.id << " has no table on member " << p.member;
    kv::BlockTable& mine = tables.at(p.member);
    Status failed;
    for (const cluster::LayerMove& m : p.moves) {
      KUN_CHECK_OK(mine.add_layer(m.layer, member_alloc(p.member)));
      const std::vector<kv::BlockId> from = tables.at(m.from).layer_blocks(m.layer);
      failed = move_kv(instances[static_cast<std::size_t>(m.from)], from, instances[static_cast<std::size_t>(p.member)],
                       mine.layer_blocks(m.layer), TransferKind::kKvExchange, &exchanged_bytes);
      if (!failed.ok()) break;
      tables.at(m.from).drop_layer(m.layer, member_alloc(m.from));
      exchanged_blocks += static_cast<std::int64_t>(from.size());
    }
    if (!failed.ok()) {
      free_tables(tables);
      move_failed.insert(p.id);
      ++recomputed;
      record_failure("kv_move", group, instances, failed,
                     "request " + std::to_string(p.id.value) + " recomputes on device " +
                         std::to_string(instances[static_cast<std::size_t>(p.member)]));
      continue;
    }
    KUN_CHECK_EQ(mine.num_layers(), L) << "request " << p.id << " gathered";
    KUN_CHECK_EQ(mine.num_tokens(), p.tokens) << "request " << p.id;
    placed.emplace(p.id, std::move(mine));
  }
  // Layers whose pages the pool could not spare at begin_restore (or whose pull failed then) get
  // them now: repack live blocks out of the pages the allocator picks (copies inside the device),
  // then pull the weights from the peer that kept them (or any other holder), with the group
  // paused. A repack or a pull that fails from every holder fails the split, which rolls back.
  Status split_error = pull_missing_layers(
      instances, restore_plan.pulls,
      [&](std::int32_t member, std::span<const kv::BlockMove> moves) {
        std::int64_t remapped = 0;
        for (const cluster::Placement& p : plan.keep_kv) {
          if (p.member == member && placed.count(p.id) != 0) remapped += placed.at(p.id).remap_blocks(moves);
        }
        return remapped;
      },
      reserved_pages, &unit->failed_pulls, &repacked_blocks, &pulled_bytes);
  for (std::size_t k = 0; split_error.ok() && k < instances.size(); ++k) {
    const std::int64_t inst = instances[k];
    auto snap = client().check_integrity(endpoint(inst));
    if (!snap.ok()) {
      split_error = snap.status().with_context("device " + std::to_string(inst));
      break;
    }
    KUN_CHECK_EQ(snap->kv_pages, allocators_[static_cast<std::size_t>(inst)]->num_pages()) << "device " << inst;
  }
  if (!split_error.ok()) {
    // Reserved pages of unanswered pulls not retried this time stay reserved for the next split.
    for (auto& [key, pages] : reserved_pages) unit->failed_pulls.push_back(Unit::FailedPull{key.first, key.second, std::move(pages), true});
    // Roll back: every request goes back into the group as it is now (KV gathered so far stays
    // where it went, the group's tables say where; requests that lost KV recompute), layers
    // pulled so far stay (the group keeps restoring and the next split skips them).
    {
      for (RequestId id : order) {
        engine::Engine::Detached& d = detached.at(id);
        auto tit = tables_of.find(id);
        if (tit != tables_of.end() && !tit->second.empty()) {
          auto pit = placed.find(id);
          if (pit != placed.end()) {
            for (const cluster::Placement& p : plan.keep_kv) {
              if (p.id == id) tit->second.insert_or_assign(p.member, std::move(pit->second));
            }
          }
          const std::int64_t tokens = tit->second.begin()->second.num_tokens();
          unit->kv->import_tables(id, tokens, std::move(tit->second));
          unit->engine->adopt_with_imported_kv(std::move(d));
        } else {
          KUN_CHECK_OK(unit->engine->adopt(std::move(d), /*with_kv=*/false));
        }
      }
    }
    lock.lock();
    reopen_gate(*unit, *routing());
    unit->engine->resume();
    release_locked({unit});
    return split_error;
  }
  std::vector<Unit*> fresh_units;
  std::vector<std::shared_ptr<Unit>> fresh;
  for (std::int64_t inst : instances) {
    fresh.push_back(make_unit({inst}, -1));
    fresh.back()->engine->mutable_scheduler().set_admission_history(history);
    fresh_units.push_back(fresh.back().get());
  }
  const auto moved = static_cast<std::int64_t>(plan.keep_kv.size() + plan.queued.size());
  KUN_CHECK_EQ(moved, static_cast<std::int64_t>(detached.size())) << "split of group " << group << " lost a request";
  {
    std::lock_guard<std::mutex> rl(requests_mu_);
    for (const cluster::Placement& p : plan.keep_kv) {
      Unit* u = fresh_units[static_cast<std::size_t>(p.member)];
      request_instance_[p.id] = u->instances.front();
      if (move_failed.count(p.id) != 0) {
        KUN_CHECK_OK(u->engine->adopt(std::move(detached.at(p.id)), /*with_kv=*/false));
        continue;
      }
      std::map<std::int32_t, kv::BlockTable> whole;
      whole.emplace(0, std::move(placed.at(p.id)));
      u->kv->import_tables(p.id, p.tokens, std::move(whole));
      u->engine->adopt_with_imported_kv(std::move(detached.at(p.id)));
    }
    for (const cluster::Landing& l : plan.queued) {
      Unit* u = fresh_units[static_cast<std::size_t>(l.member)];
      request_instance_[l.id] = u->instances.front();
      KUN_CHECK_OK(u->engine->adopt(std::move(detached.at(l.id)), /*with_kv=*/false));
    }
  }
  lock.lock();
  publish_successors_locked(lock, {std::move(unit)}, fresh);  // the instances replace the group; returns unlocked
  ClusterEvent ev = split_event("restore", group, instances, t0, pulled_bytes, moved, exchanged_blocks, recomputed, repacked_blocks);
  ev.gather_ms = gather_ms;
  ev.begin_pause_ms = begin_pause_ms;
  ev.kv_blocks_gathered_live = live_blocks;
  ev.reason = reason + "; KV gathered back: " + std::to_string(plan.keep_kv.size() - move_failed.size()) + " requests, " +
              std::to_string(live_blocks) + " blocks while decoding, " + std::to_string(exchanged_blocks) + " blocks, " +
              std::to_string(exchanged_bytes) + " bytes at the split (" + std::to_string(repacked_blocks) + " blocks repacked, " +
              std::to_string(recomputed) + " requests recompute)";
  record(std::move(ev));
  lock.lock();
  return ok_status();
}

Status ClusterRuntime::migrate_locked(TransitionLock& lock, RequestId request, std::int64_t to_instance,
                                      const std::string& reason) {
  const auto t0 = std::chrono::steady_clock::now();
  const std::int64_t from_instance = instance_of(request);
  if (from_instance < 0) return not_found("request " + std::to_string(request.value) + " is not live");
  std::shared_ptr<Unit> from, to;
  for (const auto& u : units_) {
    if (std::find(u->instances.begin(), u->instances.end(), from_instance) != u->instances.end()) from = u;
    if (std::find(u->instances.begin(), u->instances.end(), to_instance) != u->instances.end()) to = u;
  }
  if (from == nullptr || to == nullptr || from == to) return invalid_argument("migration needs two different instances");
  if (from->group >= 0 || to->group >= 0) return failed_precondition("migration is between independent instances");
  KUN_CHECK(!from->in_transition && !to->in_transition) << "migration between units in another transition";
  // Both units are reserved and their gates close, so no cancel of the moving request can reach
  // the engine it is leaving after it left; they reopen (handing on what queued) once
  // request_instance_ names its home. The copy runs without transition_mu_.
  from->in_transition = true;
  to->in_transition = true;
  close_gate(*from);
  close_gate(*to);
  lock.unlock();
  from->engine->pause();
  to->engine->pause();
  auto resume = [&] {
    lock.lock();
    const std::shared_ptr<const Routing> r = routing();
    reopen_gate(*from, *r);
    reopen_gate(*to, *r);
    from->engine->resume();
    to->engine->resume();
    release_locked({from, to});
  };
  std::optional<engine::Engine::Detached> d = from->engine->detach(request, /*keep_kv=*/true);
  if (!d) {
    resume();
    return not_found("request " + std::to_string(request.value) + " finished before it could move");
  }
  const bool live = from->kv->tokens_held(request) > 0 && d->request.state == engine::RequestState::kRunning;
  std::int64_t bytes = 0, blocks = 0;
  if (live && to->kv->can_grow(request, d->request.num_computed)) {
    const std::vector<engine::LayerBlockList> src = from->kv->block_lists(request);
    KUN_CHECK_OK(to->engine->adopt(std::move(*d), /*with_kv=*/true));
    const std::vector<engine::LayerBlockList> dst = to->kv->block_lists(request);
    KUN_CHECK_EQ(src.size(), dst.size());
    const auto ids = [](const std::vector<std::int64_t>& v) {
      std::vector<kv::BlockId> out;
      for (std::int64_t b : v) out.push_back(kv::BlockId(b));
      return out;
    };
    std::vector<kv::BlockId> src_blocks, dst_blocks;  // every layer's blocks, one message
    for (std::size_t i = 0; i < src.size(); ++i) {
      KUN_CHECK_EQ(src[i].layer, dst[i].layer);
      KUN_CHECK_EQ(src[i].blocks.size(), dst[i].blocks.size());
      for (kv::BlockId b : ids(src[i].blocks)) src_blocks.push_back(b);
      for (kv::BlockId b : ids(dst[i].blocks)) dst_blocks.push_back(b);
    }
    const Status copied = move_kv(from_instance, src_blocks, to_instance, dst_blocks, TransferKind::kKvMigration, &bytes);
    if (!copied.ok()) {
      // The request goes back where it was, with its KV (still held there); the destination's
      // blocks are freed.
      std::optional<engine::Engine::Detached> back = to->engine->detach(request, /*keep_kv=*/true);
      KUN_CHECK(back.has_value()) << "request " << request << " left the paused destination";
      to->engine->mutable_scheduler().release_detached(request);
      KUN_CHECK_OK(from->engine->adopt(std::move(*back), /*with_kv=*/true));
      resume();
      record_failure("migrate", -1, {from_instance, to_instance}, copied,
                     "request " + std::to_string(request.value) + " stays on instance " + std::to_string(from_instance));
      return copied;
    }
    blocks += static_cast<std::int64_t>(src_blocks.size());
    from->engine->mutable_scheduler().release_detached(request);
  } else if (live) {
    // The destination cannot hold its KV: it stays where it is.
    KUN_CHECK_OK(from->engine->adopt(std::move(*d), /*with_kv=*/true));
    resume();
    return resource_exhausted("instance " + std::to_string(to_instance) + " has no room for the request's KV");
  } else {
    from->engine->mutable_scheduler().release_detached(request);
    KUN_CHECK_OK(to->engine->adopt(std::move(*d), /*with_kv=*/false));
  }
  {
    std::lock_guard<std::mutex> rl(requests_mu_);
    request_instance_[request] = to_instance;
  }
  resume();
  lock.unlock();
  {
    std::lock_guard<std::mutex> el(events_mu_);
    kv_blocks_moved_ += blocks;
  }
  ClusterEvent ev = transition_event("migrate", -1, {from_instance, to_instance}, t0, bytes, 1);
  ev.reason = reason;
  record(std::move(ev));
  lock.lock();
  return ok_status();
}

}  // namespace kun::runtime
