// Regrouping a live fused group (issue 15): growth g -> 2g and partial restore (shrink) 2g -> g,
// carried out from the same pure plans the simulator carries out (cluster/transition_plan.h):
//  * growth is cluster::plan_drop over members that already hold a part of the layers (an
//    absorbed group's members hold their stage, an absorbed instance holds every layer): each
//    member drops the layers its new stage does not keep (their pages become KV pages), the
//    running requests keep their KV where it is and the layers now run by another member reach it
//    by remote attention until the live exchange moves them (as after a drop). A drop is a growth
//    that absorbs no group: drop_locked (cluster_transitions.cc) carries out both;
//  * shrink is cluster::plan_shrink, live like restore (two phases): begin_shrink reserves each
//    member's pages for the layers its new stage adds (repacking live blocks inside the device),
//    starts the weight pull thread restore uses, and gives each running request the plan keeps a
//    home on its half (KvManager home layouts: each layer on the half's member that keeps it); the
//    group then decodes on while the pulls run and the exchange rounds gather each request onto
//    its half. The switch (once the weights are back and the gather is done, or its time is up)
//    pauses the group, recomputes the plan (it keeps each request on its home half while it
//    fits), copies what the gather left, pulls what failed or could not be spared before, and
//    publishes the two halves: no weight pull normally happens inside that pause.
// Both follow the control path of the other transitions: the units are reserved under
// transition_mu_ (Unit::in_transition, gates closed), every agent message, transfer and join runs
// with the lock released, and it is re-taken to publish or roll back. Failures past the commit
// point (runtime/README.md, "Failures"): a growth's drop_layer that fails keeps the layer
// (drop_layer); a shrink's KV move that fails makes its request recompute (kv_move); a repack or
// a weight pull that no holder can serve at the switch rolls the shrink back (shrink), the group
// whole: homes cleared, KV where the gather put it, layers pulled so far kept.
#include <algorithm>
#include <chrono>
#include <set>

#include "common/check.h"
#include "common/log.h"
#include "runtime/cluster_runtime.h"

namespace kun::runtime {
std::vector<std::int64_t> ClusterRuntime::merged_admission_history(const std::vector<std::vector<std::int64_t>>& histories) {
  std::size_t longest = 0;
  for (const auto& h : histories) longest = std::max(longest, h.size());
  std::vector<std::int64_t> history;
  for (std::size_t i = 0; i < longest; ++i) {
    for (const auto& h : histories) {
      if (h.size() + i >= longest) history.push_back(h[h.size() + i - longest]);
    }
  }
  return history;
}

std::vector<std::pair<std::int64_t, std::int64_t>> ClusterRuntime::layers_outside_stages(const std::vector<std::int64_t>& instances) const {
  const auto g = static_cast<std::int64_t>(instances.size());
  const std::int64_t L = config_.num_layers;
  std::vector<std::pair<std::int64_t, std::int64_t>> out;
  for (std::int64_t k = 0; k < g; ++k) {
    const std::int64_t inst = instances[static_cast<std::size_t>(k)];
    for (std::int64_t l = 0; l < L; ++l) {
      const bool in_stage = l >= cluster::stage_layer_begin(k, g, L) && l < cluster::stage_layer_begin(k + 1, g, L);
      if (!in_stage && mirror_has_layer(inst, l)) out.emplace_back(inst, l);
    }
  }
  return out;
}

std::vector<cluster::Coordinator::AbsorbedGroup> ClusterRuntime::absorbed_groups_locked(const std::vector<std::int64_t>& ids) const {
  std::vector<cluster::Coordinator::AbsorbedGroup> absorbed;
  for (std::int64_t id : ids) {
    if (const std::shared_ptr<Unit> u = group_unit_locked(id)) absorbed.push_back(cluster::Coordinator::AbsorbedGroup{id, u->instances});
  }
  return absorbed;
}

Status ClusterRuntime::move_request_layer(const std::vector<std::int64_t>& instances, std::map<std::int32_t, kv::BlockTable>& tables,
                                          const cluster::LayerMove& move, std::int64_t* blocks) {
  const std::int64_t src = instances[static_cast<std::size_t>(move.from)];
  const std::int64_t dst = instances[static_cast<std::size_t>(move.to)];
  kv::KvBlockAllocator& dst_alloc = *allocators_[static_cast<std::size_t>(dst)];
  KUN_CHECK(tables.count(move.to) != 0 && tables.count(move.from) != 0) << "layer " << move.layer << " move without a table";
  kv::BlockTable& to = tables.at(move.to);
  // The commit point checked every destination has the blocks at every step of the gather.
  KUN_CHECK_OK(to.add_layer(move.layer, dst_alloc));
  const std::vector<kv::BlockId> from = tables.at(move.from).layer_blocks(move.layer);
  if (Status s = move_kv(src, from, dst, to.layer_blocks(move.layer), TransferKind::kKvExchange); !s.ok()) {
    to.drop_layer(move.layer, dst_alloc);  // the source keeps the layer (its bytes are intact)
    return s;
  }
  tables.at(move.from).drop_layer(move.layer, *allocators_[static_cast<std::size_t>(src)]);
  *blocks += static_cast<std::int64_t>(from.size());
  return ok_status();
}

void ClusterRuntime::run_policy_round() {
  TransitionLock lock(transition_mu_);
  if (!any_in_transition_locked()) {
    const cluster::Actions actions = coordinator_->tick(clock_->now_us(), snapshots_of(units_));
    if (!actions.empty()) run_actions(lock, actions);
  }
  finish_gathered_restores(lock);
}

StatusOr<std::int64_t> ClusterRuntime::grow(std::int64_t group, const std::vector<std::int64_t>& partners) {
  TransitionLock lock(transition_mu_);
  // Wait until the group and the partners' units are out of any transition (the group's members
  // are read again after each wait: a transition may have changed them).
  while (true) {
    std::vector<std::int64_t> involved = partners;
    if (const std::shared_ptr<Unit> u = group_unit_locked(group)) involved.insert(involved.end(), u->instances.begin(), u->instances.end());
    wait_instances_free_locked(lock, involved);
    const std::shared_ptr<Unit> u = group_unit_locked(group);
    if (u == nullptr || std::all_of(u->instances.begin(), u->instances.end(), [&](std::int64_t inst) {
          return std::find(involved.begin(), involved.end(), inst) != involved.end();
        })) {
      break;
    }
  }
  KUN_ASSIGN_OR_RETURN(cluster::DropAction action, coordinator_->force_grow(group, partners, clock_->now_us()));
  KUN_RETURN_IF_ERROR(run_growth_locked(lock, action));
  return action.group;
}

StatusOr<std::vector<std::int64_t>> ClusterRuntime::begin_shrink(std::int64_t group) {
  TransitionLock lock(transition_mu_);
  wait_group_free_locked(lock, group);
  KUN_ASSIGN_OR_RETURN(cluster::ShrinkAction action, coordinator_->force_shrink(group, clock_->now_us()));
  KUN_RETURN_IF_ERROR(run_shrink_locked(lock, action));
  return action.new_groups;
}

StatusOr<std::vector<std::int64_t>> ClusterRuntime::shrink(std::int64_t group) {
  std::shared_ptr<Unit> unit;
  std::vector<std::int64_t> new_groups;
  {
    TransitionLock lock(transition_mu_);
    wait_group_free_locked(lock, group);
    const std::shared_ptr<Unit> u = group_unit_locked(group);
    if (u == nullptr || !u->shrinking.load()) {
      KUN_ASSIGN_OR_RETURN(cluster::ShrinkAction action, coordinator_->force_shrink(group, clock_->now_us()));
      KUN_RETURN_IF_ERROR(run_shrink_locked(lock, action));
    }
    unit = group_unit_locked(group);
    if (unit == nullptr) return not_found("no fused group " + std::to_string(group));
    new_groups = unit->shrink_action.new_groups;
  }
  // The weights come back on the pull thread while the group decodes; wait for them without
  // transition_mu_, then switch at once (what is not on its half yet is copied in the pause).
  {
    std::unique_lock<std::mutex> pl(policy_mu_);
    policy_cv_.wait(pl, [&] { return unit->weights_back.load(std::memory_order_acquire); });
  }
  TransitionLock lock(transition_mu_);
  wait_group_free_locked(lock, group);
  if (std::find(units_.begin(), units_.end(), unit) == units_.end()) return new_groups;  // the policy loop switched it meanwhile
  if (!unit->shrinking.load()) return unavailable("the shrink of group " + std::to_string(group) + " rolled back meanwhile");
  KUN_RETURN_IF_ERROR(finish_shrink_locked(lock, group));
  return new_groups;
}

Status ClusterRuntime::run_growth_locked(TransitionLock& lock, const cluster::DropAction& action) {
  // The groups absorbed, as they are now, so that a failed growth can give them back.
  const std::vector<cluster::Coordinator::AbsorbedGroup> absorbed = absorbed_groups_locked(action.absorbs);
  StatusOr<std::int64_t> grown = drop_locked(lock, action);
  if (!grown.ok()) {
    record_failure("grow", action.group, action.instances, grown.status());
    coordinator_->abandon_growth(action.group, absorbed, clock_->now_us());
    return grown.status();
  }
  coordinator_->on_drop_done(action.group, clock_->now_us());
  return ok_status();
}

Status ClusterRuntime::run_shrink_locked(TransitionLock& lock, const cluster::ShrinkAction& action) {
  Status s = begin_shrink_locked(lock, action);
  if (!s.ok()) {
    std::vector<std::int64_t> instances;
    for (const auto& half : action.halves) instances.insert(instances.end(), half.begin(), half.end());
    record_failure("shrink", action.group, instances, s);
    coordinator_->abandon_shrink(action.group, clock_->now_us());
  }
  return s;
}

Status ClusterRuntime::finish_shrink_locked(TransitionLock& lock, std::int64_t group) {
  const std::shared_ptr<Unit> u = group_unit_locked(group);
  KUN_CHECK(u != nullptr && u->shrinking.load()) << "group " << group << " is not shrinking";
  const std::vector<std::int64_t> instances = u->instances;
  Status s = shrink_switch_locked(lock, group);
  if (!s.ok()) {
    record_failure("shrink", group, instances, s);
    coordinator_->abandon_shrink(group, clock_->now_us());
    return s;
  }
  coordinator_->on_shrink_done(group, clock_->now_us());
  return ok_status();
}

cluster::ShrinkInput ClusterRuntime::shrink_input(
    Unit& unit, const std::map<std::pair<std::int64_t, std::int64_t>, std::vector<memory::PageId>>& reserved) const {
  const auto g = static_cast<std::int64_t>(unit.instances.size());
  const std::int64_t L = config_.num_layers;
  const cluster::TransitionGeometry geo = transition_geometry();
  cluster::ShrinkInput input;
  input.group = unit.group;
  input.members = unit.instances;
  input.strategy = options_.stale_kv;
  for (std::int64_t k = 0; k < g; ++k) {
    const std::int64_t inst = unit.instances[static_cast<std::size_t>(k)];
    std::int64_t held = 0, reserved_pages = 0;
    for (std::int64_t l = 0; l < L; ++l) held += mirror_has_layer(inst, l) ? 1 : 0;
    for (const auto& [key, pages] : reserved) reserved_pages += key.first == inst ? static_cast<std::int64_t>(pages.size()) : 0;
    // The member's pool as an independent instance: its pool now (with the pages an unanswered
    // pull keeps reserved) less the pages of the layers it does not hold.
    input.base_kv_blocks.push_back(allocators_[static_cast<std::size_t>(inst)]->num_total() +
                                   (reserved_pages - (L - held) * geo.pages_per_layer) * geo.blocks_per_page);
  }
  std::vector<std::int32_t> stages(static_cast<std::size_t>(g));
  for (std::int64_t k = 0; k < g; ++k) stages[static_cast<std::size_t>(k)] = static_cast<std::int32_t>(k);
  input.requests = cluster::transition_requests(unit.engine->scheduler(), *unit.kv, stages);
  return input;
}

void ClusterRuntime::end_shrink_phase(Unit& unit) {
  for (RequestId id : unit.engine->scheduler().request_ids_in_order()) {
    if (unit.kv->home(id) >= 0) unit.kv->set_home(id, -1);
  }
  unit.kv->set_home_layouts({});
  unit.shrinking.store(false);
  unit.gathered.store(false);
  // Layers pulled so far stay: the member holds them outside its stage.
  unit.kept_layers = layers_outside_stages(unit.instances);
}

Status ClusterRuntime::begin_shrink_locked(TransitionLock& lock, const cluster::ShrinkAction& action) {
  const std::int64_t group = action.group;
  const std::shared_ptr<Unit> unit_ptr = group_unit_locked(group);
  if (unit_ptr == nullptr) return not_found("no fused group " + std::to_string(group));
  Unit& unit = *unit_ptr;
  KUN_CHECK(!unit.in_transition) << "group " << group << " is in another transition";
  if (unit.in_restore()) return failed_precondition("group " + std::to_string(group) + " is restoring");
  if (unit.shrinking.load()) return failed_precondition("group " + std::to_string(group) + " is shrinking already");
  const auto g = static_cast<std::int64_t>(unit.instances.size());
  if (g < 4 || g % 2 != 0) return failed_precondition("a shrink needs an even degree >= 4, not " + std::to_string(g));
  // Reserve the group, then work without transition_mu_. Its gate stays open: nothing is routed
  // elsewhere until the switch, so submits queue in its inbox while it is paused here.
  unit.in_transition = true;
  lock.unlock();
  const auto t0 = std::chrono::steady_clock::now();
  unit.engine->pause();
  unit.engine->quiesce();
  const cluster::ShrinkPlan plan = cluster::plan_shrink(shrink_input(unit, {}), transition_geometry());
  KUN_CHECK(plan.halves == action.halves) << "shrink of group " << group << ": plan and action disagree on the halves";
  // Commit point: nothing has moved yet. (The block counts are checked at the switch, on the
  // requests then; here only pages a pool can spare are taken.)
  if (Status commit = options_.transition_fault ? options_.transition_fault("shrink", group) : ok_status(); !commit.ok()) {
    lock.lock();
    unit.engine->resume();
    release_locked({unit_ptr});
    return commit;
  }
  // Homes: each running request the plan keeps continues on its half, each layer on the half's
  // member whose new stage keeps it; the exchange rounds gather it there while the group decodes.
  if (options_.stale_kv != cluster::StaleKvStrategy::kRecompute) {
    unit.kv->set_home_layouts(plan.layer_owners);
    for (const cluster::Placement& p : plan.keep_kv) unit.kv->set_home(p.id, p.member);
  }
  unit.restore_began = t0;
  unit.restore_reason = action.reason;
  unit.restore_repacked_blocks = 0;
  unit.live_gathered_blocks = 0;
  unit.shrink_action = action;
  // The weights each half misses: pages back from the pools now (repacking inside the device), the
  // bytes on the background pull while the group decodes on its stage layers.
  std::vector<LayerPull> pulls = reclaim_pages_for_pulls(unit, plan.pulls);
  unit.gathered.store(unit.kv->requests_with_misplaced_layers().empty());
  unit.shrinking.store(true, std::memory_order_release);
  lock.lock();
  start_weight_pull_locked(unit, std::move(pulls), "shrink");
  unit.begin_pause_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  unit.engine->resume();
  release_locked({unit_ptr});
  return ok_status();
}

Status ClusterRuntime::shrink_switch_locked(TransitionLock& lock, std::int64_t group) {
  const auto t0 = std::chrono::steady_clock::now();
  std::shared_ptr<Unit> unit = group_unit_locked(group);
  if (unit == nullptr) return not_found("no fused group " + std::to_string(group));
  KUN_CHECK(!unit->in_transition) << "group " << group << " is in another transition";
  KUN_CHECK(unit->shrinking.load()) << "group " << group << " switches before its live phase";
  // The weights pulled since begin_shrink have arrived (callers wait for weights_back), so the
  // join below returns at once.
  KUN_CHECK(unit->weights_back.load(std::memory_order_acquire)) << "group " << group << " switches before its weights are back";
  const cluster::ShrinkAction action = unit->shrink_action;
  const std::vector<std::int64_t> instances = unit->instances;
  const auto g = static_cast<std::int64_t>(instances.size());
  const std::int64_t L = config_.num_layers;
  const cluster::TransitionGeometry geo = transition_geometry();
  const auto member_alloc = [&](std::int64_t k) -> kv::KvBlockAllocator& {
    return *allocators_[static_cast<std::size_t>(instances[static_cast<std::size_t>(k)])];
  };
  // Reserve the group, then work without transition_mu_. Only the group stops: its gate closes
  // (what is routed to it meanwhile goes to its halves) and its engine parks at a step boundary.
  unit->in_transition = true;
  close_gate(*unit);
  lock.unlock();
  if (unit->weight_pull.joinable()) unit->weight_pull.join();
  const double gather_ms = std::chrono::duration<double, std::milli>(t0 - unit->restore_began).count();
  unit->engine->pause();
  unit->engine->quiesce();
  // Pulls that failed during the live phase are retried below, into the pages an unanswered one
  // keeps reserved or pages taken from the pool now.
  auto reserved_pages = take_failed_pulls(*unit);
  // Back to the whole group (the engine paused, its requests adopted): homes and layouts go,
  // pages of unanswered pulls stay reserved, the gate reopens and the group decodes on.
  const auto roll_back = [&] {
    for (auto& [key, pages] : reserved_pages) unit->failed_pulls.push_back(Unit::FailedPull{key.first, key.second, std::move(pages), true});
    reserved_pages.clear();
    end_shrink_phase(*unit);
    lock.lock();
    reopen_gate(*unit, *routing());
    unit->engine->resume();
    release_locked({unit});
  };
  const cluster::ShrinkInput input = shrink_input(*unit, reserved_pages);
  const cluster::ShrinkPlan plan = cluster::plan_shrink(input, geo);
  KUN_CHECK(plan.halves == action.halves) << "shrink of group " << group << ": plan and action disagree on the halves";
  // Commit point: nothing has moved yet. The carrying out is checked on block counts first: each
  // copy of what the gather left allocates on its destination before it frees its source, so
  // every member must have the blocks at every point, and end within its room after the shrink.
  Status commit;
  {
    std::vector<std::int64_t> used(static_cast<std::size_t>(g)), total(static_cast<std::size_t>(g));
    for (std::int64_t k = 0; k < g; ++k) {
      total[static_cast<std::size_t>(k)] = member_alloc(k).num_total();
      used[static_cast<std::size_t>(k)] = total[static_cast<std::size_t>(k)] - member_alloc(k).num_free();
    }
    std::map<RequestId, const cluster::TransitionRequest*> by_id;
    for (const cluster::TransitionRequest& r : input.requests) by_id[r.id] = &r;
    for (const cluster::Landing& l : plan.queued) {
      const cluster::TransitionRequest& r = *by_id.at(l.id);
      if (!l.lost_kv || !r.running) continue;
      for (std::int32_t m : r.layer_member) used[static_cast<std::size_t>(m)] -= geo.token_blocks(r.tokens_held);
    }
    for (const cluster::Placement& p : plan.keep_kv) {
      const std::int64_t tb = geo.token_blocks(p.tokens);
      for (const cluster::LayerMove& m : p.moves) {
        used[static_cast<std::size_t>(m.to)] += tb;
        if (used[static_cast<std::size_t>(m.to)] > total[static_cast<std::size_t>(m.to)] && commit.ok()) {
          commit = resource_exhausted("shrink of group " + std::to_string(group) + ": device " +
                                      std::to_string(instances[static_cast<std::size_t>(m.to)]) + " is short of blocks to gather request " +
                                      std::to_string(p.id.value));
        }
        used[static_cast<std::size_t>(m.from)] -= tb;
      }
    }
    for (std::int64_t k = 0; commit.ok() && k < g; ++k) {
      if (used[static_cast<std::size_t>(k)] > plan.room_blocks[static_cast<std::size_t>(k)]) {
        commit = resource_exhausted("shrink of group " + std::to_string(group) + ": device " +
                                    std::to_string(instances[static_cast<std::size_t>(k)]) + " would keep " +
                                    std::to_string(used[static_cast<std::size_t>(k)]) + " blocks in a pool of " +
                                    std::to_string(plan.room_blocks[static_cast<std::size_t>(k)]));
      }
    }
  }
  if (!commit.ok()) {
    roll_back();
    return commit;
  }
  record_plan("shrink", group, plan.to_string());
  const std::vector<std::int64_t> history = unit->engine->scheduler().admission_history();
  const std::int64_t live_blocks = unit->live_gathered_blocks.load();
  const double begin_pause_ms = unit->begin_pause_ms;
  // Every request leaves the group; those the rule may keep take their tables along.
  std::map<RequestId, engine::Engine::Detached> detached;
  std::map<RequestId, std::map<std::int32_t, kv::BlockTable>> tables_of;  // keyed by member index
  std::vector<RequestId> order;                                           // the group's order, for a rollback
  for (const cluster::TransitionRequest& r : input.requests) {
    const bool keep = options_.stale_kv != cluster::StaleKvStrategy::kRecompute && r.running;
    auto d = unit->engine->detach(r.id, keep);
    KUN_CHECK(d.has_value());
    if (keep) tables_of.emplace(r.id, unit->kv->export_tables(r.id));
    detached.emplace(r.id, std::move(*d));
    order.push_back(r.id);
  }
  const auto free_tables = [&](RequestId id) {
    auto tit = tables_of.find(id);
    if (tit == tables_of.end()) return;
    for (auto& [k, t] : tit->second) t.free_all(member_alloc(k));
    tables_of.erase(tit);
  };
  std::int64_t recomputed = 0;
  for (const cluster::Landing& l : plan.queued) {
    if (!l.lost_kv) continue;
    ++recomputed;
    free_tables(l.id);
  }
  // What the live gather left (requests that started after begin_shrink, layers whose move had
  // not come yet, a request its home half had no room for) is copied now (stop-and-copy). A
  // request whose copy fails recomputes on its half: its blocks are freed.
  std::int64_t exchanged_blocks = 0;
  std::set<RequestId> move_failed;
  for (const cluster::Placement& p : plan.keep_kv) {
    auto& tables = tables_of.at(p.id);
    Status failed;
    for (const cluster::LayerMove& m : p.moves) {
      failed = move_request_layer(instances, tables, m, &exchanged_blocks);
      if (!failed.ok()) break;
    }
    if (failed.ok()) continue;
    free_tables(p.id);
    move_failed.insert(p.id);
    ++recomputed;
    record_failure("kv_move", group, instances, failed, "request " + std::to_string(p.id.value) + " recomputes on half " + std::to_string(p.member));
  }
  // Layers whose pull failed during the live phase, or whose pages a pool could not spare then,
  // are pulled now, paused (normally none: the live phase pulled them all). A repack or a pull
  // that fails from every holder rolls the shrink back.
  std::int64_t pulled_bytes = unit->restore_pulled_bytes, repacked_blocks = unit->restore_repacked_blocks;
  Status shrink_error = pull_missing_layers(
      instances, plan.pulls,
      [&](std::int32_t member, std::span<const kv::BlockMove> moves) {
        std::int64_t remapped = 0;
        for (auto& [id, tables] : tables_of) {
          auto t = tables.find(member);
          if (t != tables.end()) remapped += t->second.remap_blocks(moves);
        }
        return remapped;
      },
      reserved_pages, &unit->failed_pulls, &repacked_blocks, &pulled_bytes);
  for (std::size_t k = 0; shrink_error.ok() && k < instances.size(); ++k) {
    auto snap = client().check_integrity(endpoint(instances[k]));
    if (!snap.ok()) {
      shrink_error = snap.status().with_context("device " + std::to_string(instances[k]));
      break;
    }
    KUN_CHECK_EQ(snap->kv_pages, member_alloc(static_cast<std::int64_t>(k)).num_pages()) << "device " << instances[k];
  }
  if (!shrink_error.ok()) {
    // Roll back: every request goes back into the group as it is now (KV gathered so far stays
    // where it went, its tables say where, and the exchange or remote attention serves it;
    // requests that lost KV recompute). Layers pulled so far stay: the group holds them twice.
    for (RequestId id : order) {
      engine::Engine::Detached& d = detached.at(id);
      auto tit = tables_of.find(id);
      if (tit != tables_of.end()) {
        const std::int64_t tokens = tit->second.begin()->second.num_tokens();
        unit->kv->import_tables(id, tokens, std::move(tit->second));
        unit->engine->adopt_with_imported_kv(std::move(d));
      } else {
        KUN_CHECK_OK(unit->engine->adopt(std::move(d), /*with_kv=*/false));
      }
    }
    roll_back();
    return shrink_error;
  }
  // Each kept request's tables move to its half, keyed by the half's stage index.
  std::vector<std::int64_t> half_of(static_cast<std::size_t>(g)), stage_in_half(static_cast<std::size_t>(g));
  for (std::size_t h = 0; h < 2; ++h) {
    for (std::size_t j = 0; j < plan.half_members[h].size(); ++j) {
      half_of[static_cast<std::size_t>(plan.half_members[h][j])] = static_cast<std::int64_t>(h);
      stage_in_half[static_cast<std::size_t>(plan.half_members[h][j])] = static_cast<std::int64_t>(j);
    }
  }
  const std::int64_t h_degree = g / 2;
  std::map<RequestId, std::map<std::int32_t, kv::BlockTable>> half_tables;
  for (const cluster::Placement& p : plan.keep_kv) {
    if (move_failed.count(p.id) != 0) continue;
    std::map<std::int32_t, kv::BlockTable> mine;
    for (auto& [k, t] : tables_of.at(p.id)) {
      if (half_of[static_cast<std::size_t>(k)] != p.member) {
        KUN_CHECK_EQ(t.num_layers(), 0) << "request " << p.id << " left layers on member " << k << " of the other half";
        t.free_all(member_alloc(k));
        continue;
      }
      const std::int64_t j = stage_in_half[static_cast<std::size_t>(k)];
      KUN_CHECK_EQ(t.num_layers(), cluster::stage_layer_begin(j + 1, h_degree, L) - cluster::stage_layer_begin(j, h_degree, L))
          << "request " << p.id << " on member " << k << " after the gather";
      mine.emplace(static_cast<std::int32_t>(j), std::move(t));
    }
    KUN_CHECK_EQ(static_cast<std::int64_t>(mine.size()), h_degree) << "request " << p.id;
    half_tables.emplace(p.id, std::move(mine));
  }
  std::vector<std::shared_ptr<Unit>> halves;
  for (std::size_t h = 0; h < 2; ++h) {
    halves.push_back(make_unit(plan.halves[h], action.new_groups[h]));
    halves.back()->kept_layers = layers_outside_stages(plan.halves[h]);
    halves.back()->engine->mutable_scheduler().set_admission_history(history);
  }
  const auto moved = static_cast<std::int64_t>(plan.keep_kv.size() + plan.queued.size());
  KUN_CHECK_EQ(moved, static_cast<std::int64_t>(detached.size())) << "shrink of group " << group << " lost a request";
  {
    std::lock_guard<std::mutex> rl(requests_mu_);
    for (const cluster::Placement& p : plan.keep_kv) {
      Unit& u = *halves[static_cast<std::size_t>(p.member)];
      request_instance_[p.id] = u.instances.front();
      if (move_failed.count(p.id) != 0) {
        KUN_CHECK_OK(u.engine->adopt(std::move(detached.at(p.id)), /*with_kv=*/false));
        continue;
      }
      u.kv->import_tables(p.id, p.tokens, std::move(half_tables.at(p.id)));
      KUN_CHECK(u.kv->misplaced_layers(p.id).empty()) << "request " << p.id << " gathered onto half " << p.member;
      u.engine->adopt_with_imported_kv(std::move(detached.at(p.id)));
    }
    for (const cluster::Landing& l : plan.queued) {
      Unit& u = *halves[static_cast<std::size_t>(l.member)];
      request_instance_[l.id] = u.instances.front();
      KUN_CHECK_OK(u.engine->adopt(std::move(detached.at(l.id)), /*with_kv=*/false));
    }
  }
  lock.lock();
  publish_successors_locked(lock, {std::move(unit)}, halves);  // the halves replace the group; returns unlocked
  ClusterEvent ev = split_event("shrink", group, instances, t0, pulled_bytes, moved, exchanged_blocks, recomputed, repacked_blocks);
  ev.gather_ms = gather_ms;
  ev.begin_pause_ms = begin_pause_ms;
  ev.kv_blocks_gathered_live = live_blocks;
  ev.reason = action.reason + "; into groups " + std::to_string(action.new_groups[0]) + " and " +
              std::to_string(action.new_groups[1]) + ": " + std::to_string(plan.keep_kv.size() - move_failed.size()) +
              " requests keep their KV (" + std::to_string(live_blocks) + " blocks gathered while decoding, " +
              std::to_string(exchanged_blocks) + " at the switch, " + std::to_string(repacked_blocks) + " repacked), " +
              std::to_string(recomputed) + " recompute";
  record(std::move(ev));
  lock.lock();
  return ok_status();
}

}  // namespace kun::runtime
