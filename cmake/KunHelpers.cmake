# Shared build settings for every KunServe target.
add_library(kun_warnings INTERFACE)
target_compile_options(kun_warnings INTERFACE
  -Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor -Wcast-align -Woverloaded-virtual
  -Wnull-dereference -Wimplicit-fallthrough -Wno-missing-field-initializers
  $<$<BOOL:${KUN_WERROR}>:-Werror>)
target_include_directories(kun_warnings INTERFACE ${PROJECT_SOURCE_DIR})

if(KUN_SANITIZE STREQUAL "asan-ubsan")
  target_compile_options(kun_warnings INTERFACE -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer)
  target_link_options(kun_warnings INTERFACE -fsanitize=address,undefined)
elseif(KUN_SANITIZE STREQUAL "tsan")
  target_compile_options(kun_warnings INTERFACE -fsanitize=thread -fno-omit-frame-pointer)
  target_link_options(kun_warnings INTERFACE -fsanitize=thread)
elseif(KUN_SANITIZE STREQUAL "fuzz")
  # clang only: coverage instrumentation for libFuzzer plus ASan/UBSan; the fuzz targets add
  # -fsanitize=fuzzer at link time (fuzz/CMakeLists.txt).
  target_compile_options(kun_warnings INTERFACE -fsanitize=fuzzer-no-link,address,undefined
                         -fno-sanitize-recover=all -fno-omit-frame-pointer -g)
  target_link_options(kun_warnings INTERFACE -fsanitize=address,undefined)
endif()

# kun_add_library(NAME SOURCES a.cc b.cc DEPS x y)
function(kun_add_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;DEPS" ${ARGN})
  add_library(${name} STATIC ${ARG_SOURCES})
  target_link_libraries(${name} PUBLIC kun_warnings ${ARG_DEPS})
endfunction()

# kun_add_test(NAME SOURCES a.cc DEPS x y LABELS heavy TIMEOUT 300)
# Every test binary is a GoogleTest executable registered with ctest.
function(kun_add_test name)
  if(NOT KUN_BUILD_TESTS)
    return()
  endif()
  cmake_parse_arguments(ARG "" "TIMEOUT" "SOURCES;DEPS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE kun_warnings ${ARG_DEPS} GTest::gtest GTest::gtest_main)
  target_compile_definitions(${name} PRIVATE
    KUN_SOURCE_DIR="${PROJECT_SOURCE_DIR}"
    KUN_REFERENCE_PYTHON="${KUN_REFERENCE_PYTHON}")
  if(NOT ARG_TIMEOUT)
    set(ARG_TIMEOUT 300)
  endif()
  add_test(NAME ${name} COMMAND ${name})
  set(labels unit)
  if(ARG_LABELS)
    set(labels ${ARG_LABELS})
  endif()
  set_tests_properties(${name} PROPERTIES TIMEOUT ${ARG_TIMEOUT} LABELS "${labels}"
    ENVIRONMENT "KUN_SOURCE_DIR=${PROJECT_SOURCE_DIR};KUN_BINARY_DIR=${PROJECT_BINARY_DIR}")
endfunction()

# kun_add_test_variant(TEST NAME ENV "VAR=value"): runs kun_add_test's executable TEST again as
# ctest test NAME with one more environment variable (TEST's labels, timeout and environment).
function(kun_add_test_variant test name)
  if(NOT KUN_BUILD_TESTS)
    return()
  endif()
  cmake_parse_arguments(ARG "" "ENV" "" ${ARGN})
  get_test_property(${test} LABELS labels)
  get_test_property(${test} TIMEOUT timeout)
  get_test_property(${test} ENVIRONMENT env)
  add_test(NAME ${name} COMMAND ${test})
  set_tests_properties(${name} PROPERTIES TIMEOUT ${timeout} LABELS "${labels}" ENVIRONMENT "${env};${ARG_ENV}")
endfunction()

# GCC 12's middle-end warnings that fire inside inlined Boost.Asio/Beast code (not ours):
# -Wnull-dereference in Asio's scheduler and, with the sanitizers, -Wmaybe-uninitialized on a
# boost::optional in Beast's parser. Under -fsanitize=thread GCC also warns (-Wtsan) that Asio's
# std_fenced_block uses atomic_thread_fence; Asio's queues synchronize through mutexes, which
# TSan models. Apply to the translation units that include Asio/Beast only.
set(KUN_ASIO_WARNING_FLAGS -Wno-null-dereference)
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
  list(APPEND KUN_ASIO_WARNING_FLAGS -Wno-maybe-uninitialized)  # GCC only (clang: the fuzz build)
endif()
if(KUN_SANITIZE STREQUAL "tsan")
  list(APPEND KUN_ASIO_WARNING_FLAGS -Wno-tsan)
endif()
