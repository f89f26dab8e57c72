// Schemas of every smoe_ops operator. Backend kernels register themselves next to their code
// (TORCH_LIBRARY_IMPL in csrc/cpu/*.cpp); fake kernels and autograd formulas are registered
// in Python (smoe_ops/ops/*.py), right under the wrapper each belongs to.
//
// Conventions every kernel follows (see ../DESIGN.md):
//   ids int32, offsets int64; routing weights float32 (float64 for float64 logits);
//   accumulation in float32 for bfloat16 / float16; ties in scores go to the lower expert id.
//   Optional gradients that were not requested come back as empty tensors ([0]).
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(smoe_ops, m) { smoe::define_schemas(m); }
