// Boost.Asio/Beast headers for this module. GCC 12 at -O3 reports -Wnull-dereference inside
// Asio's scheduler once it is inlined into our code (a false positive in third-party code); the
// warning is silenced for these headers only, the rest of the build keeps warnings as errors.
#pragma once

#if !defined(BOOST_BEAST_USE_STD_STRING_VIEW) || !defined(BOOST_ASIO_NO_DEPRECATED)
#error "Asio/Beast users must link kun_asio (one set of Boost configuration macros per binary)"
#endif

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wnull-dereference"
#include <boost/asio/connect.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#pragma GCC diagnostic pop
