// The mixture kernel's two calls (mixture_passes.h) for double tensors.
#include "mixture_passes.h"

int mix_forward_f64(const MixArgs* a, int threads) { return forward_as<double>(a, threads); }
int mix_backward_f64(const MixArgs* a, int threads) { return backward_as<double>(a, threads); }
