// UTF-8 validation (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF).
#pragma once

#include <cstddef>
#include <string_view>

namespace kun::server {

// True if `s` is entirely well-formed UTF-8. On false, *error_offset (if given) is the byte
// offset of the first bad sequence.
bool is_valid_utf8(std::string_view s, std::size_t* error_offset = nullptr);

}  // namespace kun::server
