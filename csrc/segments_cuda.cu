// CUDA implementations of the peft_fast_C ops (see segments.h for the semantics). Compiled
// only when torch has CUDA and nvcc is found; registered in segments.cpp.
//
// Per-operator ATen headers, not ATen/ATen.h: nvcc compiles this file several times faster.
// Deliberately simple: one atomic counting kernel; the stable sort, prefix sums and row
// gathers/scatters are ATen ops (cub radix sort, index_select, index_add) composed as in
// peft_fast/_segments.py's references, so they match those on CUDA by construction.
#include <algorithm>
#include <optional>

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/ge.h>
#include <ATen/ops/index_select.h>
#include <ATen/ops/logical_or.h>
#include <ATen/ops/lt.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "segments.h"

namespace peft_fast_C {
namespace {

// counts_full[v + 1] += 1 for every token value v (bin 0 is -1, the base model). The values
// were validated before the launch, so every bin index is in [0, n_adapters].
template <typename index_t>
__global__ void count_adapters_kernel(const index_t* __restrict__ idx,  // [T]
                                      int64_t T,
                                      unsigned long long* __restrict__ counts_full) {  // [n_adapters + 1]
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < T; t += stride) {
    atomicAdd(counts_full + (static_cast<int64_t>(idx[t]) + 1), 1ULL);
  }
}

}  // namespace

MetadataOut segment_metadata_cuda(const at::Tensor& adapter_idx, int64_t n_adapters) {
  check_segment_args(adapter_idx, n_adapters);
  const c10::cuda::CUDAGuard device_guard(adapter_idx.device());
  const at::Tensor idx = adapter_idx.contiguous();
  const int64_t T = idx.size(0);
  const auto opts = idx.options().dtype(at::kLong);

  if (T > 0) {
    // One device->host sync validates the batch (the `active` output needs one anyway); the
    // search for the first offending position runs on the error path only.
    const at::Tensor bad = at::logical_or(at::lt(idx, -1), at::ge(idx, n_adapters));
    if (bad.any().item<bool>()) {
      const int64_t pos = at::nonzero(bad).select(1, 0).select(0, 0).item<int64_t>();
      throw_adapter_out_of_range(idx.select(0, pos).item<int64_t>(), pos, n_adapters);
    }
  }

  at::Tensor counts_full = at::zeros({n_adapters + 1}, opts);
  if (T > 0) {
    constexpr int kThreads = 256;
    const int64_t blocks = std::min<int64_t>((T + kThreads - 1) / kThreads, 4096);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_INDEX_TYPES(idx.scalar_type(), "segment_metadata_cuda", [&] {
      count_adapters_kernel<index_t><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
          idx.const_data_ptr<index_t>(), T, reinterpret_cast<unsigned long long*>(counts_full.data_ptr<int64_t>()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // Stable: tokens keep their batch order inside each group; -1 (base) sorts first.
  at::Tensor order = std::get<1>(at::sort(idx, std::optional<bool>(true), /*dim=*/0, /*descending=*/false));
  at::Tensor counts = counts_full.slice(0, 1).clone();
  // starts[a] = exclusive prefix sum over [base, 0, ..., n-1] at bin a + 1.
  at::Tensor starts = at::cumsum(counts_full, 0).sub_(counts_full).slice(0, 1).clone();
  at::Tensor active = at::nonzero(counts).view({-1});
  return {order, counts, starts, active};
}

// Out-of-range rows trip a device-side assert inside index_select / index_add (as with
// torch indexing): checking them on the host would cost a sync per call.
at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& index) {
  check_gather_args(x, index);
  const c10::cuda::CUDAGuard device_guard(x.device());
  return at::index_select(x, 0, index).contiguous();
}

// The reference's formula: accumulate in fp32 for half/bf16 (index_add_ would round after
// every atomic addition), round once. Duplicate rows are summed by atomics, so their order,
// and the last bits, may vary from run to run, as for torch's index_add_ on CUDA.
at::Tensor scatter_add_rows_cuda(const at::Tensor& out, const at::Tensor& src, const at::Tensor& index) {
  check_scatter_args(out, src, index);
  const c10::cuda::CUDAGuard device_guard(out.device());
  const bool reduced = out.scalar_type() == at::kHalf || out.scalar_type() == at::kBFloat16;
  const at::ScalarType acc_type = reduced ? at::kFloat : out.scalar_type();
  at::Tensor acc = out.to(acc_type, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
  if (index.numel() > 0) acc.index_add_(0, index, src.to(acc_type));
  return reduced ? acc.to(out.scalar_type()) : acc;
}

}  // namespace peft_fast_C
