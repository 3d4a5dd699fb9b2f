// Strongly typed ids so a request id is never passed where a device id is expected.
#pragma once

#include <cstdint>
#include <functional>
#include <ostream>

namespace kun {

template <typename Tag>
struct Id {
  std::int64_t value = -1;
  constexpr Id() = default;
  constexpr explicit Id(std::int64_t v) : value(v) {}
  constexpr bool valid() const { return value >= 0; }
  friend constexpr bool operator==(Id a, Id b) { return a.value == b.value; }
  friend constexpr auto operator<=>(Id a, Id b) { return a.value <=> b.value; }
  friend std::ostream& operator<<(std::ostream& os, Id id) { return os << id.value; }
};

struct RequestTag {};
struct DeviceTag {};
struct InstanceTag {};
struct GroupTag {};

using RequestId = Id<RequestTag>;
using DeviceId = Id<DeviceTag>;
using InstanceId = Id<InstanceTag>;
using GroupId = Id<GroupTag>;

}  // namespace kun

template <typename Tag>
struct std::hash<kun::Id<Tag>> {
  std::size_t operator()(kun::Id<Tag> id) const noexcept { return std::hash<std::int64_t>()(id.value); }
};
