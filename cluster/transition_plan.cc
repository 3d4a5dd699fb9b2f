#include "cluster/transition_plan.h"

#include <algorithm>
#include <cctype>
#include <map>
#include <sstream>

#include "common/check.h"

namespace kun::cluster {

std::int64_t stage_layer_begin(std::int64_t stage, std::int64_t g, std::int64_t num_layers) { return stage * num_layers / g; }

std::int64_t stage_holding_layer(std::int64_t layer, std::int64_t g, std::int64_t num_layers) {
  // Stage k holds [k L / g, (k + 1) L / g): the largest k with k L / g <= layer.
  std::int64_t k = (layer * g) / num_layers;
  while (k + 1 < g && stage_layer_begin(k + 1, g, num_layers) <= layer) ++k;
  while (k > 0 && stage_layer_begin(k, g, num_layers) > layer) --k;
  return k;
}

namespace {

void check_geometry(const TransitionGeometry& geo) {
  KUN_CHECK_GT(geo.num_layers, 0);
  KUN_CHECK_GT(geo.block_size_tokens, 0);
  KUN_CHECK_GT(geo.blocks_per_page, 0);
  KUN_CHECK_GE(geo.pages_per_layer, 0);
}

void write_moves(std::ostringstream& os, const std::vector<LayerMove>& moves) {
  os << "[";
  for (std::size_t i = 0; i < moves.size(); ++i) {
    os << (i ? " " : "") << "L" << moves[i].layer << ":" << moves[i].from << ">" << moves[i].to;
  }
  os << "]";
}

void write_ids(std::ostringstream& os, const std::vector<std::int64_t>& ids) {
  os << "{";
  for (std::size_t i = 0; i < ids.size(); ++i) os << (i ? "," : "") << ids[i];
  os << "}";
}


// " r<id>><unit>:<tokens>t<moves>..." for the kept KV, then "; queued r<id>><unit>[!]...": the
// part of a split's and a shrink's text that says where every request lands.
void write_landings(std::ostringstream& os, const std::vector<Placement>& keep_kv, const std::vector<Landing>& queued) {
  for (const Placement& p : keep_kv) {
    os << " r" << p.id.value << ">" << p.member << ":" << p.tokens << "t";
    write_moves(os, p.moves);
  }
  os << "; queued";
  for (const Landing& l : queued) os << " r" << l.id.value << ">" << l.member << (l.lost_kv ? "!" : "");
}

// Where every request of a split or a shrink lands: a running request whose KV is kept goes where
// `place(r)` puts it (the unit index, having added its Placement to the plan; -1 when it fits
// nowhere and its KV is freed). The requests whose KV is not kept (running under recompute, or
// lost by `place`) and then the queued ones land, in that order, on the unit with the fewest
// requests landed so far (the first such unit on a tie).
template <typename Place>
std::vector<Landing> land_requests(const std::vector<TransitionRequest>& requests, StaleKvStrategy strategy,
                                   std::size_t units, Place&& place) {
  std::vector<std::int64_t> landed(units, 0);
  std::vector<Landing> lost;
  std::vector<RequestId> waiting;
  for (const TransitionRequest& r : requests) {
    const bool keep = r.running && strategy != StaleKvStrategy::kRecompute;
    if (!keep) {
      if (r.running) {
        lost.push_back(Landing{r.id, 0, true});
      } else {
        waiting.push_back(r.id);
      }
      continue;
    }
    const std::int64_t unit = place(r);
    if (unit < 0) {
      lost.push_back(Landing{r.id, 0, true});
      continue;
    }
    ++landed[static_cast<std::size_t>(unit)];
  }
  std::vector<Landing> queued;
  const auto land = [&](Landing l) {
    const auto it = std::min_element(landed.begin(), landed.end());
    l.member = static_cast<std::int32_t>(it - landed.begin());
    ++*it;
    queued.push_back(l);
  };
  for (const Landing& l : lost) land(l);
  for (RequestId id : waiting) land(Landing{id, 0, false});
  return queued;
}

}  // namespace

std::int64_t DropPlan::stage_of_layer(std::int64_t layer) const {
  for (std::size_t k = 0; k < members.size(); ++k) {
    if (layer >= members[k].layer_begin && layer < members[k].layer_end) return static_cast<std::int64_t>(k);
  }
  KUN_CHECK(false) << "layer " << layer << " has no stage";
  return -1;
}

DropPlan plan_drop(const DropInput& in, const TransitionGeometry& geo) {
  check_geometry(geo);
  const auto g = static_cast<std::int64_t>(in.members.size());
  const std::int64_t L = geo.num_layers;
  KUN_CHECK(g >= 2 && g <= L) << "drop of " << g << " members, " << L << " layers";
  KUN_CHECK_EQ(in.held_begin.size(), in.members.size());
  KUN_CHECK_EQ(in.held_end.size(), in.members.size());
  DropPlan plan;
  plan.group = in.group;
  plan.strategy = in.strategy;
  for (std::int64_t k = 0; k < g; ++k) {
    const auto ks = static_cast<std::size_t>(k);
    MemberLayout m;
    m.instance = in.members[ks];
    m.layer_begin = stage_layer_begin(k, g, L);
    m.layer_end = stage_layer_begin(k + 1, g, L);
    KUN_CHECK(in.held_begin[ks] <= m.layer_begin && m.layer_end <= in.held_end[ks])
        << "member " << m.instance << " holds layers [" << in.held_begin[ks] << "," << in.held_end[ks]
        << ") but stage " << k << " of " << g << " keeps [" << m.layer_begin << "," << m.layer_end << ")";
    for (std::int64_t l = in.held_begin[ks]; l < in.held_end[ks]; ++l) {
      if (l < m.layer_begin || l >= m.layer_end) m.layers_dropped.push_back(l);
    }
    m.pages_to_kv = static_cast<std::int64_t>(m.layers_dropped.size()) * geo.pages_per_layer;
    m.blocks_to_kv = m.pages_to_kv * geo.blocks_per_page;
    plan.members.push_back(std::move(m));
  }
  std::vector<RequestId> started, fresh;
  for (const TransitionRequest& r : in.requests) {
    const bool keep = r.running && in.strategy != StaleKvStrategy::kRecompute;
    if (keep) {
      KUN_CHECK_EQ(static_cast<std::int64_t>(r.layer_member.size()), L) << "request " << r.id;
      StaleKvPlan s;
      s.id = r.id;
      s.tokens = r.tokens_held;
      for (std::int64_t l = 0; l < L; ++l) {
        const std::int32_t at = r.layer_member[static_cast<std::size_t>(l)];
        KUN_CHECK(at >= 0 && at < g) << "request " << r.id << " layer " << l << " on member " << at;
        const auto owner = static_cast<std::int32_t>(stage_holding_layer(l, g, L));
        if (at != owner) s.moves.push_back(LayerMove{l, at, owner});
      }
      plan.keep_kv.push_back(std::move(s));
      continue;
    }
    if (r.running) plan.lose_kv.push_back(r.id);
    (r.started || r.running ? started : fresh).push_back(r.id);
  }
  plan.queue = std::move(started);
  plan.queue.insert(plan.queue.end(), fresh.begin(), fresh.end());
  return plan;
}

std::string DropPlan::to_string() const {
  std::ostringstream os;
  os << "drop group " << group << " (" << stale_kv_strategy_name(strategy) << ")";
  for (const MemberLayout& m : members) {
    os << " m" << m.instance << "[" << m.layer_begin << "," << m.layer_end << ")+" << m.blocks_to_kv << "b";
  }
  os << "; keep";
  for (const StaleKvPlan& s : keep_kv) {
    os << " r" << s.id.value << ":" << s.tokens << "t";
    write_moves(os, s.moves);
  }
  os << "; lose";
  for (RequestId id : lose_kv) os << " r" << id.value;
  os << "; queue";
  for (RequestId id : queue) os << " r" << id.value;
  return os.str();
}

RestorePlan plan_restore(const RestoreInput& in, const TransitionGeometry& geo) {
  check_geometry(geo);
  const auto g = static_cast<std::int64_t>(in.members.size());
  const std::int64_t L = geo.num_layers;
  KUN_CHECK(g >= 2 && g <= L) << "restore of " << g << " members";
  KUN_CHECK_EQ(in.kv_blocks_total.size(), in.members.size());
  KUN_CHECK(in.layers_kept.empty() || in.layers_kept.size() == in.members.size()) << "layers_kept is per member";
  RestorePlan plan;
  plan.group = in.group;
  plan.members = in.members;
  plan.gather = in.strategy != StaleKvStrategy::kRecompute;
  for (std::int64_t k = 0; k < g; ++k) {
    std::int64_t pulled = 0;
    for (std::int64_t l = 0; l < L; ++l) {
      const std::int64_t owner = stage_holding_layer(l, g, L);
      if (owner == k) continue;
      if (!in.layers_kept.empty()) {
        const auto& kept = in.layers_kept[static_cast<std::size_t>(k)];
        if (std::find(kept.begin(), kept.end(), l) != kept.end()) continue;
      }
      plan.pulls.push_back(WeightPull{static_cast<std::int32_t>(k), l, static_cast<std::int32_t>(owner)});
      ++pulled;
    }
    const std::int64_t pages = pulled * geo.pages_per_layer;
    plan.pages_reclaimed.push_back(pages);
    const std::int64_t room = in.kv_blocks_total[static_cast<std::size_t>(k)] - pages * geo.blocks_per_page;
    KUN_CHECK_GE(room, 0) << "member " << in.members[static_cast<std::size_t>(k)] << " pool smaller than its lent pages";
    plan.split_room_blocks.push_back(room);
  }
  return plan;
}

std::string RestorePlan::to_string() const {
  std::ostringstream os;
  os << "restore group " << group << " members ";
  write_ids(os, members);
  os << (gather ? " gather" : " no-gather") << "; pulls";
  for (const WeightPull& p : pulls) os << " " << p.member << "<L" << p.layer << "@" << p.from;
  os << "; reclaim ";
  write_ids(os, pages_reclaimed);
  os << " pages; room ";
  write_ids(os, split_room_blocks);
  return os.str();
}

SplitPlan plan_split(const SplitInput& in, const TransitionGeometry& geo) {
  check_geometry(geo);
  const auto g = static_cast<std::int64_t>(in.members.size());
  const std::int64_t L = geo.num_layers;
  KUN_CHECK_GE(g, 2);
  KUN_CHECK_EQ(in.split_room_blocks.size(), in.members.size());
  KUN_CHECK_EQ(in.free_blocks_now.size(), in.members.size());
  SplitPlan plan;
  plan.group = in.group;
  plan.members = in.members;
  std::vector<std::int64_t> room = in.split_room_blocks;
  std::vector<std::int64_t> free_now = in.free_blocks_now;
  plan.queued = land_requests(in.requests, in.strategy, static_cast<std::size_t>(g), [&](const TransitionRequest& r) {
    KUN_CHECK_EQ(static_cast<std::int64_t>(r.layer_member.size()), L) << "request " << r.id;
    const std::int64_t tb = geo.token_blocks(r.tokens_held);
    const std::int64_t need = tb * L;
    std::vector<std::int64_t> held(static_cast<std::size_t>(g), 0);  // layer blocks per member
    for (std::int32_t m : r.layer_member) {
      KUN_CHECK(m >= 0 && m < g) << "request " << r.id << " on member " << m;
      held[static_cast<std::size_t>(m)] += tb;
    }
    std::int64_t best = -1;
    for (std::int64_t k = 0; k < g; ++k) {
      if (room[static_cast<std::size_t>(k)] < need) continue;
      if (best < 0 || room[static_cast<std::size_t>(k)] > room[static_cast<std::size_t>(best)]) best = k;
    }
    if (r.home >= 0 && r.home < g && room[static_cast<std::size_t>(r.home)] >= need) best = r.home;
    const bool fits_now =
        best >= 0 && free_now[static_cast<std::size_t>(best)] >= need - held[static_cast<std::size_t>(best)];
    if (!fits_now) {  // its KV is freed where it is
      for (std::int64_t k = 0; k < g; ++k) free_now[static_cast<std::size_t>(k)] += held[static_cast<std::size_t>(k)];
      return std::int64_t{-1};
    }
    const auto b = static_cast<std::size_t>(best);
    room[b] -= need;
    free_now[b] -= need - held[b];
    for (std::int64_t k = 0; k < g; ++k) {
      if (k != best) free_now[static_cast<std::size_t>(k)] += held[static_cast<std::size_t>(k)];
    }
    Placement p;
    p.id = r.id;
    p.member = static_cast<std::int32_t>(best);
    p.tokens = r.tokens_held;
    for (std::int64_t l = 0; l < L; ++l) {
      const std::int32_t at = r.layer_member[static_cast<std::size_t>(l)];
      if (at != best) p.moves.push_back(LayerMove{l, at, static_cast<std::int32_t>(best)});
    }
    plan.keep_kv.push_back(std::move(p));
    return best;
  });
  return plan;
}

std::string SplitPlan::to_string() const {
  std::ostringstream os;
  os << "split group " << group << " members ";
  write_ids(os, members);
  os << "; keep";
  write_landings(os, keep_kv, queued);
  return os.str();
}

ShrinkPlan plan_shrink(const ShrinkInput& in, const TransitionGeometry& geo) {
  check_geometry(geo);
  const auto g = static_cast<std::int64_t>(in.members.size());
  const std::int64_t L = geo.num_layers;
  KUN_CHECK(g >= 4 && g % 2 == 0) << "shrink needs an even degree >= 4, not " << g;
  KUN_CHECK_EQ(in.base_kv_blocks.size(), in.members.size());
  const std::int64_t h = g / 2;
  KUN_CHECK_LE(h, L);
  ShrinkPlan plan;
  plan.group = in.group;
  plan.members = in.members;
  plan.halves.assign(2, {});
  plan.half_members.assign(2, {});
  plan.pages_reclaimed.assign(static_cast<std::size_t>(g), 0);
  plan.room_blocks.assign(static_cast<std::size_t>(g), 0);
  std::vector<std::int64_t> keep_begin(static_cast<std::size_t>(g)), keep_end(static_cast<std::size_t>(g));
  for (std::int64_t s = 0; s < g; ++s) {
    const std::int64_t half = s % 2, j = s / 2;
    plan.halves[static_cast<std::size_t>(half)].push_back(in.members[static_cast<std::size_t>(s)]);
    plan.half_members[static_cast<std::size_t>(half)].push_back(static_cast<std::int32_t>(s));
    const std::int64_t held_begin = stage_layer_begin(s, g, L), held_end = stage_layer_begin(s + 1, g, L);
    keep_begin[static_cast<std::size_t>(s)] = stage_layer_begin(j, h, L);
    keep_end[static_cast<std::size_t>(s)] = stage_layer_begin(j + 1, h, L);
    KUN_CHECK(keep_begin[static_cast<std::size_t>(s)] <= held_begin && held_end <= keep_end[static_cast<std::size_t>(s)])
        << "stage " << s << " of " << g << " holds layers it would not keep at degree " << h;
    for (std::int64_t l = keep_begin[static_cast<std::size_t>(s)]; l < keep_end[static_cast<std::size_t>(s)]; ++l) {
      if (l >= held_begin && l < held_end) continue;
      const auto from = static_cast<std::int32_t>(stage_holding_layer(l, g, L));
      plan.pulls.push_back(WeightPull{static_cast<std::int32_t>(s), l, from});
      plan.pages_reclaimed[static_cast<std::size_t>(s)] += geo.pages_per_layer;
    }
    const std::int64_t kept = keep_end[static_cast<std::size_t>(s)] - keep_begin[static_cast<std::size_t>(s)];
    plan.room_blocks[static_cast<std::size_t>(s)] =
        in.base_kv_blocks[static_cast<std::size_t>(s)] + (L - kept) * geo.pages_per_layer * geo.blocks_per_page;
  }
  plan.layer_owners.assign(2, std::vector<std::int32_t>(static_cast<std::size_t>(L)));
  for (std::size_t half = 0; half < 2; ++half) {
    for (std::int64_t l = 0; l < L; ++l) {
      plan.layer_owners[half][static_cast<std::size_t>(l)] =
          plan.half_members[half][static_cast<std::size_t>(stage_holding_layer(l, h, L))];
    }
  }
  std::vector<std::int64_t> room = plan.room_blocks;
  plan.queued = land_requests(in.requests, in.strategy, 2, [&](const TransitionRequest& r) {
    KUN_CHECK_EQ(static_cast<std::int64_t>(r.layer_member.size()), L) << "request " << r.id;
    const std::int64_t tb = geo.token_blocks(r.tokens_held);
    // Room left on a half: the least over its members, in this request's blocks.
    const auto fits = [&](std::int64_t half) {
      std::int64_t least = -1;
      for (std::int32_t m : plan.half_members[static_cast<std::size_t>(half)]) {
        const std::int64_t need = tb * (keep_end[static_cast<std::size_t>(m)] - keep_begin[static_cast<std::size_t>(m)]);
        const std::int64_t left = room[static_cast<std::size_t>(m)] - need;
        if (left < 0) return std::int64_t{-1};
        least = least < 0 ? left : std::min(least, left);
      }
      return least;
    };
    const std::int64_t left0 = fits(0), left1 = fits(1);
    if (left0 < 0 && left1 < 0) return std::int64_t{-1};
    // The half its live gather was heading to, when it still fits there; else the most room.
    const bool home_fits = (r.home == 0 && left0 >= 0) || (r.home == 1 && left1 >= 0);
    const std::int64_t half = home_fits ? r.home : left1 > left0 ? 1 : 0;
    Placement p;
    p.id = r.id;
    p.member = static_cast<std::int32_t>(half);
    p.tokens = r.tokens_held;
    for (std::int32_t m : plan.half_members[static_cast<std::size_t>(half)]) {
      room[static_cast<std::size_t>(m)] -= tb * (keep_end[static_cast<std::size_t>(m)] - keep_begin[static_cast<std::size_t>(m)]);
      for (std::int64_t l = keep_begin[static_cast<std::size_t>(m)]; l < keep_end[static_cast<std::size_t>(m)]; ++l) {
        const std::int32_t at = r.layer_member[static_cast<std::size_t>(l)];
        if (at != m) p.moves.push_back(LayerMove{l, at, m});
      }
    }
    plan.keep_kv.push_back(std::move(p));
    return half;
  });
  return plan;
}

std::string ShrinkPlan::to_string() const {
  std::ostringstream os;
  os << "shrink group " << group << " members ";
  write_ids(os, members);
  os << " into ";
  write_ids(os, halves[0]);
  os << " + ";
  write_ids(os, halves[1]);
  os << "; pulls " << pulls.size() << "; keep";
  write_landings(os, keep_kv, queued);
  return os.str();
}

std::string canonical_transitions(const std::vector<TransitionRecord>& records) {
  std::map<std::string, std::int64_t> renumber;
  std::ostringstream os;
  for (const TransitionRecord& rec : records) {
    const std::string& s = rec.plan;
    for (std::size_t i = 0; i < s.size();) {
      const bool at_id = s[i] == 'r' && (i == 0 || s[i - 1] == ' ') && i + 1 < s.size() &&
                         std::isdigit(static_cast<unsigned char>(s[i + 1]));
      if (!at_id) {
        os << s[i++];
        continue;
      }
      std::size_t j = i + 1;
      while (j < s.size() && std::isdigit(static_cast<unsigned char>(s[j]))) ++j;
      const std::string id = s.substr(i + 1, j - i - 1);
      auto [it, inserted] = renumber.emplace(id, static_cast<std::int64_t>(renumber.size()));
      os << "r#" << it->second;
      i = j;
    }
    os << "\n";
  }
  return os.str();
}

}  // namespace kun::cluster
