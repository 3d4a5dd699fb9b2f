// MpiTransport between 3 ranks (run under mpirun -np 3; every rank exits 0 only if its checks
// pass): payloads intact, including multi-chunk and empty ones; order per (source, destination,
// kind) with kinds interleaved and a second sender at the same time; receives matched by source;
// an activation sent after a 64 MiB bulk message arrives before it (it waits behind at most one
// chunk); a payload handed back with recycle() receives the next bulk message (intact); messages
// to the sender itself; orderly shutdown.
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "runtime/mpi/mpi_session.h"
#include "runtime/mpi/mpi_transport.h"

namespace kun::runtime::mpi {
namespace {

int failures = 0;
void expect(bool ok, int rank, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "rank %d FAIL %s\n", rank, what.c_str());
    ++failures;
  }
}

std::vector<std::byte> pattern(std::size_t n, std::int64_t seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((static_cast<std::size_t>(seed) * 7 + i * 13) & 0xff);
  return v;
}

TransferKind kind_of(int i) {
  switch (i % 4) {
    case 0: return TransferKind::kKvExchange;
    case 1: return TransferKind::kActivation;
    case 2: return TransferKind::kRemoteAttention;
    default: return TransferKind::kWeights;
  }
}
std::size_t size_of(int i) {
  switch (i % 4) {
    case 0: return 200 * 1024 + 17;  // 4 chunks of 64 KiB
    case 1: return 1024;
    case 2: return 3000;
    default: return i % 8 == 3 ? 0 : 70000;  // empty bulk messages too
  }
}

Message recv_one(MessageTransport& t, int src, Port port = Port::kUser) {
  RecvMatch m;
  m.port = port;
  m.src = src;
  RecvHandle h = t.recv(m);
  if (!h.wait_for(std::chrono::seconds(20))) {
    std::fprintf(stderr, "rank %d: nothing from %d within 20 s\n", t.device(), src);
    std::abort();
  }
  const Status s = h.wait();
  if (!s.ok()) {
    std::fprintf(stderr, "rank %d: %s\n", t.device(), s.to_string().c_str());
    std::abort();
  }
  return h.take();
}

int check_main(int argc, char** argv) {
  auto session = MpiSession::init(&argc, &argv);
  if (!session.ok() || (*session)->size() != 3) {
    std::fprintf(stderr, "run with mpirun -np 3\n");
    return 2;
  }
  const int rank = (*session)->rank();
  MpiTransportOptions o;
  o.bulk_chunk_bytes = 64 * 1024;
  // --peer-timeout-ms N: slow builds (TSan) on a loaded host need more than the default.
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::string(argv[i]) == "--peer-timeout-ms") o.peer_timeout = std::chrono::milliseconds(std::stoll(argv[i + 1]));
  }
  // --no-doorbells: idle ranks poll (the path for peers on other hosts).
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--no-doorbells") o.doorbells = false;
  }
  auto created = MpiTransport::create(o);
  if (!created.ok()) return 2;
  MpiTransport& t = **created;
  const int n = 40;
  if (rank == 0 || rank == 2) {
    std::vector<SendHandle> sent;
    for (int i = 0; i < n; ++i) {
      MessageHeader h;
      h.dst = 1;
      h.kind = kind_of(i);
      h.port = Port::kUser;
      h.request_id = i;
      h.block_ids = {i, rank};
      sent.push_back(t.send_owned(std::move(h), pattern(size_of(i), i + rank)));
    }
    for (auto& s : sent) expect(s.wait().ok(), rank, "send completes");
  }
  if (rank == 0) {
    // A 64 MiB bulk message, then an activation: the activation must arrive first.
    static const std::vector<std::byte> bulk = pattern(64u << 20, 99);
    MessageHeader b;
    b.dst = 1;
    b.kind = TransferKind::kKvMigration;
    b.port = Port::kAgent;
    b.request_id = 1000;
    SendHandle bs = t.send(std::move(b), bulk);
    MessageHeader a;
    a.dst = 1;
    a.kind = TransferKind::kActivation;
    a.port = Port::kAgent;
    a.request_id = 1001;
    SendHandle as = t.send_owned(std::move(a), pattern(4096, 5));
    expect(as.wait().ok() && bs.wait().ok(), rank, "bulk and activation sent");
    // Once rank 1 has handed the 64 MiB buffer back, a smaller bulk message is received into it.
    (void)recv_one(t, 1, Port::kReply);
    MessageHeader r;
    r.dst = 1;
    r.kind = TransferKind::kKvExchange;
    r.port = Port::kAgent;
    r.request_id = 1002;
    expect(t.send_owned(std::move(r), pattern((1u << 20) + 5, 77)).wait().ok(), rank, "second bulk sent");
  }
  if (rank == 1) {
    // From rank 2 only, then from rank 0: in order per kind, intact.
    for (int src : {2, 0}) {
      std::vector<std::int64_t> last(static_cast<std::size_t>(TransferKind::kCount), -1);
      for (int i = 0; i < n; ++i) {
        Message m = recv_one(t, src);
        const std::int64_t id = m.header.request_id;
        expect(m.header.src == src && m.header.block_ids == std::vector<std::int64_t>{id, src}, rank, "header from " + std::to_string(src));
        expect(m.header.kind == kind_of(static_cast<int>(id)), rank, "kind of message " + std::to_string(id));
        expect(m.payload == pattern(size_of(static_cast<int>(id)), id + src), rank, "payload of message " + std::to_string(id));
        auto& l = last[static_cast<std::size_t>(m.header.kind)];
        expect(id > l, rank, "message " + std::to_string(id) + " after " + std::to_string(l) + " of its kind");
        l = id;
      }
    }
    Message first = recv_one(t, 0, Port::kAgent);
    Message second = recv_one(t, 0, Port::kAgent);
    expect(first.header.request_id == 1001, rank, "the activation arrived before the 64 MiB bulk message");
    expect(second.header.request_id == 1000 && second.payload == pattern(64u << 20, 99), rank, "bulk message intact");
    const std::byte* recycled = second.payload.data();
    t.recycle(std::move(second.payload));
    MessageHeader go;
    go.dst = 0;
    go.port = Port::kReply;
    expect(t.send_owned(std::move(go), {}).wait().ok(), rank, "go sent");
    Message third = recv_one(t, 0, Port::kAgent);
    expect(third.header.request_id == 1002 && third.payload == pattern((1u << 20) + 5, 77), rank,
           "bulk message received into a recycled buffer intact");
    expect(third.payload.data() == recycled, rank, "the recycled buffer was reused");
    // To itself.
    MessageHeader self;
    self.dst = 1;
    self.port = Port::kReply;
    self.tag = 9;
    expect(t.send_owned(std::move(self), pattern(10, 1)).wait().ok(), rank, "self send");
    Message back = recv_one(t, 1, Port::kReply);
    expect(back.payload == pattern(10, 1) && back.header.tag == 9, rank, "self message");
  }
  const TransferStats st = t.stats();
  if (rank == 0) expect(st.bytes_of(TransferKind::kKvMigration) == (64 << 20), rank, "bulk bytes counted");
  const Status s = t.shutdown();
  expect(s.ok(), rank, "shutdown: " + s.to_string());
  created->reset();
  if (failures == 0) std::printf("rank %d: all checks passed\n", rank);
  return failures == 0 ? 0 : 1;
}

}  // namespace
}  // namespace kun::runtime::mpi

int main(int argc, char** argv) { return kun::runtime::mpi::check_main(argc, argv); }
