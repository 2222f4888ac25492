// float32 matmuls for XLA:CPU programs through OpenBLAS: an XLA FFI handler (see cpu_gemm.py).
//
// y[g] = x[g] @ w[g] (or @ w[0] for every g): x (G, M, K), w (G or 1, K, N), y (G, M, N), all
// row-major float32. OpenBLAS runs single-threaded; the handler splits the output columns into
// chunks over XLA's own intra-op thread pool, so that one set of threads does all of a program's
// work (OpenBLAS's own pool would spin beside XLA's between calls).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Columns per chunk are a multiple of this (whole vector registers of OpenBLAS's kernels), and a
// matmul is split only where each part gets at least kMinColumns.
constexpr int64_t kColumnAlign = 16;
constexpr int64_t kMinColumns = 64;

class Countdown {
 public:
  explicit Countdown(int64_t n) : left_(n) {}
  void Done() {
    std::lock_guard<std::mutex> lock(mu_);
    if (--left_ == 0) cv_.notify_all();
  }
  void Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return left_ == 0; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int64_t left_;
};

ffi::Error Sgemm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                 ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 3 || wd.size() != 3 || yd.size() != 3) {
    return ffi::Error::InvalidArgument("var_jax_cpu_sgemm takes rank-3 operands (G, M, K), (G or 1, K, N)");
  }
  const int64_t G = xd[0], M = xd[1], K = xd[2], Gw = wd[0], N = wd[2];
  if (wd[1] != K || (Gw != 1 && Gw != G) || yd[0] != G || yd[1] != M || yd[2] != N) {
    return ffi::Error::InvalidArgument("var_jax_cpu_sgemm: operand shapes do not match");
  }
  if (M == 0 || N == 0 || G == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  if (K == 0) {
    std::fill(yp, yp + G * M * N, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t parts = std::min<int64_t>(threads, std::max<int64_t>(1, N / kMinColumns));
  const int64_t step = ((N + parts - 1) / parts + kColumnAlign - 1) / kColumnAlign * kColumnAlign;
  parts = (N + step - 1) / step;
  auto run = [=](int64_t part) {
    const int64_t n0 = part * step, n = std::min(step, N - n0);
    for (int64_t g = 0; g < G; ++g) {
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, n, K, 1.0f, xp + g * M * K,
                        K, wp + (Gw == 1 ? 0 : g * K * N) + n0, N, 0.0f, yp + g * M * N + n0, N);
    }
  };
  if (parts == 1) {
    run(0);
    return ffi::Error::Success();
  }
  // Chunks are claimed from a counter, and the caller claims too: it never waits on a chunk that
  // is still queued behind it (the caller may itself be one of the pool's threads).
  struct Shared {
    explicit Shared(int64_t n) : done(n) {}
    std::atomic<int64_t> next{0};
    Countdown done;
  };
  auto shared = std::make_shared<Shared>(parts);
  auto drain = [shared, run, parts] {
    for (int64_t p; (p = shared->next.fetch_add(1)) < parts;) {
      run(p);
      shared->done.Done();
    }
  };
  for (int64_t p = 1; p < parts; ++p) {
    auto task = drain;
    pool.Schedule(std::move(task));
  }
  drain();
  shared->done.Wait();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VarJaxCpuSgemm, Sgemm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// OpenBLAS's own threads off: the handler parallelises over XLA's pool instead.
extern "C" void VarJaxCpuGemmInit() { scipy_openblas_set_num_threads(1); }
