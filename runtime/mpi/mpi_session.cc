#include "runtime/mpi/mpi_session.h"

#include <cstdio>
#include <cstdlib>
#include <iostream>

#include <mpi.h>

#include <cstring>
#include <sstream>

namespace kun::runtime::mpi {

#ifndef KUN_BUILD_ID
#define KUN_BUILD_ID "unknown"
#endif

std::string this_build_id() { return KUN_BUILD_ID; }

StatusOr<std::unique_ptr<MpiSession>> MpiSession::init(int* argc, char*** argv) {
  int provided = 0;
  if (MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided) != MPI_SUCCESS) {
    return unavailable("MPI_Init_thread failed");
  }
  if (provided < MPI_THREAD_SERIALIZED) {
    MPI_Finalize();
    return unimplemented("the MPI library gives thread level " + std::to_string(provided) +
                         ", the transport needs MPI_THREAD_SERIALIZED or higher");
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  return std::unique_ptr<MpiSession>(new MpiSession(rank, size));
}

MpiSession::~MpiSession() { MPI_Finalize(); }

void MpiSession::exit_without_finalize(int exit_code) {
  std::cout.flush();
  std::cerr.flush();
  std::fflush(nullptr);
  std::_Exit(exit_code);
}

void MpiSession::abort(int exit_code) {
  MPI_Abort(MPI_COMM_WORLD, exit_code);
  std::abort();  // MPI_Abort does not return; this is for the compiler
}

namespace {
constexpr int kIdentityBytes = 4096;

std::string encode(const NodeIdentity& id) {
  std::string s;
  for (const auto& [k, v] : id.fields()) s += k + "=" + v + "\n";
  return s;
}

std::vector<std::pair<std::string, std::string>> decode(const std::string& s) {
  std::vector<std::pair<std::string, std::string>> out;
  std::istringstream in(s);
  std::string line;
  while (std::getline(in, line)) {
    const auto eq = line.find('=');
    if (eq != std::string::npos) out.emplace_back(line.substr(0, eq), line.substr(eq + 1));
  }
  return out;
}
}  // namespace

Status check_identity(const NodeIdentity& mine) {
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  std::string text = encode(mine);
  if (text.size() >= kIdentityBytes) return invalid_argument("node identity longer than " + std::to_string(kIdentityBytes));
  std::vector<char> buf(kIdentityBytes, '\0');
  std::memcpy(buf.data(), text.data(), text.size());
  std::vector<char> all(rank == 0 ? static_cast<std::size_t>(kIdentityBytes) * static_cast<std::size_t>(size) : 0);
  if (MPI_Gather(buf.data(), kIdentityBytes, MPI_CHAR, all.data(), kIdentityBytes, MPI_CHAR, 0, MPI_COMM_WORLD) !=
      MPI_SUCCESS) {
    return unavailable("start-up identity exchange failed");
  }
  std::string verdict;
  if (rank == 0) {
    const auto ours = mine.fields();
    for (int r = 1; r < size; ++r) {
      const std::string theirs_text(all.data() + static_cast<std::size_t>(r) * kIdentityBytes);
      const auto theirs = decode(theirs_text);
      for (const auto& [key, value] : ours) {
        std::string other = "(missing)";
        for (const auto& [k2, v2] : theirs) {
          if (k2 == key) other = v2;
        }
        if (other != value) {
          verdict += (verdict.empty() ? "" : "; ") + std::string("rank ") + std::to_string(r) + " has " + key + " '" + other +
                     "' but rank 0 has '" + value + "'";
        }
      }
    }
  }
  int length = static_cast<int>(verdict.size());
  MPI_Bcast(&length, 1, MPI_INT, 0, MPI_COMM_WORLD);
  verdict.resize(static_cast<std::size_t>(length));
  if (length > 0) MPI_Bcast(verdict.data(), length, MPI_CHAR, 0, MPI_COMM_WORLD);
  if (verdict.empty()) return ok_status();
  return failed_precondition("ranks disagree, refusing to start: " + verdict);
}

}  // namespace kun::runtime::mpi
