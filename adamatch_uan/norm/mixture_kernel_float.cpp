// The mixture kernel's two calls (mixture_passes.h) for float tensors.
#include "mixture_passes.h"

int mix_forward_f32(const MixArgs* a, int threads) { return forward_as<float>(a, threads); }
int mix_backward_f32(const MixArgs* a, int threads) { return backward_as<float>(a, threads); }
