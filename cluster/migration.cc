#include "cluster/migration.h"

#include <algorithm>
#include <sstream>
#include <unordered_set>

#include "common/check.h"

namespace kun::cluster {

MigrationPolicy::MigrationPolicy(MigrationConfig config, ClusterShape shape)
    : config_(config), shape_(std::move(shape)) {
  KUN_CHECK_GE(config_.max_concurrent_per_instance, 1);
  KUN_CHECK_GT(shape_.num_layers, 0);
  KUN_CHECK_GT(shape_.block_size_tokens, 0);
}

std::int64_t MigrationPolicy::blocks_needed(const RequestSnapshot& r) const {
  const std::int64_t token_blocks = (r.tokens + shape_.block_size_tokens - 1) / shape_.block_size_tokens;
  return std::max(r.blocks_held, token_blocks * shape_.num_layers);
}

bool MigrationPolicy::overloaded(const InstanceSnapshot& s) const {
  if (s.pending_blocks > 0 && s.pending_blocks >= s.kv_blocks_free) return true;
  return s.demand() > config_.overload_demand_threshold;
}

std::int64_t MigrationPolicy::in_flight_at(std::int64_t instance) const {
  std::int64_t n = 0;
  for (const auto& [id, f] : in_flight_) n += (f.live && (f.from == instance || f.to == instance)) ? 1 : 0;
  return n;
}

void MigrationPolicy::on_done(RequestId request) { in_flight_.erase(request); }

void MigrationPolicy::expire(std::int64_t now_us, const std::vector<InstanceSnapshot>& snapshots) {
  // Where each request is visible now.
  std::unordered_map<RequestId, std::vector<std::int64_t>> seen;
  for (const InstanceSnapshot& s : snapshots) {
    for (const RequestSnapshot& r : s.requests) {
      if (in_flight_.count(r.id)) seen[r.id].push_back(s.instance);
    }
  }
  for (auto it = in_flight_.begin(); it != in_flight_.end();) {
    const Flight& f = it->second;
    bool done = now_us - f.started_us >= config_.in_flight_timeout_us;
    auto where = seen.find(it->first);
    if (where != seen.end()) {
      const auto& at = where->second;
      const bool on_to = std::find(at.begin(), at.end(), f.to) != at.end();
      const bool on_from = std::find(at.begin(), at.end(), f.from) != at.end();
      done = done || (on_to && !on_from);
    }
    it = done ? in_flight_.erase(it) : std::next(it);
  }
}

std::vector<MigrateAction> MigrationPolicy::plan(std::int64_t now_us, const std::vector<InstanceSnapshot>& snapshots) {
  expire(now_us, snapshots);
  std::vector<MigrateAction> out;
  const std::size_t n = snapshots.size();
  if (n < 2) return out;

  // Projected state, updated as this tick plans moves.
  struct Proj {
    const InstanceSnapshot* snap;
    std::int64_t demanded;   // blocks demanded
    std::int64_t free;       // free blocks
    std::int64_t pending;    // pending blocks
    std::int64_t incoming;   // blocks promised to live migrations into it this tick
    std::int64_t busy;       // migrations touching it
  };
  std::vector<Proj> proj;
  proj.reserve(n);
  for (const InstanceSnapshot& s : snapshots) {
    proj.push_back({&s, s.blocks_demanded, s.kv_blocks_free, s.pending_blocks, 0, in_flight_at(s.instance)});
  }
  auto demand_of = [](const Proj& p) {
    return p.snap->kv_blocks_total > 0
               ? static_cast<double>(p.demanded) / static_cast<double>(p.snap->kv_blocks_total)
               : 1.0;
  };
  auto still_overloaded = [&](const Proj& p) {
    if (p.pending > 0 && p.pending >= p.free) return true;
    return demand_of(p) > config_.overload_demand_threshold;
  };
  std::vector<std::size_t> sources;
  for (std::size_t i = 0; i < n; ++i) {
    if (overloaded(snapshots[i])) sources.push_back(i);
  }
  std::sort(sources.begin(), sources.end(), [&](std::size_t a, std::size_t b) {
    const double da = demand_of(proj[a]), db = demand_of(proj[b]);
    if (da != db) return da > db;
    return snapshots[a].instance < snapshots[b].instance;
  });
  std::unordered_set<std::size_t> source_set(sources.begin(), sources.end());

  // Least-loaded destination other than `src` able to take `blocks` now (live) or at all (queued).
  auto pick_dest = [&](std::size_t src, std::int64_t blocks, bool live) -> std::size_t {
    std::size_t best = n;
    for (std::size_t j = 0; j < n; ++j) {
      if (j == src || source_set.count(j)) continue;
      const Proj& p = proj[j];
      if (live) {
        if (p.busy >= config_.max_concurrent_per_instance) continue;
        if (p.free - p.pending - p.incoming < blocks) continue;
        const double after = p.snap->kv_blocks_total > 0
                                 ? static_cast<double>(p.demanded + blocks) / static_cast<double>(p.snap->kv_blocks_total)
                                 : 1.0;
        if (after > config_.dest_max_demand) continue;
      }
      if (best == n || demand_of(p) < demand_of(proj[best]) ||
          (demand_of(p) == demand_of(proj[best]) && p.snap->instance < proj[best].snap->instance)) {
        best = j;
      }
    }
    return best;
  };

  for (std::size_t si : sources) {
    Proj& src = proj[si];
    const InstanceSnapshot& s = *src.snap;
    if (config_.migrate_running) {
      std::vector<const RequestSnapshot*> running;
      for (const RequestSnapshot& r : s.requests) {
        if (r.running && r.blocks_held > 0 && !in_flight(r.id)) running.push_back(&r);
      }
      std::sort(running.begin(), running.end(), [](const RequestSnapshot* a, const RequestSnapshot* b) {
        if (a->blocks_held != b->blocks_held) return a->blocks_held > b->blocks_held;
        return a->id < b->id;
      });
      for (const RequestSnapshot* r : running) {
        if (!still_overloaded(src) || src.busy >= config_.max_concurrent_per_instance) break;
        const std::size_t di = pick_dest(si, r->blocks_held, /*live=*/true);
        if (di == n) continue;  // a smaller request may still fit somewhere
        Proj& dst = proj[di];
        std::ostringstream why;
        why << "live: instance " << s.instance << " overloaded (demand " << demand_of(src) << ", pending "
            << src.pending << " vs free " << src.free << "); request holds " << r->blocks_held
            << " blocks; dest " << dst.snap->instance << " demand " << demand_of(dst) << ", free net "
            << dst.free - dst.pending - dst.incoming;
        out.push_back({r->id, s.instance, dst.snap->instance, true, why.str()});
        in_flight_[r->id] = {s.instance, dst.snap->instance, now_us, true};
        src.demanded -= r->blocks_held;
        src.free += r->blocks_held;  // freed once the move completes
        dst.demanded += r->blocks_held;
        dst.incoming += r->blocks_held;
        ++src.busy;
        ++dst.busy;
      }
    }
    if (config_.rebalance_queued) {
      const std::size_t di = pick_dest(si, 0, /*live=*/false);
      if (di == n) continue;
      Proj& dst = proj[di];
      const std::int64_t budget = (src.demanded - dst.demanded) / 2;
      if (budget <= 0) continue;
      std::vector<const RequestSnapshot*> queued;
      for (const RequestSnapshot& r : s.requests) {
        if (!r.running && !in_flight(r.id)) queued.push_back(&r);
      }
      std::sort(queued.begin(), queued.end(), [&](const RequestSnapshot* a, const RequestSnapshot* b) {
        const std::int64_t na = blocks_needed(*a), nb = blocks_needed(*b);
        if (na != nb) return na < nb;
        return a->id < b->id;
      });
      std::int64_t moved = 0;
      for (const RequestSnapshot* r : queued) {
        const std::int64_t need = blocks_needed(*r);
        if (moved + need > budget) break;
        moved += need;
        std::ostringstream why;
        why << "queued: instance " << s.instance << " load " << src.demanded << " blocks vs min load "
            << dst.demanded << " at instance " << dst.snap->instance << "; budget " << budget
            << ", request needs " << need;
        out.push_back({r->id, s.instance, dst.snap->instance, false, why.str()});
        in_flight_[r->id] = {s.instance, dst.snap->instance, now_us, false};
        src.demanded -= need;
        src.pending -= std::min(src.pending, need);
        dst.demanded += need;
        dst.pending += need;
      }
    }
  }
  return out;
}

}  // namespace kun::cluster
