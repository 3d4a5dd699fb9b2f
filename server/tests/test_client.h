// Blocking raw-socket HTTP/1.1 client for server tests (127.0.0.1 only, every wait bounded).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace kun::server::testing {

struct HttpResponse {
  int status = 0;
  std::map<std::string, std::string> headers;  // lower-case names
  std::string body;                            // de-chunked
  bool complete = false;
  std::string header(const std::string& name) const {
    auto it = headers.find(name);
    return it == headers.end() ? std::string() : it->second;
  }
};

class RawConnection {
 public:
  explicit RawConnection(std::uint16_t port) {
    fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(port);
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::connect(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      ::close(fd_);
      fd_ = -1;
    }
    int one = 1;
    if (fd_ >= 0) ::setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  ~RawConnection() { close(); }
  RawConnection(const RawConnection&) = delete;
  RawConnection& operator=(const RawConnection&) = delete;

  bool connected() const { return fd_ >= 0; }
  void close() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }
  // Closes with RST instead of FIN (a client that vanishes).
  void abort() {
    if (fd_ < 0) return;
    linger l{1, 0};
    ::setsockopt(fd_, SOL_SOCKET, SO_LINGER, &l, sizeof(l));
    close();
  }

  bool send_all(const std::string& data) {
    std::size_t off = 0;
    while (off < data.size()) {
      const ssize_t n = ::send(fd_, data.data() + off, data.size() - off, MSG_NOSIGNAL);
      if (n <= 0) return false;
      off += static_cast<std::size_t>(n);
    }
    return true;
  }

  // Reads until the bytes received so far contain `text`; false on EOF, error or timeout.
  bool read_until(const std::string& text, int timeout_ms) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (buffer_.find(text) == std::string::npos) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
      if (left <= 0 || !read_more(static_cast<int>(left))) return false;
    }
    return true;
  }

  // Reads more bytes into the buffer; false on EOF, error or timeout.
  bool read_more(int timeout_ms) {
    pollfd p{fd_, POLLIN, 0};
    if (::poll(&p, 1, timeout_ms) <= 0) return false;
    char buf[16384];
    const ssize_t n = ::recv(fd_, buf, sizeof(buf), 0);
    if (n <= 0) {
      eof_ = true;
      return false;
    }
    buffer_.append(buf, static_cast<std::size_t>(n));
    return true;
  }

  // Reads one whole response (Content-Length, chunked, or until close).
  HttpResponse read_response(int timeout_ms = 10000) {
    HttpResponse r;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    auto left = [&] {
      return static_cast<int>(std::max<std::int64_t>(
          0, std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now())
                 .count()));
    };
    std::size_t head_end;
    while ((head_end = buffer_.find("\r\n\r\n")) == std::string::npos) {
      if (!read_more(left())) return r;
    }
    const std::string head = buffer_.substr(0, head_end);
    buffer_.erase(0, head_end + 4);
    std::size_t line_end = head.find("\r\n");
    const std::string status_line = head.substr(0, line_end);
    if (status_line.size() >= 12) r.status = std::stoi(status_line.substr(9, 3));
    std::size_t pos = line_end == std::string::npos ? head.size() : line_end + 2;
    while (pos < head.size()) {
      std::size_t e = head.find("\r\n", pos);
      if (e == std::string::npos) e = head.size();
      const std::string line = head.substr(pos, e - pos);
      const std::size_t colon = line.find(':');
      if (colon != std::string::npos) {
        std::string name = line.substr(0, colon);
        std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
        std::string value = line.substr(colon + 1);
        value.erase(0, value.find_first_not_of(' '));
        r.headers[name] = value;
      }
      pos = e + 2;
    }
    if (r.status == 100) return read_response(left());
    if (r.status == 204 || r.status == 304) {  // never a body
      r.complete = true;
      return r;
    }
    if (r.header("transfer-encoding") == "chunked") {
      for (;;) {
        std::size_t le;
        while ((le = buffer_.find("\r\n")) == std::string::npos) {
          if (!read_more(left())) return r;
        }
        const std::size_t size = std::stoul(buffer_.substr(0, le), nullptr, 16);
        while (buffer_.size() < le + 2 + size + 2) {
          if (!read_more(left())) return r;
        }
        r.body += buffer_.substr(le + 2, size);
        chunks_.push_back(buffer_.substr(le + 2, size));
        buffer_.erase(0, le + 2 + size + 2);
        if (size == 0) {
          r.complete = true;
          return r;
        }
      }
    }
    if (!r.header("content-length").empty()) {
      const std::size_t len = std::stoul(r.header("content-length"));
      while (buffer_.size() < len) {
        if (!read_more(left())) return r;
      }
      r.body = buffer_.substr(0, len);
      buffer_.erase(0, len);
      r.complete = true;
      return r;
    }
    while (read_more(left())) {
    }
    r.body = buffer_;
    buffer_.clear();
    r.complete = eof_;
    return r;
  }

  // True if the peer closed the connection within timeout_ms (EOF with no more data).
  bool wait_closed(int timeout_ms) {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
    while (std::chrono::steady_clock::now() < deadline) {
      if (!read_more(50) && eof_) return true;
    }
    return false;
  }

  const std::vector<std::string>& chunks() const { return chunks_; }
  std::string& buffer() { return buffer_; }
  int fd() const { return fd_; }

 private:
  int fd_ = -1;
  bool eof_ = false;
  std::string buffer_;
  std::vector<std::string> chunks_;
};

inline std::string make_request(const std::string& method, const std::string& path,
                                const std::string& body, const std::string& extra_headers = "",
                                bool keep_alive = true) {
  std::string r = method + " " + path + " HTTP/1.1\r\nHost: 127.0.0.1\r\n";
  if (!body.empty() || method == "POST") {
    r += "Content-Type: application/json\r\nContent-Length: " + std::to_string(body.size()) + "\r\n";
  }
  r += extra_headers;
  if (!keep_alive) r += "Connection: close\r\n";
  r += "\r\n";
  r += body;
  return r;
}

// One request on a fresh connection.
inline HttpResponse exchange(std::uint16_t port, const std::string& raw, int timeout_ms = 10000) {
  RawConnection c(port);
  if (!c.connected() || !c.send_all(raw)) return {};
  return c.read_response(timeout_ms);
}

// Splits an SSE body into the payloads of its "data: " events.
inline std::vector<std::string> sse_data(const std::string& body) {
  std::vector<std::string> out;
  std::size_t pos = 0;
  while (pos < body.size()) {
    std::size_t end = body.find("\n\n", pos);
    if (end == std::string::npos) break;
    std::string ev = body.substr(pos, end - pos);
    if (ev.rfind("data: ", 0) == 0) out.push_back(ev.substr(6));
    pos = end + 2;
  }
  return out;
}

}  // namespace kun::server::testing
