#include "cluster/planner.h"

#include <algorithm>
#include <map>
#include <sstream>
#include <unordered_map>

#include "common/check.h"

namespace kun::cluster {
namespace {

void check_shape(const ClusterShape& shape) {
  KUN_CHECK_GT(shape.num_layers, 0);
  KUN_CHECK_GT(shape.layer_block_bytes, 0);
  KUN_CHECK_GT(shape.block_size_tokens, 0);
  KUN_CHECK_GE(shape.layer_param_bytes, 0);
}

std::int64_t ceil_div(std::int64_t a, std::int64_t b) { return a <= 0 ? 0 : (a + b - 1) / b; }

std::string join_ids(const std::vector<std::int64_t>& ids) {
  std::ostringstream os;
  os << "{";
  for (std::size_t i = 0; i < ids.size(); ++i) os << (i ? "," : "") << ids[i];
  os << "}";
  return os.str();
}

}  // namespace

std::int64_t layers_kept(std::int64_t stage, std::int64_t degree, std::int64_t num_layers) {
  KUN_CHECK(degree >= 1 && stage >= 0 && stage < degree) << "stage " << stage << " degree " << degree;
  return (stage + 1) * num_layers / degree - stage * num_layers / degree;
}

std::int64_t independent_capacity_tokens(const InstanceSnapshot& s, const ClusterShape& shape) {
  check_shape(shape);
  return (s.kv_blocks_total / shape.num_layers) * shape.block_size_tokens;
}

std::int64_t demand_tokens(const InstanceSnapshot& s, const ClusterShape& shape) {
  check_shape(shape);
  return ceil_div(s.blocks_demanded, shape.num_layers) * shape.block_size_tokens;
}

std::int64_t fused_capacity_tokens(const std::vector<const InstanceSnapshot*>& members,
                                   const ClusterShape& shape) {
  check_shape(shape);
  const auto g = static_cast<std::int64_t>(members.size());
  KUN_CHECK_GE(g, 1);
  KUN_CHECK_LE(g, shape.num_layers) << "more stages than layers";
  std::int64_t min_token_blocks = -1;
  for (std::int64_t s = 0; s < g; ++s) {
    const std::int64_t kept = layers_kept(s, g, shape.num_layers);
    const std::int64_t extra = (shape.num_layers - kept) * shape.layer_param_bytes / shape.layer_block_bytes;
    const std::int64_t token_blocks = (members[static_cast<std::size_t>(s)]->kv_blocks_total + extra) / kept;
    if (min_token_blocks < 0 || token_blocks < min_token_blocks) min_token_blocks = token_blocks;
  }
  return min_token_blocks * shape.block_size_tokens;
}

Planner::Planner(PlannerConfig config) : config_(config) {
  KUN_CHECK(config_.target_utilization > 0.0 && config_.target_utilization <= 1.0)
      << "target_utilization " << config_.target_utilization;
  KUN_CHECK(config_.trend_horizon_samples >= 0.0) << "trend_horizon_samples " << config_.trend_horizon_samples;
  KUN_CHECK_GE(config_.trend_samples, 2) << "a trend needs two samples";
}

Plan Planner::plan(const std::vector<InstanceSnapshot>& independent, const std::vector<std::int64_t>& overloaded,
                   const ClusterShape& shape, const std::unordered_map<std::int64_t, std::int64_t>& growth_tokens) const {
  check_shape(shape);
  Plan result;
  const double target = config_.target_utilization;

  std::vector<std::int64_t> degrees;
  for (std::int64_t g : shape.allowed_degrees) {
    if (degree_allowed(g, shape)) degrees.push_back(g);
  }
  std::sort(degrees.begin(), degrees.end());
  degrees.erase(std::unique(degrees.begin(), degrees.end()), degrees.end());

  struct Entry {
    const InstanceSnapshot* snap;
    std::int64_t capacity_tokens;
    std::int64_t demand_tokens;
    std::int64_t growth_tokens;  // projected over the trend horizon
    double deficit_tokens;       // demand + growth - target x capacity; negative = spare
  };
  const std::size_t n = independent.size();
  std::vector<Entry> entries;
  entries.reserve(n);
  for (const InstanceSnapshot& s : independent) {
    const auto grown = growth_tokens.find(s.instance);
    const std::int64_t growth = grown == growth_tokens.end() ? 0 : std::max<std::int64_t>(0, grown->second);
    Entry e{&s, independent_capacity_tokens(s, shape), demand_tokens(s, shape), growth, 0.0};
    e.deficit_tokens =
        static_cast<double>(e.demand_tokens + e.growth_tokens) - target * static_cast<double>(e.capacity_tokens);
    entries.push_back(e);
  }
  // Ascending deficit: front = least loaded (most spare), back = most overloaded.
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    if (a.deficit_tokens != b.deficit_tokens) return a.deficit_tokens < b.deficit_tokens;
    return a.snap->instance < b.snap->instance;
  });
  std::unordered_map<std::int64_t, std::size_t> pos;
  pos.reserve(n);
  for (std::size_t i = 0; i < n; ++i) {
    const bool inserted = pos.emplace(entries[i].snap->instance, i).second;
    KUN_CHECK(inserted) << "instance " << entries[i].snap->instance << " appears twice";
  }
  // Doubly linked list over the sorted order of still-unassigned instances; n is the sentinel.
  std::vector<std::size_t> next(n + 1), prev(n + 1);
  for (std::size_t i = 0; i <= n; ++i) {
    next[i] = (i + 1) % (n + 1);
    prev[i] = (i + n) % (n + 1);
  }
  std::vector<bool> taken(n, false);
  auto unlink = [&](std::size_t i) {
    taken[i] = true;
    next[prev[i]] = next[i];
    prev[next[i]] = prev[i];
  };
  std::size_t available = n;

  // Leaders: overloaded ids, largest deficit first.
  std::vector<std::size_t> leaders;
  for (std::int64_t id : overloaded) {
    auto it = pos.find(id);
    if (it == pos.end()) {
      result.notes.push_back("instance " + std::to_string(id) + " is not independent; not planned");
      continue;
    }
    leaders.push_back(it->second);
  }
  std::sort(leaders.begin(), leaders.end(), std::greater<>());
  leaders.erase(std::unique(leaders.begin(), leaders.end()), leaders.end());

  for (std::size_t li : leaders) {
    if (taken[li]) continue;  // already absorbed as a partner of a larger deficit
    const Entry& lead = entries[li];
    // Peek the least-loaded unassigned partners, skipping the leader.
    const std::int64_t max_g = degrees.empty() ? 0 : degrees.back();
    std::vector<std::size_t> partners;
    for (std::size_t j = next[n]; j != n && static_cast<std::int64_t>(partners.size()) < max_g - 1; j = next[j]) {
      if (j != li) partners.push_back(j);
    }
    std::ostringstream why;
    why << "instance " << lead.snap->instance << " demand " << lead.demand_tokens << " tokens vs capacity "
        << lead.capacity_tokens;
    if (lead.growth_tokens > 0) why << ", growing by " << lead.growth_tokens << " tokens over the trend horizon";
    why << " (deficit " << static_cast<std::int64_t>(lead.deficit_tokens)
        << " tokens at target " << target << ")";
    struct Candidate {
      std::int64_t g = 0;
      std::vector<std::size_t> members;
      std::int64_t demand = 0, growth = 0, before = 0, after = 0;
      bool covers = false;
    };
    Candidate chosen;
    for (std::int64_t g : degrees) {
      if (static_cast<std::int64_t>(partners.size()) < g - 1) break;
      Candidate c;
      c.g = g;
      c.members.push_back(li);
      c.members.insert(c.members.end(), partners.begin(), partners.begin() + (g - 1));
      std::sort(c.members.begin(), c.members.end(),
                [&](std::size_t a, std::size_t b) { return entries[a].snap->instance < entries[b].snap->instance; });
      std::vector<const InstanceSnapshot*> snaps;
      for (std::size_t m : c.members) {
        snaps.push_back(entries[m].snap);
        c.demand += entries[m].demand_tokens;
        c.growth += entries[m].growth_tokens;
        c.before += entries[m].capacity_tokens;
      }
      c.after = fused_capacity_tokens(snaps, shape);
      c.covers = static_cast<double>(c.demand + c.growth) <= target * static_cast<double>(c.after);
      why << "; g=" << g << " ";
      std::vector<std::int64_t> ids;
      for (std::size_t m : c.members) ids.push_back(entries[m].snap->instance);
      why << join_ids(ids) << ": demand " << c.demand;
      if (c.growth > 0) why << " + " << c.growth << " projected";
      why << " tokens, capacity " << c.before << " -> " << c.after << (c.covers ? " covers" : " short by ");
      if (!c.covers) {
        why << static_cast<std::int64_t>(static_cast<double>(c.demand + c.growth) - target * static_cast<double>(c.after));
      }
      chosen = std::move(c);
      if (chosen.covers) break;
    }
    if (chosen.g == 0) {
      why << "; no partner available (" << available - 1 << " unassigned besides it); stays independent";
      result.notes.push_back(why.str());
      continue;
    }
    if (!chosen.covers) why << "; no allowed degree covers it, taking the largest available g=" << chosen.g;
    PlannedGroup pg;
    pg.degree = chosen.g;
    pg.leader = lead.snap->instance;
    pg.demand_tokens = chosen.demand;
    pg.growth_tokens = chosen.growth;
    pg.capacity_before_tokens = chosen.before;
    pg.capacity_after_tokens = chosen.after;
    pg.covers = chosen.covers;
    for (std::size_t m : chosen.members) {
      pg.instances.push_back(entries[m].snap->instance);
      unlink(m);
      --available;
    }
    pg.reason = why.str();
    result.groups.push_back(std::move(pg));
  }
  return result;
}

bool Planner::degree_allowed(std::int64_t g, const ClusterShape& shape) const {
  if (g < 2 || g > shape.num_layers) return false;
  if (config_.max_degree > 0 && g > config_.max_degree) return false;
  return std::find(shape.allowed_degrees.begin(), shape.allowed_degrees.end(), g) != shape.allowed_degrees.end();
}

std::int64_t Planner::group_capacity_tokens(const std::vector<const InstanceSnapshot*>& members, const ClusterShape& shape) {
  check_shape(shape);
  const auto g = static_cast<std::int64_t>(members.size());
  KUN_CHECK_GE(g, 1);
  std::int64_t min_token_blocks = -1;
  for (std::int64_t s = 0; s < g; ++s) {
    const std::int64_t kept = layers_kept(s, g, shape.num_layers);
    const std::int64_t token_blocks = members[static_cast<std::size_t>(s)]->kv_blocks_total / kept;
    if (min_token_blocks < 0 || token_blocks < min_token_blocks) min_token_blocks = token_blocks;
  }
  return min_token_blocks * shape.block_size_tokens;
}

PlannedShrink Planner::plan_shrink(const GroupView& group, const ClusterShape& shape) const {
  check_shape(shape);
  const auto g = static_cast<std::int64_t>(group.members.size());
  KUN_CHECK(g >= 4 && g % 2 == 0) << "group " << group.id << ": shrink needs an even degree >= 4, not " << g;
  const std::int64_t L = shape.num_layers;
  const std::int64_t h = g / 2;
  PlannedShrink p;
  p.group = group.id;
  p.halves.assign(2, {});
  p.demand_tokens = group_demand_tokens(group.members, shape);
  p.capacity_before_tokens = group_capacity_tokens(group.members, shape);
  // Per half, its capacity at degree h: stage j (old stage 2j + half) keeps layers_kept(j, h)
  // and lends the rest; its independent pool is its pool now minus the layers it lends at g.
  std::int64_t after = 0;
  for (std::int64_t half = 0; half < 2; ++half) {
    std::int64_t least = -1;
    for (std::int64_t j = 0; j < h; ++j) {
      const std::int64_t s = 2 * j + half;
      const InstanceSnapshot* m = group.members[static_cast<std::size_t>(s)];
      p.halves[static_cast<std::size_t>(half)].push_back(m->instance);
      const std::int64_t lent_now = (L - layers_kept(s, g, L)) * shape.layer_param_bytes / shape.layer_block_bytes;
      const std::int64_t kept = layers_kept(j, h, L);
      const std::int64_t lent_after = (L - kept) * shape.layer_param_bytes / shape.layer_block_bytes;
      const std::int64_t token_blocks = std::max<std::int64_t>(0, m->kv_blocks_total - lent_now + lent_after) / kept;
      if (least < 0 || token_blocks < least) least = token_blocks;
    }
    after += least * shape.block_size_tokens;
  }
  p.capacity_after_tokens = after;
  p.covers = static_cast<double>(p.demand_tokens) <= config_.target_utilization * static_cast<double>(after);
  std::ostringstream why;
  why << "shrink " << g << " -> 2 x " << h << ": demand " << p.demand_tokens << " tokens, capacity " << p.capacity_before_tokens
      << " -> " << after << (p.covers ? "" : " (does not cover)");
  p.reason = why.str();
  return p;
}

std::int64_t Planner::group_demand_tokens(const std::vector<const InstanceSnapshot*>& members, const ClusterShape& shape) {
  check_shape(shape);
  std::int64_t blocks = 0;
  for (const InstanceSnapshot* m : members) blocks += m->blocks_demanded;
  return ceil_div(blocks, shape.num_layers) * shape.block_size_tokens;
}

std::vector<PlannedGrowth> Planner::plan_growth(const std::vector<GroupView>& groups, const std::vector<InstanceSnapshot>& free,
                                                const ClusterShape& shape) const {
  check_shape(shape);
  std::vector<PlannedGrowth> out;
  if (!config_.grow_groups) return out;
  const double target = config_.target_utilization;
  // Free instances, least loaded first (front of the list is taken first).
  std::vector<const InstanceSnapshot*> spare;
  for (const InstanceSnapshot& s : free) spare.push_back(&s);
  const auto deficit_of = [&](const InstanceSnapshot* s) {
    return static_cast<double>(demand_tokens(*s, shape)) - target * static_cast<double>(independent_capacity_tokens(*s, shape));
  };
  std::sort(spare.begin(), spare.end(), [&](const InstanceSnapshot* a, const InstanceSnapshot* b) {
    const double da = deficit_of(a), db = deficit_of(b);
    return da != db ? da < db : a->instance < b->instance;
  });
  std::size_t next_spare = 0;
  struct G {
    const GroupView* view;
    std::int64_t demand, capacity;
    double deficit;
  };
  std::vector<G> gs;
  for (const GroupView& v : groups) {
    KUN_CHECK(!v.members.empty()) << "group " << v.id;
    G e{&v, group_demand_tokens(v.members, shape), group_capacity_tokens(v.members, shape), 0.0};
    e.deficit = static_cast<double>(e.demand + std::max<std::int64_t>(0, v.growth_tokens)) - target * static_cast<double>(e.capacity);
    gs.push_back(e);
  }
  // Merge candidates by degree, least loaded first; growers, largest deficit first.
  std::vector<std::size_t> order(gs.size());
  for (std::size_t i = 0; i < gs.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return gs[a].deficit != gs[b].deficit ? gs[a].deficit < gs[b].deficit : gs[a].view->id < gs[b].view->id;
  });
  std::map<std::size_t, std::vector<std::size_t>> mergeable;  // degree -> candidates, least loaded first
  std::map<std::size_t, std::size_t> next_mergeable;
  // Overloaded groups by degree, least loaded first: a last resort for a merge (see below).
  std::map<std::size_t, std::vector<std::size_t>> overloaded_of_degree;
  std::map<std::size_t, std::size_t> next_overloaded;
  for (std::size_t i : order) {
    if (!gs[i].view->overloaded) mergeable[gs[i].view->members.size()].push_back(i);
    if (gs[i].view->overloaded) overloaded_of_degree[gs[i].view->members.size()].push_back(i);
  }
  std::vector<bool> taken(gs.size(), false);
  // A member's pool without the pages its dropped layers lent (what it has as an instance).
  const auto base_of = [&](const InstanceSnapshot* s, std::int64_t stage, std::int64_t g) {
    InstanceSnapshot b = *s;
    if (g > 1) {
      b.kv_blocks_total -= (shape.num_layers - layers_kept(stage, g, shape.num_layers)) * shape.layer_param_bytes /
                           shape.layer_block_bytes;
    }
    return b;
  };
  for (auto it = order.rbegin(); it != order.rend(); ++it) {
    const std::size_t gi = *it;
    const G& grower = gs[gi];
    if (taken[gi] || !grower.view->overloaded) continue;
    const auto g = static_cast<std::int64_t>(grower.view->members.size());
    std::ostringstream why;
    why << "group " << grower.view->id << " (g=" << g << ") demand " << grower.demand;
    if (grower.view->growth_tokens > 0) why << " + " << grower.view->growth_tokens << " projected";
    why << " tokens vs capacity " << grower.capacity;
    if (!degree_allowed(2 * g, shape)) continue;  // at its largest size
    std::vector<const InstanceSnapshot*> partners;
    std::vector<std::int64_t> partner_stage_degree;  // the degree the partner's layout comes from
    std::int64_t merged = -1;
    std::int64_t merged_growth = 0;
    if (static_cast<std::int64_t>(spare.size() - next_spare) >= g) {
      for (std::int64_t j = 0; j < g; ++j) partners.push_back(spare[next_spare + static_cast<std::size_t>(j)]);
      partner_stage_degree.assign(static_cast<std::size_t>(g), 1);
      why << "; +" << g << " free instances";
    } else {
      auto& cands = mergeable[static_cast<std::size_t>(g)];
      std::size_t& next = next_mergeable[static_cast<std::size_t>(g)];
      while (next < cands.size() && (taken[cands[next]] || cands[next] == gi)) ++next;
      std::size_t mi = gs.size();
      if (next < cands.size()) {
        mi = cands[next];
      } else {
        // No light group of degree g: the least loaded other overloaded one, if the merged group
        // covers both groups' demand now (a group of 2g lends each member more pages than one of
        // g: for Llama-2-13B a member's pool grows x1.29 at g = 2, x1.44 at g = 4). Not their
        // projected growth: the merge adds capacity now, and the merged group grows again if the
        // projection comes true (counting it kept two overloaded pairs of the H100 13B sweep
        // apart for 3 s at 23.8 req/s, their requests queueing on memory: p99 TTFT 2.19 s).
        auto& over = overloaded_of_degree[static_cast<std::size_t>(g)];
        std::size_t& on = next_overloaded[static_cast<std::size_t>(g)];
        while (on < over.size() && taken[over[on]]) ++on;
        std::size_t k = on;
        if (k < over.size() && over[k] == gi) ++k;
        while (k < over.size() && taken[over[k]]) ++k;
        if (k == over.size()) continue;  // nothing to grow with
        const std::size_t cand = over[k];
        std::vector<InstanceSnapshot> merged_bases;
        std::vector<const InstanceSnapshot*> merged_ptrs;
        merged_bases.reserve(static_cast<std::size_t>(2 * g));
        for (std::int64_t j = 0; j < g; ++j) {
          merged_bases.push_back(base_of(grower.view->members[static_cast<std::size_t>(j)], j, g));
          merged_bases.push_back(base_of(gs[cand].view->members[static_cast<std::size_t>(j)], j, g));
        }
        for (const InstanceSnapshot& b : merged_bases) merged_ptrs.push_back(&b);
        const std::int64_t need = grower.demand + gs[cand].demand;
        if (static_cast<double>(need) > target * static_cast<double>(fused_capacity_tokens(merged_ptrs, shape))) continue;
        mi = cand;
        why << "; no free instance or light group, the merged group holds both";
      }
      taken[mi] = true;
      merged = gs[mi].view->id;
      merged_growth = std::max<std::int64_t>(0, gs[mi].view->growth_tokens);
      partners = gs[mi].view->members;
      partner_stage_degree.assign(static_cast<std::size_t>(g), g);
      why << "; merging group " << merged << " (demand " << gs[mi].demand << " vs " << gs[mi].capacity << ")";
    }
    if (merged < 0) next_spare += static_cast<std::size_t>(g);
    taken[gi] = true;
    PlannedGrowth pg;
    pg.group = grower.view->id;
    pg.absorbs.push_back(grower.view->id);
    if (merged >= 0) pg.absorbs.push_back(merged);
    pg.degree = 2 * g;
    std::vector<InstanceSnapshot> bases;
    bases.reserve(static_cast<std::size_t>(2 * g));
    for (std::int64_t j = 0; j < g; ++j) {
      const InstanceSnapshot* own = grower.view->members[static_cast<std::size_t>(j)];
      const InstanceSnapshot* other = partners[static_cast<std::size_t>(j)];
      pg.instances.push_back(own->instance);
      pg.instances.push_back(other->instance);
      bases.push_back(base_of(own, j, g));
      bases.push_back(base_of(other, j, partner_stage_degree[static_cast<std::size_t>(j)]));
    }
    std::vector<const InstanceSnapshot*> base_ptrs;
    std::vector<const InstanceSnapshot*> all;
    for (const InstanceSnapshot& b : bases) base_ptrs.push_back(&b);
    for (std::int64_t j = 0; j < g; ++j) {
      all.push_back(grower.view->members[static_cast<std::size_t>(j)]);
      all.push_back(partners[static_cast<std::size_t>(j)]);
    }
    pg.demand_tokens = group_demand_tokens(all, shape);
    pg.growth_tokens = std::max<std::int64_t>(0, grower.view->growth_tokens) + merged_growth;
    pg.capacity_before_tokens = grower.capacity + (merged >= 0 ? group_capacity_tokens(partners, shape) : 0);
    if (merged < 0) {
      for (const InstanceSnapshot* p : partners) pg.capacity_before_tokens += independent_capacity_tokens(*p, shape);
    }
    pg.capacity_after_tokens = fused_capacity_tokens(base_ptrs, shape);
    pg.covers = static_cast<double>(pg.demand_tokens + pg.growth_tokens) <= target * static_cast<double>(pg.capacity_after_tokens);
    why << "; g=" << pg.degree << " " << join_ids(pg.instances) << ": demand " << pg.demand_tokens;
    if (pg.growth_tokens > 0) why << " + " << pg.growth_tokens << " projected";
    why << " tokens, capacity " << pg.capacity_before_tokens << " -> " << pg.capacity_after_tokens << (pg.covers ? " covers" : " (still short)");
    pg.reason = why.str();
    out.push_back(std::move(pg));
  }
  return out;
}

}  // namespace kun::cluster
