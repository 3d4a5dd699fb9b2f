// main() of a gtest binary run under mpirun: rank 0 runs the tests, every ClusterRuntime they
// create gets an MpiFleet over ranks 1..N (set_default_fleet_factory); ranks 1..N build and
// serve one device after another (serve_device_rank) with the tests' weights (tiny_weights()).
// So the in-process scenarios of runtime/tests/cluster_test.cc run unchanged with one process
// per device, and their token-for-token expectations (computed on rank 0, one instance alone)
// hold across processes.
#include <gtest/gtest.h>

#include <iostream>

#include "runtime/cluster_runtime.h"
#include "runtime/mpi/mpi_fleet.h"
#include "runtime/mpi/mpi_session.h"
#include "runtime/mpi/mpi_transport.h"
#include "runtime/tests/test_models.h"

int main(int argc, char** argv) {
  namespace rm = kun::runtime::mpi;
  auto session = rm::MpiSession::init(&argc, &argv);
  if (!session.ok()) {
    std::cerr << session.status().to_string() << std::endl;
    return 1;
  }
  rm::MpiTransportOptions topt;
  topt.peer_timeout = std::chrono::milliseconds(20000);  // 5 ranks on 2 cores, with ctest -j beside
  auto transport = rm::MpiTransport::create(topt);
  if (!transport.ok()) {
    std::cerr << transport.status().to_string() << std::endl;
    (*session)->abort(2);
  }
  const std::chrono::milliseconds timeout(120000);
  if ((*session)->rank() != 0) {
    const auto weights = kun::runtime::testing::tiny_weights();
    const int rc = rm::serve_device_rank(**session, **transport, [&](const std::string& key)
                                                                      -> kun::StatusOr<const kun::model::WeightSource*> {
      if (!key.empty()) return kun::invalid_argument("unknown weights '" + key + "'");
      return weights.get();
    });
    transport->reset();
    return rc;
  }
  kun::runtime::set_default_fleet_factory(rm::mpi_fleet_factory(**transport, "", timeout));
  ::testing::InitGoogleTest(&argc, argv);
  const int rc = RUN_ALL_TESTS();
  kun::runtime::set_default_fleet_factory({});
  const kun::Status released = rm::release_device_ranks(**transport, timeout);
  const kun::Status closed = (*transport)->shutdown();
  if (!released.ok() || !closed.ok()) {
    std::cerr << (released.ok() ? closed : released).to_string() << std::endl;
    (*session)->abort(3);
  }
  transport->reset();
  return rc;
}
