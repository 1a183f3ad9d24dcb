// Byte-level BPE encoding (tokenizers/bpe.py) in C++: the split patterns of real tokenizers,
// a piece cache and the merge loop, for a whole text in one call; and SentencePiece's merge
// loop (tokenizers/sentencepiece.py), for all the chunks of a text in one call.
//
// Why: in Python the regex split alone runs at ~18 MB/s and every piece then costs a dict
// lookup and a list extend; one call per text (not per piece) keeps the op's few microseconds
// of overhead out of the loop. tokenizers/bpe.py holds the written-out reference: every rule
// here (pattern alternatives, leftmost-first ties, the rounds for long pieces) mirrors a line
// there, and tests/test_tokenizer_native.py checks the two give the same ids.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace {

// Unicode classes, one byte per code point, computed by Python's `regex` module itself so
// \p{L}, \p{N} and \s mean here exactly what they mean in the reference's patterns.
constexpr uint8_t kLetter = 1, kNumber = 2, kSpace = 4;

// The split patterns bpe.py runs without a time limit (its KNOWN_PATTERNS), by number.
enum Pattern : int64_t { kGpt2 = 0, kLlama3 = 1, kEachNumber = 2, kNumberRun = 3, kNumbers3 = 4 };

constexpr int32_t kNoRank = INT32_MAX;
constexpr size_t kLongPiece = 4096;  // bpe.py _LONG_PIECE: merge in rounds above this
constexpr size_t kShortPiece = 64;   // tokens; a piece this short merges without a heap
constexpr size_t kBucketPiece = 1 << 16;  // tokens; a piece this long merges from buckets
constexpr size_t kCacheMaxEntries = 1 << 18;  // ~25 MB; the 5 MB test corpus has ~160k
constexpr size_t kCacheMaxBytes = 1024;  // ~bpe.py's 256 characters; longer pieces are rare

// The merge table: (left id, right id) -> (rank, merged id), open addressing.
class PairTable {
 public:
  PairTable(const int64_t* left, const int64_t* right, const int64_t* rank, const int64_t* merged,
            int64_t n) {
    size_t capacity = 16;
    while (capacity < 2 * static_cast<size_t>(n)) capacity *= 2;
    mask_ = capacity - 1;
    slots_.assign(capacity, Slot{kEmpty, kNoRank, -1});
    for (int64_t i = 0; i < n; i++) {
      uint64_t key = Key(left[i], right[i]);
      size_t at = Hash(key);
      while (slots_[at].key != kEmpty && slots_[at].key != key) at = (at + 1) & mask_;
      size_ += slots_[at].key == kEmpty;
      slots_[at] = Slot{key, static_cast<int32_t>(rank[i]), static_cast<int32_t>(merged[i])};
    }
  }

  size_t size() const { return size_; }

  // (rank, merged id) of a pair, or (kNoRank, -1).
  std::pair<int32_t, int32_t> Find(int32_t left, int32_t right) const {
    uint64_t key = Key(left, right);
    for (size_t at = Hash(key);; at = (at + 1) & mask_) {
      const Slot& s = slots_[at];
      if (s.key == key) return {s.rank, s.merged};
      if (s.key == kEmpty) return {kNoRank, -1};
    }
  }

 private:
  struct Slot {
    uint64_t key;
    int32_t rank, merged;
  };
  static constexpr uint64_t kEmpty = ~0ull;
  static uint64_t Key(int64_t left, int64_t right) {
    return (static_cast<uint64_t>(left) << 32) | static_cast<uint32_t>(right);
  }
  size_t Hash(uint64_t key) const { return (key * 0x9E3779B97F4A7C15ull >> 20) & mask_; }
  std::vector<Slot> slots_;
  size_t mask_, size_ = 0;
};

// The code point at p[i] (valid UTF-8: Python encoded it) and its length in bytes.
inline uint32_t Decode(const uint8_t* p, int64_t i, int* len) {
  uint8_t b = p[i];
  if (b < 0x80) return *len = 1, b;
  if (b < 0xE0) return *len = 2, ((b & 0x1Fu) << 6) | (p[i + 1] & 0x3Fu);
  if (b < 0xF0) return *len = 3, ((b & 0x0Fu) << 12) | ((p[i + 1] & 0x3Fu) << 6) | (p[i + 2] & 0x3Fu);
  *len = 4;
  return ((b & 0x07u) << 18) | ((p[i + 1] & 0x3Fu) << 12) | ((p[i + 2] & 0x3Fu) << 6) |
         (p[i + 3] & 0x3Fu);
}

// A text being split: byte offsets, the end of the current chunk, and class lookups.
struct Scan {
  const uint8_t* p;
  int64_t end;
  const uint8_t* classes;

  uint8_t ClassAt(int64_t i) const {
    int len;
    return classes[Decode(p, i, &len)];
  }
  int64_t Next(int64_t i) const {
    int len;
    Decode(p, i, &len);
    return i + len;
  }
  int64_t Previous(int64_t i) const {  // the start of the character before byte i
    do i--;
    while ((p[i] & 0xC0) == 0x80);
    return i;
  }
  // Past the run of characters from i whose class satisfies `keep` (0 bits = neither L, N, S).
  template <typename Keep>
  int64_t Run(int64_t i, Keep keep) const {
    while (i < end && keep(ClassAt(i))) i = Next(i);
    return i;
  }
};

bool IsLetter(uint8_t c) { return c & kLetter; }
bool IsNumber(uint8_t c) { return c & kNumber; }
bool IsSpace(uint8_t c) { return c & kSpace; }
bool IsOther(uint8_t c) { return c == 0; }  // [^\s\p{L}\p{N}]

// \s+(?!\S)|\s+ from i (a space): the run, less its last character where a non-space follows
// (that one joins the next piece: " word").
int64_t Spaces(const Scan& s, int64_t i) {
  int64_t j = s.Run(i, IsSpace);
  if (j == s.end) return j;
  int64_t before = s.Previous(j);
  return before > i ? before : j;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ (GPT2_PATTERN)
int64_t Gpt2Match(const Scan& s, int64_t i) {
  const uint8_t* p = s.p;
  if (p[i] == '\'' && i + 1 < s.end) {
    uint8_t a = p[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if (i + 2 < s.end) {
      uint8_t b = p[i + 2];
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
  }
  int64_t at = i;
  if (p[i] == ' ' && i + 1 < s.end) at = i + 1;  // " ?" before a letter, number or other
  uint8_t c = s.ClassAt(at);
  if (IsLetter(c)) return s.Run(at, IsLetter);
  if (IsNumber(c)) return s.Run(at, IsNumber);
  if (IsOther(c)) return s.Run(at, IsOther);
  return Spaces(s, i);
}

// Llama 3's (?i:'s) also matches U+017F (ſ), which case-folds to s: the `regex` module's rule.
bool FoldsTo(const uint8_t* p, int64_t i, int64_t end, char lower, int* len) {
  if (i >= end) return false;
  uint32_t c = Decode(p, i, len);
  return c == static_cast<uint32_t>(lower) || c == static_cast<uint32_t>(lower - 32) ||
         (lower == 's' && c == 0x17F);
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*
// |\s*[\r\n]+|\s+(?!\S)|\s+ (LLAMA3_PATTERN)
int64_t Llama3Match(const Scan& s, int64_t i) {
  const uint8_t* p = s.p;
  int a, b;
  if (p[i] == '\'') {
    for (char one : {'s', 't', 'm', 'd'})
      if (FoldsTo(p, i + 1, s.end, one, &a)) return i + 1 + a;
    for (const char* two : {"re", "ve", "ll"})
      if (FoldsTo(p, i + 1, s.end, two[0], &a) && FoldsTo(p, i + 1 + a, s.end, two[1], &b))
        return i + 1 + a + b;
  }
  uint8_t c = s.ClassAt(i);
  int64_t next = s.Next(i);
  bool line = p[i] == '\r' || p[i] == '\n';
  if (!line && !IsLetter(c) && !IsNumber(c) && next < s.end && IsLetter(s.ClassAt(next)))
    return s.Run(next, IsLetter);
  if (IsLetter(c)) return s.Run(i, IsLetter);
  if (IsNumber(c)) {
    int64_t j = i;
    for (int k = 0; k < 3 && j < s.end && IsNumber(s.ClassAt(j)); k++) j = s.Next(j);
    return j;
  }
  int64_t at = p[i] == ' ' && next < s.end && IsOther(s.ClassAt(next)) ? next : i;
  if (IsOther(s.ClassAt(at))) {
    int64_t j = s.Run(at, IsOther);
    while (j < s.end && (p[j] == '\r' || p[j] == '\n')) j++;
    return j;
  }
  // \s*[\r\n]+: the spaces up to and including the last line break among them
  int64_t j = s.Run(i, IsSpace);
  for (int64_t k = j - 1; k >= i; k--)
    if (p[k] == '\r' || p[k] == '\n') return k + 1;
  return Spaces(s, i);
}

// \p{N}, \p{N}+ and \p{N}{1,3} with the gaps between their matches (HF's Split "isolated").
int64_t NumberMatch(const Scan& s, int64_t i, int64_t pattern) {
  if (!IsNumber(s.ClassAt(i))) return s.Run(i, [](uint8_t c) { return !IsNumber(c); });
  if (pattern == kNumberRun) return s.Run(i, IsNumber);
  int64_t j = s.Next(i);
  for (int k = 1; pattern == kNumbers3 && k < 3 && j < s.end && IsNumber(s.ClassAt(j)); k++)
    j = s.Next(j);
  return j;
}

struct Hash {  // lets a std::string map be searched with a string_view
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <typename Value>
using StringMap = std::unordered_map<std::string, Value, Hash, std::equal_to<>>;

// The ids of pieces seen before (pieces repeat like words): bpe.py `encode_cached`, cleared
// when full so memory stays bounded. A piece's ids are pool_[at, at + count).
class PieceCache {
 public:
  // Appends the ids of `piece` to `out` if cached.
  bool Get(std::string_view piece, std::vector<int32_t>& out) const {
    auto hit = map_.find(piece);
    if (hit == map_.end()) return false;
    auto [at, count] = hit->second;
    out.insert(out.end(), pool_.begin() + at, pool_.begin() + at + count);
    return true;
  }
  // Keeps out[start, end) as the ids of `piece`.
  void Put(std::string_view piece, const std::vector<int32_t>& out, size_t start) {
    if (piece.size() > kCacheMaxBytes) return;
    if (map_.size() >= kCacheMaxEntries) map_.clear(), pool_.clear();
    map_.emplace(std::string(piece), std::pair<size_t, size_t>(pool_.size(), out.size() - start));
    pool_.insert(pool_.end(), out.begin() + start, out.end());
  }

 private:
  StringMap<std::pair<size_t, size_t>> map_;
  std::vector<int32_t> pool_;
};

// n values of T, on 2 MB pages where the kernel allows them (transparent huge pages in
// "madvise" mode) once they fill one: a long piece's merges jump between nodes far apart,
// and on 4 KB pages nearly every jump misses the TLB (10 MB of letters: ~8% faster on an
// Intel Xeon, A/B in turns). Uninitialised, as malloc's.
template <typename T>
std::unique_ptr<T[], void (*)(void*)> PageArray(size_t n) {
  constexpr size_t kHugePage = 2 << 20;
  size_t bytes = std::max<size_t>(n * sizeof(T), 1);
  void* p = nullptr;
  if (bytes < kHugePage) {
    p = std::malloc(bytes);
  } else {
    bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    p = std::aligned_alloc(kHugePage, bytes);
#ifdef MADV_HUGEPAGE
    if (p != nullptr) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  }
  if (p == nullptr) throw std::bad_alloc();
  return {static_cast<T*>(p), std::free};
}

at::Tensor ToTensor(const std::vector<int32_t>& ids) {
  at::Tensor t = at::empty({static_cast<int64_t>(ids.size())}, at::kInt);
  std::memcpy(t.data_ptr<int32_t>(), ids.data(), ids.size() * sizeof(int32_t));
  return t;
}

// Calls piece(start, stop) for each of `lengths` (characters) one after another in `p`.
template <typename Piece>
void ForEachPiece(const uint8_t* p, const at::Tensor& lengths, Piece piece) {
  const int64_t* n = lengths.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t k = 0; k < lengths.numel(); k++) {
    int64_t stop = start;
    for (int64_t c = 0; c < n[k]; c++) {
      int len;
      Decode(p, stop, &len);
      stop += len;
    }
    piece(start, stop);
    start = stop;
  }
}

class BytePairEncoder : public torch::CustomClassHolder {
 public:
  // merges: [n, 4] rows of (left id, right id, rank, merged id); byte_ids: [256], -1 where a
  // byte has no token; classes: [0x110000] (see above); patterns: the split, in order;
  // whole_*: for `ignore_merges`, each token's bytes (concatenated, offsets) and id.
  BytePairEncoder(at::Tensor merges, at::Tensor byte_ids, at::Tensor classes, at::Tensor patterns,
                  at::Tensor whole_bytes, at::Tensor whole_offsets, at::Tensor whole_ids)
      : table_(merges.select(1, 0).contiguous().data_ptr<int64_t>(),
               merges.select(1, 1).contiguous().data_ptr<int64_t>(),
               merges.select(1, 2).contiguous().data_ptr<int64_t>(),
               merges.select(1, 3).contiguous().data_ptr<int64_t>(), merges.size(0)),
        classes_(classes.contiguous()),
        patterns_(patterns.data_ptr<int64_t>(), patterns.data_ptr<int64_t>() + patterns.numel()) {
    for (int b = 0; b < 256; b++) byte_ids_[b] = static_cast<int32_t>(byte_ids[b].item<int64_t>());
    const char* bytes = reinterpret_cast<const char*>(whole_bytes.data_ptr<uint8_t>());
    const int64_t* offsets = whole_offsets.data_ptr<int64_t>();
    const int64_t* ids = whole_ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < whole_ids.numel(); i++)  // a later token wins, as in the dict
      whole_[std::string(bytes + offsets[i], offsets[i + 1] - offsets[i])] = ids[i];
  }

  // The ids of a whole text, split by the patterns here.
  at::Tensor encode(at::Tensor text) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<int32_t> out;
    const uint8_t* p = text.data_ptr<uint8_t>();
    Split(p, 0, text.numel(), 0, out);
    return ToTensor(out);
  }

  // The ids of pieces split in Python: text's bytes, and each piece's length in characters.
  at::Tensor merge(at::Tensor text, at::Tensor lengths) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<int32_t> out;
    const uint8_t* p = text.data_ptr<uint8_t>();
    ForEachPiece(p, lengths, [&](int64_t start, int64_t stop) { Piece(p + start, stop - start, out); });
    return ToTensor(out);
  }

 private:

  // bpe.py `_pieces`: pattern `level` splits [start, stop); each piece goes to the next
  // pattern, except a piece of one character, which no pattern splits further.
  void Split(const uint8_t* p, int64_t start, int64_t stop, size_t level,
             std::vector<int32_t>& out) {
    if (level == patterns_.size()) return Piece(p + start, stop - start, out);
    Scan s{p, stop, classes_.data_ptr<uint8_t>()};
    int64_t pattern = patterns_[level];
    for (int64_t i = start; i < stop;) {
      int64_t j = pattern == kGpt2     ? Gpt2Match(s, i)
                  : pattern == kLlama3 ? Llama3Match(s, i)
                                       : NumberMatch(s, i, pattern);
      if (s.Next(i) == j)
        Piece(p + i, j - i, out);
      else
        Split(p, i, j, level + 1, out);
      i = j;
    }
  }

  // bpe.py `_encode_text`: the cache around `_encode_piece`.
  void Piece(const uint8_t* data, int64_t n, std::vector<int32_t>& out) {
    if (n == 1 && whole_.empty()) {
      if (byte_ids_[data[0]] >= 0) out.push_back(byte_ids_[data[0]]);
      return;
    }
    std::string_view key(reinterpret_cast<const char*>(data), n);
    if (cache_.Get(key, out)) return;
    size_t start = out.size();
    EncodePiece(key, out);
    cache_.Put(key, out, start);
  }

  // bpe.py `_encode_piece`: a whole token (ignore_merges), else bytes -> rounds -> merges,
  // appended to `out`.
  void EncodePiece(std::string_view piece, std::vector<int32_t>& out) {
    if (!whole_.empty())
      if (auto hit = whole_.find(piece); hit != whole_.end()) return out.push_back(hit->second);
    size_t start = out.size();
    for (unsigned char b : piece)
      if (byte_ids_[b] >= 0) out.push_back(byte_ids_[b]);  // bytes without a token dropped
    size_t n = out.size() - start;
    if (n <= kShortPiece) return MergeShort(out.data() + start, n, out);
    std::vector<int32_t> ids(out.begin() + start, out.end());
    out.resize(start);
    std::vector<int32_t> ranks;  // each adjacent pair's rank, as the last round found them
    if (ids.size() > kLongPiece) Rounds(ids, ranks);
    Merge(ids, ranks);
    out.insert(out.end(), ids.begin(), ids.end());
  }

  // `Merge` for a short piece, without a heap: merge the lowest-ranked pair, leftmost on
  // ties, until none is left (the same order the heap pops them in); ids[0, n) end `out`.
  void MergeShort(int32_t* ids, size_t n, std::vector<int32_t>& out) const {
    int32_t rank[kShortPiece];
    for (size_t i = 0; i + 1 < n; i++) rank[i] = table_.Find(ids[i], ids[i + 1]).first;
    while (n > 1) {
      size_t at = 0;
      for (size_t i = 1; i + 1 < n; i++)
        if (rank[i] < rank[at]) at = i;
      if (rank[at] == kNoRank) break;
      ids[at] = table_.Find(ids[at], ids[at + 1]).second;
      std::memmove(ids + at + 1, ids + at + 2, (n - at - 2) * sizeof(int32_t));
      std::memmove(rank + at, rank + at + 1, (n - at - 2) * sizeof(int32_t));
      n--;
      if (at > 0) rank[at - 1] = table_.Find(ids[at - 1], ids[at]).first;
      if (at + 1 < n) rank[at] = table_.Find(ids[at], ids[at + 1]).first;
    }
    out.resize(ids + n - out.data());
  }

  // bpe.py `_merge_rounds`: while the piece is long and the lowest-ranked pair present occurs
  // at least once per 64 tokens, merge it everywhere at once, leftmost first on overlaps.
  // The last round's look-ups are left in `ranks` (those of the pairs of `a` as it ends), so
  // the merge that follows does not look every pair up again.
  void Rounds(std::vector<int32_t>& a, std::vector<int32_t>& ranks) const {
    while (a.size() > kLongPiece) {
      int32_t best = kNoRank, best_merged = -1, left = -1, right = -1;
      size_t hits = 0;
      std::pair<int32_t, int32_t> found{kNoRank, -1};
      ranks.resize(a.size() - 1);
      for (size_t i = 0; i + 1 < a.size(); i++) {
        if (i == 0 || a[i] != a[i - 1] || a[i + 1] != a[i])  // runs of one pair: look up once
          found = table_.Find(a[i], a[i + 1]);
        ranks[i] = found.first;
        if (found.first < best) {
          best = found.first, best_merged = found.second, hits = 0;
          left = a[i], right = a[i + 1];
        }
        hits += found.first == best;
      }
      if (best == kNoRank || hits * 64 < a.size()) return;
      size_t w = 0;
      for (size_t i = 0; i < a.size(); w++) {
        if (i + 1 < a.size() && a[i] == left && a[i + 1] == right) {
          a[w] = best_merged;
          i += 2;
        } else {
          a[w] = a[i++];
        }
      }
      a.resize(w);
      ranks.clear();  // stale: the pairs changed
    }
  }

  // bpe.py `_merge`: lowest rank first, leftmost first on ties, from a queue of (rank,
  // position) over a linked list; stale entries are skipped when popped. A heap, or for a
  // long piece buckets by rank (a heap of millions of pairs spends its time in cache misses).
  // `ranks`: each pair's rank if known (`Rounds`), else empty.
  void Merge(std::vector<int32_t>& ids, const std::vector<int32_t>& ranks) const {
    if (ids.size() >= kBucketPiece && table_.size() <= 8 * ids.size())
      MergeWith<BucketQueue>(ids, ranks);
    else
      MergeWith<HeapQueue>(ids, ranks);
  }

  template <typename Queue>
  void MergeWith(std::vector<int32_t>& ids, const std::vector<int32_t>& ranks) const {
    const int32_t n = static_cast<int32_t>(ids.size());
    Queue queue;
    bool any = false;
    for (int32_t i = 0; i + 1 < n; i++)
      if (int32_t rank = ranks.empty() ? table_.Find(ids[i], ids[i + 1]).first : ranks[i];
          rank != kNoRank)
        queue.Push(rank, i), any = true;
    if (!any) return;
    // a token and its live neighbours side by side: one cache line per merge, not three
    struct Node {
      int32_t id, next, previous;
    };
    auto nodes = PageArray<Node>(n);
    for (int32_t i = 0; i < n; i++) nodes[i] = Node{ids[i], i + 1, i - 1};
    auto push = [&](int32_t i, int32_t j) {
      if (int32_t rank = table_.Find(nodes[i].id, nodes[j].id).first; rank != kNoRank)
        queue.Push(rank, i);
    };
    int32_t rank, i;
    while (queue.Pop(rank, i)) {
      // subtle: a bucket's positions are known ahead, and its nodes lie far apart (a cache
      // and TLB miss each): fetching a few pops ahead halves the time of a 10 MB piece
      if (int32_t ahead = queue.Ahead(); ahead >= 0) __builtin_prefetch(&nodes[ahead]);
      Node& a = nodes[i];
      if (a.id < 0 || a.next >= n) continue;
      Node& b = nodes[a.next];
      auto [now, merged] = table_.Find(a.id, b.id);
      if (now != rank) continue;  // stale: the pair at i changed since it was pushed
      a.id = merged, b.id = -1;
      a.next = b.next;
      if (a.next < n) {
        nodes[a.next].previous = i;
        push(i, a.next);
      }
      if (a.previous >= 0) push(a.previous, i);
    }
    ids.clear();
    for (int32_t i = 0; i < n; i++)
      if (nodes[i].id >= 0) ids.push_back(nodes[i].id);
  }

  static uint64_t Key(int32_t rank, int32_t i) {
    return (static_cast<uint64_t>(rank) << 32) | static_cast<uint32_t>(i);
  }

  // A min-heap of (rank, position), packed in one integer.
  struct HeapQueue {
    std::vector<uint64_t> heap;
    bool heaped = false;  // the first pushes are heapified at once
    void Push(int32_t rank, int32_t i) {
      heap.push_back(Key(rank, i));
      if (heaped) std::push_heap(heap.begin(), heap.end(), std::greater<>());
    }
    bool Pop(int32_t& rank, int32_t& i) {
      if (!heaped) std::make_heap(heap.begin(), heap.end(), std::greater<>()), heaped = true;
      if (heap.empty()) return false;
      std::pop_heap(heap.begin(), heap.end(), std::greater<>());
      rank = static_cast<int32_t>(heap.back() >> 32), i = static_cast<int32_t>(heap.back());
      heap.pop_back();
      return true;
    }
    int32_t Ahead() const { return -1; }
  };

  // The same order from buckets of positions by rank, each sorted when its turn comes; what
  // is pushed at or below the bucket being drained waits in a small heap beside it.
  struct BucketQueue {
    std::vector<std::vector<int32_t>> buckets;
    HeapQueue urgent{{}, true};  // heaped from the start: its front is read before a pop
    size_t current = 0, next = 0;
    bool started = false;
    void Push(int32_t rank, int32_t i) {
      if (started && static_cast<size_t>(rank) <= current) return urgent.Push(rank, i);
      if (static_cast<size_t>(rank) >= buckets.size()) buckets.resize(rank + 1);
      buckets[rank].push_back(i);
    }
    bool Pop(int32_t& rank, int32_t& i) {
      for (;;) {
        bool have = started && current < buckets.size() && next < buckets[current].size();
        if (!urgent.heap.empty() &&
            (!have || urgent.heap.front() < Key(current, buckets[current][next])))
          return urgent.Pop(rank, i);
        if (have) {
          rank = static_cast<int32_t>(current), i = buckets[current][next++];
          return true;
        }
        if (started && current < buckets.size()) std::vector<int32_t>().swap(buckets[current++]);
        started = true, next = 0;
        while (current < buckets.size() && buckets[current].empty()) current++;
        if (current == buckets.size()) return false;
        std::sort(buckets[current].begin(), buckets[current].end());
      }
    }
    int32_t Ahead() const {  // a position some pops from now, or -1
      constexpr size_t kAhead = 16;
      if (current >= buckets.size() || next + kAhead >= buckets[current].size()) return -1;
      return buckets[current][next + kAhead];
    }
  };

  PairTable table_;
  at::Tensor classes_;
  std::vector<int64_t> patterns_;
  int32_t byte_ids_[256];
  StringMap<int32_t> whole_;
  PieceCache cache_;
  std::mutex mutex_;  // the cache is shared by every thread that encodes with this tokenizer
};

// Token text -> id by open addressing: a slot holds the text's hash beside the id, so a
// lookup is about one cache miss (a node-based map took three, and most of the merge time).
class TokenTable {
 public:
  TokenTable(const uint8_t* bytes, const int64_t* offsets, int64_t n)
      : bytes_(reinterpret_cast<const char*>(bytes), offsets[n]), offsets_(offsets, offsets + n + 1) {
    size_t capacity = 16;
    while (capacity < 2 * static_cast<size_t>(n)) capacity *= 2;
    mask_ = capacity - 1;
    slots_.assign(capacity, Slot{0, -1});
    for (int32_t id = 0; id < n; id++) {
      std::string_view text = Text(id);
      if (text.empty()) continue;  // a token UTF-8 cannot spell matches no text
      uint64_t hash = Hash(text);
      size_t at = hash & mask_;
      while (slots_[at].id >= 0) at = (at + 1) & mask_;
      slots_[at] = Slot{hash, id};
    }
  }

  // The id of the token spelled `text`, or -1.
  int32_t Find(std::string_view text) const {
    uint64_t hash = Hash(text);
    for (size_t at = hash & mask_;; at = (at + 1) & mask_) {
      const Slot& s = slots_[at];
      if (s.id < 0) return -1;
      if (s.hash == hash && Text(s.id) == text) return s.id;
    }
  }

 private:
  struct Slot {
    uint64_t hash;
    int32_t id;
  };
  static uint64_t Hash(std::string_view s) { return std::hash<std::string_view>{}(s); }
  std::string_view Text(int32_t id) const {
    return std::string_view(bytes_).substr(offsets_[id], offsets_[id + 1] - offsets_[id]);
  }
  std::string bytes_;
  std::vector<int64_t> offsets_;
  std::vector<Slot> slots_;
  size_t mask_;
};

// SentencePiece-style BPE (sentencepiece.py `_encode_chunk` and `_merge`): the symbols are
// the characters of ▁-escaped text, merged best priority first, leftmost first on ties;
// a symbol no token covers becomes one byte token per UTF-8 byte.
class SentencePieceEncoder : public torch::CustomClassHolder {
 public:
  // tokens, offsets: each token's UTF-8, concatenated; priorities: [n] the heap key of a
  // merge that makes token i (minus its score), or empty where merges: [m, 4] rows of (left
  // id, right id, rank, merged id) rank the pairs instead; byte_ids: [256], -1 for none.
  SentencePieceEncoder(at::Tensor tokens, at::Tensor offsets, at::Tensor priorities,
                       at::Tensor merges, at::Tensor byte_ids)
      : pairs_(merges.select(1, 0).contiguous().data_ptr<int64_t>(),
               merges.select(1, 1).contiguous().data_ptr<int64_t>(),
               merges.select(1, 2).contiguous().data_ptr<int64_t>(),
               merges.select(1, 3).contiguous().data_ptr<int64_t>(), merges.size(0)),
        priorities_(priorities.data_ptr<double>(),
                    priorities.data_ptr<double>() + priorities.numel()),
        by_text_(priorities.numel() > 0),
        ids_(tokens.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(), offsets.numel() - 1) {
    for (int b = 0; b < 256; b++) byte_ids_[b] = static_cast<int32_t>(byte_ids[b].item<int64_t>());
  }

  // The ids of chunks split in Python: the ▁-escaped text's bytes, each chunk's length in
  // characters, and the id of each chunk that is a literal token (empty), else -1.
  at::Tensor merge(at::Tensor text, at::Tensor lengths, at::Tensor fixed) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<int32_t> out;
    const uint8_t* p = text.data_ptr<uint8_t>();
    const int64_t* literal = fixed.data_ptr<int64_t>();
    int64_t k = 0;
    ForEachPiece(p, lengths, [&](int64_t start, int64_t stop) {
      if (int64_t id = literal[k++]; id >= 0) return out.push_back(static_cast<int32_t>(id));
      std::string_view chunk(reinterpret_cast<const char*>(p + start), stop - start);
      if (cache_.Get(chunk, out)) return;
      size_t first = out.size();
      Chunk(chunk, out);
      cache_.Put(chunk, out, first);
    });
    return ToTensor(out);
  }

 private:
  struct Symbol {
    int32_t start, size, next, previous, id;  // bytes of the chunk; id: for ranked pairs
  };
  struct Entry {  // sentencepiece.py's heap tuple (priority, left position, merged size)
    double priority;
    int32_t i, size;
    bool operator>(const Entry& o) const {
      return std::tie(priority, i, size) > std::tie(o.priority, o.i, o.size);
    }
  };

  int32_t Id(std::string_view text) const { return ids_.Find(text); }

  void Chunk(std::string_view chunk, std::vector<int32_t>& out) const {
    const uint8_t* p = reinterpret_cast<const uint8_t*>(chunk.data());
    std::vector<Symbol> symbols;
    for (int32_t i = 0, len; i < static_cast<int32_t>(chunk.size()); i += len) {
      Decode(p, i, &len);
      int32_t k = static_cast<int32_t>(symbols.size());
      symbols.push_back(Symbol{i, len, k + 1, k - 1, by_text_ ? -1 : Id(chunk.substr(i, len))});
    }
    const int32_t n = static_cast<int32_t>(symbols.size());
    std::vector<Entry> heap;
    std::greater<> later;
    // The entry of merging symbols a and b (adjacent, so their text is one run of the chunk)
    auto push = [&](int32_t a, int32_t b) {
      const Symbol &x = symbols[a], &y = symbols[b];
      double priority;
      if (by_text_) {
        int32_t id = Id(chunk.substr(x.start, x.size + y.size));
        if (id < 0) return;
        priority = priorities_[id];
      } else {
        if (x.id < 0 || y.id < 0) return;
        int32_t rank = pairs_.Find(x.id, y.id).first;
        if (rank == kNoRank) return;
        priority = rank;
      }
      heap.push_back(Entry{priority, a, x.size + y.size});
      std::push_heap(heap.begin(), heap.end(), later);
    };
    for (int32_t i = 0; i + 1 < n; i++) push(i, i + 1);
    while (!heap.empty()) {
      Entry e = heap.front();
      std::pop_heap(heap.begin(), heap.end(), later);
      heap.pop_back();
      Symbol& a = symbols[e.i];
      if (a.size == 0 || a.next >= n || a.size + symbols[a.next].size != e.size)
        continue;  // stale: a side merged since this pair was pushed
      Symbol& b = symbols[a.next];
      if (!by_text_) a.id = pairs_.Find(a.id, b.id).second;
      a.size += b.size, b.size = 0;
      a.next = b.next;
      if (a.next < n) {
        symbols[a.next].previous = e.i;
        push(e.i, a.next);
      }
      if (a.previous >= 0) push(a.previous, e.i);
    }
    for (const Symbol& s : symbols) {
      if (s.size == 0) continue;
      if (int32_t id = Id(chunk.substr(s.start, s.size)); id >= 0) {
        out.push_back(id);
        continue;
      }
      for (int32_t k = s.start; k < s.start + s.size; k++)  // byte fallback: <0xNN> tokens
        if (int32_t id = byte_ids_[p[k]]; id >= 0) out.push_back(id);
    }
  }

  PairTable pairs_;
  std::vector<double> priorities_;
  bool by_text_;
  TokenTable ids_;
  int32_t byte_ids_[256];
  PieceCache cache_;
  std::mutex mutex_;
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(tinyformers, m) {
  m.class_<BytePairEncoder>("BytePairEncoder")
      .def(torch::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                       at::Tensor>())
      .def("encode", &BytePairEncoder::encode)
      .def("merge", &BytePairEncoder::merge);
  m.class_<SentencePieceEncoder>("SentencePieceEncoder")
      .def(torch::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>())
      .def("merge", &SentencePieceEncoder::merge);
}
