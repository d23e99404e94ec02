"""Development tools for the fused kernels, runnable on any machine and imported by nothing in
the runtime: compile_check (every kernel configuration compiled for sm_80 / sm_90, registers,
spills, tensor-core instructions) and byte_count (the bytes each launch moves, counted in Triton's
interpreter)."""
