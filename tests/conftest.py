import os

# Triton kernels run on CPU tensors through the interpreter; it must be on before triton
# compiles (decorates) any kernel.
os.environ.setdefault("TRITON_INTERPRET", "1")
