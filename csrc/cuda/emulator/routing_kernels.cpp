// The kernels of csrc/cuda/routing.cu, compiled for the CUDA emulator (cuda_emulator.h).
#include "cuda/routing.cu"
