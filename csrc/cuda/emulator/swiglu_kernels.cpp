// The kernels of csrc/cuda/swiglu.cu, compiled for the CUDA emulator (cuda_emulator.h).
#include "cuda/swiglu.cu"
