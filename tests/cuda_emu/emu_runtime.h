// A checking CUDA execution model for the fused loss's kernels, run on the CPU (see
// docs/cuda_emulator.md). The threads of a block run as cooperative fibers on one OS thread; every
// barrier and warp operation is a rendezvous that checks CUDA's rules (same call site, lanes named in
// masks present and not exited) and a block that can make no progress is reported, never hung.
// Errors surface the way the real build sees them: as the error that C10_CUDA_KERNEL_LAUNCH_CHECK
// reads after the launch.
#pragma once

#include <dlfcn.h>
#include <elf.h>
#include <link.h>
#include <ucontext.h>

#include <cxxabi.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <c10/util/Exception.h>

// ------------------------------------------------------------------ the runtime API's types
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

typedef struct CUstream_st* cudaStream_t;

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorAssert = 710,
  cudaErrorLaunchFailure = 719,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  int maxThreadsPerBlock;
  int maxDynamicSharedSizeBytes;
};

struct cudaDeviceProp {
  char name[256];
  size_t sharedMemPerBlock;
  size_t sharedMemPerBlockOptin;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int warpSize;
};

namespace dhm_emu {

// The kernels' `extern __shared__` array in the calling thread, kDynCapacity + kCanaryBytes long
// (defined by the module, in the kernels' namespace).
unsigned char* dynamic_shared_memory();

constexpr int kWarpSize = 32;
constexpr size_t kDefaultSharedLimit = 48u << 10;  // without cudaFuncSetAttribute
constexpr size_t kDynCapacity = 256u << 10;        // above every emulated opt-in limit
constexpr size_t kCanaryBytes = 4u << 10;          // checked after every block
constexpr unsigned char kPoison = 0xff;            // a NaN in every float width
constexpr unsigned char kCanary = 0xa5;
constexpr size_t kStackBytes = 128u << 10;

enum class Order { kForward, kReverse, kRandom };
enum class Op { kNone, kSyncThreads, kSyncWarp, kShfl, kShflUp, kShflDown, kShflXor };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kSyncThreads: return "__syncthreads";
    case Op::kSyncWarp: return "__syncwarp";
    case Op::kShfl: return "__shfl_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    default: return "running";
  }
}

// ------------------------------------------------------------------ fiber contexts
// A switch saves the callee-saved registers and the FP control words and swaps stacks, with no
// system call (swapcontext sets the signal mask on every switch; this made a block-per-row launch
// ~1.3x faster end to end, measured). Elsewhere than x86-64, ucontext.
#if defined(__x86_64__)
extern "C" void dhm_emu_switch(void** save_sp, void* load_sp);
asm(R"(
  .text
  .p2align 4
  .globl dhm_emu_switch
  .hidden dhm_emu_switch
  .type dhm_emu_switch, @function
dhm_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size dhm_emu_switch, .-dhm_emu_switch
)");

struct Context {
  void* sp = nullptr;
};

inline void switch_context(Context& from, Context& to) { dhm_emu_switch(&from.sp, to.sp); }

// A fresh context that starts in entry() on `stack` (entry must never return).
inline void make_context(Context& c, std::vector<char>& stack, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack.data() + stack.size()) & ~uintptr_t(15);
  auto* slot = reinterpret_cast<uint64_t*>(top - 16);  // return address: entry sees rsp = 8 mod 16
  slot[0] = reinterpret_cast<uint64_t>(entry);
  uint64_t* sp = slot - 7;  // control words, r15, r14, r13, r12, rbx, rbp
  std::memset(sp, 0, 7 * sizeof(uint64_t));
  const uint32_t mxcsr = 0x1f80;  // round to nearest, all exceptions masked
  const uint16_t fpucw = 0x037f;
  std::memcpy(sp, &mxcsr, sizeof(mxcsr));
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpucw, sizeof(fpucw));
  c.sp = sp;
}
#else
struct Context {
  ucontext_t uc;
};

inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }

inline void make_context(Context& c, std::vector<char>& stack, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack.data();
  c.uc.uc_stack.ss_size = stack.size();
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

struct Site {
  const char* file = nullptr;
  int line = 0;
  bool operator==(const Site& o) const { return line == o.line && std::strcmp(file, o.file) == 0; }
  std::string str() const {
    const char* slash = std::strrchr(file, '/');
    return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
  }
};

struct Fiber {
  Context ctx;
  std::vector<char> stack;
  dim3 tid;
  int linear = 0;
  bool exited = false;
  Op waiting = Op::kNone;  // the barrier or warp operation it is blocked in
  Site site;
  unsigned mask = 0;
  uint64_t value = 0;  // a shuffle's operand, as bits
  int arg = 0;         // srcLane / delta / laneMask
  int width = kWarpSize;
  uint64_t result = 0;
};

// Everything about the launch in progress (one at a time; blocks run one after another).
struct State {
  cudaDeviceProp prop{};
  Order order = Order::kForward;
  uint64_t seed = 0;
  std::mt19937_64 rng;
  dim3 grid, block, block_idx;
  std::vector<Fiber> fibers;
  Context scheduler;
  Fiber* current = nullptr;
  std::function<void()> body;  // the kernel call with its parameters
  std::string error;           // the first fault of this launch
  cudaError_t error_code = cudaSuccess;
  cudaError_t last_error = cudaSuccess;  // what cudaGetLastError returns
  std::string last_message;
  std::map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute
  unsigned char* dyn_smem = nullptr;            // the kernels' `extern __shared__` array
  struct Launch {
    std::string kernel;
    dim3 grid, block;
    size_t dynamic_smem, static_smem;
  };
  std::vector<Launch> launches;
};

inline State& state() {
  static State s;
  return s;
}

// ------------------------------------------------------------------ the kernels' static __shared__
// The kernels' `__shared__` variables are block-scope thread_locals (static storage), so every fiber
// of the OS thread sees one copy: a block's shared memory. Their names and sizes are read from this
// library's symbol table (a function's static local is "_ZZ" + its encoding + "E" + name), so
// that a launch can report the kernel's static size and poison its variables before each block.
struct SharedVar {
  void* addr;
  size_t size;
};
struct KernelInfo {
  std::string name;  // mangled
  std::vector<SharedVar> shared;
  size_t static_bytes = 0;
};

struct SymbolTable {
  std::map<uintptr_t, std::string> functions;            // load address -> mangled name
  std::vector<std::pair<std::string, Elf64_Sym>> tls;    // thread-local objects
  uintptr_t base = 0;
};

inline int find_module(struct dl_phdr_info* info, size_t, void* data) {
  auto* want = static_cast<std::pair<uintptr_t, dl_phdr_info>*>(data);
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    const auto& ph = info->dlpi_phdr[i];
    const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
    if (ph.p_type == PT_LOAD && want->first >= lo && want->first < lo + ph.p_memsz) {
      want->second = *info;
      return 1;
    }
  }
  return 0;
}

// This library's dl_phdr_info (found through the address of a function in it).
inline dl_phdr_info this_module() {
  std::pair<uintptr_t, dl_phdr_info> want{reinterpret_cast<uintptr_t>(&find_module), {}};
  TORCH_CHECK(dl_iterate_phdr(find_module, &want) == 1, "cuda_emu: cannot find its own module");
  return want.second;
}

inline const SymbolTable& symbols() {
  static const SymbolTable table = [] {
    SymbolTable t;
    const dl_phdr_info mod = this_module();
    Dl_info dl{};
    TORCH_CHECK(dladdr(reinterpret_cast<void*>(&find_module), &dl) != 0, "cuda_emu: dladdr failed");
    t.base = mod.dlpi_addr;
    std::ifstream in(dl.dli_fname, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    TORCH_CHECK(bytes.size() > sizeof(Elf64_Ehdr), "cuda_emu: cannot read ", dl.dli_fname);
    const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(bytes.data());
    const auto* sh = reinterpret_cast<const Elf64_Shdr*>(bytes.data() + eh->e_shoff);
    for (int s = 0; s < eh->e_shnum; ++s) {
      if (sh[s].sh_type != SHT_SYMTAB) continue;
      const char* names = bytes.data() + sh[sh[s].sh_link].sh_offset;
      const auto* sym = reinterpret_cast<const Elf64_Sym*>(bytes.data() + sh[s].sh_offset);
      const size_t count = sh[s].sh_size / sizeof(Elf64_Sym);
      for (size_t i = 0; i < count; ++i) {
        const int type = ELF64_ST_TYPE(sym[i].st_info);
        if (sym[i].st_shndx == SHN_UNDEF) continue;
        if (type == STT_FUNC) t.functions[t.base + sym[i].st_value] = names + sym[i].st_name;
        if (type == STT_TLS) t.tls.emplace_back(names + sym[i].st_name, sym[i]);
      }
    }
    TORCH_CHECK(!t.functions.empty(), "cuda_emu: ", dl.dli_fname, " has no symbol table (stripped?)");
    return t;
  }();
  return table;
}

inline const KernelInfo& kernel_info(const void* fn) {
  static std::map<const void*, KernelInfo> cache;
  auto it = cache.find(fn);
  if (it != cache.end()) return it->second;
  const SymbolTable& t = symbols();
  auto f = t.functions.find(reinterpret_cast<uintptr_t>(fn));
  TORCH_CHECK(f != t.functions.end(), "cuda_emu: a launched kernel is not in the symbol table");
  KernelInfo info;
  info.name = f->second;
  // The calling thread's block of this module's thread-local storage (allocated: s_dyn was touched).
  const dl_phdr_info mod = this_module();
  auto* tls = static_cast<unsigned char*>(mod.dlpi_tls_data);
  TORCH_CHECK(tls != nullptr, "cuda_emu: the module's thread-local block is not allocated");
  const std::string prefix = "_ZZ" + info.name.substr(2) + "E";
  for (const auto& [name, sym] : t.tls) {
    if (name.compare(0, prefix.size(), prefix) != 0) continue;
    info.shared.push_back({tls + sym.st_value, sym.st_size});
    const size_t align = sym.st_size >= 16 ? 16 : 8;
    info.static_bytes = (info.static_bytes + align - 1) / align * align + sym.st_size;
  }
  return cache.emplace(fn, std::move(info)).first->second;
}

// ------------------------------------------------------------------ faults
// A fault ends the block: the fiber that found it switches back to the scheduler for good, and the
// launch reports it. Its fiber stack is abandoned (kernel frames hold only trivially destructible data).
[[noreturn]] inline void fault(cudaError_t code, const std::string& what) {
  State& s = state();
  if (s.error.empty()) {
    s.error = what;
    s.error_code = code;
  }
  if (s.current != nullptr) {
    Fiber* f = s.current;
    f->exited = true;
    s.current = nullptr;
    switch_context(f->ctx, s.scheduler);
  }
  throw std::logic_error("cuda_emu: unreachable");  // only the scheduler calls this outside a fiber
}

inline std::string thread_name(const Fiber& f) {
  std::ostringstream o;
  o << "thread " << f.linear << " (block " << state().block_idx.x << ")";
  return o.str();
}

// "threads 0-15, 32" from a sorted list.
inline std::string ranges(const std::vector<int>& ids) {
  std::ostringstream o;
  for (size_t i = 0; i < ids.size();) {
    size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    o << (i ? ", " : "") << ids[i];
    if (j > i) o << "-" << ids[j];
    i = j + 1;
  }
  return o.str();
}

// ------------------------------------------------------------------ scheduling
inline void yield_to_scheduler() {
  State& s = state();
  Fiber* f = s.current;
  s.current = nullptr;
  switch_context(f->ctx, s.scheduler);
  // resumed by the scheduler (which set s.current)
}

inline void fiber_main() {
  State& s = state();
  s.body();
  s.current->exited = true;
  Fiber* f = s.current;
  s.current = nullptr;
  switch_context(f->ctx, s.scheduler);
}

inline int threads_in_block() { return static_cast<int>(state().block.x * state().block.y * state().block.z); }

inline std::string hex(unsigned v) {
  std::ostringstream o;
  o << "0x" << std::hex << v;
  return o.str();
}

// Which lane a shuffle reads (PTX shfl.sync: the lane, the clamp and the segment mask from width).
inline int shuffle_source(Op op, int lane, int arg, int width) {
  const unsigned segmask = static_cast<unsigned>(kWarpSize - width) & 31u;
  const unsigned clamp = op == Op::kShflUp ? 0u : 31u;
  const unsigned l = static_cast<unsigned>(lane);
  const unsigned b = static_cast<unsigned>(arg) & 31u;
  const int max_lane = static_cast<int>((l & segmask) | (clamp & ~segmask));
  const int min_lane = static_cast<int>(l & segmask);
  int j = 0;
  bool in_range = false;
  switch (op) {
    case Op::kShflUp: j = lane - static_cast<int>(b); in_range = j >= max_lane; break;
    case Op::kShflDown: j = lane + static_cast<int>(b); in_range = j <= max_lane; break;
    case Op::kShflXor: j = static_cast<int>(l ^ b); in_range = j <= max_lane; break;
    default: j = min_lane | static_cast<int>(b & ~segmask); in_range = j <= max_lane; break;
  }
  return in_range ? j : lane;
}

// The rendezvous of the warp operation fiber f waits in: released when every lane of its mask is
// there (same operation, call site and mask). Exited lanes named in a shuffle's mask are a fault; for
// __syncwarp they are left out (CUDA's rule). A lane elsewhere may still come: the deadlock check decides.
inline bool try_release_group(Fiber& f) {
  State& s = state();
  const int w = f.linear / kWarpSize;
  const int first = w * kWarpSize;
  const int lanes = std::min(kWarpSize, threads_in_block() - first);
  int members[kWarpSize];
  int count = 0;
  for (int m = 0; m < kWarpSize; ++m) {
    if (!(f.mask >> m & 1u)) continue;
    if (m >= lanes)
      fault(cudaErrorLaunchFailure, std::string(op_name(f.waiting)) + " at " + f.site.str() + ": mask " +
                                        hex(f.mask) + " names lane " + std::to_string(m) + " of warp " +
                                        std::to_string(w) + ", which does not exist (" + std::to_string(lanes) +
                                        " threads in this warp)");
    Fiber& g = s.fibers[first + m];
    if (g.exited) {
      if (f.waiting == Op::kSyncWarp) continue;
      fault(cudaErrorLaunchFailure, std::string(op_name(f.waiting)) + " at " + f.site.str() + " with mask " +
                                        hex(f.mask) + ": lane " + std::to_string(m) + " of warp " +
                                        std::to_string(w) +
                                        " has exited (every lane named in the mask must reach the shuffle)");
    }
    if (g.waiting != f.waiting || !(g.site == f.site) || g.mask != f.mask) return false;
    members[count++] = m;
  }
  if (f.waiting != Op::kSyncWarp) {
    for (int i = 0; i < count; ++i) {
      Fiber& g = s.fibers[first + members[i]];
      const int j = shuffle_source(g.waiting, members[i], g.arg, g.width);
      if (!(g.mask >> j & 1u))
        fault(cudaErrorLaunchFailure, std::string(op_name(g.waiting)) + " at " + g.site.str() + ": lane " +
                                          std::to_string(members[i]) + " of warp " + std::to_string(w) +
                                          " reads lane " + std::to_string(j) +
                                          ", which is not in the mask (its value is undefined)");
      g.result = s.fibers[first + j].value;
    }
  }
  for (int i = 0; i < count; ++i) s.fibers[first + members[i]].waiting = Op::kNone;
  return true;
}

// Every pending warp operation of warp w (after a lane exited, or when nothing can run).
inline bool try_release_warp(int w) {
  State& s = state();
  const int first = w * kWarpSize;
  const int lanes = std::min(kWarpSize, threads_in_block() - first);
  bool released = false;
  for (int l = 0; l < lanes; ++l) {
    Fiber& f = s.fibers[first + l];
    if (f.exited || f.waiting == Op::kNone || f.waiting == Op::kSyncThreads) continue;
    released = try_release_group(f) || released;
  }
  return released;
}

// Block barrier: every thread that has not exited waits in __syncthreads, at one call site.
inline bool try_release_block() {
  State& s = state();
  const Fiber* first = nullptr;
  for (Fiber& f : s.fibers) {
    if (f.exited) continue;
    if (f.waiting != Op::kSyncThreads) return false;
    if (first == nullptr) first = &f;
  }
  if (first == nullptr) return false;
  std::map<std::string, std::vector<int>> by_site;
  for (Fiber& f : s.fibers)
    if (!f.exited) by_site[f.site.str()].push_back(f.linear);
  if (by_site.size() > 1) {
    std::string msg = "divergent __syncthreads in block " + std::to_string(s.block_idx.x) + ":";
    for (auto& [site, ids] : by_site) msg += " threads " + ranges(ids) + " wait at " + site + ";";
    fault(cudaErrorLaunchFailure, msg + " every thread of the block must reach the same barrier");
  }
  for (Fiber& f : s.fibers)
    if (!f.exited) f.waiting = Op::kNone;
  return true;
}

[[noreturn]] inline void report_deadlock() {
  State& s = state();
  std::map<std::string, std::vector<int>> by_site;
  for (Fiber& f : s.fibers) {
    if (f.exited) continue;
    std::ostringstream key;
    key << op_name(f.waiting) << " at " << f.site.str();
    if (f.waiting != Op::kSyncThreads) key << " (warp " << f.linear / kWarpSize << ", mask 0x" << std::hex << f.mask << ")";
    by_site[key.str()].push_back(f.linear);
  }
  std::string msg = "deadlock in block " + std::to_string(s.block_idx.x) + ", no thread can go on:";
  for (auto& [site, ids] : by_site) msg += " threads " + ranges(ids) + " wait in " + site + ";";
  fault(cudaErrorLaunchFailure, msg);
}

inline void run_block() {
  State& s = state();
  const int n = threads_in_block();
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) order[i] = s.order == Order::kReverse ? n - 1 - i : i;
  for (;;) {
    if (s.order == Order::kRandom) std::shuffle(order.begin(), order.end(), s.rng);
    bool ran = false, alive = false;
    for (int i : order) {
      Fiber& f = s.fibers[i];
      if (f.exited) continue;
      alive = true;
      if (f.waiting != Op::kNone) continue;
      s.current = &f;
      switch_context(s.scheduler, f.ctx);
      ran = true;
      if (!s.error.empty()) return;
      // An exit may complete a __syncwarp or break a shuffle (arrivals release their own group).
      if (f.exited) try_release_warp(f.linear / kWarpSize);
      if (!s.error.empty()) return;
    }
    if (!alive) return;
    if (ran) continue;
    bool released = try_release_block();
    for (int w = 0; !released && w * kWarpSize < n; ++w) released = try_release_warp(w);
    if (!s.error.empty()) return;
    if (!released) report_deadlock();
  }
}

// Fault from the scheduler's own context (not a fiber): report_deadlock/try_release_* call fault()
// with s.current == nullptr, which throws; run_block_checked turns that into the launch's error.
inline void run_block_checked() {
  try {
    run_block();
  } catch (const std::logic_error&) {
    // the fault is recorded in state().error
  }
}

// ------------------------------------------------------------------ device-side entry points
inline Fiber& self() {
  Fiber* f = state().current;
  TORCH_CHECK(f != nullptr, "cuda_emu: device function called outside a kernel");
  return *f;
}

inline void block_until_released(Op op, Site site, unsigned mask) {
  Fiber& f = self();
  f.waiting = op;
  f.site = site;
  f.mask = mask;
  if (op != Op::kSyncThreads) {
    const int lane = f.linear % kWarpSize;
    if (!(mask >> lane & 1u))
      fault(cudaErrorLaunchFailure, std::string(op_name(op)) + " at " + site.str() + ": calling lane " +
                                        std::to_string(lane) + " is not in its mask");
    if (try_release_group(f)) return;  // the last lane to arrive goes on
  }
  yield_to_scheduler();
}

inline void syncthreads(const char* file, int line) { block_until_released(Op::kSyncThreads, {file, line}, 0); }

inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  block_until_released(Op::kSyncWarp, {file, line}, mask);
}

// The types CUDA's shuffle intrinsics are overloaded for (64-bit ones move as two 32-bit halves,
// which is the same as moving the whole value).
template <typename T>
constexpr bool kShuffleType =
    std::is_same_v<T, int> || std::is_same_v<T, unsigned> || std::is_same_v<T, long> ||
    std::is_same_v<T, unsigned long> || std::is_same_v<T, long long> ||
    std::is_same_v<T, unsigned long long> || std::is_same_v<T, float> || std::is_same_v<T, double>;

template <typename T>
T shuffle(Op op, const char* file, int line, unsigned mask, T var, int arg, int width) {
  static_assert(kShuffleType<T>, "no CUDA shuffle intrinsic takes this type");
  const bool pow2 = width >= 1 && width <= kWarpSize && (width & (width - 1)) == 0;
  if (!pow2)
    fault(cudaErrorLaunchFailure, std::string(op_name(op)) + " at " + Site{file, line}.str() +
                                      ": width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
  Fiber& f = self();
  std::memcpy(&f.value, &var, sizeof(T));
  f.arg = arg;
  f.width = width;
  block_until_released(op, {file, line}, mask);
  T out;
  std::memcpy(&out, &f.result, sizeof(T));
  return out;
}

[[noreturn]] inline void kernel_assert(const char* cond, const char* file, int line) {
  fault(cudaErrorAssert, "device-side assert triggered: `" + std::string(cond) + "` failed at " +
                             Site{file, line}.str() + " in " + thread_name(self()));
}

// ------------------------------------------------------------------ the runtime API
inline void set_error(cudaError_t code, const std::string& msg) {
  State& s = state();
  if (s.last_error == cudaSuccess) {
    s.last_error = code;
    s.last_message = msg;
  }
}

inline size_t max_dynamic(const void* fn, size_t static_bytes) {
  const auto& m = state().max_dynamic_smem;
  auto it = m.find(fn);
  return it != m.end() ? static_cast<size_t>(it->second) : kDefaultSharedLimit - static_bytes;
}

// Checks a launch as the runtime does; an empty string when it may run.
inline std::string check_config(const void* fn, const KernelInfo& info, dim3 grid, dim3 block, size_t dyn) {
  const cudaDeviceProp& p = state().prop;
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  std::ostringstream o;
  if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0)
    o << "a grid or block dimension is 0";
  else if (threads > static_cast<uint64_t>(p.maxThreadsPerBlock) || block.x > unsigned(p.maxThreadsDim[0]) ||
           block.y > unsigned(p.maxThreadsDim[1]) || block.z > unsigned(p.maxThreadsDim[2]))
    o << "block (" << block.x << ", " << block.y << ", " << block.z << ") exceeds " << p.maxThreadsPerBlock
      << " threads or the block dimension limits";
  else if (grid.x > unsigned(p.maxGridSize[0]) || grid.y > unsigned(p.maxGridSize[1]) ||
           grid.z > unsigned(p.maxGridSize[2]))
    o << "grid (" << grid.x << ", " << grid.y << ", " << grid.z << ") exceeds the grid limits";
  else if (info.static_bytes + dyn > p.sharedMemPerBlockOptin)
    o << "shared memory " << info.static_bytes << " static + " << dyn << " dynamic bytes exceeds the device's opt-in limit of "
      << p.sharedMemPerBlockOptin;
  else if (dyn > max_dynamic(fn, info.static_bytes))
    o << dyn << " bytes of dynamic shared memory (+ " << info.static_bytes << " static) above the kernel's limit of "
      << max_dynamic(fn, info.static_bytes) << " (more than 48 KiB needs cudaFuncSetAttribute("
      << "cudaFuncAttributeMaxDynamicSharedMemorySize) first)";
  return o.str();
}

inline std::string demangled(const std::string& name) {
  int status = 0;
  char* out = abi::__cxa_demangle(name.c_str(), nullptr, nullptr, &status);
  std::string text = status == 0 && out ? out : name;
  std::free(out);
  return text;
}

struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  LaunchConfig(dim3 g, dim3 b, size_t dyn = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(dyn) {}
};

inline void prepare_fibers(int n) {
  State& s = state();
  s.fibers.resize(n);  // stacks of the first n are kept from launch to launch
  for (int i = 0; i < n; ++i) {
    Fiber& f = s.fibers[i];
    if (f.stack.empty()) f.stack.resize(kStackBytes);
    f.linear = i;
    f.tid = dim3(i % s.block.x, (i / s.block.x) % s.block.y, i / (s.block.x * s.block.y));
    f.exited = false;
    f.waiting = Op::kNone;
    make_context(f.ctx, f.stack, fiber_main);
  }
}

inline void check_canary(const KernelInfo& info, size_t dyn) {
  State& s = state();
  for (size_t i = 0; i < kCanaryBytes; ++i) {
    if (s.dyn_smem[dyn + i] != kCanary) {
      if (s.error.empty()) {
        s.error = "shared-memory overrun in " + demangled(info.name) + ", block " + std::to_string(s.block_idx.x) +
                  ": byte " + std::to_string(dyn + i) + " written, past the " + std::to_string(dyn) +
                  " bytes of dynamic shared memory launched";
        s.error_code = cudaErrorLaunchFailure;
      }
      return;
    }
  }
}

// kernel<<<grid, block, smem, stream>>>(args...), rewritten by tests/cuda_emu/build.py.
template <typename... Params, typename... Args>
void launch(void (*fn)(Params...), LaunchConfig cfg, Args&&... args) {
  State& s = state();
  const KernelInfo& info = kernel_info(reinterpret_cast<const void*>(fn));
  s.launches.push_back({info.name, cfg.grid, cfg.block, cfg.smem, info.static_bytes});
  const std::string bad = check_config(reinterpret_cast<const void*>(fn), info, cfg.grid, cfg.block, cfg.smem);
  if (!bad.empty()) {
    set_error(bad.find("shared memory") != std::string::npos ? cudaErrorInvalidValue : cudaErrorInvalidConfiguration,
              "launch of " + demangled(info.name) + ": " + bad);
    return;
  }
  // Parameters are copied once, as into the kernel's parameter space.
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  s.body = [&] { std::apply(fn, params); };
  s.grid = cfg.grid;
  s.block = cfg.block;
  s.rng.seed(s.seed);
  const uint64_t blocks = uint64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) order[i] = s.order == Order::kReverse ? blocks - 1 - i : i;
  if (s.order == Order::kRandom) std::shuffle(order.begin(), order.end(), s.rng);
  for (uint64_t b : order) {
    s.block_idx = dim3(b % cfg.grid.x, (b / cfg.grid.x) % cfg.grid.y, b / (uint64_t(cfg.grid.x) * cfg.grid.y));
    for (const SharedVar& v : info.shared) std::memset(v.addr, kPoison, v.size);
    s.dyn_smem = dynamic_shared_memory();
    std::memset(s.dyn_smem, kPoison, cfg.smem);
    std::memset(s.dyn_smem + cfg.smem, kCanary, kCanaryBytes);
    prepare_fibers(static_cast<int>(cfg.block.x * cfg.block.y * cfg.block.z));
    run_block_checked();
    check_canary(info, cfg.smem);
    if (!s.error.empty()) break;
  }
  s.body = nullptr;
  if (!s.error.empty()) {
    set_error(s.error_code, demangled(info.name) + ": " + s.error);
    s.error.clear();
    s.error_code = cudaSuccess;
  }
}

template <typename T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* fn) {
  const KernelInfo& info = kernel_info(reinterpret_cast<const void*>(fn));
  attr->sharedSizeBytes = info.static_bytes;
  attr->maxThreadsPerBlock = state().prop.maxThreadsPerBlock;
  attr->maxDynamicSharedSizeBytes = static_cast<int>(max_dynamic(reinterpret_cast<const void*>(fn), info.static_bytes));
  return cudaSuccess;
}

template <typename T>
cudaError_t cudaFuncSetAttribute(T* fn, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  const KernelInfo& info = kernel_info(reinterpret_cast<const void*>(fn));
  if (value < 0 || info.static_bytes + static_cast<size_t>(value) > state().prop.sharedMemPerBlockOptin) {
    set_error(cudaErrorInvalidValue, "cudaFuncSetAttribute(" + demangled(info.name) +
                                         ", cudaFuncAttributeMaxDynamicSharedMemorySize, " + std::to_string(value) +
                                         "): above the device's opt-in limit of " +
                                         std::to_string(state().prop.sharedMemPerBlockOptin) + " bytes minus " +
                                         std::to_string(info.static_bytes) + " static");
    return cudaErrorInvalidValue;
  }
  state().max_dynamic_smem[reinterpret_cast<const void*>(fn)] = value;
  return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
  State& s = state();
  const cudaError_t e = s.last_error;
  s.last_error = cudaSuccess;
  return e;
}

inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorAssert: return "device-side assert triggered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    default: return "unknown error";
  }
}

// What C10_CUDA_CHECK does with an error: raise it (with the emulator's account of the fault).
inline void check(cudaError_t e, const char* file, int line) {
  if (e == cudaSuccess) return;
  State& s = state();
  std::string msg = s.last_message;
  s.last_message.clear();
  s.last_error = cudaSuccess;  // reported once
  TORCH_CHECK(false, "CUDA error: ", cudaGetErrorString(e), " [emulated, checked at ", Site{file, line}.str(),
              "]: ", msg);
}

}  // namespace dhm_emu

using dhm_emu::cudaFuncGetAttributes;
using dhm_emu::cudaFuncSetAttribute;
using dhm_emu::cudaGetErrorString;
using dhm_emu::cudaGetLastError;
