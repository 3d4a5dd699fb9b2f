// MpiSession: MPI's lifetime in a process (MPI_Init_thread .. MPI_Finalize) and the start-up
// check that every rank runs the same thing.
//
// Layout (runtime/README.md, "MPI"): rank 0 is the front end (HTTP server, router, coordinator,
// and the schedulers); ranks 1..N each own one device and run its DeviceAgent.
#pragma once

#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"

namespace kun::runtime::mpi {

class MpiSession {
 public:
  // Initializes MPI asking for MPI_THREAD_MULTIPLE; needs at least MPI_THREAD_SERIALIZED (the
  // transport's progress thread makes the MPI calls while the main thread waits on handles).
  static StatusOr<std::unique_ptr<MpiSession>> init(int* argc, char*** argv);
  ~MpiSession();  // MPI_Finalize, unless aborted
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

  int rank() const { return rank_; }
  int size() const { return size_; }
  // Ends every rank of the job (MPI_Abort): for a peer that died or hung, where MPI_Finalize
  // would wait for it forever.
  [[noreturn]] void abort(int exit_code);
  // Ends this process only, without MPI_Finalize: for a rank that has said goodbye to every live
  // peer after another rank died. MPI_Finalize is collective over the whole job and waits for the
  // dead rank forever when mpirun runs with --enable-recovery (where the front end's MPI_Abort
  // ends only the front end).
  [[noreturn]] void exit_without_finalize(int exit_code);

 private:
  MpiSession(int rank, int size) : rank_(rank), size_(size) {}
  int rank_;
  int size_;
};

// What every rank must agree on before serving.
struct NodeIdentity {
  std::string model;
  std::string preset;
  std::string dtype;
  // The GEMM activations (kernels::GemmActivations): their bits differ, and the amx mode keeps
  // its weights in another panel layout, so ranks that exchange layers or sequences must agree.
  std::string gemm;
  std::string build_id;
  std::vector<std::pair<std::string, std::string>> fields() const {
    return {{"model", model}, {"preset", preset}, {"dtype", dtype}, {"gemm", gemm}, {"build", build_id}};
  }
};

// The build id compiled into this binary (git revision at configure time).
std::string this_build_id();

// Collective over MPI_COMM_WORLD: rank 0 compares every rank's identity with its own. Every rank
// gets the same answer: ok, or kFailedPrecondition naming each disagreeing rank, the field, and
// both values.
Status check_identity(const NodeIdentity& mine);

}  // namespace kun::runtime::mpi
