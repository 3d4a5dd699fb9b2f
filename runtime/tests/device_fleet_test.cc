// InProcessFleet: devices come up behind agents, and the front end learns their geometry by
// message only (the numbers must match what a device of the same options has).
#include <gtest/gtest.h>

#include "model/config.h"
#include "model/weight_source.h"
#include "runtime/device_fleet.h"

namespace kun::runtime {
namespace {

TEST(DeviceFleetTest, GeometryGatheredByMessageMatchesTheDevices) {
  auto config = model::preset_config("tiny");
  ASSERT_TRUE(config.ok());
  auto weights = model::synthetic_weights(*config, 7);
  FleetOptions opt;
  opt.num_devices = 3;
  opt.device.capacity_bytes = 64ll << 20;
  opt.device.page_bytes = 64 << 10;
  opt.host_swap_blocks = 5;
  auto fleet = InProcessFleet::create(opt, *weights);
  ASSERT_TRUE(fleet.ok()) << fleet.status().to_string();
  ASSERT_EQ((*fleet)->num_devices(), 3);
  // A device built here with the same options, for the expected numbers.
  auto ref = VirtualDevice::create(opt.device, *config);
  ASSERT_TRUE(ref.ok());
  ASSERT_TRUE((*ref)->load_weights(*weights, 0, config->num_layers).ok());
  const auto kv_pages = (*ref)->give_free_pages_to_kv();
  for (int d = 0; d < 3; ++d) {
    const DeviceGeometry& g = (*fleet)->geometry(d);
    EXPECT_EQ(g.device, (*fleet)->endpoint_of(d));
    EXPECT_EQ((*fleet)->device_at(g.device), d);
    EXPECT_EQ(g.num_layers, config->num_layers);
    EXPECT_EQ(g.page_bytes, opt.device.page_bytes);
    EXPECT_EQ(g.num_pages, (*ref)->arena().num_pages());
    EXPECT_EQ(g.blocks_per_page, (*ref)->kv_storage().blocks_per_page());
    EXPECT_EQ(g.block_bytes, (*ref)->kv_storage().block_bytes());
    EXPECT_EQ(g.pages_per_layer, (*ref)->pages_per_layer());
    EXPECT_EQ(g.layer_segment_bytes, (*ref)->layer_segment_bytes());
    EXPECT_EQ(g.host_swap_blocks, 5);
    EXPECT_EQ(g.kv_dtype, static_cast<std::int32_t>(opt.device.kv_dtype));
    EXPECT_EQ(static_cast<std::int64_t>(g.resident_layers.size()), config->num_layers);
    EXPECT_EQ(g.kv_page_ids.size(), kv_pages.size());
  }
  EXPECT_EQ((*fleet)->front_end().device(), (*fleet)->front_end_id());
  (*fleet)->shutdown();
  (*fleet)->shutdown();  // idempotent
}

}  // namespace
}  // namespace kun::runtime
