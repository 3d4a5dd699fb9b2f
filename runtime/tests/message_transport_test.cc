// The handle-addressed, asynchronous transport's in-process backend: messages arrive intact and
// matched by port, source and tag; per (source, destination, kind) order holds; a receiver that
// waits sleeps (thread CPU time stays near zero); over a paced link a latency-bound message
// overtakes a bulk message, waiting behind at most one chunk. Times are bounded from below or
// compared between transfers of very different length.
#include <gtest/gtest.h>

#include <time.h>

#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "runtime/message_transport.h"

namespace kun::runtime {
namespace {

using Clock = std::chrono::steady_clock;

std::vector<std::byte> pattern(std::size_t n, unsigned seed) {
  std::vector<std::byte> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<std::byte>((seed + i * 31) & 0xff);
  return v;
}

MessageHeader to(int dst, TransferKind kind, Port port = Port::kUser, std::uint64_t tag = 0) {
  MessageHeader h;
  h.dst = dst;
  h.kind = kind;
  h.port = port;
  h.tag = tag;
  return h;
}

double thread_cpu_s() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + static_cast<double>(ts.tv_nsec) * 1e-9;
}

TEST(MessageTransportTest, HeaderRoundTripsAndMalformedBytesAreRefused) {
  MessageHeader h = to(3, TransferKind::kKvExchange, Port::kReply, 77);
  h.src = 1;
  h.op = 5;
  h.error = 4;
  h.reply_to = 2;
  h.peer = 0;
  h.request_id = 1234567890123;
  h.layer = 11;
  h.start_pos = 40;
  h.num_tokens = 7;
  h.block_ids = {5, 6, 9};
  h.peer_block_ids = {100};
  const auto bytes = encode_header(h);
  auto back = decode_header(bytes);
  ASSERT_TRUE(back.ok()) << back.status().to_string();
  EXPECT_EQ(back->src, 1);
  EXPECT_EQ(back->dst, 3);
  EXPECT_EQ(back->kind, TransferKind::kKvExchange);
  EXPECT_EQ(back->port, Port::kReply);
  EXPECT_EQ(back->tag, 77u);
  EXPECT_EQ(back->request_id, 1234567890123);
  EXPECT_EQ(back->block_ids, h.block_ids);
  EXPECT_EQ(back->peer_block_ids, h.peer_block_ids);
  EXPECT_EQ(back->start_pos, 40);
  auto truncated = decode_header(std::span<const std::byte>(bytes).first(bytes.size() - 3));
  EXPECT_EQ(truncated.status().code(), StatusCode::kDataLoss);
  auto bad = bytes;
  bad[0] = std::byte{0};
  EXPECT_EQ(decode_header(bad).status().code(), StatusCode::kDataLoss);
}

TEST(MessageTransportTest, DeliversAndMatchesByPortSourceAndTag) {
  InProcessMessageHub hub(3);
  const auto a = pattern(1000, 1), b = pattern(300, 2);
  // A receive posted before the message and one after it both complete.
  RecvMatch from0;
  from0.port = Port::kUser;
  from0.src = 0;
  RecvHandle early = hub.endpoint(2).recv(from0);
  EXPECT_FALSE(early.ready());
  SendHandle s1 = hub.endpoint(0).send(to(2, TransferKind::kActivation), a);
  ASSERT_TRUE(s1.wait().ok());
  ASSERT_TRUE(early.wait().ok());
  Message m = early.take();
  EXPECT_EQ(m.header.src, 0);
  EXPECT_EQ(m.payload, a);
  // Tag matching skips an older message with another tag.
  hub.endpoint(1).send_owned(to(2, TransferKind::kActivation, Port::kReply, 5), pattern(10, 3));
  hub.endpoint(1).send_owned(to(2, TransferKind::kActivation, Port::kReply, 6), b);
  RecvMatch tag6;
  tag6.port = Port::kReply;
  tag6.tag = 6;
  RecvHandle r6 = hub.endpoint(2).recv(tag6);
  ASSERT_TRUE(r6.wait().ok());
  EXPECT_EQ(r6.take().payload, b);
  RecvMatch wrong_port;
  wrong_port.port = Port::kAgent;
  RecvHandle none = hub.endpoint(2).recv(wrong_port);
  EXPECT_FALSE(none.wait_for(std::chrono::milliseconds(20)));
  const TransferStats st = hub.stats();
  EXPECT_EQ(st.bytes_of(TransferKind::kActivation), 1000 + 10 + 300);
  EXPECT_EQ(st.messages[static_cast<int>(TransferKind::kActivation)], 3);
}

TEST(MessageTransportTest, KeepsOrderPerSourceDestinationAndKindOnAPacedLink) {
  LinkModel link;
  link.bandwidth_bytes_per_s = 2e9;
  link.bulk_chunk_bytes = 4096;
  InProcessMessageHub hub(2, link);
  const int n = 40;
  for (int i = 0; i < n; ++i) {
    MessageHeader h = to(1, i % 3 == 0 ? TransferKind::kKvExchange : TransferKind::kActivation);
    h.request_id = i;
    hub.endpoint(0).send_owned(std::move(h), pattern(i % 3 == 0 ? 20000 : 100, static_cast<unsigned>(i)));
  }
  std::int64_t last_bulk = -1, last_act = -1;
  for (int i = 0; i < n; ++i) {
    RecvMatch any;
    any.port = Port::kUser;
    RecvHandle r = hub.endpoint(1).recv(any);
    ASSERT_TRUE(r.wait().ok());
    Message m = r.take();
    const std::int64_t id = m.header.request_id;
    EXPECT_EQ(m.payload, pattern(id % 3 == 0 ? 20000 : 100, static_cast<unsigned>(id)));
    std::int64_t& last = m.header.kind == TransferKind::kKvExchange ? last_bulk : last_act;
    EXPECT_GT(id, last) << "message " << id << " of kind " << transfer_kind_name(m.header.kind) << " overtook " << last;
    last = id;
  }
  EXPECT_EQ(last_bulk, 39);
  EXPECT_EQ(last_act, 38);
}

TEST(MessageTransportTest, ActivationWaitsBehindAtMostOneBulkChunk) {
  LinkModel link;
  link.bandwidth_bytes_per_s = 0.25e9;  // 64 MiB: 268 ms; one 64 KiB chunk: 0.26 ms
  InProcessMessageHub hub(2, link);
  const auto bulk = pattern(64u << 20, 1);
  const auto act = pattern(256u << 10, 9);  // 1 ms on the link
  const auto t0 = Clock::now();
  SendHandle bulk_sent = hub.endpoint(0).send(to(1, TransferKind::kKvExchange), bulk);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const auto act_start = Clock::now();
  SendHandle act_sent = hub.endpoint(0).send(to(1, TransferKind::kActivation), act);
  ASSERT_TRUE(act_sent.wait().ok());
  const auto act_done = Clock::now();
  EXPECT_FALSE(bulk_sent.ready()) << "the activation waited for the whole bulk message";
  ASSERT_TRUE(bulk_sent.wait().ok());
  const auto bulk_done = Clock::now();
  RecvMatch any;
  any.port = Port::kUser;
  RecvHandle first = hub.endpoint(1).recv(any);
  ASSERT_TRUE(first.wait().ok());
  Message m1 = first.take();
  EXPECT_EQ(m1.header.kind, TransferKind::kActivation) << "the activation was delivered after the bulk message";
  EXPECT_EQ(m1.payload, act);
  RecvHandle second = hub.endpoint(1).recv(any);
  ASSERT_TRUE(second.wait().ok());
  EXPECT_EQ(second.take().payload, bulk);
  const double bulk_ms = std::chrono::duration<double, std::milli>(bulk_done - t0).count();
  EXPECT_GE(bulk_ms, 268.0);
  EXPECT_LT(act_done - act_start, (bulk_done - act_start) / 2);
  EXPECT_GE(hub.stats().bulk_chunks_deferred, 1);
}

TEST(MessageTransportTest, AWaitingReceiverSleeps) {
  InProcessMessageHub hub(2);
  double cpu_s = -1.0;
  std::thread waiter([&] {
    const double c0 = thread_cpu_s();
    RecvMatch any;
    any.port = Port::kUser;
    RecvHandle r = hub.endpoint(1).recv(any);
    (void)r.wait();
    cpu_s = thread_cpu_s() - c0;
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  hub.endpoint(0).send_owned(to(1, TransferKind::kActivation), pattern(8, 0));
  waiter.join();
  // A spinning waiter would have used ~0.4 s of CPU.
  EXPECT_LT(cpu_s, 0.02);
}

TEST(MessageTransportTest, ShutdownEndsWaitingReceivesWithAnError) {
  RecvHandle r;
  {
    InProcessMessageHub hub(2);
    RecvMatch any;
    any.port = Port::kAgent;
    r = hub.endpoint(0).recv(any);
  }
  const Status s = r.wait();
  EXPECT_EQ(s.code(), StatusCode::kUnavailable) << s.to_string();
}

}  // namespace
}  // namespace kun::runtime
