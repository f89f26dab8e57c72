// The schema of every smoe_ops operator, defined once for the library smoe_ops
// (csrc/registration.cpp) and for the CUDA emulator's smoe_ops_emu
// (csrc/cuda/emulator/registration.cpp), which runs the CUDA glue on the host.
#pragma once

#include <torch/library.h>

namespace smoe {

inline void define_schemas(torch::Library& m) {
  // Routing: scores, (group-limited) top-k, renormalize, scale. num_groups = 1 disables groups.
  m.def(
      "route(Tensor logits, int k, str score, bool renormalize, Tensor? expert_bias, "
      "int num_groups, int topk_groups, float scale) -> (Tensor weights, Tensor ids, "
      "Tensor counts)");
  m.def(
      "route_backward(Tensor grad_weights, Tensor logits, Tensor ids, str score, "
      "bool renormalize, float scale) -> Tensor");

  // Routing losses: losses = [balance, z, entropy, batch_entropy], mean_probs [E].
  m.def(
      "router_losses(Tensor logits, Tensor counts, int k) -> (Tensor losses, Tensor mean_probs)");
  m.def(
      "router_losses_backward(Tensor grad_losses, Tensor logits, Tensor counts, int k, "
      "Tensor mean_probs) -> Tensor");

  // Dispatch: order [N] int32 (sorted row -> flat slot t*k+j), offsets [E+1] int64,
  // inverse [T, k] int32 (slot -> sorted row).
  m.def("dispatch(Tensor ids, int num_experts) -> (Tensor order, Tensor offsets, Tensor inverse)");
  m.def("permute(Tensor x, Tensor inverse) -> Tensor");
  m.def("unpermute(Tensor ys, Tensor inverse, Tensor? weights) -> Tensor");
  m.def(
      "unpermute_backward(Tensor grad_y, Tensor ys, Tensor inverse, Tensor? weights, "
      "bool weights_grad) -> (Tensor grad_ys, Tensor grad_weights)");

  // Grouped GEMM over the expert segments given by offsets.
  m.def("grouped_mm(Tensor x, Tensor w, Tensor offsets, Tensor? bias) -> Tensor");
  m.def(
      "grouped_mm_backward(Tensor grad_out, Tensor x, Tensor w, Tensor offsets, "
      "bool[3] output_mask) -> (Tensor grad_x, Tensor grad_w, Tensor grad_bias)");

  // Gated activation: [N, 2I] -> [N, I].
  m.def("swiglu(Tensor gate_up) -> Tensor");
  m.def("swiglu_backward(Tensor grad_out, Tensor gate_up) -> Tensor");
}

}  // namespace smoe
