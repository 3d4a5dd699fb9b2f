#include "cluster/demand_monitor.h"

#include <algorithm>

#include "common/check.h"

namespace kun::cluster {

const char* vote_name(Vote v) {
  switch (v) {
    case Vote::kNone: return "none";
    case Vote::kDrop: return "drop";
    case Vote::kRestore: return "restore";
  }
  return "unknown";
}

DemandSample sample_of(const InstanceSnapshot& s, std::int64_t now_us) {
  DemandSample d;
  d.time_us = now_us;
  d.demand = s.demand();
  d.pending_blocks = s.pending_blocks;
  d.free_blocks = s.kv_blocks_free;
  d.num_queued = s.num_queued;
  return d;
}

DemandSample sample_of_group(const std::vector<const InstanceSnapshot*>& members, std::int64_t now_us,
                             std::int64_t lent_blocks) {
  KUN_CHECK_GE(lent_blocks, 0);
  DemandSample d;
  d.time_us = now_us;
  std::int64_t demanded = 0;
  std::int64_t total = 0;
  for (const InstanceSnapshot* m : members) {
    KUN_CHECK(m != nullptr);
    demanded += m->blocks_demanded;
    total += m->kv_blocks_total;
    d.pending_blocks += m->pending_blocks;
    d.free_blocks += m->kv_blocks_free;
    d.num_queued += m->num_queued;
  }
  const std::int64_t capacity = total - lent_blocks;
  d.demand = capacity > 0 ? static_cast<double>(demanded) / static_cast<double>(capacity) : (demanded > 0 ? 1e9 : 0.0);
  return d;
}

double least_squares_slope(const std::deque<DemandSample>& window) {
  const auto n = static_cast<double>(window.size());
  if (window.size() < 2) return 0.0;
  // x = 0..n-1; slope = sum((x - xm)(y - ym)) / sum((x - xm)^2).
  const double xm = (n - 1.0) / 2.0;
  double ym = 0.0;
  for (const auto& s : window) ym += s.demand;
  ym /= n;
  double num = 0.0;
  double den = 0.0;
  double x = 0.0;
  for (const auto& s : window) {
    num += (x - xm) * (s.demand - ym);
    den += (x - xm) * (x - xm);
    x += 1.0;
  }
  return num / den;
}

double recent_growth_per_sample(const std::deque<DemandSample>& window, std::int64_t samples) {
  KUN_CHECK_GE(samples, 2);
  const auto n = static_cast<std::int64_t>(window.size());
  if (n < samples) return 0.0;
  const double newest = window.back().demand;
  const double oldest = window[static_cast<std::size_t>(n - samples)].demand;
  return std::max(0.0, (newest - oldest) / static_cast<double>(samples - 1));
}

DemandMonitor::DemandMonitor(DemandMonitorConfig config) : config_(config) {
  KUN_CHECK_GT(config_.sample_period_us, 0);
  KUN_CHECK_GT(config_.window_samples, 0);
  KUN_CHECK_GE(config_.drop_votes_needed, 1);
  KUN_CHECK_GE(config_.restore_votes_needed, 1);
  KUN_CHECK_GE(config_.min_trend_samples, 2);
  KUN_CHECK_LE(config_.drop_votes_needed, config_.window_samples);
  KUN_CHECK_LE(config_.restore_votes_needed, config_.window_samples);
  KUN_CHECK_GE(config_.sustained_overload_samples, 0);
}

bool DemandMonitor::overloaded(const DemandSample& s) const {
  return s.demand >= config_.drop_demand_threshold && (s.pending_blocks > 0 || s.num_queued > 0);
}

bool DemandMonitor::drop_eligible(const DemandSample& s) const {
  if (s.demand < config_.drop_demand_threshold) return false;
  if (s.pending_blocks < s.free_blocks) return false;
  if (config_.drop_requires_pending && s.pending_blocks <= 0) return false;
  return true;
}

bool DemandMonitor::falling(const std::deque<DemandSample>& window) const {
  if (static_cast<std::int64_t>(window.size()) < config_.min_trend_samples) return false;
  switch (config_.trend_rule) {
    case TrendRule::kLeastSquaresSlope:
      return least_squares_slope(window) < config_.falling_slope_threshold_per_sample;
    case TrendRule::kLastBelowFirst:
      return window.back().demand < window.front().demand;
  }
  return false;
}

bool DemandMonitor::restore_eligible(const Window& w) const {
  if (w.samples.empty()) return false;
  const DemandSample& s = w.samples.back();
  if (s.num_queued != 0 || s.pending_blocks != 0) return false;
  if (s.demand > config_.restore_demand_threshold) return false;
  return falling(w.samples);
}

bool DemandMonitor::observe(Window& w, const DemandSample& sample) {
  if (w.has_sample) {
    KUN_CHECK_GE(sample.time_us, w.last_sample_us) << "time went backwards";
    if (sample.time_us - w.last_sample_us < config_.sample_period_us) return false;
  }
  w.has_sample = true;
  w.last_sample_us = sample.time_us;
  w.samples.push_back(sample);
  while (static_cast<std::int64_t>(w.samples.size()) > config_.window_samples) w.samples.pop_front();
  w.drop_streak = drop_eligible(sample) ? w.drop_streak + 1 : 0;
  w.overload_streak = overloaded(sample) ? w.overload_streak + 1 : 0;
  w.restore_streak = restore_eligible(w) ? w.restore_streak + 1 : 0;
  return true;
}

bool DemandMonitor::observe_instance(std::int64_t instance, const DemandSample& sample) {
  return observe(instances_[instance], sample);
}

bool DemandMonitor::observe_group(std::int64_t group, const DemandSample& sample) {
  return observe(groups_[group], sample);
}

Vote DemandMonitor::vote(const Window* w) const {
  if (w == nullptr) return Vote::kNone;
  if (w->drop_streak >= config_.drop_votes_needed) return Vote::kDrop;
  if (config_.sustained_overload_samples > 0 && w->overload_streak >= config_.sustained_overload_samples) return Vote::kDrop;
  if (w->restore_streak >= config_.restore_votes_needed) return Vote::kRestore;
  return Vote::kNone;
}

Vote DemandMonitor::instance_vote(std::int64_t instance) const { return vote(instance_window(instance)); }
Vote DemandMonitor::group_vote(std::int64_t group) const { return vote(group_window(group)); }

bool DemandMonitor::observe_group_load(std::int64_t group, const DemandSample& sample) {
  return observe(group_loads_[group], sample);
}

Vote DemandMonitor::group_load_vote(std::int64_t group) const {
  auto it = group_loads_.find(group);
  if (it == group_loads_.end()) return Vote::kNone;
  const Vote v = vote(&it->second);
  return v == Vote::kDrop ? v : Vote::kNone;  // a fused group's load only asks for growth
}

bool DemandMonitor::observe_group_shrink(std::int64_t group, const DemandSample& sample) {
  return observe(group_shrinks_[group], sample);
}

Vote DemandMonitor::group_shrink_vote(std::int64_t group) const {
  auto it = group_shrinks_.find(group);
  if (it == group_shrinks_.end()) return Vote::kNone;
  const Vote v = vote(&it->second);
  return v == Vote::kRestore ? v : Vote::kNone;  // only asks to shrink
}

const DemandMonitor::Window* DemandMonitor::group_shrink_window(std::int64_t group) const {
  auto it = group_shrinks_.find(group);
  return it == group_shrinks_.end() ? nullptr : &it->second;
}

const DemandMonitor::Window* DemandMonitor::group_load_window(std::int64_t group) const {
  auto it = group_loads_.find(group);
  return it == group_loads_.end() ? nullptr : &it->second;
}

void DemandMonitor::reset_instance(std::int64_t instance) { instances_.erase(instance); }
void DemandMonitor::reset_group(std::int64_t group) {
  groups_.erase(group);
  group_loads_.erase(group);
  group_shrinks_.erase(group);
}

const DemandMonitor::Window* DemandMonitor::instance_window(std::int64_t instance) const {
  auto it = instances_.find(instance);
  return it == instances_.end() ? nullptr : &it->second;
}

const DemandMonitor::Window* DemandMonitor::group_window(std::int64_t group) const {
  auto it = groups_.find(group);
  return it == groups_.end() ? nullptr : &it->second;
}

}  // namespace kun::cluster
