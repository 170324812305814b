import os

# Triton kernels run on CPU tensors through the interpreter; it must be on before triton
# compiles (decorates) any kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Bucketing changes rounding (a stacked and a lone Newton-Schulz differ in the last bits), so
# the suite and its golden trajectories run on the default stack limits, not on limits
# measured on this machine, and write no measurement cache (matrixopt.batching).
os.environ.setdefault("MATRIXOPT_STACK_LIMITS", "default")
os.environ.setdefault("MATRIXOPT_STACK_CACHE", "off")
