#include "sim/device_profile.h"

#include <algorithm>
#include <limits>
#include <map>
#include <charconv>
#include <cmath>
#include <fstream>
#include <sstream>

#include "common/check.h"

namespace kun::sim {
namespace {

constexpr const char* kFormat = "kunserve-device-profile-1";

nlohmann::json spec_to_json(const GpuSpec& g) {
  return {{"name", g.name},
          {"peak_flops", g.peak_flops},
          {"hbm_bytes_per_s", g.hbm_bytes_per_s},
          {"memory_bytes", g.memory_bytes},
          {"gemm_flops_eff", g.gemm_flops_eff},
          {"gemm_bw_eff", g.gemm_bw_eff},
          {"gemm_overhead_us", g.gemm_overhead_us},
          {"elem_bw_eff", g.elem_bw_eff},
          {"elem_overhead_us", g.elem_overhead_us},
          {"attn_flops_eff", g.attn_flops_eff},
          {"attn_bw_eff", g.attn_bw_eff},
          {"attn_overhead_us", g.attn_overhead_us},
          {"step_overhead_us", g.step_overhead_us},
          {"dtype_bytes", g.dtype_bytes},
          {"page_bytes", g.page_bytes},
          {"host_contention", g.host_contention},
          {"host_contention_us", g.host_contention_us},
          {"host_contention_fused_us", g.host_contention_fused_us},
          {"host_idle_gap_us", g.host_idle_gap_us},
          {"host_idle_us", g.host_idle_us},
          {"host_contention_tokens", g.host_contention_tokens},
          {"host_contention_token_knots", g.host_contention_token_knots},
          {"host_contention_fused_tokens", g.host_contention_fused_tokens},
          {"drop_layer_us", g.drop_layer_us},
          {"host_swap_us", g.host_swap_us},
          {"table_tokens", g.table_tokens},
          {"table_us", g.table_us},
          {"sample_us", g.sample_us},
          {"attn_pair_us", g.attn_pair_us},
          {"measured_model", g.measured_model}};
}

StatusOr<GpuSpec> spec_from_json(const nlohmann::json& j) {
  GpuSpec g;
  try {
    g.name = j.at("name").get<std::string>();
    g.peak_flops = j.at("peak_flops").get<double>();
    g.hbm_bytes_per_s = j.at("hbm_bytes_per_s").get<double>();
    g.memory_bytes = j.at("memory_bytes").get<std::int64_t>();
    g.gemm_flops_eff = j.at("gemm_flops_eff").get<double>();
    g.gemm_bw_eff = j.at("gemm_bw_eff").get<double>();
    g.gemm_overhead_us = j.at("gemm_overhead_us").get<double>();
    g.elem_bw_eff = j.at("elem_bw_eff").get<double>();
    g.elem_overhead_us = j.at("elem_overhead_us").get<double>();
    g.attn_flops_eff = j.at("attn_flops_eff").get<double>();
    g.attn_bw_eff = j.at("attn_bw_eff").get<double>();
    g.attn_overhead_us = j.at("attn_overhead_us").get<double>();
    g.step_overhead_us = j.at("step_overhead_us").get<double>();
    g.dtype_bytes = j.at("dtype_bytes").get<std::int64_t>();
    g.page_bytes = j.at("page_bytes").get<std::int64_t>();
    g.host_contention = j.at("host_contention").get<std::vector<double>>();
    g.host_contention_us = j.value("host_contention_us", std::vector<double>{});
    g.host_contention_fused_us = j.value("host_contention_fused_us", std::vector<double>{});
    g.host_idle_gap_us = j.value("host_idle_gap_us", std::vector<double>{});
    g.host_idle_us = j.value("host_idle_us", std::vector<double>{});
    g.host_contention_tokens = j.value("host_contention_tokens", std::vector<std::vector<double>>{});
    g.host_contention_token_knots = j.value("host_contention_token_knots", std::vector<double>{});
    g.host_contention_fused_tokens = j.value("host_contention_fused_tokens", std::vector<std::vector<double>>{});
    g.drop_layer_us = j.value("drop_layer_us", 0.0);
    g.host_swap_us = j.value("host_swap_us", 0.0);
    g.table_tokens = j.value("table_tokens", std::vector<double>{});
    g.table_us = j.value("table_us", std::vector<double>{});
    g.sample_us = j.value("sample_us", 0.0);
    g.attn_pair_us = j.value("attn_pair_us", 0.0);
    g.measured_model = j.value("measured_model", "");
  } catch (const std::exception& e) {
    return invalid_argument(std::string("device profile: bad or missing spec field: ") + e.what());
  }
  if (!(g.peak_flops > 0) || !(g.hbm_bytes_per_s > 0) || g.memory_bytes <= 0 || g.dtype_bytes <= 0 || g.page_bytes < 0) {
    return invalid_argument("device profile '" + g.name + "': peak_flops, hbm_bytes_per_s, memory_bytes and dtype_bytes must be > 0");
  }
  if (g.table_tokens.size() != g.table_us.size()) {
    return invalid_argument("device profile '" + g.name + "': table_tokens and table_us differ in length");
  }
  for (std::size_t i = 0; i < g.table_tokens.size(); ++i) {
    if (!(g.table_tokens[i] > (i == 0 ? 0.0 : g.table_tokens[i - 1])) || !(g.table_us[i] >= 0)) {
      return invalid_argument("device profile '" + g.name + "': table_tokens must increase from > 0, table_us be >= 0");
    }
  }
  for (double c : g.host_contention) {
    if (!(c > 0)) return invalid_argument("device profile '" + g.name + "': host_contention entries must be > 0");
  }
  if (!g.host_contention_us.empty() && g.host_contention_us.size() != g.host_contention.size()) {
    return invalid_argument("device profile '" + g.name + "': host_contention_us must be empty or as long as host_contention");
  }
  for (double c : g.host_contention_us) {
    if (!(c >= 0)) return invalid_argument("device profile '" + g.name + "': host_contention_us entries must be >= 0");
  }
  if (!g.host_contention_fused_us.empty() && g.host_contention_fused_us.size() != g.host_contention.size()) {
    return invalid_argument("device profile '" + g.name + "': host_contention_fused_us must be empty or as long as host_contention");
  }
  for (double c : g.host_contention_fused_us) {
    if (!(c >= 0)) return invalid_argument("device profile '" + g.name + "': host_contention_fused_us entries must be >= 0");
  }
  for (std::size_t i = 0; i < g.host_contention_token_knots.size(); ++i) {
    if (!(g.host_contention_token_knots[i] > (i == 0 ? 0.0 : g.host_contention_token_knots[i - 1]))) {
      return invalid_argument("device profile '" + g.name + "': host_contention_token_knots must increase from > 0");
    }
  }
  for (const auto* rows : {&g.host_contention_tokens, &g.host_contention_fused_tokens}) {
    const char* name = rows == &g.host_contention_tokens ? "host_contention_tokens" : "host_contention_fused_tokens";
    if (!rows->empty() && rows->size() != g.host_contention.size()) {
      return invalid_argument("device profile '" + g.name + "': " + name + " must be empty or one row per host_contention entry");
    }
    for (const auto& row : *rows) {
      for (double c : row) {
        if (!(c > 0)) return invalid_argument("device profile '" + g.name + "': " + name + " entries must be > 0");
      }
    }
  }
  if (!(g.drop_layer_us >= 0)) return invalid_argument("device profile '" + g.name + "': drop_layer_us must be >= 0");
  if (!(g.host_swap_us >= 0)) return invalid_argument("device profile '" + g.name + "': host_swap_us must be >= 0");
  if (g.host_idle_gap_us.size() != g.host_idle_us.size()) {
    return invalid_argument("device profile '" + g.name + "': host_idle_gap_us and host_idle_us differ in length");
  }
  for (std::size_t i = 0; i < g.host_idle_gap_us.size(); ++i) {
    if (!(g.host_idle_gap_us[i] > (i == 0 ? 0.0 : g.host_idle_gap_us[i - 1])) || !(g.host_idle_us[i] >= 0)) {
      return invalid_argument("device profile '" + g.name + "': host_idle_gap_us must increase from > 0, host_idle_us be >= 0");
    }
  }
  g.calibrated = true;
  return g;
}

// Solves (A^T W A + ridge) x = A^T W y by Gaussian elimination with partial pivoting.
std::vector<double> least_squares(const std::vector<std::vector<double>>& rows, const std::vector<double>& y,
                                  const std::vector<double>& weight, double ridge) {
  const std::size_t n = rows.empty() ? 0 : rows[0].size();
  std::vector<std::vector<double>> m(n, std::vector<double>(n + 1, 0.0));
  for (std::size_t r = 0; r < rows.size(); ++r) {
    for (std::size_t i = 0; i < n; ++i) {
      if (rows[r][i] == 0.0) continue;
      for (std::size_t j = 0; j < n; ++j) m[i][j] += weight[r] * rows[r][i] * rows[r][j];
      m[i][n] += weight[r] * rows[r][i] * y[r];
    }
  }
  for (std::size_t i = 0; i < n; ++i) m[i][i] += ridge * std::max(1e-30, m[i][i]) + 1e-12;
  for (std::size_t c = 0; c < n; ++c) {
    std::size_t piv = c;
    for (std::size_t r = c + 1; r < n; ++r) {
      if (std::abs(m[r][c]) > std::abs(m[piv][c])) piv = r;
    }
    std::swap(m[c], m[piv]);
    KUN_CHECK(m[c][c] != 0.0) << "singular fit";
    for (std::size_t r = 0; r < n; ++r) {
      if (r == c) continue;
      const double f = m[r][c] / m[c][c];
      if (f == 0.0) continue;
      for (std::size_t k = c; k <= n; ++k) m[r][k] -= f * m[c][k];
    }
  }
  std::vector<double> x(n);
  for (std::size_t i = 0; i < n; ++i) x[i] = m[i][n] / m[i][i];
  return x;
}

double hat(const std::vector<double>& knots, std::size_t k, double t) {
  const double x = knots[k];
  if (t == x) return 1.0;
  if (t < x) {
    if (k == 0) return t / x;  // from 0 tokens
    const double lo = knots[k - 1];
    return t > lo ? (t - lo) / (x - lo) : 0.0;
  }
  if (k + 1 == knots.size()) return 0.0;  // beyond the last knot: see below
  const double hi = knots[k + 1];
  return t < hi ? (hi - t) / (hi - x) : 0.0;
}

}  // namespace

double predicted_step_us(const CostModel& cost, std::span<const SeqWork> seqs) {
  return cost.step_us(seqs, cost.model().num_layers, /*first_stage=*/true, /*last_stage=*/true);
}

FitError fit_error(const GpuSpec& spec, const model::ModelConfig& model, std::span<const ProfileStep> steps) {
  const CostModel cost(spec, model);
  std::vector<double> err;
  double signed_sum = 0.0;
  for (const ProfileStep& s : steps) {
    const double rel = (predicted_step_us(cost, s.seqs) - s.measured_us) / s.measured_us;
    err.push_back(std::abs(rel));
    signed_sum += rel;
  }
  FitError f;
  f.steps = static_cast<std::int64_t>(err.size());
  if (err.empty()) return f;
  std::sort(err.begin(), err.end());
  f.median = err[err.size() / 2];
  f.p90 = err[std::min(err.size() - 1, err.size() * 9 / 10)];
  f.mean_signed = signed_sum / static_cast<double>(err.size());
  return f;
}

std::vector<double> default_table_knots() {
  return {1, 2, 4, 8, 16, 32, 64, 128, 256, 512};
}

GpuSpec fit_device_spec(const GpuSpec& start, const model::ModelConfig& model, std::span<const ProfileStep> steps,
                        std::vector<double> knots) {
  KUN_CHECK(!steps.empty()) << "no steps to fit";
  GpuSpec g = start;
  // The engine's own time per step.
  std::vector<double> overheads;
  for (const ProfileStep& s : steps) {
    if (s.exec_us > 0) overheads.push_back(std::max(0.0, s.measured_us - s.exec_us));
  }
  std::sort(overheads.begin(), overheads.end());
  g.step_overhead_us = overheads.empty() ? 0.0 : overheads[overheads.size() / 2];
  // Keep the knots that have a step at or beyond them (no extrapolating table ends), at least 2.
  double max_tokens = 0.0;
  for (const ProfileStep& s : steps) {
    double t = 0.0;
    for (const SeqWork& w : s.seqs) t += static_cast<double>(w.new_tokens);
    max_tokens = std::max(max_tokens, t);
  }
  std::sort(knots.begin(), knots.end());
  while (knots.size() > 2 && knots[knots.size() - 2] >= max_tokens) knots.pop_back();
  const std::size_t nk = knots.size();
  const double last_slope_span = knots[nk - 1] - knots[nk - 2];
  const auto features = [&](const std::vector<SeqWork>& seqs, std::vector<bool> use_extra) {
    double t = 0.0, sampled = 0.0, reads = 0.0, pairs = 0.0;
    for (const SeqWork& w : seqs) {
      const double n = static_cast<double>(w.new_tokens);
      const double c = static_cast<double>(w.context_tokens);
      t += n;
      if (w.sample) sampled += 1.0;
      reads += c + n;
      pairs += n * c + n * (n + 1.0) / 2.0;
    }
    std::vector<double> f(nk, 0.0);
    for (std::size_t k = 0; k < nk; ++k) f[k] = hat(knots, k, t);
    if (t > knots[nk - 1]) {  // linear extrapolation of the last segment
      const double u = (t - knots[nk - 2]) / last_slope_span;
      f[nk - 1] = u;
      f[nk - 2] = 1.0 - u;
    }
    // Attention: the (query, key) pairs, which for a decode token is the tokens it reads (reads
    // and pairs are the same for decode steps, so only one of them can be fitted).
    (void)reads;
    const double extra[2] = {std::max(0.0, sampled - 1.0), pairs};
    for (int e = 0; e < 2; ++e) {
      if (use_extra[static_cast<std::size_t>(e)]) f.push_back(extra[e]);
    }
    return f;
  };
  std::vector<bool> use = {true, true};
  std::vector<double> x;
  for (int pass = 0; pass < 4; ++pass) {
    std::vector<std::vector<double>> rows;
    std::vector<double> y, w;
    for (const ProfileStep& s : steps) {
      const double target = s.exec_us > 0 ? s.exec_us : std::max(1.0, s.measured_us - g.step_overhead_us);
      rows.push_back(features(s.seqs, use));
      y.push_back(target);
      w.push_back(1.0 / (target * target));  // relative error
    }
    x = least_squares(rows, y, w, 1e-9);
    bool dropped = false;
    std::size_t i = nk;
    for (int e = 0; e < 2; ++e) {
      if (!use[static_cast<std::size_t>(e)]) continue;
      if (x[i] < 0) {
        use[static_cast<std::size_t>(e)] = false;
        dropped = true;
      }
      ++i;
    }
    if (!dropped) break;
  }
  g.table_tokens = knots;
  g.table_us.assign(x.begin(), x.begin() + static_cast<std::ptrdiff_t>(nk));
  // A bigger batch never takes less time: make the table non-decreasing (pool adjacent
  // violators, weighted equally), which also smooths knots with few steps near them.
  {
    std::vector<double> value, weight;
    std::vector<std::size_t> count;
    for (double v : g.table_us) {
      value.push_back(std::max(v, 1.0));
      weight.push_back(1.0);
      count.push_back(1);
      while (value.size() > 1 && value[value.size() - 2] > value.back()) {
        const std::size_t i = value.size() - 2;
        value[i] = (value[i] * weight[i] + value.back() * weight.back()) / (weight[i] + weight.back());
        weight[i] += weight.back();
        count[i] += count.back();
        value.pop_back();
        weight.pop_back();
        count.pop_back();
      }
    }
    std::size_t k = 0;
    for (std::size_t i = 0; i < value.size(); ++i) {
      for (std::size_t c = 0; c < count[i]; ++c) g.table_us[k++] = value[i];
    }
  }
  std::size_t i = nk;
  double* extra[2] = {&g.sample_us, &g.attn_pair_us};
  for (int e = 0; e < 2; ++e) *extra[e] = use[static_cast<std::size_t>(e)] ? x[i++] : 0.0;
  (void)model;  // the table is per model: the caller records which (GpuSpec::measured_model)
  g.calibrated = true;
  return g;
}

nlohmann::json DeviceProfile::to_json() const {
  nlohmann::json s = nlohmann::json::array();
  for (const ProfileStep& st : steps) {
    nlohmann::json seqs = nlohmann::json::array();
    for (const SeqWork& w : st.seqs) seqs.push_back({w.context_tokens, w.new_tokens, w.sample ? 1 : 0});
    s.push_back({{"us", st.measured_us}, {"exec_us", st.exec_us}, {"seqs", seqs}});
  }
  return {{"format", kFormat},
          {"spec", spec_to_json(spec)},
          {"preset", preset},
          {"threads", threads},
          {"weight_dtype", weight_dtype},
          {"kv_dtype", kv_dtype},
          {"host", host},
          {"contention", spec.host_contention},
          {"fit", {{"median_rel_err", fit.median}, {"p90_rel_err", fit.p90}, {"mean_signed_rel_err", fit.mean_signed}, {"steps", fit.steps}}},
          {"steps", s}};
}

StatusOr<DeviceProfile> DeviceProfile::from_json(const nlohmann::json& j) {
  if (!j.is_object() || j.value("format", "") != kFormat) {
    return invalid_argument(std::string("not a device profile (\"format\": \"") + kFormat + "\" expected)");
  }
  DeviceProfile p;
  if (!j.contains("spec")) return invalid_argument("device profile: no \"spec\"");
  KUN_ASSIGN_OR_RETURN(p.spec, spec_from_json(j.at("spec")));
  try {
    p.preset = j.value("preset", "");
    p.threads = j.value("threads", 1);
    p.weight_dtype = j.value("weight_dtype", "bf16");
    p.kv_dtype = j.value("kv_dtype", "bf16");
    p.host = j.value("host", "");
    if (j.contains("steps")) {
      for (const auto& st : j.at("steps")) {
        ProfileStep ps;
        ps.measured_us = st.at("us").get<double>();
        ps.exec_us = st.value("exec_us", 0.0);
        if (!(ps.measured_us > 0)) return invalid_argument("device profile: a step's \"us\" must be > 0");
        for (const auto& w : st.at("seqs")) {
          SeqWork sw{w.at(0).get<std::int64_t>(), w.at(1).get<std::int64_t>(), w.at(2).get<int>() != 0};
          if (sw.context_tokens < 0 || sw.new_tokens < 0) return invalid_argument("device profile: negative token counts");
          ps.seqs.push_back(sw);
        }
        p.steps.push_back(std::move(ps));
      }
    }
    if (j.contains("fit")) {
      const auto& f = j.at("fit");
      p.fit.median = f.value("median_rel_err", 0.0);
      p.fit.p90 = f.value("p90_rel_err", 0.0);
      p.fit.mean_signed = f.value("mean_signed_rel_err", 0.0);
      p.fit.steps = f.value("steps", 0);
    }
  } catch (const std::exception& e) {
    return invalid_argument(std::string("device profile: ") + e.what());
  }
  return p;
}

StatusOr<DeviceProfile> load_device_profile(const std::string& path) {
  std::ifstream f(path);
  if (!f) return not_found("cannot read device profile '" + path + "'");
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    return invalid_argument("device profile '" + path + "' is not JSON: " + e.what());
  }
  auto p = DeviceProfile::from_json(j);
  if (!p.ok()) return Status(p.status().code(), "'" + path + "': " + p.status().message());
  return p;
}

Status save_device_profile(const DeviceProfile& profile, const std::string& path) {
  std::ofstream f(path);
  if (!f) return invalid_argument("cannot write device profile '" + path + "'");
  // Readable constants, one line per measured step.
  nlohmann::json j = profile.to_json();
  const nlohmann::json steps = j["steps"];
  j.erase("steps");
  std::string head = j.dump(1);
  head.resize(head.size() - 2);  // drop "\n}"
  f << head << ",\n \"steps\": [";
  for (std::size_t i = 0; i < steps.size(); ++i) f << (i ? ",\n  " : "\n  ") << steps[i].dump();
  f << "\n ]\n}\n";
  if (!f) return invalid_argument("writing device profile '" + path + "' failed");
  return ok_status();
}

ContentionFit fit_contention(std::span<const std::pair<double, double>> samples) {
  double sx = 0, sy = 0, sxx = 0, sxy = 0;
  for (const auto& [x, y] : samples) {
    sx += x;
    sy += y;
    sxx += x * x;
    sxy += x * y;
  }
  ContentionFit fit;
  if (samples.empty() || !(sx > 0)) return fit;
  fit.factor = sy / sx;
  const auto n = static_cast<double>(samples.size());
  const double det = n * sxx - sx * sx;
  if (n >= 2 && det > 1e-9 * n * sxx) {
    const double slope = (n * sxy - sx * sy) / det;
    const double intercept = (sy - slope * sx) / n;
    if (intercept >= 0 && slope >= 0.5) {
      fit.factor = slope;
      fit.fixed_us = intercept;
    }
  }
  return fit;
}

StatusOr<std::vector<RecordedStep>> parse_recorded_steps(const std::string& csv, const std::string& source) {
  std::istringstream in(csv);
  std::string line;
  if (!std::getline(in, line)) return invalid_argument("step log '" + source + "' is empty");
  const auto split = [](const std::string& row) {
    std::vector<std::string> cells;
    std::stringstream ss(row);
    std::string cell;
    while (std::getline(ss, cell, ',')) cells.push_back(cell);
    return cells;
  };
  const std::vector<std::string> header = split(line);
  const char* const kColumns[] = {"end_us",     "duration_us", "unit_devices",   "sequences",
                                  "new_tokens", "sampled",     "attended_pairs", "swap_blocks"};
  std::vector<std::size_t> column;
  for (const char* name : kColumns) {
    const auto it = std::find(header.begin(), header.end(), name);
    if (it == header.end()) return invalid_argument("step log '" + source + "' has no column '" + name + "'");
    column.push_back(static_cast<std::size_t>(it - header.begin()));
  }
  const auto first_instance_column = std::find(header.begin(), header.end(), "first_instance");
  std::vector<RecordedStep> steps;
  for (std::int64_t row = 2; std::getline(in, line); ++row) {
    if (line.empty()) continue;
    const std::vector<std::string> cells = split(line);
    std::int64_t v[8];
    for (std::size_t c = 0; c < column.size(); ++c) {
      const std::string& cell = column[c] < cells.size() ? cells[column[c]] : std::string();
      const char* end = cell.data() + cell.size();
      const auto [ptr, ec] = std::from_chars(cell.data(), end, v[c]);
      if (ec != std::errc() || ptr != end || cell.empty()) {
        return invalid_argument("step log '" + source + "' row " + std::to_string(row) + ": '" + kColumns[c] +
                                "' is not an integer");
      }
    }
    RecordedStep step{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]};
    if (first_instance_column != header.end()) {
      const auto c = static_cast<std::size_t>(first_instance_column - header.begin());
      const std::string& cell = c < cells.size() ? cells[c] : std::string();
      const auto [ptr, ec] = std::from_chars(cell.data(), cell.data() + cell.size(), step.first_instance);
      if (ec != std::errc() || ptr != cell.data() + cell.size() || cell.empty()) {
        return invalid_argument("step log '" + source + "' row " + std::to_string(row) + ": 'first_instance' is not an integer");
      }
    }
    steps.push_back(step);
  }
  return steps;
}

std::string recorded_steps_csv(std::span<const RecordedStep> steps) {
  std::string csv = "end_us,duration_us,unit_devices,first_instance,sequences,new_tokens,sampled,attended_pairs,swap_blocks\n";
  for (const RecordedStep& s : steps) {
    csv += std::to_string(s.end_us) + "," + std::to_string(s.duration_us) + "," + std::to_string(s.unit_devices) + "," +
           std::to_string(s.first_instance) + "," + std::to_string(s.sequences) + "," + std::to_string(s.new_tokens) + "," +
           std::to_string(s.sampled) + "," + std::to_string(s.attended_pairs) + "," + std::to_string(s.swap_blocks) + "\n";
  }
  return csv;
}

std::vector<double> devices_computing(std::span<const RecordedStep> steps, double swap_us_per_block, double swap_wait_us) {
  // Each step's computing span: a step with copies computes after them (and its wait).
  struct Span {
    double begin, end;
  };
  std::vector<Span> spans;
  spans.reserve(steps.size());
  for (const RecordedStep& r : steps) {
    const auto d = static_cast<double>(r.duration_us);
    const double copy = r.swap_blocks > 0 ? std::min(d, swap_us_per_block * static_cast<double>(r.swap_blocks) + swap_wait_us) : 0.0;
    spans.push_back(Span{static_cast<double>(r.end_us) - d + copy, static_cast<double>(r.end_us)});
  }
  std::vector<std::size_t> order(spans.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return spans[a].begin < spans[b].begin; });
  std::vector<double> overlap(spans.size(), 0.0);
  std::vector<std::size_t> active;  // started earlier, may still overlap the next one
  for (std::size_t i : order) {
    const Span& s = spans[i];
    std::erase_if(active, [&](std::size_t j) { return spans[j].end <= s.begin; });
    for (std::size_t j : active) {
      const double ov = std::min(s.end, spans[j].end) - std::max(s.begin, spans[j].begin);
      if (ov > 0) {
        overlap[i] += ov;
        overlap[j] += ov;
      }
    }
    active.push_back(i);
  }
  std::vector<double> out(spans.size());
  for (std::size_t i = 0; i < spans.size(); ++i) {
    const double length = spans[i].end - spans[i].begin;
    out[i] = 1.0 + (length > 0 ? overlap[i] / length : 0.0);
  }
  return out;
}

std::vector<double> default_idle_gap_knots_us() { return {10'000.0, 30'000.0, 100'000.0, 300'000.0}; }

std::vector<double> default_shape_token_knots() { return {1, 2, 3, 4, 6, 8, 16, 32, 64, 128, 256, 512}; }

std::vector<double> idle_before(std::span<const RecordedStep> steps) {
  std::vector<std::size_t> order(steps.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  const auto start = [&](std::size_t i) { return steps[i].end_us - steps[i].duration_us; };
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return start(a) < start(b); });
  std::map<std::int64_t, std::int64_t> last_end;  // first instance -> latest end so far
  std::vector<double> out(steps.size(), std::numeric_limits<double>::infinity());
  for (std::size_t i : order) {
    const auto it = last_end.find(steps[i].first_instance);
    if (it != last_end.end()) {
      out[i] = static_cast<double>(std::max<std::int64_t>(0, start(i) - it->second));
      it->second = std::max(it->second, steps[i].end_us);
    } else {
      last_end.emplace(steps[i].first_instance, steps[i].end_us);
    }
  }
  return out;
}

namespace {

// One recorded step as the host fit sees it: its table time, what it took (less its swap copies'
// link time), the devices computing over it (rounded, 1..max_devices), the idle spell before it.
struct HostSample {
  double predicted, measured;
  std::int64_t k;
  double idle_us;
  bool fused;
  std::int64_t tokens;
  bool swapped;
};

// Every step of one run with sequences (a fused group's steps with copies left out: the runtime
// swaps only on independent instances).
void collect_host_samples(const CostModel& cost, std::int64_t num_layers, std::span<const RecordedStep> run,
                          double swap_us_per_block, double swap_wait_us, std::int64_t max_devices,
                          std::vector<HostSample>* out) {
  const std::vector<double> busy = devices_computing(run, swap_us_per_block, swap_wait_us);
  const std::vector<double> idle = idle_before(run);
  for (std::size_t i = 0; i < run.size(); ++i) {
    const RecordedStep& r = run[i];
    if (r.sequences == 0 || (r.swap_blocks > 0 && r.unit_devices > 1)) continue;
    CostModel::BatchTerms b;
    b.tokens = r.new_tokens;
    b.sampled = r.sampled;
    b.pairs = static_cast<double>(r.attended_pairs);
    const double link_us = swap_us_per_block * static_cast<double>(r.swap_blocks);
    out->push_back(HostSample{cost.step_us(b, num_layers, true, true), static_cast<double>(r.duration_us) - link_us,
                              std::clamp<std::int64_t>(std::llround(busy[i]), 1, max_devices), idle[i], r.unit_devices > 1,
                              r.new_tokens, r.swap_blocks > 0});
  }
}

// The idle-spell bin of a step (knot i: idle at least gaps[i], less than gaps[i + 1]); -1 below
// the first knot.
std::ptrdiff_t idle_bin(const std::vector<double>& gaps, double idle_us) {
  return std::upper_bound(gaps.begin(), gaps.end(), idle_us) - gaps.begin() - 1;
}

// Per count and bin of new tokens, the samples' sum of (measured - b) over the sum of a x table
// (1 with fewer than min_steps in a bin).
std::vector<std::vector<double>> fit_shape(std::span<const HostSample> samples, const std::vector<double>& knots,
                                           const std::vector<double>& factor, const std::vector<double>& fixed_us,
                                           std::int64_t min_steps) {
  const std::size_t counts = factor.size();
  std::vector<std::vector<double>> over(counts, std::vector<double>(knots.size(), 0.0));
  std::vector<std::vector<double>> under = over;
  std::vector<std::vector<std::int64_t>> n(counts, std::vector<std::int64_t>(knots.size(), 0));
  for (const HostSample& s : samples) {
    const auto k = static_cast<std::size_t>(s.k - 1);
    const std::size_t b = knot_bin(knots, s.tokens);
    over[k][b] += s.measured - fixed_us[k];
    under[k][b] += factor[k] * s.predicted;
    ++n[k][b];
  }
  std::vector<std::vector<double>> rows;
  for (std::size_t k = 0; k < counts; ++k) {
    std::vector<double> row(knots.size(), 1.0);
    for (std::size_t b = 0; b < knots.size(); ++b) {
      if (n[k][b] >= min_steps && under[k][b] > 0) row[b] = std::max(0.1, over[k][b] / under[k][b]);
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

// What a step takes (less its link time) on a host, priced by the GpuSpec terms the simulator
// reads (ClusterSim::reprice_contended_steps): a x shape x table + b, the swap wait, the idle extra.
double priced_us(const GpuSpec& host, const HostSample& s) {
  const auto k = static_cast<double>(s.k);
  double us = host.contention_factor(k) * host.contention_shape(k, s.tokens, s.fused) * s.predicted +
              (s.fused ? host.fused_contention_latency_us(k) : host.contention_latency_us(k));
  if (s.swapped) us += host.host_swap_us;
  return us + host.idle_wake_us(s.idle_us);
}

// One pass of fit_host_contention, the swap steps' wait after their copies (swap_wait_us) not
// counted among the devices computing.
HostContentionFit fit_pass(const CostModel& cost, std::int64_t num_layers, std::span<const std::vector<RecordedStep>> runs,
                           double swap_us_per_block, double swap_wait_us, std::int64_t max_devices, std::int64_t min_steps) {
  const std::vector<double> gaps = default_idle_gap_knots_us();
  // Every step without swap copies, by kind; the independent steps with copies apart.
  std::vector<HostSample> all;
  std::vector<HostSample> swapping;
  {
    std::vector<HostSample> samples;
    for (const std::vector<RecordedStep>& run : runs) {
      collect_host_samples(cost, num_layers, run, swap_us_per_block, swap_wait_us, max_devices, &samples);
    }
    for (const HostSample& s : samples) (s.swapped ? swapping : all).push_back(s);
  }
  // a(k), b(k) over the independent steps that did not start after an idle spell.
  std::vector<std::vector<std::pair<double, double>>> samples(static_cast<std::size_t>(max_devices));
  for (const HostSample& s : all) {
    if (!s.fused && s.idle_us < gaps.front()) samples[static_cast<std::size_t>(s.k - 1)].emplace_back(s.predicted, s.measured);
  }
  HostContentionFit fit;
  for (std::int64_t k = 1; k <= max_devices; ++k) {
    const auto& v = samples[static_cast<std::size_t>(k - 1)];
    double predicted = 0, measured = 0;
    for (const auto& [x, y] : v) {
      predicted += x;
      measured += y;
    }
    fit.steps.push_back(static_cast<std::int64_t>(v.size()));
    fit.measured_over_table.push_back(predicted > 0 ? measured / predicted : 0.0);
    if (static_cast<std::int64_t>(v.size()) < min_steps) {
      // Too few steps at this count: the previous count's values (count 1: no contention).
      fit.factor.push_back(k > 1 ? fit.factor.back() : 1.0);
      fit.fixed_us.push_back(k > 1 ? fit.fixed_us.back() : 0.0);
      continue;
    }
    const ContentionFit c = fit_contention(v);
    fit.factor.push_back(c.factor);
    fit.fixed_us.push_back(c.fixed_us);
  }
  // The contended step's shape by new tokens, of the independent steps (the fused rounds' below,
  // once their b is known).
  std::vector<HostSample> independent, fused;
  for (const HostSample& s : all) {
    if (s.idle_us < gaps.front()) (s.fused ? fused : independent).push_back(s);
  }
  if (!cost.gpu().table_tokens.empty()) {
    fit.token_knots = default_shape_token_knots();
    fit.token_shape = fit_shape(independent, fit.token_knots, fit.factor, fit.fixed_us, min_steps);
  }
  // A fused round's fixed time, at each count's factor: the mean of measured - a x table over
  // the micro-batches (a micro-batch's trip through every stage is the whole model's table).
  std::vector<double> fused_residual(static_cast<std::size_t>(max_devices), 0.0);
  fit.fused_steps.assign(static_cast<std::size_t>(max_devices), 0);
  for (const HostSample& s : fused) {
    const auto k = static_cast<std::size_t>(s.k - 1);
    fused_residual[k] += s.measured - fit.factor[k] * s.predicted;
    ++fit.fused_steps[k];
  }
  for (std::size_t k = 0; k < fused_residual.size(); ++k) {
    if (fit.fused_steps[k] < min_steps) {
      // Too few: the count below's fused value, or this count's independent-step value.
      fit.fused_fixed_us.push_back(k > 0 && fit.fused_steps[k - 1] >= min_steps ? fit.fused_fixed_us.back() : fit.fixed_us[k]);
      continue;
    }
    fit.fused_fixed_us.push_back(std::max(0.0, fused_residual[k] / static_cast<double>(fit.fused_steps[k])));
  }
  if (!fit.token_knots.empty()) {
    fit.fused_token_shape = fit_shape(fused, fit.token_knots, fit.factor, fit.fused_fixed_us, min_steps);
  }
  // The steps after an idle spell: what they took beyond their kind's a x shape x table + b (the
  // host fitted so far, no idle extra yet), by the spell's length (knot i: idle at least gaps[i],
  // less than gaps[i + 1]).
  GpuSpec host = cost.gpu();
  apply_host_fit(fit, &host);
  std::vector<double> extra(gaps.size(), 0.0);
  std::vector<std::int64_t>& count = fit.idle_steps;
  count.assign(gaps.size(), 0);
  for (const HostSample& s : all) {
    if (s.idle_us < gaps.front()) continue;
    const auto bin = static_cast<std::size_t>(idle_bin(gaps, s.idle_us));
    extra[bin] += s.measured - priced_us(host, s);
    ++count[bin];
  }
  fit.idle_gap_us = gaps;
  for (std::size_t i = 0; i < gaps.size(); ++i) {
    // Too few: the shorter spell's value (the first: none).
    const double v = count[i] >= kMinIdleSteps ? std::max(0.0, extra[i] / static_cast<double>(count[i]))
                                               : (i > 0 ? fit.idle_us.back() : 0.0);
    fit.idle_us.push_back(v);
  }
  // The steps with swap copies (not after an idle spell): what they took beyond their link time,
  // a x shape x table and b (the host's swap wait is not fitted yet: 0).
  double swap_extra = 0.0;
  for (const HostSample& s : swapping) {
    if (s.idle_us >= gaps.front()) continue;
    swap_extra += s.measured - priced_us(host, s);
    ++fit.swap_steps;
  }
  if (fit.swap_steps >= min_steps) fit.swap_extra_us = std::max(0.0, swap_extra / static_cast<double>(fit.swap_steps));
  return fit;
}

}  // namespace

HostContentionFit fit_host_contention(const CostModel& cost, std::int64_t num_layers,
                                      std::span<const std::vector<RecordedStep>> runs, double swap_us_per_block,
                                      std::int64_t max_devices, std::int64_t min_steps) {
  KUN_CHECK_GE(max_devices, 1);
  // The swap steps' wait is fitted last, and the simulator does not count it as computing: a
  // second pass fits everything again with it left out of the devices computing.
  const HostContentionFit first = fit_pass(cost, num_layers, runs, swap_us_per_block, 0.0, max_devices, min_steps);
  if (first.swap_extra_us <= 0.0) return first;
  return fit_pass(cost, num_layers, runs, swap_us_per_block, first.swap_extra_us, max_devices, min_steps);
}

void apply_host_fit(const HostContentionFit& fit, GpuSpec* spec) {
  spec->host_contention = fit.factor;
  spec->host_contention_us = fit.fixed_us;
  spec->host_contention_fused_us = fit.fused_fixed_us;
  spec->host_contention_tokens = fit.token_shape;
  spec->host_contention_token_knots = fit.token_knots;
  spec->host_contention_fused_tokens = fit.fused_token_shape;
  spec->host_idle_gap_us = fit.idle_gap_us;
  spec->host_idle_us = fit.idle_us;
  spec->host_swap_us = fit.swap_extra_us;
}

double host_speed_ratio(const CostModel& cost, std::int64_t num_layers, const GpuSpec& host,
                        std::span<const RecordedStep> window, double swap_us_per_block) {
  KUN_CHECK(!host.host_contention.empty()) << "host_speed_ratio needs a fitted host";
  std::vector<HostSample> samples;
  collect_host_samples(cost, num_layers, window, swap_us_per_block, host.host_swap_us,
                       static_cast<std::int64_t>(host.host_contention.size()), &samples);
  double measured = 0.0, priced = 0.0;
  for (const HostSample& s : samples) {
    measured += s.measured;
    priced += priced_us(host, s);
  }
  return priced > 0.0 ? measured / priced : 1.0;
}

void scale_host_speed(GpuSpec* spec, double ratio) {
  KUN_CHECK(ratio > 0.0) << "host speed ratio " << ratio;
  for (auto* v : {&spec->host_contention, &spec->host_contention_us, &spec->host_contention_fused_us, &spec->host_idle_us}) {
    for (double& x : *v) x *= ratio;
  }
  spec->host_swap_us *= ratio;
}

}  // namespace kun::sim
