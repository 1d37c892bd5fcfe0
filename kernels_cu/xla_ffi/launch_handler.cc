// sparsevox's XLA FFI custom call: launch a prepared sparsevox kernel sequence on XLA's CUDA stream.
//
// Host-only C++17 (no device code), built into sparsevox/_lib/libsparsevox_xla_ffi.so by
// `python -m sparsevox build-ffi` (sparsevox/cuda/ffi_build.py) against XLA's FFI headers
// (jax.ffi.include_dir()) and cuda.h for the driver types only. The driver itself (cuLaunchKernel) is
// resolved at the first launch with dlopen("libcuda.so.1"), so the library builds and loads on a
// machine without a GPU or driver.
//
// The launch table. Python prepares a launch once (sparsevox.algorithms.implicit_gemm.Launch: the
// CUfunctions CuPy loaded, their grid/block/shared memory and argument lists) and registers it here
// under an int64 id with sparsevox_ffi_register_launch. Each step's kernel parameters are a template:
// the packed bytes of every fixed argument (scalars, addresses of the kernel map's tables), plus slots
// naming which parameter receives the address of which XLA buffer (inputs 0..n_args-1, then outputs
// n_args..n_args+n_rets-1). The handler copies the template, writes the buffer addresses into the slots
// and calls cuLaunchKernel for each step, in order, on XLA's stream.
//
// Every failure (unknown id, wrong buffer count or size, misaligned buffer, wrong device, null stream,
// no driver, a driver error) is an ffi::Error with a message, never a crash. The same checks are
// exported as C functions (sparsevox_ffi_check, sparsevox_ffi_pack) and as a CPU-platform handler that
// does everything but the launch (sparsevox_launch_dryrun), so they are tested without a GPU.

#include <dlfcn.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <sstream>
#include <string>
#include <vector>

#ifdef SPARSEVOX_NO_CUDA_H  // the driver types this file uses, when no CUDA toolkit is installed
typedef int CUresult;
typedef struct CUfunc_st* CUfunction;
typedef struct CUstream_st* CUstream;
#define CUDA_SUCCESS 0
#else
#include <cuda.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

#define SV_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kAbiVersion = 2;

struct Step {
  CUfunction func = nullptr;
  unsigned grid[3] = {1, 1, 1};
  unsigned block[3] = {1, 1, 1};
  unsigned smem = 0;
  std::vector<uint8_t> params;        // the packed template (slots zero)
  std::vector<uint32_t> offsets;      // offset of each kernel parameter in `params`
  std::vector<uint32_t> slot_param;   // parameter index that receives ...
  std::vector<int32_t> slot_buffer;   // ... the address of this buffer (args, then rets)
};

struct Entry {
  int n_args = 0, n_rets = 0, device = -1;
  uint32_t align = 1;                 // every buffer address must be a multiple of this
  std::vector<uint64_t> bytes;        // expected size of each buffer (0: unchecked)
  std::vector<Step> steps;
};

std::shared_mutex table_mutex;
std::map<int64_t, std::shared_ptr<const Entry>> table;

std::shared_ptr<const Entry> find(int64_t id) {
  std::shared_lock<std::shared_mutex> lock(table_mutex);
  auto it = table.find(id);
  return it == table.end() ? nullptr : it->second;
}

// "" when the call may go ahead; else what is wrong, for the user.
std::string check_counts(int64_t id, const Entry* e, size_t n_args, size_t n_rets) {
  std::ostringstream m;
  if (e == nullptr) {
    m << "sparsevox_launch: unknown launch_id " << id
      << " (not registered in this process, or forgotten when its kernel map was freed; "
         "re-trace the function so the launch is prepared again)";
  } else if (n_args != size_t(e->n_args) || n_rets != size_t(e->n_rets)) {
    m << "sparsevox_launch: launch_id " << id << " takes " << e->n_args << " input and " << e->n_rets
      << " output buffers, got " << n_args << " and " << n_rets;
  }
  return m.str();
}

std::string check_buffers(int64_t id, const Entry& e, const std::vector<uint64_t>& addr,
                          const std::vector<uint64_t>& size) {
  for (size_t i = 0; i < addr.size(); ++i) {
    const char* what = int(i) < e.n_args ? "input" : "output";
    size_t k = int(i) < e.n_args ? i : i - e.n_args;
    std::ostringstream m;
    if (e.bytes[i] && size[i] != e.bytes[i]) {
      m << "sparsevox_launch: launch_id " << id << ": " << what << " " << k << " has " << size[i]
        << " bytes, the prepared launch expects " << e.bytes[i];
      return m.str();
    }
    if (e.bytes[i] && addr[i] == 0) {
      m << "sparsevox_launch: launch_id " << id << ": " << what << " " << k << " has a null address";
      return m.str();
    }
    if (addr[i] % e.align) {
      m << "sparsevox_launch: launch_id " << id << ": " << what << " " << k << " at 0x" << std::hex
        << addr[i] << std::dec << " is not " << e.align << "-byte aligned, as the prepared kernels need";
      return m.str();
    }
  }
  return "";
}

// The parameter bytes of one step with the buffer addresses written into its slots; `ptrs` gets the
// address of each parameter in `bytes` (what cuLaunchKernel's kernelParams holds).
void pack(const Step& s, const std::vector<uint64_t>& addr, std::vector<uint8_t>& bytes,
          std::vector<void*>& ptrs) {
  bytes = s.params;
  for (size_t j = 0; j < s.slot_param.size(); ++j) {
    uint64_t a = addr[s.slot_buffer[j]];
    std::memcpy(bytes.data() + s.offsets[s.slot_param[j]], &a, sizeof(a));
  }
  ptrs.resize(s.offsets.size());
  for (size_t p = 0; p < s.offsets.size(); ++p) ptrs[p] = bytes.data() + s.offsets[p];
}

// --- the driver, resolved at the first launch ------------------------------------------------------

using LaunchFn = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                              unsigned, CUstream, void**, void**);
using ErrorStringFn = CUresult (*)(CUresult, const char**);

struct Driver {
  LaunchFn launch = nullptr;
  ErrorStringFn error_string = nullptr;
  std::string error;  // why there is none
};

const Driver& driver() {
  static const Driver d = [] {
    Driver d;
    void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (h == nullptr) {
      const char* why = dlerror();
      d.error = std::string("the CUDA driver (libcuda.so.1) does not load: ") + (why ? why : "unknown");
      return d;
    }
    d.launch = reinterpret_cast<LaunchFn>(dlsym(h, "cuLaunchKernel"));
    d.error_string = reinterpret_cast<ErrorStringFn>(dlsym(h, "cuGetErrorString"));
    if (d.launch == nullptr) d.error = "libcuda.so.1 has no cuLaunchKernel";
    return d;
  }();
  return d;
}

template <typename Bufs>
ffi::Error collect(const Bufs& bufs, size_t n, std::vector<uint64_t>& addr, std::vector<uint64_t>& size) {
  for (size_t i = 0; i < n; ++i) {
    auto b = bufs.template get<ffi::AnyBuffer>(i);
    if (b.has_error()) return b.error();
    addr.push_back(reinterpret_cast<uint64_t>(b.value().untyped_data()));
    size.push_back(b.value().size_bytes());
  }
  return ffi::Error::Success();
}

template <typename Rets>
ffi::Error collect_rets(const Rets& rets, size_t n, std::vector<uint64_t>& addr, std::vector<uint64_t>& size) {
  for (size_t i = 0; i < n; ++i) {
    auto b = rets.template get<ffi::AnyBuffer>(i);
    if (b.has_error()) return b.error();
    addr.push_back(reinterpret_cast<uint64_t>((*b.value()).untyped_data()));
    size.push_back((*b.value()).size_bytes());
  }
  return ffi::Error::Success();
}

// Everything but the launch: look the id up, check the buffers, and fill `entry`, `addr`.
ffi::Error prepare(int64_t id, const ffi::RemainingArgs& args, const ffi::RemainingRets& rets,
                   std::shared_ptr<const Entry>& entry, std::vector<uint64_t>& addr) {
  entry = find(id);
  std::string why = check_counts(id, entry.get(), args.size(), rets.size());
  if (!why.empty()) return ffi::Error::InvalidArgument(why);
  std::vector<uint64_t> size;
  if (auto err = collect(args, args.size(), addr, size); err.failure()) return err;
  if (auto err = collect_rets(rets, rets.size(), addr, size); err.failure()) return err;
  why = check_buffers(id, *entry, addr, size);
  if (!why.empty()) return ffi::Error::InvalidArgument(why);
  return ffi::Error::Success();
}

ffi::Error launch_impl(CUstream stream, int32_t device, ffi::RemainingArgs args, ffi::RemainingRets rets,
                       int64_t id) {
  std::shared_ptr<const Entry> entry;
  std::vector<uint64_t> addr;
  if (auto err = prepare(id, args, rets, entry, addr); err.failure()) return err;
  if (stream == nullptr) {
    return ffi::Error::InvalidArgument("sparsevox_launch: XLA passed a null CUDA stream (is this a CUDA "
                                       "backend?); the prepared kernels run only on XLA's own stream");
  }
  if (entry->device >= 0 && device != entry->device) {
    std::ostringstream m;
    m << "sparsevox_launch: launch_id " << id << " was prepared on GPU " << entry->device
      << " but XLA runs this call on GPU " << device << "; prepare it on that device";
    return ffi::Error::InvalidArgument(m.str());
  }
  const Driver& d = driver();
  if (d.launch == nullptr) return ffi::Error::Internal("sparsevox_launch: " + d.error);
  std::vector<uint8_t> bytes;
  std::vector<void*> ptrs;
  for (size_t i = 0; i < entry->steps.size(); ++i) {
    const Step& s = entry->steps[i];
    pack(s, addr, bytes, ptrs);
    CUresult r = d.launch(s.func, s.grid[0], s.grid[1], s.grid[2], s.block[0], s.block[1], s.block[2], s.smem,
                          stream, ptrs.data(), nullptr);
    if (r != CUDA_SUCCESS) {
      const char* text = nullptr;
      if (d.error_string) d.error_string(r, &text);
      std::ostringstream m;
      m << "sparsevox_launch: cuLaunchKernel of launch_id " << id << " step " << i << " failed: error "
        << int(r) << " (" << (text ? text : "unknown") << ")";
      return ffi::Error::Internal(m.str());
    }
  }
  return ffi::Error::Success();
}

// The CPU-platform twin: validates and packs exactly as the CUDA handler does, launches nothing, and
// leaves the packed parameters of the last call for sparsevox_ffi_last_params (tests).
std::mutex last_mutex;
std::map<int64_t, std::vector<std::vector<uint8_t>>> last_params;

ffi::Error dryrun_impl(ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t id) {
  std::shared_ptr<const Entry> entry;
  std::vector<uint64_t> addr;
  if (auto err = prepare(id, args, rets, entry, addr); err.failure()) return err;
  std::vector<std::vector<uint8_t>> packed;
  std::vector<void*> ptrs;
  for (const Step& s : entry->steps) {
    packed.emplace_back();
    pack(s, addr, packed.back(), ptrs);
  }
  std::lock_guard<std::mutex> lock(last_mutex);
  last_params[id] = std::move(packed);
  return ffi::Error::Success();
}

size_t copy_text(const std::string& s, char* out, size_t cap) {
  if (out && cap) {
    size_t n = s.size() < cap - 1 ? s.size() : cap - 1;
    std::memcpy(out, s.data(), n);
    out[n] = '\0';
  }
  return s.size();
}

}  // namespace

#pragma GCC visibility push(default)
XLA_FFI_DEFINE_HANDLER_SYMBOL(sparsevox_launch, launch_impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<CUstream>>()
                                  .Ctx<ffi::DeviceOrdinal>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attr<int64_t>("launch_id"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(sparsevox_launch_dryrun, dryrun_impl,
                              ffi::Ffi::Bind().RemainingArgs().RemainingRets().Attr<int64_t>("launch_id"));
#pragma GCC visibility pop

// --- the C interface (ctypes: sparsevox/cuda/ffi_lib.py) --------------------------------------------

struct sparsevox_ffi_step {
  void* func;                       // CUfunction, loaded in the device's primary context
  uint32_t grid[3], block[3], smem;
  const void* params;               // the packed template
  uint32_t params_size;
  uint32_t n_params;
  const uint32_t* param_offsets;    // [n_params]
  const uint32_t* param_sizes;      // [n_params]
  uint32_t n_slots;
  const uint32_t* slot_param;       // [n_slots]: parameter index (an 8-byte parameter) ...
  const int32_t* slot_buffer;       // [n_slots]: ... receiving this buffer's address (args, then rets)
};

SV_EXPORT int sparsevox_ffi_abi_version() { return kAbiVersion; }

// Register (or replace) launch `id`. Returns 0, or -1 with the reason in `msg`.
SV_EXPORT int sparsevox_ffi_register_launch(int64_t id, int32_t n_args, int32_t n_rets, int32_t device,
                                            uint32_t align, const uint64_t* buffer_bytes, int32_t n_steps,
                                            const sparsevox_ffi_step* steps, char* msg, size_t msg_cap) {
  auto fail = [&](const std::string& why) {
    copy_text("sparsevox_ffi_register_launch(" + std::to_string(id) + "): " + why, msg, msg_cap);
    return -1;
  };
  if (n_args < 0 || n_rets < 0 || n_steps < 1 || (n_steps && steps == nullptr)) {
    return fail("needs n_args, n_rets >= 0 and at least one step");
  }
  if (align == 0 || (align & (align - 1))) return fail("align must be a power of two");
  auto e = std::make_shared<Entry>();
  e->n_args = n_args;
  e->n_rets = n_rets;
  e->device = device;
  e->align = align;
  e->bytes.assign(size_t(n_args + n_rets), 0);
  if (buffer_bytes) e->bytes.assign(buffer_bytes, buffer_bytes + n_args + n_rets);
  for (int32_t i = 0; i < n_steps; ++i) {
    const sparsevox_ffi_step& in = steps[i];
    Step s;
    s.func = static_cast<CUfunction>(in.func);
    for (int k = 0; k < 3; ++k) {
      if (in.grid[k] == 0 || in.block[k] == 0) return fail("grid and block dimensions must be >= 1");
      s.grid[k] = in.grid[k];
      s.block[k] = in.block[k];
    }
    s.smem = in.smem;
    const uint8_t* p = static_cast<const uint8_t*>(in.params);
    s.params.assign(p, p + in.params_size);
    s.offsets.assign(in.param_offsets, in.param_offsets + in.n_params);
    for (uint32_t p = 0; p < in.n_params; ++p) {
      if (uint64_t(s.offsets[p]) + in.param_sizes[p] > in.params_size || in.param_sizes[p] == 0) {
        return fail("parameter " + std::to_string(p) + " lies outside the parameter bytes");
      }
    }
    for (uint32_t j = 0; j < in.n_slots; ++j) {
      uint32_t par = in.slot_param[j];
      int32_t buf = in.slot_buffer[j];
      if (par >= in.n_params || in.param_sizes[par] != 8) {
        return fail("slot " + std::to_string(j) + " names parameter " + std::to_string(par) +
                    ", which is not an 8-byte parameter of the step");
      }
      if (buf < 0 || buf >= n_args + n_rets) {
        return fail("slot " + std::to_string(j) + " names buffer " + std::to_string(buf) + " of " +
                    std::to_string(n_args + n_rets));
      }
      s.slot_param.push_back(par);
      s.slot_buffer.push_back(buf);
    }
    e->steps.push_back(std::move(s));
  }
  std::unique_lock<std::shared_mutex> lock(table_mutex);
  table[id] = std::move(e);
  return 0;
}

// Forget launch `id` (a call that still names it then fails cleanly). Returns 1 if it was registered.
SV_EXPORT int sparsevox_ffi_forget_launch(int64_t id) {
  {
    std::lock_guard<std::mutex> lock(last_mutex);
    last_params.erase(id);
  }
  std::unique_lock<std::shared_mutex> lock(table_mutex);
  return int(table.erase(id));
}

SV_EXPORT int64_t sparsevox_ffi_launch_count() {
  std::shared_lock<std::shared_mutex> lock(table_mutex);
  return int64_t(table.size());
}

// The handler's id and count checks: 0 when a call with these counts would go ahead, else 1 and the
// message the handler would return in `msg`.
SV_EXPORT int sparsevox_ffi_check(int64_t id, int32_t n_args, int32_t n_rets, char* msg, size_t msg_cap) {
  auto e = find(id);
  std::string why = check_counts(id, e.get(), size_t(n_args < 0 ? 0 : n_args), size_t(n_rets < 0 ? 0 : n_rets));
  copy_text(why, msg, msg_cap);
  return why.empty() ? 0 : 1;
}

// Every check of the handler on these buffers (addresses and byte sizes, args then rets), then the
// packed parameter bytes of step `step` into `out`. Returns the byte count, or -1 with `msg` set.
SV_EXPORT int64_t sparsevox_ffi_pack(int64_t id, int32_t step, const uint64_t* addr, const uint64_t* size,
                                     int32_t n_args, int32_t n_rets, void* out, size_t cap, char* msg,
                                     size_t msg_cap) {
  auto e = find(id);
  std::string why = check_counts(id, e.get(), size_t(n_args < 0 ? 0 : n_args), size_t(n_rets < 0 ? 0 : n_rets));
  std::vector<uint64_t> a(addr, addr + (n_args + n_rets)), s(size, size + (n_args + n_rets));
  if (why.empty()) why = check_buffers(id, *e, a, s);
  if (why.empty() && (step < 0 || size_t(step) >= e->steps.size())) {
    why = "launch_id " + std::to_string(id) + " has " + std::to_string(e->steps.size()) + " steps, asked for " +
          std::to_string(step);
  }
  if (!why.empty()) {
    copy_text(why, msg, msg_cap);
    return -1;
  }
  std::vector<uint8_t> bytes;
  std::vector<void*> ptrs;
  pack(e->steps[step], a, bytes, ptrs);
  if (out && cap >= bytes.size()) std::memcpy(out, bytes.data(), bytes.size());
  return int64_t(bytes.size());
}

// The packed parameters of step `step` in the last sparsevox_launch_dryrun call of `id`: byte count
// (copied into `out` when it fits), or -1 when there is none.
SV_EXPORT int64_t sparsevox_ffi_last_params(int64_t id, int32_t step, void* out, size_t cap) {
  std::lock_guard<std::mutex> lock(last_mutex);
  auto it = last_params.find(id);
  if (it == last_params.end() || step < 0 || size_t(step) >= it->second.size()) return -1;
  const auto& b = it->second[step];
  if (out && cap >= b.size()) std::memcpy(out, b.data(), b.size());
  return int64_t(b.size());
}

// Whether the CUDA driver resolves here (loads libcuda.so.1 on the first call): 1, or 0 with the reason.
SV_EXPORT int sparsevox_ffi_driver_available(char* msg, size_t msg_cap) {
  const Driver& d = driver();
  copy_text(d.error, msg, msg_cap);
  return d.launch != nullptr;
}
