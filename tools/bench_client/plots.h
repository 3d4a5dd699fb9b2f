// Gnuplot script writers for the bench report: a per-second timeline (arrivals/completions,
// server gauges such as memory demand per instance and group state, TTFT) and TTFT CDFs of
// several policies on one chart. Scripts read the CSVs written next to them and render a PNG
// (pngcairo if available in the gnuplot build, else png). Namespace kun::bench.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "workload/report.h"

namespace kun::bench {

// "ttft_ms,cdf" rows: sorted TTFTs of ok requests with their empirical CDF (i / n).
std::string ttft_cdf_csv(const std::vector<workload::RequestRecord>& records);

// One row per request in trace order ("index,arrival_us,queue_us,first_token_us,finish_us,
// prompt_tokens,output_tokens,recomputed_tokens,outcome"; -1 where unknown; times in us from the run start): `bench --out-dir`
// and `simulate --timeline-prefix` write it so that a run and its simulation can be compared
// request by request (scripts/compare_requests.py).
std::string requests_csv(const std::vector<workload::RequestRecord>& records);

// Timeline PNG from a CSV written by workload::timeline_to_csv(timeline). Three panels sharing
// the time axis: requests/s (arrivals, completions, failures); gauges whose series contains
// "demand" or "usage" (left axis) and "group"/"state" (right axis, as steps); mean TTFT (log).
std::string timeline_plot_script(const workload::Timeline& timeline, const std::string& csv_path,
                                 const std::string& png_path, const std::string& title);

// TTFT CDF PNG: one line per (label, csv path of ttft_cdf_csv), log-scale x.
std::string ttft_cdf_plot_script(const std::vector<std::pair<std::string, std::string>>& label_csv_paths,
                                 const std::string& png_path, const std::string& title);

Status write_text_file(const std::string& path, const std::string& content);
// Runs `gnuplot script_path`; UNAVAILABLE when gnuplot is missing or fails.
Status run_gnuplot(const std::string& script_path);

}  // namespace kun::bench
