// The CUDA emulator's operator library, smoe_ops_emu: the schemas of smoe_ops, implemented for
// CPU tensors by the CUDA glue (csrc/cuda/*_ops.cpp, built with -DSMOE_CUDA_EMULATE), whose
// kernels run on the emulator. No fake kernels or autograd: tests call the ops directly.
#include <torch/library.h>

#include "schemas.h"

TORCH_LIBRARY(smoe_ops_emu, m) { smoe::define_schemas(m); }
