// Mixed-adapter batch ops shared by segments.cpp (CPU, Meta, registration) and
// segments_cuda.cu (CUDA kernels, compiled only when the build has CUDA torch and nvcc).
//
// Semantics (peft_fast/_segments.py holds the pure-torch references they must match):
//   segment_metadata(adapter_idx [T] int32/int64 in [-1, n), n) ->
//       order  int64 [T]   token positions stably sorted by adapter (-1 tokens first)
//       counts int64 [n]   tokens per adapter
//       starts int64 [n]   offset in `order` where each adapter's group begins
//       active int64 [A]   adapters with count > 0, ascending
//   gather_rows(x [T, K], index int64 [T']) -> x[index]  [T', K], contiguous
//   scatter_add_rows(out [T, N], src [T', N], index int64 [T']) -> copy of out with
//       out[index[i]] += src[i], in index order (duplicates accumulate)
#pragma once

#include <tuple>

#include <ATen/core/Tensor.h>

namespace peft_fast_C {

using MetadataOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Argument checks shared by every backend. They read only metadata (SymInt-aware, so the
// Meta kernels run them under torch.compile's symbolic shapes). Error types follow Python:
// TypeError for dtypes, ValueError for shapes/devices, IndexError for row indices.
void check_segment_args(const at::Tensor& adapter_idx, int64_t n_adapters);
void check_gather_args(const at::Tensor& x, const at::Tensor& index);
void check_scatter_args(const at::Tensor& out, const at::Tensor& src, const at::Tensor& index);

// Raises the ValueError for an adapter index outside [-1, n_adapters).
[[noreturn]] void throw_adapter_out_of_range(int64_t value, int64_t position, int64_t n_adapters);

#ifdef PEFT_FAST_WITH_CUDA
MetadataOut segment_metadata_cuda(const at::Tensor& adapter_idx, int64_t n_adapters);
at::Tensor gather_rows_cuda(const at::Tensor& x, const at::Tensor& index);
at::Tensor scatter_add_rows_cuda(const at::Tensor& out, const at::Tensor& src, const at::Tensor& index);
#endif

}  // namespace peft_fast_C
