#include "model/tokenizer_regex.h"

#include <memory>

#include "model/tokenizer_unicode.h"

namespace kun::model {
namespace {

constexpr int kInfinite = -1;
constexpr int kMaxRepeat = 1000;

char32_t ascii_fold(char32_t cp) {
  return (cp >= 'A' && cp <= 'Z') ? cp + ('a' - 'A') : cp;
}

// Syntax tree of a pattern.
struct Node {
  enum class Kind { kEmpty, kChar, kClass, kAny, kConcat, kAlt, kRepeat, kLook, kAssert } kind =
      Kind::kEmpty;
  char32_t ch = 0;
  bool icase = false;
  int class_index = 0;
  int min = 0, max = 0;
  bool greedy = true;
  bool negate = false;
  TokenizerRegex::Op assert_op = TokenizerRegex::Op::kMatch;
  std::vector<std::unique_ptr<Node>> children;
};

bool nullable(const Node& n) {
  switch (n.kind) {
    case Node::Kind::kEmpty: case Node::Kind::kLook: case Node::Kind::kAssert:
      return true;
    case Node::Kind::kChar: case Node::Kind::kClass: case Node::Kind::kAny:
      return false;
    case Node::Kind::kConcat:
      for (const auto& c : n.children) if (!nullable(*c)) return false;
      return true;
    case Node::Kind::kAlt:
      for (const auto& c : n.children) if (nullable(*c)) return true;
      return false;
    case Node::Kind::kRepeat:
      return n.min == 0 || nullable(*n.children[0]);
  }
  return true;
}

}  // namespace

class RegexCompiler {
 public:
  RegexCompiler(std::string_view pattern, TokenizerRegex& out)
      : cps_(unicode::decode_utf8(pattern)), out_(out) {}

  Status compile() {
    auto root = parse_alt(false);
    if (!status_.ok()) return status_;
    if (pos_ != cps_.size()) {
      error("unbalanced ')'");
      return status_;
    }
    emit_node(*root);
    if (!status_.ok()) return status_;
    emit(TokenizerRegex::Inst{.op = TokenizerRegex::Op::kMatch});
    return ok_status();
  }

 private:
  using Op = TokenizerRegex::Op;
  using Inst = TokenizerRegex::Inst;
  using ClassItem = TokenizerRegex::ClassItem;

  void error(std::string what) {
    if (status_.ok()) {
      status_ = invalid_argument("regex '" + out_.pattern_ + "': " + what + " at code point " +
                                 std::to_string(pos_));
    }
  }
  bool at_end() const { return pos_ >= cps_.size(); }
  char32_t peek(std::size_t ahead = 0) const {
    return pos_ + ahead < cps_.size() ? cps_[pos_ + ahead] : 0;
  }

  std::unique_ptr<Node> make(Node::Kind kind) {
    auto n = std::make_unique<Node>();
    n->kind = kind;
    return n;
  }

  std::unique_ptr<Node> parse_alt(bool in_group) {
    auto alt = make(Node::Kind::kAlt);
    alt->children.push_back(parse_concat());
    while (status_.ok() && !at_end() && peek() == '|') {
      ++pos_;
      alt->children.push_back(parse_concat());
    }
    if (!in_group && !at_end() && status_.ok()) error("unexpected ')'");
    if (alt->children.size() == 1) return std::move(alt->children[0]);
    return alt;
  }

  std::unique_ptr<Node> parse_concat() {
    auto cat = make(Node::Kind::kConcat);
    while (status_.ok() && !at_end() && peek() != '|' && peek() != ')') {
      auto atom = parse_atom();
      if (!status_.ok() || !atom) break;
      atom = parse_quantifiers(std::move(atom));
      cat->children.push_back(std::move(atom));
    }
    return cat;
  }

  bool parse_int(int* value) {
    if (at_end() || peek() < '0' || peek() > '9') return false;
    long v = 0;
    while (!at_end() && peek() >= '0' && peek() <= '9') {
      v = v * 10 + static_cast<long>(peek() - '0');
      if (v > kMaxRepeat) v = kMaxRepeat + 1;
      ++pos_;
    }
    *value = static_cast<int>(v);
    return true;
  }

  std::unique_ptr<Node> parse_quantifiers(std::unique_ptr<Node> atom) {
    while (status_.ok() && !at_end()) {
      int min = 0, max = 0;
      const char32_t c = peek();
      if (c == '?') { min = 0; max = 1; ++pos_; }
      else if (c == '*') { min = 0; max = kInfinite; ++pos_; }
      else if (c == '+') { min = 1; max = kInfinite; ++pos_; }
      else if (c == '{') {
        const std::size_t save = pos_;
        ++pos_;
        if (!parse_int(&min)) { pos_ = save; return atom; }  // a literal '{'
        max = min;
        if (peek() == ',') {
          ++pos_;
          if (!parse_int(&max)) max = kInfinite;
        }
        if (peek() != '}') { pos_ = save; return atom; }
        ++pos_;
        if (min > kMaxRepeat || max > kMaxRepeat || (max != kInfinite && max < min)) {
          error("bad repetition bounds");
          return atom;
        }
      } else {
        return atom;
      }
      bool greedy = true;
      if (peek() == '?') { greedy = false; ++pos_; }
      else if (peek() == '+') { ++pos_; }  // possessive: treated as greedy
      if (atom->kind == Node::Kind::kLook || atom->kind == Node::Kind::kAssert) {
        error("quantifier on an assertion");
        return atom;
      }
      if (max == kInfinite && nullable(*atom)) {
        error("unbounded quantifier on a sub-pattern that can match empty is not supported");
        return atom;
      }
      auto rep = make(Node::Kind::kRepeat);
      rep->min = min;
      rep->max = max;
      rep->greedy = greedy;
      rep->children.push_back(std::move(atom));
      atom = std::move(rep);
    }
    return atom;
  }

  std::unique_ptr<Node> parse_atom() {
    const char32_t c = peek();
    ++pos_;
    switch (c) {
      case '(': return parse_group();
      case '[': {
        auto n = make(Node::Kind::kClass);
        TokenizerRegex::CharClass cls;
        cls.icase = icase_;
        parse_class_body(cls);
        n->class_index = add_class(std::move(cls));
        return n;
      }
      case '.': return make(Node::Kind::kAny);
      case '^': { auto n = make(Node::Kind::kAssert); n->assert_op = Op::kLineBegin; return n; }
      case '$': { auto n = make(Node::Kind::kAssert); n->assert_op = Op::kLineEnd; return n; }
      case '\\': return parse_escape_atom();
      case '*': case '+': case '?':
        error("nothing to repeat");
        return nullptr;
      default: {
        auto n = make(Node::Kind::kChar);
        n->ch = c;
        n->icase = icase_;
        return n;
      }
    }
  }

  std::unique_ptr<Node> parse_group() {
    const bool saved_icase = icase_;
    std::unique_ptr<Node> result;
    if (peek() == '?') {
      ++pos_;
      const char32_t kind = peek();
      if (kind == ':') {
        ++pos_;
        result = parse_alt(true);
      } else if (kind == '=' || kind == '!') {
        ++pos_;
        auto look = make(Node::Kind::kLook);
        look->negate = kind == '!';
        look->children.push_back(parse_alt(true));
        result = std::move(look);
      } else if (kind == '<' && peek(1) != '=' && peek(1) != '!') {
        while (!at_end() && peek() != '>') ++pos_;  // named group: the name is ignored
        if (at_end()) { error("unterminated group name"); return nullptr; }
        ++pos_;
        result = parse_alt(true);
      } else {
        // Flag group: (?i) (?-i) (?i:...) (?i-m:...).
        bool on = true;
        bool flags_icase = icase_;
        while (!at_end() && peek() != ':' && peek() != ')') {
          const char32_t f = peek();
          if (f == '-') on = false;
          else if (f == 'i') flags_icase = on;
          else if (f != 'm' && f != 's' && f != 'x') { error("unsupported group flag"); return nullptr; }
          ++pos_;
        }
        if (at_end()) { error("unterminated group"); return nullptr; }
        if (peek() == ')') {  // (?i): applies to the rest of the enclosing group
          ++pos_;
          icase_ = flags_icase;
          return make(Node::Kind::kEmpty);
        }
        ++pos_;
        icase_ = flags_icase;
        result = parse_alt(true);
      }
    } else {
      result = parse_alt(true);
    }
    icase_ = saved_icase;
    if (!status_.ok()) return nullptr;
    if (at_end() || peek() != ')') { error("missing ')'"); return nullptr; }
    ++pos_;
    return result;
  }

  // Parses the hex digits of \xHH, \x{...} or \uHHHH after the letter.
  bool parse_hex(int digits, char32_t* out) {
    char32_t v = 0;
    const bool braced = digits == 2 && peek() == '{';
    if (braced) ++pos_;
    int n = 0;
    while (!at_end() && (braced || n < digits)) {
      const char32_t h = peek();
      int d = -1;
      if (h >= '0' && h <= '9') d = static_cast<int>(h - '0');
      else if ((h | 0x20) >= 'a' && (h | 0x20) <= 'f') d = static_cast<int>((h | 0x20) - 'a' + 10);
      if (d < 0) break;
      v = v * 16 + static_cast<char32_t>(d);
      if (v > 0x10FFFF) return false;
      ++pos_;
      ++n;
    }
    if (braced) {
      if (peek() != '}') return false;
      ++pos_;
    }
    if (n == 0 || (!braced && n != digits)) return false;
    *out = v;
    return true;
  }

  // Parses \p{..}/\P{..} after the letter.
  bool parse_property(bool negated, ClassItem* item) {
    std::string name;
    if (peek() == '{') {
      ++pos_;
      while (!at_end() && peek() != '}') {
        name.push_back(static_cast<char>(peek() < 0x80 ? peek() : '?'));
        ++pos_;
      }
      if (at_end()) return false;
      ++pos_;
    } else if (!at_end()) {
      name.push_back(static_cast<char>(peek() < 0x80 ? peek() : '?'));
      ++pos_;
    }
    if (!name.empty() && name[0] == '^') {
      negated = !negated;
      name.erase(0, 1);
    }
    static const char* const kLongNames[][2] = {
        {"Letter", "L"}, {"Mark", "M"}, {"Number", "N"}, {"Punctuation", "P"},
        {"Symbol", "S"}, {"Separator", "Z"}, {"Other", "C"}};
    for (const auto& ln : kLongNames) if (name == ln[0]) name = ln[1];
    item->negated = negated;
    if (name.size() == 1 && std::string_view("LMNPSZC").find(name[0]) != std::string_view::npos) {
      item->kind = ClassItem::Kind::kMajor;
      item->value = name[0];
      return true;
    }
    static const char* const kCategoryNames[] = {
        "Cn", "Lu", "Ll", "Lt", "Lm", "Lo", "Mn", "Mc", "Me", "Nd", "Nl", "No", "Pc", "Pd", "Ps",
        "Pe", "Pi", "Pf", "Po", "Sm", "Sc", "Sk", "So", "Zs", "Zl", "Zp", "Cc", "Cf", "Cs", "Co"};
    for (int i = 0; i < static_cast<int>(std::size(kCategoryNames)); ++i) {
      if (name == kCategoryNames[i]) {
        item->kind = ClassItem::Kind::kCategory;
        item->value = i;
        return true;
      }
    }
    return false;
  }

  // Parses an escape (after '\') that denotes a set or a single character. Returns true and
  // fills `item` for a set, or fills `*ch` for a character. Anchors are handled by the caller.
  bool parse_escape(ClassItem* item, char32_t* ch, bool* is_set) {
    if (at_end()) { error("trailing backslash"); return false; }
    const char32_t c = peek();
    ++pos_;
    *is_set = true;
    switch (c) {
      case 's': item->kind = ClassItem::Kind::kSpace; return true;
      case 'S': item->kind = ClassItem::Kind::kSpace; item->negated = true; return true;
      case 'd': item->kind = ClassItem::Kind::kDigit; return true;
      case 'D': item->kind = ClassItem::Kind::kDigit; item->negated = true; return true;
      case 'w': item->kind = ClassItem::Kind::kWord; return true;
      case 'W': item->kind = ClassItem::Kind::kWord; item->negated = true; return true;
      case 'p': case 'P':
        if (!parse_property(c == 'P', item)) { error("unsupported Unicode property"); return false; }
        return true;
      default: break;
    }
    *is_set = false;
    switch (c) {
      case 'r': *ch = '\r'; return true;
      case 'n': *ch = '\n'; return true;
      case 't': *ch = '\t'; return true;
      case 'f': *ch = '\f'; return true;
      case 'v': *ch = '\v'; return true;
      case 'e': *ch = 0x1B; return true;
      case 'a': *ch = 0x07; return true;
      case '0': *ch = 0; return true;
      case 'x':
        if (!parse_hex(2, ch)) { error("bad \\x escape"); return false; }
        return true;
      case 'u':
        if (!parse_hex(4, ch)) { error("bad \\u escape"); return false; }
        return true;
      default:
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '1' && c <= '9')) {
          error("unsupported escape");
          return false;
        }
        *ch = c;  // an escaped punctuation character stands for itself
        return true;
    }
  }

  std::unique_ptr<Node> parse_escape_atom() {
    const char32_t c = peek();
    Op anchor = Op::kMatch;
    if (c == 'A') anchor = Op::kTextBegin;
    else if (c == 'z') anchor = Op::kTextEnd;
    else if (c == 'Z') anchor = Op::kTextEndNewline;
    if (anchor != Op::kMatch) {
      ++pos_;
      auto n = make(Node::Kind::kAssert);
      n->assert_op = anchor;
      return n;
    }
    ClassItem item;
    char32_t ch = 0;
    bool is_set = false;
    if (!parse_escape(&item, &ch, &is_set)) return nullptr;
    if (is_set) {
      auto n = make(Node::Kind::kClass);
      TokenizerRegex::CharClass cls;
      cls.icase = icase_;
      cls.items.push_back(item);
      n->class_index = add_class(std::move(cls));
      return n;
    }
    auto n = make(Node::Kind::kChar);
    n->ch = ch;
    n->icase = icase_;
    return n;
  }

  // After '['; consumes through the closing ']'.
  void parse_class_body(TokenizerRegex::CharClass& cls) {
    if (peek() == '^') {
      cls.negated = true;
      ++pos_;
    }
    bool first = true;
    while (status_.ok()) {
      if (at_end()) { error("unterminated character class"); return; }
      char32_t c = peek();
      if (c == ']' && !first) { ++pos_; return; }
      first = false;
      if (c == '[') { error("nested character classes are not supported"); return; }
      ++pos_;
      char32_t lo = c;
      if (c == '\\') {
        ClassItem item;
        bool is_set = false;
        if (!parse_escape(&item, &lo, &is_set)) return;
        if (is_set) {
          cls.items.push_back(item);
          continue;
        }
      }
      char32_t hi = lo;
      if (peek() == '-' && peek(1) != ']' && pos_ + 1 < cps_.size()) {
        ++pos_;
        hi = peek();
        ++pos_;
        if (hi == '\\') {
          ClassItem item;
          bool is_set = false;
          if (!parse_escape(&item, &hi, &is_set)) return;
          if (is_set) { error("range ending in a set"); return; }
        }
        if (hi < lo) { error("reversed range"); return; }
      }
      ClassItem range;
      range.kind = ClassItem::Kind::kRange;
      range.lo = lo;
      range.hi = hi;
      cls.items.push_back(range);
    }
  }

  int add_class(TokenizerRegex::CharClass cls) {
    out_.classes_.push_back(std::move(cls));
    return static_cast<int>(out_.classes_.size()) - 1;
  }

  int emit(Inst inst) {
    out_.program_.push_back(inst);
    return static_cast<int>(out_.program_.size()) - 1;
  }
  int next_pc() const { return static_cast<int>(out_.program_.size()); }

  void emit_node(const Node& n) {
    if (out_.program_.size() > 200000) { error("pattern too large"); return; }
    switch (n.kind) {
      case Node::Kind::kEmpty:
        return;
      case Node::Kind::kChar:
        emit(Inst{.op = Op::kChar, .ch = n.icase ? ascii_fold(n.ch) : n.ch, .icase = n.icase});
        return;
      case Node::Kind::kClass:
        emit(Inst{.op = Op::kClass, .x = n.class_index});
        return;
      case Node::Kind::kAny:
        emit(Inst{.op = Op::kAny});
        return;
      case Node::Kind::kAssert:
        emit(Inst{.op = n.assert_op});
        return;
      case Node::Kind::kConcat:
        for (const auto& c : n.children) emit_node(*c);
        return;
      case Node::Kind::kAlt: {
        // Split(a, next) a Jmp(end) Split(b, next) b Jmp(end) ... last
        std::vector<int> jumps;
        for (std::size_t i = 0; i < n.children.size(); ++i) {
          if (i + 1 < n.children.size()) {
            const int split = emit(Inst{.op = Op::kSplit});
            out_.program_[split].x = next_pc();
            emit_node(*n.children[i]);
            jumps.push_back(emit(Inst{.op = Op::kJmp}));
            out_.program_[split].y = next_pc();
          } else {
            emit_node(*n.children[i]);
          }
        }
        for (int j : jumps) out_.program_[j].x = next_pc();
        return;
      }
      case Node::Kind::kLook: {
        const int look = emit(Inst{.op = Op::kLook, .negate = n.negate});
        out_.program_[look].x = next_pc();
        emit_node(*n.children[0]);
        emit(Inst{.op = Op::kMatch});
        out_.program_[look].y = next_pc();
        return;
      }
      case Node::Kind::kRepeat: {
        const Node& child = *n.children[0];
        for (int i = 0; i < n.min; ++i) emit_node(child);
        auto split_to = [&](int split, int body, int exit) {
          out_.program_[split].x = n.greedy ? body : exit;
          out_.program_[split].y = n.greedy ? exit : body;
        };
        if (n.max == kInfinite) {
          const int split = emit(Inst{.op = Op::kSplit});
          emit_node(child);
          emit(Inst{.op = Op::kJmp, .x = split});
          split_to(split, split + 1, next_pc());
        } else {
          std::vector<int> splits;
          for (int i = n.min; i < n.max; ++i) {
            splits.push_back(emit(Inst{.op = Op::kSplit}));
            emit_node(child);
          }
          for (int s : splits) split_to(s, s + 1, next_pc());
        }
        return;
      }
    }
  }

  std::vector<char32_t> cps_;
  std::size_t pos_ = 0;
  bool icase_ = false;
  Status status_;
  TokenizerRegex& out_;
};

StatusOr<TokenizerRegex> TokenizerRegex::compile(std::string_view pattern) {
  TokenizerRegex re;
  re.pattern_ = std::string(pattern);
  if (!unicode::is_valid_utf8(pattern)) return invalid_argument("regex is not valid UTF-8");
  RegexCompiler compiler(pattern, re);
  KUN_RETURN_IF_ERROR(compiler.compile());
  return re;
}

bool TokenizerRegex::class_matches(const CharClass& cls, char32_t cp) const {
  auto item_matches = [](const ClassItem& item, char32_t c) {
    bool m = false;
    switch (item.kind) {
      case ClassItem::Kind::kRange: m = c >= item.lo && c <= item.hi; break;
      case ClassItem::Kind::kMajor:
        m = unicode::major_class(unicode::general_category(c)) == static_cast<char>(item.value);
        break;
      case ClassItem::Kind::kCategory:
        m = static_cast<int>(unicode::general_category(c)) == item.value;
        break;
      case ClassItem::Kind::kSpace: m = unicode::is_white_space(c); break;
      case ClassItem::Kind::kDigit:
        m = unicode::general_category(c) == unicode::Category::kNd;
        break;
      case ClassItem::Kind::kWord: {
        const char major = unicode::major_class(unicode::general_category(c));
        m = major == 'L' || major == 'M' || unicode::general_category(c) == unicode::Category::kNd ||
            unicode::general_category(c) == unicode::Category::kPc;
        break;
      }
    }
    return m != item.negated;
  };
  auto any = [&](char32_t c) {
    for (const auto& item : cls.items) {
      if (item_matches(item, c)) return true;
    }
    return false;
  };
  bool m = any(cp);
  if (!m && cls.icase && cp < 0x80) {
    if (cp >= 'a' && cp <= 'z') m = any(cp - ('a' - 'A'));
    else if (cp >= 'A' && cp <= 'Z') m = any(cp + ('a' - 'A'));
  }
  return m != cls.negated;
}

bool TokenizerRegex::run(int start_pc, std::size_t start_pos, std::span<const char32_t> text,
                         std::size_t* end) const {
  std::vector<std::pair<int, std::size_t>> stack;
  stack.emplace_back(start_pc, start_pos);
  const std::size_t n = text.size();
  while (!stack.empty()) {
    auto [pc, pos] = stack.back();
    stack.pop_back();
    for (;;) {
      const Inst& in = program_[static_cast<std::size_t>(pc)];
      bool ok = true;
      switch (in.op) {
        case Op::kChar:
          ok = pos < n && (in.icase ? ascii_fold(text[pos]) == in.ch : text[pos] == in.ch);
          if (ok) { ++pos; ++pc; }
          break;
        case Op::kClass:
          ok = pos < n && class_matches(classes_[static_cast<std::size_t>(in.x)], text[pos]);
          if (ok) { ++pos; ++pc; }
          break;
        case Op::kAny:
          ok = pos < n && text[pos] != '\n';
          if (ok) { ++pos; ++pc; }
          break;
        case Op::kSplit:
          stack.emplace_back(in.y, pos);
          pc = in.x;
          break;
        case Op::kJmp:
          pc = in.x;
          break;
        case Op::kLook: {
          std::size_t ignored = 0;
          ok = run(in.x, pos, text, &ignored) != in.negate;
          pc = in.y;
          break;
        }
        case Op::kLineBegin: ok = pos == 0 || text[pos - 1] == '\n'; ++pc; break;
        case Op::kLineEnd: ok = pos == n || text[pos] == '\n'; ++pc; break;
        case Op::kTextBegin: ok = pos == 0; ++pc; break;
        case Op::kTextEnd: ok = pos == n; ++pc; break;
        case Op::kTextEndNewline: ok = pos == n || (pos + 1 == n && text[pos] == '\n'); ++pc; break;
        case Op::kMatch:
          *end = pos;
          return true;
      }
      if (!ok) break;
    }
  }
  return false;
}

bool TokenizerRegex::find(std::span<const char32_t> text, std::size_t from, std::size_t* begin,
                          std::size_t* end) const {
  for (std::size_t start = from; start <= text.size(); ++start) {
    if (run(0, start, text, end)) {
      *begin = start;
      return true;
    }
  }
  return false;
}

std::vector<std::pair<std::size_t, std::size_t>> TokenizerRegex::find_all(
    std::span<const char32_t> text) const {
  std::vector<std::pair<std::size_t, std::size_t>> out;
  std::size_t from = 0;
  while (from <= text.size()) {
    std::size_t b = 0, e = 0;
    if (!find(text, from, &b, &e)) break;
    if (e == b) {
      // Empty matches produce no piece; move on by one code point.
      from = b + 1;
      continue;
    }
    out.emplace_back(b, e);
    from = e;
  }
  return out;
}

}  // namespace kun::model
