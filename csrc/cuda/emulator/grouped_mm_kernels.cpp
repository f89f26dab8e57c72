// The kernels of csrc/cuda/grouped_mm.cu, compiled for the CUDA emulator (cuda_emulator.h).
#include "cuda/grouped_mm.cu"
