// The kernel's output buffers, kept for reuse.
//
// An output of the size of q (32 MiB for 16k tokens, 8 heads of 64 in float32) is above glibc's
// mmap threshold: each call would map fresh pages, fault each one in (the OS zeroing it), and unmap
// them when the tensor dies. On a training step's outputs (out, dq, dk, dv) that page work took
// 16-46% of the kernel's time at 16k tokens (docs/architecture.md). Buffers of at least
// ``kPooledBytes`` are therefore mapped here and, when their tensor dies, kept for the next request
// of the same size, with their pages resident; past a limit of idle bytes the buffers idle longest
// are unmapped (so that a run whose shapes change keeps the sizes it uses now). A new buffer's pages
// come from the OS zero-filled, which the caller may use to skip clearing it (``fresh``).
//
// The limit: ``MULTIHEAD_NATIVE_POOL_MIB`` (read once; 0 turns the pool off), else an eighth of
// the machine's memory, at most 4 GiB. ``release_pool`` unmaps the idle buffers. Built with
// AddressSanitizer, the pool is off, so that the sanitizer's checks cover the outputs.
#include <torch/extension.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <iterator>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

namespace multihead_native {
namespace {

constexpr int64_t kPooledBytes = int64_t(1) << 20;  // smaller tensors come from malloc's own heap
constexpr int64_t kGranule = int64_t(64) << 10;     // sizes are rounded up to this

struct Block {
  void* base;
  int64_t bytes;
};

class Pool {
 public:
  Pool() : limit_(limit_from_environment()) {}

  bool on() const { return limit_ > 0; }
  int64_t limit() const { return limit_; }

  // A buffer of ``bytes`` (a multiple of kGranule), the last one of that size to come back;
  // ``fresh``: its pages were just mapped (zeros)
  Block* take(int64_t bytes, bool* fresh) {
    {
      std::lock_guard<std::mutex> hold(mu_);
      for (auto it = idle_.rbegin(); it != idle_.rend(); ++it)
        if ((*it)->bytes == bytes) {
          Block* b = *it;
          idle_.erase(std::next(it).base());
          idle_bytes_ -= bytes;
          *fresh = false;
          return b;
        }
    }
    void* base = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "native kernel: could not map ", bytes, " bytes for an output");
    *fresh = true;
    return new Block{base, bytes};
  }

  // A dead tensor's buffer: kept, and the buffers idle longest unmapped while over the limit
  void give_back(Block* b) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> hold(mu_);
      idle_.push_back(b);
      idle_bytes_ += b->bytes;
      size_t n = 0;
      while (idle_bytes_ > limit_) idle_bytes_ -= idle_[n]->bytes, evicted.push_back(idle_[n++]);
      idle_.erase(idle_.begin(), idle_.begin() + n);
    }
    for (Block* e : evicted) unmap(e);
  }

  int64_t release() {
    std::vector<Block*> blocks;
    {
      std::lock_guard<std::mutex> hold(mu_);
      blocks.swap(idle_);
      idle_bytes_ = 0;
    }
    int64_t freed = 0;
    for (Block* b : blocks) freed += b->bytes, unmap(b);
    return freed;
  }

  int64_t idle_bytes() {
    std::lock_guard<std::mutex> hold(mu_);
    return idle_bytes_;
  }

 private:
  static void unmap(Block* b) {
    munmap(b->base, b->bytes);
    delete b;
  }

  static int64_t limit_from_environment() {
#if defined(__SANITIZE_ADDRESS__)
    return 0;
#else
    if (const char* mib = std::getenv("MULTIHEAD_NATIVE_POOL_MIB")) {
      char* end = nullptr;
      const long long v = std::strtoll(mib, &end, 10);
      TORCH_CHECK(end != mib && *end == '\0' && v >= 0,
                  "MULTIHEAD_NATIVE_POOL_MIB must be a whole number of MiB (0: no pool), not '", mib, "'");
      return int64_t(v) << 20;
    }
    const int64_t memory = int64_t(sysconf(_SC_PHYS_PAGES)) * int64_t(sysconf(_SC_PAGESIZE));
    return std::min<int64_t>(memory > 0 ? memory / 8 : 0, int64_t(4) << 30);
#endif
  }

  const int64_t limit_;
  std::mutex mu_;
  std::vector<Block*> idle_;  // in the order they came back
  int64_t idle_bytes_ = 0;
};

// Never destroyed: a tensor that outlives the interpreter's teardown still hands its buffer back
Pool& pool() {
  static Pool* p = new Pool();
  return *p;
}

void hand_back(void* ctx) { pool().give_back(static_cast<Block*>(ctx)); }

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options, bool* fresh) {
  *fresh = false;
  const int64_t bytes = c10::multiply_integers(sizes) * int64_t(options.dtype().itemsize());
  if (!pool().on() || bytes < kPooledBytes) return at::empty(sizes, options);
  Block* b = pool().take((bytes + kGranule - 1) / kGranule * kGranule, fresh);
  // resizable through the default allocator: a resize_ past its size moves it off the pool
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes,
                       c10::DataPtr(b->base, b, &hand_back, c10::Device(c10::kCPU)), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  return at::empty({0}, options).set_(storage, 0, sizes);  // no strides: contiguous
}

int64_t release_pool() { return pool().release(); }

int64_t pool_idle_bytes() { return pool().idle_bytes(); }

int64_t pool_limit_bytes() { return pool().limit(); }

}  // namespace multihead_native
