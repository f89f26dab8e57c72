// The kernels of csrc/cuda/dispatch.cu, compiled for the CUDA emulator (cuda_emulator.h).
#include "cuda/dispatch.cu"
