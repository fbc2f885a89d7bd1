"""Import-only stubs for ``sgl_kernel.mamba`` (linear-attention CPU kernels); see the package docstring."""

from sgl_kernel import _make_stub

causal_conv1d_fn_cpu = _make_stub("mamba.causal_conv1d_fn_cpu")
causal_conv1d_update_cpu = _make_stub("mamba.causal_conv1d_update_cpu")
chunk_gated_delta_rule_cpu = _make_stub("mamba.chunk_gated_delta_rule_cpu")
